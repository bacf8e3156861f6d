package constrain

import (
	"errors"
	"fmt"
	"math"
	"math/bits"
	"sync"

	"github.com/mmfp4/mmfp4/sample"
)

// Grammar is a compiled Expr over a vocabulary: an automaton over bytes
// whose states are worked out as they are reached, and for each state the
// set of tokens allowed there, computed once and cached. A Grammar is
// safe for concurrent use; many constraints may share it.
type Grammar struct {
	v            *Vocab
	specials     []int32 // special tokens, checked one by one
	allowSpecial bool
	words        int // mask length in 64-bit words

	mu       sync.Mutex
	d        *dfa
	sets     []*tokenSet // per state; nil until computed
	setBytes int         // memory held by sets
}

// maxSetBytes bounds the memory of a grammar's cached token sets; past
// it they are dropped and worked out again as needed (a free JSON value
// can reach many states).
const maxSetBytes = 256 << 20

// tokenSet is a state's allowed tokens as a bitset, and as a list of
// whichever is shorter, the allowed or the refused ids, so that applying
// it costs in proportion to the smaller side.
type tokenSet struct {
	bits    []uint64
	allowed []int32 // when at most half the vocabulary is allowed
	refused []int32 // otherwise
}

// Options of Compile.
type Options struct {
	// AllowSpecial lets special tokens appear anywhere as their text.
	// Without it a special token is allowed only where its whole text is
	// part of a literal of the grammar (a tag such as "</think>"), so that
	// chat markers never end up inside a JSON string or free text.
	AllowSpecial bool
}

// Compile makes a Grammar of e over v.
func Compile(v *Vocab, e Expr, opt Options) (*Grammar, error) {
	if isNever(e) {
		return nil, errors.New("constrain: the grammar allows no output at all")
	}
	b := newBuilder()
	e.build(b, nfaStart, nfaAccept)
	g := &Grammar{v: v, d: newDFA(b), words: (len(v.tokens) + 63) / 64}
	for id, t := range v.tokens {
		if len(t) > 0 && v.special[id] && !v.isEOS[id] {
			g.specials = append(g.specials, int32(id))
		}
	}
	g.allowSpecial = opt.AllowSpecial
	return g, nil
}

// tokens returns the tokens allowed in state s, end-of-output ids included
// when s accepts. The caller holds g.mu.
func (g *Grammar) tokens(s int32) *tokenSet {
	for int(s) >= len(g.sets) {
		g.sets = append(g.sets, nil)
	}
	if ts := g.sets[s]; ts != nil {
		return ts
	}
	m := make([]uint64, g.words)
	set := func(id int32) { m[id>>6] |= 1 << (id & 63) }
	// Walk the trie depth first; a refused prefix skips its subtree.
	t := g.v.trie
	st := make([]int32, t.max+1)
	st[0] = s
	for n := int32(1); n < int32(len(t.label)); {
		d := t.depth[n]
		next := g.d.next(st[d-1])[t.label[n]]
		if next == 0 {
			n += t.size[n]
			continue
		}
		st[d] = next
		if f := t.first[n]; f >= 0 {
			for _, id := range t.ids[f : f+int32(t.count[n])] {
				set(id)
			}
		}
		n++
	}
	for _, id := range g.specials {
		if g.special(s, id) != 0 {
			set(id)
		}
	}
	if g.d.states[s].accept {
		for _, id := range g.v.eos {
			set(id)
		}
	}
	ts := &tokenSet{bits: m}
	count := 0
	for _, w := range m {
		count += bits.OnesCount64(w)
	}
	size := len(g.v.tokens)
	for id := range size {
		on := m[id>>6]>>(id&63)&1 == 1
		switch {
		case 2*count <= size && on:
			ts.allowed = append(ts.allowed, int32(id))
		case 2*count > size && !on:
			ts.refused = append(ts.refused, int32(id))
		}
	}
	if 2*count <= size && ts.allowed == nil {
		ts.allowed = []int32{} // nothing allowed (cannot happen in a live state)
	}
	n := 8*len(m) + 4*len(ts.allowed) + 4*len(ts.refused)
	if g.setBytes+n > maxSetBytes {
		clear(g.sets)
		g.setBytes = 0
	}
	g.setBytes += n
	g.sets[s] = ts
	return ts
}

// special is where special token id leads from state s (0: refused).
func (g *Grammar) special(s, id int32) int32 {
	if g.allowSpecial {
		return g.d.walk(s, g.v.tokens[id])
	}
	return g.d.litWalk(s, g.v.tokens[id])
}

// Precompute works out states and their token sets ahead of use, breadth
// first from the start, up to limit states; it returns how many states
// have token sets. Run it in the background after Compile to keep the
// first uses of a grammar off the critical path: it takes the grammar's
// lock for one state at a time, so constraints in use wait at most that
// long.
func (g *Grammar) Precompute(limit int) int {
	queue := []int32{start}
	seen := map[int32]bool{start: true}
	done := 0
	for len(queue) > 0 && done < limit {
		s := queue[0]
		queue = queue[1:]
		g.mu.Lock()
		g.tokens(s)
		row := *g.d.next(s)
		g.mu.Unlock()
		done++
		for _, t := range row {
			if t != 0 && !seen[t] {
				seen[t] = true
				queue = append(queue, t)
			}
		}
	}
	return done
}

