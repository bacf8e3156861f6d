package cpu

import (
	"math"

	"github.com/mmfp4/mmfp4/backend"
)

// CacheWrite stores each row's latent and k_pe at its slot of the bound pool.
func (b *Backend) CacheWrite(layer int, latent, kpe backend.Tensor) {
	lm, km, p := asMat(latent), asMat(kpe), b.pool
	switch {
	case p == nil || b.batch == nil:
		b.fail("cache write without a batch and cache pool (SetBatch)")
		return
	case layer < 0 || layer >= p.layers:
		b.fail("cache write to layer %d of %d", layer, p.layers)
		return
	}
	if b.badShape("cache latent", [2]int{lm.rows, lm.cols}, [2]int{b.batch.Rows(), p.rank}) ||
		b.badShape("cache kpe", [2]int{km.rows, km.cols}, [2]int{b.batch.Rows(), p.ropeDim}) {
		return
	}
	for t := 0; t < lm.rows; t++ {
		p.store(layer, int(b.slots[t]), lm.row(t), km.row(t))
	}
}

// AbsorbQuery computes qlat[t,h] = W_UK[h]^T q_nope[t,h] as a sum of the
// rows of W_UK[h] weighted by q_nope, so each weight row is read once.
func (b *Backend) AbsorbQuery(qlat, q backend.Tensor, wUK backend.Weight, s backend.MLAShape) {
	ql, qm := asMat(qlat), asMat(q)
	if b.badShape("absorb out", [2]int{ql.rows, ql.cols}, [2]int{qm.rows, s.Heads * s.Rank}) ||
		b.badShape("absorb in", [2]int{qm.rows, qm.cols}, [2]int{ql.rows, s.Heads * (s.NopeDim + s.RopeDim)}) ||
		b.badShape("absorb W_UK", [2]int{wUK.Rows(), wUK.Cols()}, [2]int{s.Heads * s.NopeDim, s.Rank}) {
		return
	}
	b.count(weightBytes(wUK))
	if w, ok := wUK.(*quant); ok {
		b.absorbQueryQuant(ql, qm, w, s)
		return
	}
	b.parallel(s.Heads, func(lo, hi int) {
		for h := lo; h < hi; h++ {
			for t := 0; t < ql.rows; t++ {
				out := ql.row(t)[h*s.Rank : (h+1)*s.Rank]
				clear(out)
				for i := 0; i < s.NopeDim; i++ {
					coef := qm.row(t)[h*(s.NopeDim+s.RopeDim)+i]
					axpy(out, coef, weightRow(wUK, h*s.NopeDim+i, nil))
				}
			}
		}
	})
}

// absorbQueryQuant is AbsorbQuery on MMFP4 weights without dequantizing
// rows: each row adds its codes times q_nope[i] * row_scale * group scale,
// accumulated in the de-interleaved order of axpyCodes and put back in
// column order at the end.
func (b *Backend) absorbQueryQuant(ql, qm *mat, w *quant, s backend.MLAShape) {
	if b.absorbQueryGemm(ql, qm, w, s) {
		return
	}
	m, G, groups := w.m, w.m.GroupSize, w.groups
	b.parallel(s.Heads, func(lo, hi int) {
		acc := make([]float32, s.Rank)
		coef := make([]float32, groups)
		for h := lo; h < hi; h++ {
			for t := 0; t < ql.rows; t++ {
				clear(acc)
				for i := b.absorbRows4(acc, qm.row(t), m, h, s); i < s.NopeDim; i++ {
					n := h*s.NopeDim + i
					a := qm.row(t)[h*(s.NopeDim+s.RopeDim)+i] * m.RowScale[n] * 0.5
					for g, sc := range m.Scales[n*groups : (n+1)*groups] {
						coef[g] = a * e4m3Table[sc]
					}
					b.axpyCodes(acc, m.Codes[n*m.K/2:(n+1)*m.K/2], coef, G)
				}
				b.interleaveGroups(ql.row(t)[h*s.Rank:(h+1)*s.Rank], acc, G)
			}
		}
	})
}

