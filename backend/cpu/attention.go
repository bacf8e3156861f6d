package cpu

import (
	"math"
	"sync"

	"github.com/mmfp4/mmfp4/backend"
)

// scoreBufs recycles the per-item score rows of latentAttentionSIMD.
var scoreBufs sync.Pool

// latentAttentionSIMD is LatentAttention on the SIMD float kernels; it
// reports false for the pure-Go family, which keeps the reference loop.
//
// A work item is one token and a range of heads. Its loops run over the
// cached positions four at a time and, inside, over the heads, so each
// latent row is read from memory once per item and then reused from the
// L1 cache by every head: first the scores (dots4F32), then the softmax
// (expF32), then the weighted sum of the latents (axpy4F32).
func (b *Backend) latentAttentionSIMD(om, ql, qm *mat, lat, kpe []float32, pos0 int, s backend.MLAShape, scale float32) bool {
	if b.isa == isaGo {
		return false
	}
	T, H := ql.rows, s.Heads
	// Enough items for every thread at decode (T = 1), whole tokens when
	// there are many.
	perItem := H
	if T < 4*b.threads {
		parts := (4*b.threads + T - 1) / T
		perItem = (H + parts - 1) / parts
	}
	headRanges := (H + perItem - 1) / perItem
	b.pool.run(T*headRanges, 1, func(lo, hi int) {
		for item := lo; item < hi; item++ {
			t, h0 := item/headRanges, (item%headRanges)*perItem
			h1 := min(h0+perItem, H)
			b.attendToken(om, ql, qm, lat, kpe, t, pos0+t+1, h0, h1, s, scale)
		}
	})
	return true
}

// attendToken computes heads [h0, h1) of token t over positions [0, P).
func (b *Backend) attendToken(om, ql, qm *mat, lat, kpe []float32, t, P, h0, h1 int, s backend.MLAShape, scale float32) {
	r, dr, qk := s.Rank, s.RopeDim, s.NopeDim+s.RopeDim
	nh := h1 - h0
	need := nh * P
	bp, _ := scoreBufs.Get().(*[]float32)
	if bp == nil || cap(*bp) < need {
		buf := make([]float32, need)
		bp = &buf
	}
	sc := (*bp)[:need]
	defer scoreBufs.Put(bp)

	qrow, qmrow, orow := ql.row(t), qm.row(t), om.row(t)
	var o1, o2 [4]float32
	j := 0
	for ; j+4 <= P; j += 4 {
		for h := h0; h < h1; h++ {
			b.dots4F32(qrow[h*r:(h+1)*r], lat[j*r:], r, &o1)
			b.dots4F32(qmrow[h*qk+s.NopeDim:(h+1)*qk], kpe[j*dr:], dr, &o2)
			row := sc[(h-h0)*P+j : (h-h0)*P+j+4]
			for i := range row {
				row[i] = scale * (o1[i] + o2[i])
			}
		}
	}
	for ; j < P; j++ {
		for h := h0; h < h1; h++ {
			a := b.dotF32(qrow[h*r:(h+1)*r], lat[j*r:(j+1)*r])
			c := b.dotF32(qmrow[h*qk+s.NopeDim:(h+1)*qk], kpe[j*dr:(j+1)*dr])
			sc[(h-h0)*P+j] = scale * (a + c)
		}
	}

	for h := h0; h < h1; h++ {
		row := sc[(h-h0)*P : (h-h0+1)*P]
		m := float32(math.Inf(-1))
		for _, v := range row {
			m = max(m, v)
		}
		inv := 1 / b.expF32(row, row, m)
		for i := range row {
			row[i] *= inv
		}
		clear(orow[h*r : (h+1)*r])
	}

	j = 0
	var coef [4]float32
	for ; j+4 <= P; j += 4 {
		for h := h0; h < h1; h++ {
			copy(coef[:], sc[(h-h0)*P+j:])
			b.axpy4F32(orow[h*r:(h+1)*r], lat[j*r:], r, &coef)
		}
	}
	for ; j < P; j++ {
		for h := h0; h < h1; h++ {
			axpy(orow[h*r:(h+1)*r], sc[(h-h0)*P+j], lat[j*r:(j+1)*r])
		}
	}
}
