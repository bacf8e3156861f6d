package cpu

import (
	"slices"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/format"
)

// moeFusedMaxTokens is the largest batch that takes the fused path. Its
// work items hold each expert's rows for all the tokens routed to it, so
// every expert is read from memory once per step; past this size most
// experts serve several tokens, and the blocked kernel of the per-expert
// path, which widens each weight tile once for all of them, does less work.
const moeFusedMaxTokens = 16

// moeSlot is one (token, expert) pair of a batch.
type moeSlot struct {
	token, expert int
	weight        float32
}

// moeGroup is one chosen expert and its slots, in token order.
type moeGroup struct {
	gate, up, down *format.Matrix
	slots          []int // indices into the batch's slots
}

// moeFused runs the experts of a small batch in two dispatches on the worker
// pool; it reports false (doing nothing) where it does not apply: float
// activations, weights that are not MMFP4 with groups of 128 (or whose
// shapes do not fit, left to the per-expert path to report), or a large
// batch.
//
//  1. Every (expert, span of blocks of 128 intermediate rows) is one work
//     item: for each token routed to the expert, the gate and up rows of
//     the span against the token's activations (quantized once for all
//     experts), silu(gate)*up, and the int8 quantization of each block,
//     which is exactly one group of the down projection's input. A span is
//     read from memory for the first token and from the cache for the
//     others.
//  2. Every block of output rows is one work item: the down rows of every
//     expert, applied to each of its tokens, each output added to its
//     token's row with the routing weight.
//
// The arithmetic is that of moeByExpert step for step where that path runs
// every expert token by token (fewer than gemmMinTokens tokens an expert):
// the same kernels, and each token's expert outputs added in increasing
// expert order, so the two agree bit for bit there.
//
// Shared experts (MoEShared) are groups of every token with weight 1,
// numbered after the routed experts, so each token adds their outputs last,
// as MoE followed by adding each shared block does.
func (b *Backend) moeFused(d, xm *mat, rt *routing, experts, shared []backend.Expert) bool {
	T := xm.rows
	if b.floatActs || T > moeFusedMaxTokens || T == 0 {
		return false
	}
	var slots []moeSlot
	var groups []moeGroup
	byExpert := map[int]int{} // expert -> index in groups
	add := func(t, e int, w float32) bool {
		gi, seen := byExpert[e]
		if !seen {
			var ex backend.Expert
			if e < len(experts) {
				ex = experts[e]
			} else {
				ex = shared[e-len(experts)]
			}
			g, ok1 := ex.Gate.(*quant)
			u, ok2 := ex.Up.(*quant)
			dn, ok3 := ex.Down.(*quant)
			if !ok1 || !ok2 || !ok3 {
				return false
			}
			gi = len(groups)
			byExpert[e] = gi
			groups = append(groups, moeGroup{gate: g.m, up: u.m, down: dn.m})
			// Each chosen expert's three matrices count once, as on the
			// per-expert path.
			b.count(weightBytes(ex.Gate) + weightBytes(ex.Up) + weightBytes(ex.Down))
		}
		groups[gi].slots = append(groups[gi].slots, len(slots))
		slots = append(slots, moeSlot{token: t, expert: e, weight: w})
		return true
	}
	for t := 0; t < T; t++ {
		ids, ws := rt.Choice(t)
		for k, e := range ids {
			if e < 0 || e >= len(experts) || !add(t, e, ws[k]) {
				return false // the per-expert path reports a bad id
			}
		}
	}
	for s := range shared {
		for t := 0; t < T; t++ {
			if !add(t, len(experts)+s, 1) {
				return false
			}
		}
	}
	if len(slots) == 0 {
		return true
	}
	// Groups in increasing expert order: the order in which each token's
	// outputs are added.
	slices.SortFunc(groups, func(x, y moeGroup) int { return slots[x.slots[0]].expert - slots[y.slots[0]].expert })
	inter := groups[0].gate.N
	for _, g := range groups {
		if g.gate.GroupSize != 128 || g.up.GroupSize != 128 || g.down.GroupSize != 128 ||
			g.gate.N != inter || g.up.N != inter || g.down.K != inter || inter%128 != 0 ||
			g.gate.K != xm.cols || g.up.K != xm.cols || g.down.N != d.cols {
			return false
		}
	}

	a := b.quantizeActivations(xm, 128)
	defer a.release()
	blocks := inter / 128
	h := pooledQActs(len(slots), inter, 128)
	defer h.release()
	// A new stream starts slowly (the prefetchers ramp up), so items of 128
	// rows (128 KB a stream) ran at about half the rate of spans several
	// times longer: about four items a thread keep the threads level. An
	// expert with several tokens takes spans of at most two blocks, so its
	// gate and up rows stay in the L2 cache from one token to the next.
	span := min(blocks, max(1, (len(groups)*blocks+4*b.threads-1)/(4*b.threads)))
	type item struct{ group, j0, j1 int }
	var items []item
	for gi, g := range groups {
		sp := span
		if len(g.slots) > 1 {
			sp = min(sp, 2)
		}
		for j := 0; j < blocks; j += sp {
			items = append(items, item{gi, j, min(j+sp, blocks)})
		}
	}
	b.workers.run(len(items), 1, func(lo, hi int) {
		bp := getFloats(3 * span * 128)
		defer floatBufs.put(bp)
		buf := *bp
		for _, it := range items[lo:hi] {
			g := &groups[it.group]
			rows := (it.j1 - it.j0) * 128
			gate, up, act := buf[:rows], buf[rows:2*rows], buf[2*rows:3*rows]
			for _, si := range g.slots {
				tok := slots[si].token
				b.gemvRows(g.gate, it.j0*128, it.j1*128, a, tok, gate)
				b.gemvRows(g.up, it.j0*128, it.j1*128, a, tok, up)
				b.siluMulF32(act, gate, up)
				q, sc, sum := h.row(si)
				for j := it.j0; j < it.j1; j++ {
					o := (j - it.j0) * 128
					b.quantizeRow(act[o:o+128], 128, q[j*128:(j+1)*128], sc[j:j+1], sum[j:j+1])
				}
			}
		}
	})

	// Output rows in about two items a thread, so that each item reads
	// every expert's down rows as long streams (384 KB each at
	// GLM-4.7-Flash's shapes), once for all of the expert's tokens.
	N := d.cols
	grain := ((N+2*b.threads-1)/(2*b.threads) + 3) &^ 3
	b.workers.run(N, grain, func(lo, hi int) {
		out := make([]float32, hi-lo)
		for gi := range groups {
			g := &groups[gi]
			for _, si := range g.slots {
				b.gemvRows(g.down, lo, hi, h, si, out)
				axpy(d.row(slots[si].token)[lo:hi], slots[si].weight, out)
			}
		}
	})
	return true
}
