package cuda

// Weights asked of L2 ahead of their launch. At batch 1 a launch starts
// only when the one two before it has finished, and its blocks only
// where the one before leaves room: the next layer's first launch (the
// residual add and norm with the q_a and kv_a products) becomes resident
// as the MoE down launch's blocks leave, and then waits for its weights
// from memory. The down launch, resident long before, asks L2 for them
// (l2_ahead in prelude.cuh) before its own wait. On an H200 a decode step
// 1.2% faster (docs/perf.md, 2026-11-30 (20)).

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

// l2Ahead is what a down launch asks L2 for: up to four spans.
type l2Ahead [4]l2Span

// weightSpans adds w's codes and scales to h at i and i+1.
func (h *l2Ahead) weightSpans(i int, w *QMatrix) {
	h[i] = spanOf(w.Codes, w.N*w.K/2)
	h[i+1] = spanOf(w.Scales, w.N*(w.K/w.G))
}

// takeAhead returns the request the next down launch makes, and clears
// it.
func (c *Ctx) takeAhead() l2Ahead {
	h := c.ahead
	c.ahead = l2Ahead{}
	return h
}

// moeAheadOff keeps the down launches from asking for the next launch's
// weights (comparisons).
var moeAheadOff bool

// aheadSlot is the request of the MoE launch queued in flush flush, which
// the next layer's first products fill while that flush is still being
// built (so before its closure reads it on the device thread).
type aheadSlot struct {
	idx, flush int
	h          *l2Ahead
}

// newMoEAhead returns the request a single-token MoE launch about to be
// queued hands its down kernel, remembered for fillMoEAhead; nil where
// requests are off.
func (b *Backend) newMoEAhead() *l2Ahead {
	b.moeAhead = nil
	if moeAheadOff || !b.chained() {
		return nil
	}
	h := &l2Ahead{}
	b.moeAhead = &aheadSlot{flush: b.flushes, h: h}
	return h
}

// queuedMoEAhead notes where the MoE launch that took newMoEAhead's
// request was queued.
func (b *Backend) queuedMoEAhead() {
	if a := b.moeAhead; a != nil {
		a.idx = len(b.pending) - 1
		if b.err != nil || a.flush != b.flushes {
			b.moeAhead = nil
		}
	}
}

// fillMoEAhead adds w (the first product, or with second the second) of
// the add, norm and products launch queued at idx to the request of the
// MoE launch queued right before it, when that launch is still in the
// flush being built.
func (b *Backend) fillMoEAhead(idx int, w *QMatrix, second bool) {
	a := b.moeAhead
	if a == nil || a.flush != b.flushes || a.idx != idx-1 {
		b.moeAhead = nil
		return
	}
	i := 0
	if second {
		i = 2
		b.moeAhead = nil
	}
	a.h.weightSpans(i, w)
	b.moeAheads++
}
