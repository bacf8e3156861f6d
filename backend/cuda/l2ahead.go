//go:build linux || darwin || freebsd || netbsd

package cuda

// Weights asked of L2 ahead of their launch. At batch 1 a launch starts
// only when the one two before it has finished, and its blocks only
// where the one before leaves room, and then wait for their weights from
// memory. Two launches ask L2 for the weights of the launch after them,
// before their own wait (l2_ahead in prelude.cuh):
//   - the MoE down launch, for the next layer's first launch (the residual
//     add and norm with the q_a and kv_a products), whose blocks become
//     resident as down's leave;
//   - that launch, for the one after it (the q_a norm, q_b and the
//     absorbed query with W_UK), some of whose blocks start late.
// On an H200: docs/perf.md, 2026-11-30 (20).

// l2Span is lines 128-byte lines of device memory from ptr, a line's
// start.
type l2Span struct {
	ptr   uint64
	lines int
}

// spanOf is the lines that hold n bytes from p.
func spanOf(p uint64, n int) l2Span {
	if p == 0 || n <= 0 {
		return l2Span{}
	}
	return l2Span{p &^ 127, (int(p%128) + n + 127) / 128}
}

// l2Ahead is what a launch asks L2 for: the codes and scales of up to two
// weights.
type l2Ahead [4]l2Span

// aheadArgs appends to args what the launch being made asks L2 for, as
// the kernel's last eight parameters (l2_ahead's spans), and clears it.
func (c *Ctx) aheadArgs(args ...any) []any {
	h := c.ahead
	c.ahead = l2Ahead{}
	for _, s := range h {
		args = append(args, s.ptr, s.lines)
	}
	return args
}

// withAhead runs fn, whose launch asks L2 for h (when not nil).
func withAhead(c *Ctx, h *l2Ahead, fn func() error) error {
	if h != nil {
		c.ahead = *h
	}
	err := fn()
	c.ahead = l2Ahead{}
	return err
}

// l2AheadOff keeps launches from asking for later launches' weights
// (comparisons).
var l2AheadOff bool

// Kinds of aheads.
const (
	aheadMoE = iota
	aheadNorm
)

// aheadSlot is the request of the launch queued at idx in flush flush,
// which the launch queued right after it fills while that flush is still
// being built (so before the launch's closure reads it on the device
// thread); n is the weights it holds.
type aheadSlot struct {
	idx, flush, n int
	h             *l2Ahead
}

// newAhead returns the request a single-token launch about to be queued
// hands its kernel, remembered in *slot for fillAhead; nil (and *slot
// cleared) where requests are off.
func (b *Backend) newAhead(slot **aheadSlot) *l2Ahead {
	*slot = nil
	if l2AheadOff || !b.chained() {
		return nil
	}
	h := &l2Ahead{}
	*slot = &aheadSlot{idx: -1, flush: b.flushes, h: h}
	return h
}

// queuedAhead notes that the launch holding a's request was queued at idx.
func (b *Backend) queuedAhead(a *aheadSlot, idx int) {
	if a != nil {
		a.idx = idx
	}
}

// fillAhead adds w's codes and scales to the request in *slot, when the
// launch that holds it was queued right before idx in the flush being
// built and has room; else it clears *slot.
func (b *Backend) fillAhead(slot **aheadSlot, kind, idx int, w *QMatrix) {
	a := *slot
	if a == nil || a.flush != b.flushes || a.idx != idx-1 || a.n == 2 || b.err != nil {
		*slot = nil
		return
	}
	a.h[2*a.n] = spanOf(w.Codes, w.N*w.K/2)
	a.h[2*a.n+1] = spanOf(w.Scales, w.N*(w.K/w.G))
	a.n++
	b.aheads[kind]++
}
