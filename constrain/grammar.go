package constrain

import (
	"errors"
	"fmt"
	"math"
	"math/bits"
	"sync"
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

	mu    sync.Mutex
	d     *dfa
	masks [][]uint64 // per state; nil until computed
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

// mask returns the tokens allowed in state s, end-of-output ids included
// when s accepts. The caller holds g.mu.
func (g *Grammar) mask(s int32) []uint64 {
	for int(s) >= len(g.masks) {
		g.masks = append(g.masks, nil)
	}
	if m := g.masks[s]; m != nil {
		return m
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
	g.masks[s] = m
	return m
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
// first uses of a grammar off the critical path.
func (g *Grammar) Precompute(limit int) int {
	g.mu.Lock()
	defer g.mu.Unlock()
	queue := []int32{start}
	seen := map[int32]bool{start: true}
	done := 0
	for len(queue) > 0 && done < limit {
		s := queue[0]
		queue = queue[1:]
		g.mask(s)
		done++
		for _, t := range g.d.next(s) {
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
	c.g.mu.Lock()
	defer c.g.mu.Unlock()
	return c.g.mask(c.state)
}

// Masked is the logit given to refused tokens: the lowest finite float32,
// since samplers reject infinities. Its probability is exactly zero.
const Masked = -math.MaxFloat32

// Mask sets the logits of refused tokens to Masked. Ids past the
// vocabulary (padding rows of the output layer) are refused.
func (c *Constraint) Mask(logits []float32) {
	m := c.Allowed()
	n := min(len(logits), len(m)*64)
	for w := 0; w*64 < n; w++ {
		refused := ^m[w]
		if w*64+64 > n {
			refused &= 1<<(n-w*64) - 1
		}
		for refused != 0 {
			i := bits.TrailingZeros64(refused)
			logits[w*64+i] = Masked
			refused &= refused - 1
		}
	}
	for i := n; i < len(logits); i++ {
		logits[i] = Masked
	}
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
