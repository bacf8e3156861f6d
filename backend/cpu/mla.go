package cpu

import (
	"fmt"
	"math"

	"github.com/mmfp4/mmfp4/backend"
)

// cache stores, per layer, the latent [capacity, rank] and the rotated
// shared key [capacity, ropeDim] in float32.
type cache struct {
	capacity, rank, ropeDim int
	latent, kpe             [][]float32
}

func (c *cache) Capacity() int { return c.capacity }

// NewCache allocates a latent cache.
func (b *Backend) NewCache(layers, capacity, rank, ropeDim int) backend.Cache {
	c := &cache{capacity: capacity, rank: rank, ropeDim: ropeDim}
	for l := 0; l < layers; l++ {
		c.latent = append(c.latent, make([]float32, capacity*rank))
		c.kpe = append(c.kpe, make([]float32, capacity*ropeDim))
	}
	return c
}

func asCache(c backend.Cache) *cache {
	cc, ok := c.(*cache)
	if !ok {
		panic(fmt.Sprintf("cpu backend: cache of type %T from another backend", c))
	}
	return cc
}

// CacheWrite stores the rows of latent and kpe at positions pos0, pos0+1, ...
func (b *Backend) CacheWrite(c backend.Cache, layer, pos0 int, latent, kpe backend.Tensor) {
	cc, lm, km := asCache(c), asMat(latent), asMat(kpe)
	checkShape("cache latent", [2]int{lm.rows, lm.cols}, [2]int{lm.rows, cc.rank})
	checkShape("cache kpe", [2]int{km.rows, km.cols}, [2]int{lm.rows, cc.ropeDim})
	if pos0 < 0 || pos0+lm.rows > cc.capacity {
		panic(fmt.Sprintf("cpu backend: cache write at [%d,%d) beyond capacity %d", pos0, pos0+lm.rows, cc.capacity))
	}
	for t := 0; t < lm.rows; t++ {
		p := pos0 + t
		copy(cc.latent[layer][p*cc.rank:(p+1)*cc.rank], lm.row(t))
		copy(cc.kpe[layer][p*cc.ropeDim:(p+1)*cc.ropeDim], km.row(t))
	}
}

// AbsorbQuery computes qlat[t,h] = W_UK[h]^T q_nope[t,h] as a sum of the
// rows of W_UK[h] weighted by q_nope, so each weight row is read once.
func (b *Backend) AbsorbQuery(qlat, q backend.Tensor, kvB backend.Weight, s backend.MLAShape) {
	ql, qm := asMat(qlat), asMat(q)
	checkShape("absorb out", [2]int{ql.rows, ql.cols}, [2]int{qm.rows, s.Heads * s.Rank})
	checkShape("absorb in", [2]int{qm.rows, qm.cols}, [2]int{ql.rows, s.Heads * (s.NopeDim + s.RopeDim)})
	checkShape("absorb kv_b", [2]int{kvB.Rows(), kvB.Cols()}, [2]int{s.Heads * (s.NopeDim + s.VDim), s.Rank})
	b.count(int64(s.Heads*s.NopeDim) * rowBytes(kvB)) // the W_UK rows
	if w, ok := kvB.(*quant); ok {
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
					axpy(out, coef, weightRow(kvB, h*(s.NopeDim+s.VDim)+i, nil))
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
	m, G, groups := w.m, w.m.GroupSize, w.groups
	b.parallel(s.Heads, func(lo, hi int) {
		acc := make([]float32, s.Rank)
		coef := make([]float32, groups)
		for h := lo; h < hi; h++ {
			for t := 0; t < ql.rows; t++ {
				clear(acc)
				for i := 0; i < s.NopeDim; i++ {
					n := h*(s.NopeDim+s.VDim) + i
					a := qm.row(t)[h*(s.NopeDim+s.RopeDim)+i] * m.RowScale[n] * 0.5
					for g, sc := range m.Scales[n*groups : (n+1)*groups] {
						coef[g] = a * e4m3Table[sc]
					}
					axpyCodes(acc, m.Codes[n*m.K/2:(n+1)*m.K/2], coef, G)
				}
				out := ql.row(t)[h*s.Rank : (h+1)*s.Rank]
				for g := 0; g < groups; g++ {
					for k := 0; k < G/2; k++ {
						out[g*G+2*k] = acc[g*G+k]
						out[g*G+2*k+1] = acc[g*G+G/2+k]
					}
				}
			}
		}
	})
}

// LatentAttention runs causal softmax attention against the cached latents.
func (b *Backend) LatentAttention(olat, qlat, q backend.Tensor, c backend.Cache, layer, pos0 int, s backend.MLAShape, scale float32) {
	om, ql, qm, cc := asMat(olat), asMat(qlat), asMat(q), asCache(c)
	T := ql.rows
	checkShape("attention out", [2]int{om.rows, om.cols}, [2]int{T, s.Heads * s.Rank})
	if pos0+T > cc.capacity {
		panic(fmt.Sprintf("cpu backend: attention over positions [0,%d) beyond cache capacity %d", pos0+T, cc.capacity))
	}
	lat, kpe := cc.latent[layer], cc.kpe[layer]
	b.count(4 * int64((pos0+T)*(cc.rank+cc.ropeDim))) // every cached position once
	b.parallel(T*s.Heads, func(lo, hi int) {
		scores := make([]float32, pos0+T)
		for i := lo; i < hi; i++ {
			t, h := i/s.Heads, i%s.Heads
			p := pos0 + t
			qv := ql.row(t)[h*s.Rank : (h+1)*s.Rank]
			qpe := qm.row(t)[h*(s.NopeDim+s.RopeDim)+s.NopeDim : (h+1)*(s.NopeDim+s.RopeDim)]
			maxScore := float32(math.Inf(-1))
			for j := 0; j <= p; j++ {
				sc := scale * (dot(qv, lat[j*s.Rank:(j+1)*s.Rank]) + dot(qpe, kpe[j*s.RopeDim:(j+1)*s.RopeDim]))
				scores[j] = sc
				maxScore = max(maxScore, sc)
			}
			var sum float64
			for j := 0; j <= p; j++ {
				e := float32(math.Exp(float64(scores[j] - maxScore)))
				scores[j] = e
				sum += float64(e)
			}
			out := om.row(t)[h*s.Rank : (h+1)*s.Rank]
			clear(out)
			inv := float32(1 / sum)
			for j := 0; j <= p; j++ {
				axpy(out, scores[j]*inv, lat[j*s.Rank:(j+1)*s.Rank])
			}
		}
	})
}

// ExpandValues computes out[t,h] = W_UV[h] olat[t,h]: per head, an ordinary
// matrix product with a row block of kv_b, so MMFP4 weights take the same
// (int8) kernel as every other product.
func (b *Backend) ExpandValues(out, olat backend.Tensor, kvB backend.Weight, s backend.MLAShape) {
	om, ol := asMat(out), asMat(olat)
	checkShape("expand out", [2]int{om.rows, om.cols}, [2]int{ol.rows, s.Heads * s.VDim})
	checkShape("expand in", [2]int{ol.rows, ol.cols}, [2]int{om.rows, s.Heads * s.Rank})
	for h := 0; h < s.Heads; h++ {
		wuv := weightRows(kvB, h*(s.NopeDim+s.VDim)+s.NopeDim, s.VDim)
		b.MatMul(b.Cols(out, h*s.VDim, (h+1)*s.VDim), b.Cols(olat, h*s.Rank, (h+1)*s.Rank), wuv)
	}
}
