package cpu

import (
	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/format"
)

// expandValuesInt8 is ExpandValues on MMFP4 weights in one dispatch: the
// latent outputs of all heads are quantized once (a head's Rank columns are
// whole groups, so this is what quantizing each head apart gives), and
// every (token, head, block of value rows) is one work item of the decode
// kernel. It reports false where it does not apply (float activations,
// dense weights, groups other than 128, Rank not a multiple of 128, or a
// batch large enough for the per-head matrix products).
func (b *Backend) expandValuesInt8(om, ol *mat, wUV backend.Weight, s backend.MLAShape) bool {
	w, ok := wUV.(*quant)
	if !ok || b.floatActs || w.m.GroupSize != 128 || s.Rank%128 != 0 || ol.rows >= gemmMinTokens ||
		w.m.K != s.Rank || w.m.N != s.Heads*s.VDim {
		return false
	}
	b.count(weightBytes(w))
	m, r, dv := w.m, s.Rank, s.VDim
	a := b.quantizeActivations(ol, 128)
	defer a.release()
	grain := dv // one head a work item: 64 KB of codes at GLM-4.7-Flash's shapes
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

// absorbRows4 runs the rows of W_UK[h] four at a time through axpyCodes4
// where the kernel family has it, adding into acc as absorbQueryQuant's
// loop does, and returns how many rows it took (the loop does the rest).
func (b *Backend) absorbRows4(acc, qrow []float32, m *format.Matrix, h int, s backend.MLAShape) int {
	groups := m.K / m.GroupSize
	var coef [4 * 64]float32
	if groups > 64 {
		return 0
	}
	i := 0
	for ; i+4 <= s.NopeDim; i += 4 {
		for r := 0; r < 4; r++ {
			n := h*s.NopeDim + i + r
			a := qrow[h*(s.NopeDim+s.RopeDim)+i+r] * m.RowScale[n] * 0.5
			for g, sc := range m.Scales[n*groups : (n+1)*groups] {
				coef[r*groups+g] = a * e4m3Table[sc]
			}
		}
		n := h*s.NopeDim + i
		if !axpyCodes4(b.isa, acc, m.Codes[n*m.K/2:], m.K/2, coef[:4*groups], m.GroupSize) {
			return i
		}
	}
	return i
}

// absorbQueryGemm is absorbQueryQuant for a batch of many rows (prefill):
// each head's W_UK block is widened once to float32 (through the codes-axpy
// kernel, then put in column order), and qlat[t,h] = q_nope[t,h] W_UK[h]
// runs as a matrix product on the 4x64 kernel, instead of widening the
// block's codes again for every row. It reports false where it does not
// apply.
func (b *Backend) absorbQueryGemm(ql, qm *mat, w *quant, s backend.MLAShape) bool {
	m, r, dn, qk := w.m, s.Rank, s.NopeDim, s.NopeDim+s.RopeDim
	T := ql.rows
	if !hasSgemm(b.isa) || T < attnPrefillMinTokens || r%64 != 0 || m.GroupSize != 128 {
		return false
	}
	G, groups := m.GroupSize, m.K/m.GroupSize
	b.workers.run(s.Heads, 1, func(lo, hi int) {
		wp := getFloats(dn * r)
		defer floatBufs.put(wp)
		wd := *wp // W_UK[h] as float32 [dn][r], column order
		acc := make([]float32, r)
		coef := make([]float32, groups)
		pad := getFloats(4 * dn)
		defer floatBufs.put(pad)
		for h := lo; h < hi; h++ {
			for i := 0; i < dn; i++ {
				n := h*dn + i
				for g, sc := range m.Scales[n*groups : (n+1)*groups] {
					coef[g] = m.RowScale[n] * 0.5 * e4m3Table[sc]
				}
				clear(acc)
				b.axpyCodes(acc, m.Codes[n*m.K/2:(n+1)*m.K/2], coef, G)
				b.interleaveGroups(wd[i*r:(i+1)*r], acc, G)
			}
			for t := 0; t < T; t += 4 {
				a, aStride, c, cStride := qm.data[t*qm.stride+h*qk:], qm.stride, ql.data[t*ql.stride+h*r:], ql.stride
				if t+4 > T { // the last rows through a padded copy
					p := *pad
					clear(p)
					for j := 0; j < T-t; j++ {
						copy(p[j*dn:(j+1)*dn], qm.row(t + j)[h*qk:h*qk+dn])
					}
					a, aStride = p, dn
					out := getFloats(4 * r)
					for db := 0; db < r; db += 64 {
						sgemm4x64(a, aStride, wd[db:], r, dn, (*out)[db:], r)
					}
					for j := 0; j < T-t; j++ {
						copy(ql.row(t + j)[h*r:(h+1)*r], (*out)[j*r:(j+1)*r])
					}
					floatBufs.put(out)
					continue
				}
				for db := 0; db < r; db += 64 {
					sgemm4x64(a, aStride, wd[db:], r, dn, c[db:], cStride)
				}
			}
		}
	})
	return true
}
