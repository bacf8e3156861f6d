package cpu

import (
	"slices"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/format"
)

// moeFusedMaxTokens is the largest batch that takes the fused path: beyond
// it, several tokens share experts and running each expert once on all its
// tokens reads less.
const moeFusedMaxTokens = 4

// moeSlot is one (token, expert) pair of a batch.
type moeSlot struct {
	token, expert int
	weight        float32
	gate, up      *format.Matrix
	down          *format.Matrix
}

// moeFused runs the experts of a small batch in two dispatches on the worker
// pool; it reports false (doing nothing) where it does not apply: float
// activations, weights that are not MMFP4 with groups of 128 (or whose
// shapes do not fit, left to the per-expert path to report), or a large
// batch.
//
//  1. Every (token, expert, block of 128 intermediate rows) is one work
//     item: the gate and up rows of the block against the token's
//     activations (quantized once for all experts), silu(gate)*up, and the
//     int8 quantization of that block, which is exactly one group of the
//     down projection's input.
//  2. Every block of output rows is one work item: the down rows of every
//     (token, expert), each output added to its token's row with the
//     routing weight.
//
// The arithmetic is that of moeByExpert step for step (the same kernels,
// and each token's expert outputs added in increasing expert order), so
// the two agree bit for bit.
func (b *Backend) moeFused(d, xm *mat, rt *routing, experts []backend.Expert) bool {
	T := xm.rows
	if b.floatActs || T > moeFusedMaxTokens || T == 0 {
		return false
	}
	var slots []moeSlot
	for t := 0; t < T; t++ {
		ids, ws := rt.Choice(t)
		first := len(slots)
		for k, e := range ids {
			if e < 0 || e >= len(experts) {
				return false // the per-expert path reports it
			}
			ex := experts[e]
			g, ok1 := ex.Gate.(*quant)
			u, ok2 := ex.Up.(*quant)
			dn, ok3 := ex.Down.(*quant)
			if !ok1 || !ok2 || !ok3 {
				return false
			}
			slots = append(slots, moeSlot{token: t, expert: e, weight: ws[k], gate: g.m, up: u.m, down: dn.m})
		}
		slices.SortStableFunc(slots[first:], func(a, b moeSlot) int { return a.expert - b.expert })
	}
	if len(slots) == 0 {
		return true
	}
	inter := slots[0].gate.N
	for _, s := range slots {
		if s.gate.GroupSize != 128 || s.up.GroupSize != 128 || s.down.GroupSize != 128 ||
			s.gate.N != inter || s.up.N != inter || s.down.K != inter || inter%128 != 0 ||
			s.gate.K != xm.cols || s.up.K != xm.cols || s.down.N != d.cols {
			return false
		}
	}

	// Each chosen expert's three matrices count once, as on the per-expert
	// path: the byte counter measures weights touched, not cache traffic.
	counted := make(map[int]bool, len(slots))
	for _, s := range slots {
		if !counted[s.expert] {
			counted[s.expert] = true
			ex := experts[s.expert]
			b.count(weightBytes(ex.Gate) + weightBytes(ex.Up) + weightBytes(ex.Down))
		}
	}
	a := b.quantizeActivations(xm, 128)
	defer a.release()
	blocks := inter / 128
	h := pooledQActs(len(slots), inter, 128)
	defer h.release()
	// A work item is a span of blocks of one slot, read as one stream of
	// gate rows and one of up rows: a new stream starts slowly (the
	// prefetchers ramp up), so items of 128 rows (128 KB a stream) ran at
	// about half the rate of spans several times longer. About four items
	// a thread keep the threads level.
	span := min(blocks, max(1, (len(slots)*blocks+4*b.threads-1)/(4*b.threads)))
	perSlot := (blocks + span - 1) / span
	b.workers.run(len(slots)*perSlot, 1, func(lo, hi int) {
		bp := getFloats(3 * span * 128)
		defer floatBufs.put(bp)
		buf := *bp
		for item := lo; item < hi; item++ {
			si, j0 := item/perSlot, item%perSlot*span
			j1 := min(j0+span, blocks)
			rows := (j1 - j0) * 128
			s := &slots[si]
			gate, up, act := buf[:rows], buf[rows:2*rows], buf[2*rows:3*rows]
			b.gemvRows(s.gate, j0*128, j1*128, a, s.token, gate)
			b.gemvRows(s.up, j0*128, j1*128, a, s.token, up)
			b.siluMulF32(act, gate, up)
			q, sc, sum := h.row(si)
			for j := j0; j < j1; j++ {
				o := (j - j0) * 128
				b.quantizeRow(act[o:o+128], 128, q[j*128:(j+1)*128], sc[j:j+1], sum[j:j+1])
			}
		}
	})

	// Output rows in about two items a thread, so that each item reads
	// every slot's down rows as long streams (384 KB each at
	// GLM-4.7-Flash's shapes).
	N := d.cols
	grain := ((N+2*b.threads-1)/(2*b.threads) + 3) &^ 3
	b.workers.run(N, grain, func(lo, hi int) {
		out := make([]float32, hi-lo)
		for si := range slots {
			s := &slots[si]
			b.gemvRows(s.down, lo, hi, h, si, out)
			axpy(d.row(s.token)[lo:hi], s.weight, out)
		}
	})
	return true
}