// States is how many automaton states have been worked out so far.
func (g *Grammar) States() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.d.states) - 1
}

// Constraint follows one generation through a Grammar. Not safe for
// concurrent use (one per sequence).
type Constraint struct {
	g     *Grammar
	state int32
	ended bool
	sub   []float32 // scratch for Mask and Sample
}

// Start begins a constrained output.
func (g *Grammar) Start() *Constraint { return &Constraint{g: g, state: start} }

// Allowed returns the set of allowed token ids as a bitset (bit id%64 of
// word id/64); end-of-output ids are in it when the output may end here.
// The slice is shared: do not modify it.
func (c *Constraint) Allowed() []uint64 {
	if c.ended {
		return make([]uint64, c.g.words)
	}
	return c.set().bits
}

func (c *Constraint) set() *tokenSet {
	c.g.mu.Lock()
	defer c.g.mu.Unlock()
	return c.g.tokens(c.state)
}

// Masked is the logit given to refused tokens: the lowest finite float32,
// since samplers reject infinities. Its probability is exactly zero.
const Masked = -math.MaxFloat32

// Mask sets the logits of refused tokens to Masked. Ids past the
// vocabulary (padding rows of the output layer) are refused.
func (c *Constraint) Mask(logits []float32) {
	if c.ended {
		for i := range logits {
			logits[i] = Masked
		}
		return
	}
	ts := c.set()
	size := len(c.g.v.tokens)
	if ts.allowed == nil {
		for _, id := range ts.refused {
			if int(id) < len(logits) {
				logits[id] = Masked
			}
		}
		for i := size; i < len(logits); i++ {
			logits[i] = Masked
		}
		return
	}
	// Few allowed: keep their logits, fill the row, put them back.
	if cap(c.sub) < len(ts.allowed) {
		c.sub = make([]float32, len(ts.allowed))
	}
	keep := c.sub[:len(ts.allowed)]
	for i, id := range ts.allowed {
		if int(id) < len(logits) {
			keep[i] = logits[id]
		}
	}
	fillMasked(logits)
	for i, id := range ts.allowed {
		if int(id) < len(logits) {
			logits[id] = keep[i]
		}
	}
}

// fillMasked sets every entry to Masked, by doubling copies.
func fillMasked(x []float32) {
	if len(x) == 0 {
		return
	}
	x[0] = Masked
	for n := 1; n < len(x); n *= 2 {
		copy(x[n:], x[:n])
	}
}

// Sample draws the next token from logits with s, among the allowed
// tokens only. It gives the same distribution as Mask followed by
// s.Sample, and when few tokens are allowed it looks at those alone
// instead of the whole row. logits may be modified.
func (c *Constraint) Sample(s *sample.Sampler, logits []float32) (int, error) {
	if c.ended {
		return 0, errors.New("constrain: the output has already ended")
	}
	ts := c.set()
	if ts.allowed == nil {
		c.Mask(logits)
		return s.Sample(logits)
	}
	if len(ts.allowed) == 0 {
		return 0, errors.New("constrain: no token is allowed here")
	}
	if cap(c.sub) < len(ts.allowed) {
		c.sub = make([]float32, len(ts.allowed))
	}
	sub := c.sub[:len(ts.allowed)]
	for i, id := range ts.allowed {
		if int(id) >= len(logits) {
			return 0, fmt.Errorf("constrain: %d logits for a vocabulary of %d tokens", len(logits), len(c.g.v.tokens))
		}
		sub[i] = logits[id]
	}
	j, err := s.Sample(sub)
	if err != nil {
		return 0, err
	}
	return int(ts.allowed[j]), nil
}

// Advance moves past the token id that was generated. It fails if the
// token was not allowed.
func (c *Constraint) Advance(id int) error {
	g := c.g
	if c.ended {
		return errors.New("constrain: the output has already ended")
	}
	if id < 0 || id >= len(g.v.tokens) {
		return fmt.Errorf("constrain: token id %d is outside the vocabulary (%d ids)", id, len(g.v.tokens))
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.v.isEOS[id] {
		if !g.d.states[c.state].accept {
			return fmt.Errorf("constrain: end of output (token %d) before the output is complete", id)
		}
		c.ended = true
		return nil
	}
	var next int32
	if g.v.special[id] {
		next = g.special(c.state, int32(id))
	} else {
		next = g.d.walk(c.state, g.v.tokens[id])
	}
	if next == 0 || len(g.v.tokens[id]) == 0 {
		return fmt.Errorf("constrain: token %d (%q) is not allowed here", id, g.v.tokens[id])
	}
	c.state = next
	return nil
}

// CanEnd reports whether the output may end here.
func (c *Constraint) CanEnd() bool {
	c.g.mu.Lock()
	defer c.g.mu.Unlock()
	return c.ended || c.g.d.states[c.state].accept
}

// Done reports whether the output is complete: it ended, or nothing but
// its end may follow.
func (c *Constraint) Done() bool {
	if c.ended {
		return true
	}
	c.g.mu.Lock()
	defer c.g.mu.Unlock()
	return c.g.d.final(c.state)
}