// LatentAttention runs causal softmax attention against the cached latents
// of each row's sequence, reading its blocks in place. Work is split over
// rows and, when there are fewer rows than threads, over groups of heads;
// each cached token is decoded once per work item and used by all its heads.
func (b *Backend) LatentAttention(olat, qlat, q backend.Tensor, layer int, s backend.MLAShape, scale float32) {
	om, ql, qm, p := asMat(olat), asMat(qlat), asMat(q), b.pool
	switch {
	case p == nil || b.batch == nil:
		b.fail("attention without a batch and cache pool (SetBatch)")
		return
	case layer < 0 || layer >= p.layers:
		b.fail("attention over layer %d of %d", layer, p.layers)
		return
	case p.rank != s.Rank || p.ropeDim != s.RopeDim:
		b.fail("attention of rank %d, rope dims %d over a pool of rank %d, rope dims %d", s.Rank, s.RopeDim, p.rank, p.ropeDim)
		return
	}
	T := b.batch.Rows()
	if b.badShape("attention out", [2]int{om.rows, om.cols}, [2]int{T, s.Heads * s.Rank}) ||
		b.badShape("attention qlat", [2]int{ql.rows, ql.cols}, [2]int{T, s.Heads * s.Rank}) ||
		b.badShape("attention q", [2]int{qm.rows, qm.cols}, [2]int{T, s.Heads * (s.NopeDim + s.RopeDim)}) {
		return
	}
	perToken := int64(backend.CacheBytesPerToken(p.rank, p.ropeDim, p.dtype))
	for t := 0; t < T; t++ { // each row reads its sequence's cached positions
		b.count(perToken * int64(b.batch.Positions[t]+1))
	}
	if b.latentAttentionSIMD(om, ql, qm, layer, s, scale) {
		return
	}
	chunks := 1
	if T < b.threads {
		chunks = min(s.Heads, (b.threads+T-1)/T)
	}
	per := (s.Heads + chunks - 1) / chunks
	b.parallel(T*chunks, func(lo, hi int) {
		buf := make([]float32, p.width())
		var scores []float32
		for i := lo; i < hi; i++ {
			t := i / chunks
			h0 := (i % chunks) * per
			h1 := min(h0+per, s.Heads)
			if h0 >= h1 {
				continue
			}
			seq := &b.batch.Seqs[b.rowSeq[t]]
			n := int(b.batch.Positions[t]) + 1 // positions 0..p
			scores = resize(scores, (h1-h0)*n)
			slot := func(j int) int { return int(seq.Blocks[j/p.blockSize])*p.blockSize + j%p.blockSize }

			for j := 0; j < n; j++ {
				kv := p.load(layer, slot(j), buf)
				lat, kpe := kv[:s.Rank], kv[s.Rank:]
				for h := h0; h < h1; h++ {
					qv := ql.row(t)[h*s.Rank : (h+1)*s.Rank]
					qpe := qm.row(t)[h*(s.NopeDim+s.RopeDim)+s.NopeDim : (h+1)*(s.NopeDim+s.RopeDim)]
					scores[(h-h0)*n+j] = scale * (dot(qv, lat) + dot(qpe, kpe))
				}
			}
			for h := h0; h < h1; h++ {
				sc := scores[(h-h0)*n : (h-h0+1)*n]
				maxScore := float32(math.Inf(-1))
				for _, v := range sc {
					maxScore = max(maxScore, v)
				}
				var sum float64
				for j, v := range sc {
					e := float32(math.Exp(float64(v - maxScore)))
					sc[j] = e
					sum += float64(e)
				}
				inv := float32(1 / sum)
				for j := range sc {
					sc[j] *= inv
				}
				clear(om.row(t)[h*s.Rank : (h+1)*s.Rank])
			}
			for j := 0; j < n; j++ {
				lat := p.load(layer, slot(j), buf)[:s.Rank]
				for h := h0; h < h1; h++ {
					axpy(om.row(t)[h*s.Rank:(h+1)*s.Rank], scores[(h-h0)*n+j], lat)
				}
			}
		}
	})
}

// ExpandValues computes out[t,h] = W_UV[h] olat[t,h]: per head, an ordinary
// matrix product with a row block of W_UV, so MMFP4 weights take the same
// (int8) kernel as every other product.
func (b *Backend) ExpandValues(out, olat backend.Tensor, wUV backend.Weight, s backend.MLAShape) {
	om, ol := asMat(out), asMat(olat)
	if b.badShape("expand out", [2]int{om.rows, om.cols}, [2]int{ol.rows, s.Heads * s.VDim}) ||
		b.badShape("expand in", [2]int{ol.rows, ol.cols}, [2]int{om.rows, s.Heads * s.Rank}) ||
		b.badShape("expand W_UV", [2]int{wUV.Rows(), wUV.Cols()}, [2]int{s.Heads * s.VDim, s.Rank}) {
		return
	}
	if b.expandValuesInt8(om, ol, wUV, s) {
		return
	}
	for h := 0; h < s.Heads; h++ {
		wuv := weightRows(wUV, h*s.VDim, s.VDim)
		b.MatMul(b.Cols(out, h*s.VDim, (h+1)*s.VDim), b.Cols(olat, h*s.Rank, (h+1)*s.Rank), wuv)
	}
}

// interleaveGroups puts sums kept in the order of axpyCodes (each group's
// even columns, then its odd ones) back in column order: for each group of
// G values, dst[2k] = src[k] and dst[2k+1] = src[G/2+k].
func (b *Backend) interleaveGroups(dst, src []float32, G int) {
	if interleaveSIMD(b.isa, dst, src, G) {
		return
	}
	interleaveGroupsGo(dst, src, G)
}

// interleaveGroupsGo is the reference for interleaveGroups.
func interleaveGroupsGo(dst, src []float32, G int) {
	for g := 0; g+G <= len(src); g += G {
		for k := 0; k < G/2; k++ {
			dst[g+2*k] = src[g+k]
			dst[g+2*k+1] = src[g+G/2+k]
		}
	}
}
