package constrain

import (
	"encoding/binary"
	"slices"
)

// builder holds a nondeterministic automaton over bytes (Thompson's
// construction). States are numbered from 0; state 0 is the start and
// state 1 the accepting end.
type builder struct {
	eps0  [][]int32 // epsilon moves
	edges [][]edge
	// pending builds a lazy expression's states when the automaton first
	// reaches its state.
	pending map[int32]func()
}

type edge struct {
	lo, hi byte
	to     int32
	lit    bool // part of a literal text
}

func newBuilder() *builder {
	b := &builder{pending: map[int32]func(){}}
	b.state()
	b.state()
	return b
}

func (b *builder) state() int32 {
	b.eps0 = append(b.eps0, nil)
	b.edges = append(b.edges, nil)
	return int32(len(b.eps0) - 1)
}

func (b *builder) eps(from, to int32) { b.eps0[from] = append(b.eps0[from], to) }

func (b *builder) edge(from int32, lo, hi byte, to int32) {
	b.edges[from] = append(b.edges[from], edge{lo, hi, to, false})
}

func (b *builder) litEdge(from int32, c byte, to int32) {
	b.edges[from] = append(b.edges[from], edge{c, c, to, true})
}

const (
	nfaStart  = 0
	nfaAccept = 1
)

// closure adds to set the states reachable from it by epsilon moves,
// building lazy states on the way, and returns it sorted.
func (b *builder) closure(set []int32, seen map[int32]bool) []int32 {
	clear(seen)
	stack := append([]int32(nil), set...)
	set = set[:0]
	for len(stack) > 0 {
		s := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		if seen[s] {
			continue
		}
		seen[s] = true
		if f := b.pending[s]; f != nil {
			delete(b.pending, s)
			f()
		}
		set = append(set, s)
		stack = append(stack, b.eps0[s]...)
	}
	slices.Sort(set)
	return set
}

// The deterministic automaton is built from the nondeterministic one by
// the subset construction, lazily: a state's transitions are worked out
// when the state is first used. State 0 is the dead state.
type dfa struct {
	nfa    *builder
	states []dstate
	index  map[string]int32 // NFA state set -> state
	seen   map[int32]bool   // scratch for closure
}

type dstate struct {
	set    []int32
	accept bool
	row    *[256]int32 // nil until worked out
	litRow *[256]int32 // the same through literal edges only; nil until worked out
}

func newDFA(b *builder) *dfa {
	d := &dfa{nfa: b, index: map[string]int32{}, seen: map[int32]bool{}}
	d.states = append(d.states, dstate{row: new([256]int32), litRow: new([256]int32)}) // dead
	d.intern(b.closure([]int32{nfaStart}, d.seen))
	return d
}

// start is the first live state.
const start = 1

func setKey(set []int32) string {
	buf := make([]byte, 4*len(set))
	for i, s := range set {
		binary.LittleEndian.PutUint32(buf[4*i:], uint32(s))
	}
	return string(buf)
}

func (d *dfa) intern(set []int32) int32 {
	if len(set) == 0 {
		return 0
	}
	key := setKey(set)
	if id, ok := d.index[key]; ok {
		return id
	}
	id := int32(len(d.states))
	d.states = append(d.states, dstate{set: set, accept: slices.Contains(set, nfaAccept)})
	d.index[key] = id
	return id
}

// next returns the transitions of state s, working them out on first use.
func (d *dfa) next(s int32) *[256]int32 {
	if r := d.states[s].row; r != nil {
		return r
	}
	r := d.transitions(s, false)
	d.states[s].row = r
	return r
}

// litNext is next through the edges of literal texts only: where a
// special token may stand for its text.
func (d *dfa) litNext(s int32) *[256]int32 {
	if r := d.states[s].litRow; r != nil {
		return r
	}
	r := d.transitions(s, true)
	d.states[s].litRow = r
	return r
}

func (d *dfa) transitions(s int32, litOnly bool) *[256]int32 {
	var targets [256][]int32
	for _, n := range d.states[s].set {
		for _, e := range d.nfa.edges[n] {
			if litOnly && !e.lit {
				continue
			}
			for c := int(e.lo); c <= int(e.hi); c++ {
				targets[c] = append(targets[c], e.to)
			}
		}
	}
	row := new([256]int32)
	memo := map[string]int32{} // bytes with the same targets share the work
	for c := range targets {
		t := targets[c]
		if len(t) == 0 {
			continue
		}
		slices.Sort(t)
		t = slices.Compact(t)
		k := setKey(t)
		id, ok := memo[k]
		if !ok {
			id = d.intern(d.nfa.closure(t, d.seen))
			memo[k] = id
		}
		row[c] = id
	}
	return row
}

// walk runs text from state s; 0 means the text is not allowed.
func (d *dfa) walk(s int32, text []byte) int32 {
	for _, c := range text {
		if s == 0 {
			return 0
		}
		s = d.next(s)[c]
	}
	return s
}

// litWalk is walk through literal edges only.
func (d *dfa) litWalk(s int32, text []byte) int32 {
	for _, c := range text {
		if s == 0 {
			return 0
		}
		s = d.litNext(s)[c]
	}
	return s
}

// final reports whether s accepts and no text can follow.
func (d *dfa) final(s int32) bool {
	if !d.states[s].accept {
		return false
	}
	for _, t := range d.next(s) {
		if t != 0 {
			return false
		}
	}
	return true
}
