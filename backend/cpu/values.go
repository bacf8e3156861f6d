package cpu

import "github.com/mmfp4/mmfp4/backend"

// expandValuesInt8 is ExpandValues on MMFP4 weights in one dispatch: the
// latent outputs of all heads are quantized once (a head's Rank columns are
// whole groups, so this is what quantizing each head apart gives), and
// every (token, head, block of value rows) is one work item of the decode
// kernel. It reports false where it does not apply (float activations,
// dense weights, groups other than 128, Rank not a multiple of 128, or a
// batch large enough for the per-head matrix products).
func (b *Backend) expandValuesInt8(om, ol *mat, wUV backend.Weight, s backend.MLAShape) bool {
	w, ok := wUV.(*quant)
	if !ok || b.floatActs || w.m.GroupSize != 128 || s.Rank%128 != 0 || ol.rows > moeFusedMaxTokens ||
		w.m.K != s.Rank || w.m.N != s.Heads*s.VDim {
		return false
	}
	m, r, dv := w.m, s.Rank, s.VDim
	a := b.quantizeActivations(ol, 128)
	grain := min(dv, max(4, (16384/max(r/2, 1))&^3))
	blocks := (dv + grain - 1) / grain
	b.workers.run(ol.rows*s.Heads*blocks, 1, func(lo, hi int) {
		for item := lo; item < hi; item++ {
			t, h, j := item/(s.Heads*blocks), item/blocks%s.Heads, item%blocks
			q, sc, sum := a.row(t)
			g0 := h * r / 128
			view := &qacts{rows: 1, k: r, g: 128, groups: r / 128,
				q: q[h*r : (h+1)*r], s: sc[g0 : g0+r/128], sum: sum[g0 : g0+r/128]}
			lo, hi := j*grain, min((j+1)*grain, dv)
			b.gemvRows(m, h*dv+lo, h*dv+hi, view, 0, om.row(t)[h*dv+lo:h*dv+hi])
		}
	})
	return true
}
