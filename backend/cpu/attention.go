package cpu

import (
	"math"

	"github.com/mmfp4/mmfp4/backend"
)

// latentAttentionSIMD is LatentAttention on the SIMD float kernels; it
// reports false for the pure-Go family, which keeps the reference loop.
//
// A work item is one token, all heads, and a range of cached positions.
// Its loops run over the positions four at a time and, inside, over the
// heads, so each latent row is read from memory once per item and then
// reused from the L1 cache by every head: first the scores (dots4F32),
// then their exponentials (expF32), then the weighted sum of the latents
// (axpy4F32). With few tokens (decode) the positions are split over the
// threads, each range keeps its own running maximum and sum, and the
// ranges are merged at the end; with many tokens each token is one item.
func (b *Backend) latentAttentionSIMD(om, ql, qm *mat, lat, kpe []float32, pos0 int, s backend.MLAShape, scale float32) bool {
	if b.isa == isaGo {
		return false
	}
	if b.latentAttentionPrefill(om, ql, qm, lat, kpe, pos0, s, scale) {
		return true
	}
	T, H, r := ql.rows, s.Heads, s.Rank
	chunks := 1
	if T < 4*b.threads {
		chunks = max(1, min(4*b.threads/T, (pos0+1)/64)) // ranges of at least 64 positions
	}
	if chunks == 1 {
		b.pool.run(T, 1, func(lo, hi int) {
			for t := lo; t < hi; t++ {
				b.attendRange(om.row(t), ql, qm, lat, kpe, t, 0, pos0+t+1, s, scale, nil, nil)
			}
		})
		return true
	}
	// Partial results per (token, chunk): the unnormalised output, and per
	// head the maximum score and the sum of exponentials.
	bp := getFloats(T * chunks * H * (r + 2))
	defer floatBufs.Put(bp)
	outs := (*bp)[:T*chunks*H*r]
	ms := (*bp)[T*chunks*H*r : T*chunks*H*(r+1)]
	ls := (*bp)[T*chunks*H*(r+1):]
	b.pool.run(T*chunks, 1, func(lo, hi int) {
		for item := lo; item < hi; item++ {
			t, c := item/chunks, item%chunks
			P := pos0 + t + 1
			j0, j1 := c*P/chunks, (c+1)*P/chunks
			b.attendRange(outs[item*H*r:(item+1)*H*r], ql, qm, lat, kpe, t, j0, j1, s, scale,
				ms[item*H:(item+1)*H], ls[item*H:(item+1)*H])
		}
	})
	w := make([]float32, chunks)
	for t := 0; t < T; t++ {
		orow := om.row(t)
		for h := 0; h < H; h++ {
			m := float32(math.Inf(-1))
			for c := 0; c < chunks; c++ {
				m = max(m, ms[(t*chunks+c)*H+h])
			}
			var l float32
			for c := range w {
				i := (t*chunks+c)*H + h
				w[c] = float32(math.Exp(float64(ms[i] - m)))
				l += w[c] * ls[i]
			}
			out := orow[h*r : (h+1)*r]
			clear(out)
			for c, wc := range w {
				i := t*chunks + c
				axpy(out, wc/l, outs[(i*H+h)*r:(i*H+h+1)*r])
			}
		}
	}
	return true
}

// attendRange computes, for token t and every head, attention over cached
// positions [j0, j1) into out (heads x Rank). With m and l nil it writes
// the normalised output; otherwise it writes the output unnormalised and
// each head's maximum score into m and sum of exp(score - max) into l.
func (b *Backend) attendRange(out []float32, ql, qm *mat, lat, kpe []float32, t, j0, j1 int, s backend.MLAShape, scale float32, m, l []float32) {
	H, r, dr, qk := s.Heads, s.Rank, s.RopeDim, s.NopeDim+s.RopeDim
	P := j1 - j0
	bp := getFloats(H * P)
	defer floatBufs.Put(bp)
	sc := *bp

	qrow, qmrow := ql.row(t), qm.row(t)
	fused := hasHeadKernels(b.isa, r, dr) // all heads in one call per 4 positions
	var o1, o2 [4]float32
	j := j0
	for ; j+4 <= j1; j += 4 {
		if fused {
			scoresHx4(qrow, r, qmrow[s.NopeDim:], qk, H, lat[j*r:], r, kpe[j*dr:], dr, sc[j-j0:], P, scale)
			continue
		}
		for h := 0; h < H; h++ {
			b.dots4F32(qrow[h*r:(h+1)*r], lat[j*r:], r, &o1)
			b.dots4F32(qmrow[h*qk+s.NopeDim:(h+1)*qk], kpe[j*dr:], dr, &o2)
			row := sc[h*P+j-j0 : h*P+j-j0+4]
			for i := range row {
				row[i] = scale * (o1[i] + o2[i])
			}
		}
	}
	for ; j < j1; j++ {
		for h := 0; h < H; h++ {
			a := b.dotF32(qrow[h*r:(h+1)*r], lat[j*r:(j+1)*r])
			c := b.dotF32(qmrow[h*qk+s.NopeDim:(h+1)*qk], kpe[j*dr:(j+1)*dr])
			sc[h*P+j-j0] = scale * (a + c)
		}
	}

	for h := 0; h < H; h++ {
		row := sc[h*P : (h+1)*P]
		mx := float32(math.Inf(-1))
		for _, v := range row {
			mx = max(mx, v)
		}
		sum := b.expF32(row, row, mx)
		if m != nil {
			m[h], l[h] = mx, sum
		} else {
			inv := 1 / sum
			for i := range row {
				row[i] *= inv
			}
		}
		clear(out[h*r : (h+1)*r])
	}

	j = j0
	var coef [4]float32
	for ; j+4 <= j1; j += 4 {
		if fused {
			axpyHx4(out, H, lat[j*r:], r, sc[j-j0:], P)
			continue
		}
		for h := 0; h < H; h++ {
			copy(coef[:], sc[h*P+j-j0:])
			b.axpy4F32(out[h*r:(h+1)*r], lat[j*r:], r, &coef)
		}
	}
	for ; j < j1; j++ {
		for h := 0; h < H; h++ {
			axpy(out[h*r:(h+1)*r], sc[h*P+j-j0], lat[j*r:(j+1)*r])
		}
	}
}
