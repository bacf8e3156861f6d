package cpu

import "github.com/mmfp4/mmfp4/backend"

// Prefill attention as two matrix products per block of tokens, on the
// sgemm4x64 kernel (4 query rows x 64 columns, no horizontal sums):
//
//	scores = Q C^T, Q the queries (token, head) of the block, each the
//	         concatenation [q_lat | q_pe], C the sequence's cache as one
//	         float32 matrix [positions][Rank+RopeDim] (copied or decoded
//	         once per call), C^T its transpose;
//	out    = softmax(scores) C_lat.
//
// Every query row of a block shares each loaded panel of C, so the cache
// is read from L2 rather than memory.

const (
	attnPrefillMinTokens = 16 // below, the per-token path (attendRange)
	attnBlockTokens      = 4  // tokens per work item
)

// latentAttentionPrefill runs the rows of seq; it reports false where it
// does not apply (no kernel, few rows, or a Rank that is not a multiple of
// 64).
func (b *Backend) latentAttentionPrefill(om, ql, qm *mat, layer int, seq *backend.Seq, s backend.MLAShape, scale float32) bool {
	T, H, r, dr := seq.Len, s.Heads, s.Rank, s.RopeDim
	if !hasSgemm(b.isa) || T < attnPrefillMinTokens || r%64 != 0 {
		return false
	}
	p := b.pool
	D, qk := r+dr, s.NopeDim+s.RopeDim
	pos0 := int(b.batch.Positions[seq.Start])
	P := pos0 + T
	P64 := (P + 63) &^ 63

	// The sequence's cache as one float32 matrix [P][D] (latent, then
	// k_pe), and transposed, [D][P64] with zeros beyond P.
	cp := getFloats(P * D)
	defer floatBufs.put(cp)
	cc := *cp
	for _, x := range b.spans(p, layer, seq, 0, P, cc, nil) {
		if &x.data[0] != &cc[x.j0*D] {
			copy(cc[x.j0*D:(x.j0+x.n)*D], x.data)
		}
	}
	ctp := getFloats(D * P64)
	defer floatBufs.put(ctp)
	ct := *ctp
	b.workers.run(D, 16, func(lo, hi int) {
		for d := lo; d < hi; d++ {
			row := ct[d*P64 : (d+1)*P64]
			for j := 0; j < P; j++ {
				row[j] = cc[j*D+d]
			}
			clear(row[P:])
		}
	})

	Hp := (H + 3) &^ 3 // query rows per token, padded to whole kernel blocks
	items := (T + attnBlockTokens - 1) / attnBlockTokens
	b.workers.run(items, 1, func(lo, hi int) {
		for item := lo; item < hi; item++ {
			i0, i1 := item*attnBlockTokens, min(T, (item+1)*attnBlockTokens)
			rows := (i1 - i0) * Hp
			Pmax := pos0 + i1
			Pm64 := (Pmax + 63) &^ 63

			qp := getFloats(rows * D)
			q := *qp
			clear(q)
			for i := i0; i < i1; i++ {
				t := seq.Start + i
				for h := 0; h < H; h++ {
					row := q[((i-i0)*Hp+h)*D:]
					for k, v := range ql.row(t)[h*r : (h+1)*r] {
						row[k] = scale * v
					}
					for k, v := range qm.row(t)[h*qk+s.NopeDim : (h+1)*qk] {
						row[r+k] = scale * v
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
			for i := i0; i < i1; i++ {
				Pt := pos0 + i + 1
				for h := 0; h < Hp; h++ {
					row := sc[((i-i0)*Hp+h)*Pm64 : ((i-i0)*Hp+h+1)*Pm64]
					if h >= H {
						clear(row[:Pmax])
						continue
					}
					inv[(i-i0)*Hp+h] = 1 / b.expF32(row[:Pt], row[:Pt], b.maxF32(row[:Pt]))
					clear(row[Pt:Pmax])
				}
			}

			op := getFloats(rows * r)
			o := *op
			for db := 0; db < r; db += 64 {
				for rb := 0; rb < rows; rb += 4 {
					sgemm4x64(sc[rb*Pm64:], Pm64, cc[db:], D, Pmax, o[rb*r+db:], r)
				}
			}
			for i := i0; i < i1; i++ {
				orow := om.row(seq.Start + i)
				for h := 0; h < H; h++ {
					k := (i-i0)*Hp + h
					dst, src := orow[h*r:(h+1)*r], o[k*r:(k+1)*r]
					for c, v := range src {
						dst[c] = v * inv[k]
					}
				}
			}
			floatBufs.put(qp)
			floatBufs.put(sp)
			floatBufs.put(op)
		}
	})
	return true
}
