package cpu

import "github.com/mmfp4/mmfp4/backend"

// Prefill attention as two matrix products per block of tokens, on the
// sgemm4x64 kernel (4 query rows x 64 columns, no horizontal sums):
//
//	scores = Q C^T, Q the queries (token, head) of the block, each the
//	         concatenation [q_lat | q_pe], C^T the cache transposed once
//	         per call (latent then rotary key, [Rank+RopeDim][positions]);
//	out    = softmax(scores) C_lat, the latents as stored.
//
// Every query row of a block shares each loaded panel of C, so the cache
// is read from L2 rather than memory.

const (
	attnPrefillMinTokens = 16 // below, the per-token path (attendRange)
	attnBlockTokens      = 4  // tokens per work item
)

// latentAttentionPrefill reports false where it does not apply (no kernel,
// a small batch, or a Rank that is not a multiple of 64).
func (b *Backend) latentAttentionPrefill(om, ql, qm *mat, lat, kpe []float32, pos0 int, s backend.MLAShape, scale float32) bool {
	T, H, r, dr := ql.rows, s.Heads, s.Rank, s.RopeDim
	if !hasSgemm(b.isa) || T < attnPrefillMinTokens || r%64 != 0 {
		return false
	}
	D, qk := r+dr, s.NopeDim+s.RopeDim
	P := pos0 + T
	P64 := (P + 63) &^ 63

	// The transposed cache, zero beyond P.
	ct := make([]float32, D*P64)
	b.pool.run(D, 16, func(lo, hi int) {
		for j := 0; j < P; j++ {
			for d := lo; d < hi; d++ {
				if d < r {
					ct[d*P64+j] = lat[j*r+d]
				} else {
					ct[d*P64+j] = kpe[j*dr+d-r]
				}
			}
		}
	})

	Hp := (H + 3) &^ 3 // query rows per token, padded to whole kernel blocks
	items := (T + attnBlockTokens - 1) / attnBlockTokens
	b.pool.run(items, 1, func(lo, hi int) {
		for item := lo; item < hi; item++ {
			t0, t1 := item*attnBlockTokens, min(T, (item+1)*attnBlockTokens)
			rows := (t1 - t0) * Hp
			Pmax := pos0 + t1
			Pm64 := (Pmax + 63) &^ 63

			qp := getFloats(rows * D)
			q := *qp
			clear(q)
			for t := t0; t < t1; t++ {
				for h := 0; h < H; h++ {
					row := q[((t-t0)*Hp+h)*D:]
					for i, v := range ql.row(t)[h*r : (h+1)*r] {
						row[i] = scale * v
					}
					for i, v := range qm.row(t)[h*qk+s.NopeDim : (h+1)*qk] {
						row[r+i] = scale * v
					}
				}
			}

			sp := getFloats(rows * Pm64)
			sc := *sp
			for jb := 0; jb < Pm64; jb += 64 {
				for rb := 0; rb < rows; rb += 4 {
					sgemm4x64(q[rb*D:], D, ct[jb:], P64, D, sc[rb*Pm64+jb:], Pm64)
				}
			}

			inv := make([]float32, rows)
			for t := t0; t < t1; t++ {
				Pt := pos0 + t + 1
				for h := 0; h < Hp; h++ {
					row := sc[((t-t0)*Hp+h)*Pm64 : ((t-t0)*Hp+h+1)*Pm64]
					if h >= H {
						clear(row[:Pmax])
						continue
					}
					inv[(t-t0)*Hp+h] = 1 / b.expF32(row[:Pt], row[:Pt], b.maxF32(row[:Pt]))
					clear(row[Pt:Pmax])
				}
			}

			op := getFloats(rows * r)
			o := *op
			for db := 0; db < r; db += 64 {
				for rb := 0; rb < rows; rb += 4 {
					sgemm4x64(sc[rb*Pm64:], Pm64, lat[db:], r, Pmax, o[rb*r+db:], r)
				}
			}
			for t := t0; t < t1; t++ {
				orow := om.row(t)
				for h := 0; h < H; h++ {
					k := (t-t0)*Hp + h
					dst, src := orow[h*r:(h+1)*r], o[k*r:(k+1)*r]
					for i, v := range src {
						dst[i] = v * inv[k]
					}
				}
			}
			floatBufs.Put(qp)
			floatBufs.Put(sp)
			floatBufs.Put(op)
		}
	})
	return true
}
