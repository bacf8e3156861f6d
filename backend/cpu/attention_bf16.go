package cpu

import (
	"github.com/mmfp4/mmfp4/backend"
)

// evenOdd32 writes src into dst with each block of 32 values reordered:
// the 16 even-indexed values, then the 16 odd-indexed ones. That is the
// order in which the bf16 attention kernels widen a block of the cache.
func evenOdd32(dst, src []float32) {
	for b := 0; b+32 <= len(src); b += 32 {
		for i := 0; i < 16; i++ {
			dst[b+i] = src[b+2*i]
			dst[b+16+i] = src[b+2*i+1]
		}
	}
}

// bf16Queries writes each head's queries for attendBF16 into q (heads rows
// of rank+ropeDim, as a cached row is laid out): the absorbed query
// (qrow), then q_pe (the rotary part of qmrow), each block of 32 in
// even-then-odd order.
func (b *Backend) bf16Queries(q, qrow, qmrow []float32, s backend.MLAShape) {
	H, r, qk := s.Heads, s.Rank, s.NopeDim+s.RopeDim
	w := r + s.RopeDim
	eo := func(dst, src []float32) {
		if !evenOdd32SIMD(b.isa, dst, src) {
			evenOdd32(dst, src)
		}
	}
	for h := 0; h < H; h++ {
		eo(q[h*w:h*w+r], qrow[h*r:(h+1)*r])
		eo(q[h*w+r:(h+1)*w], qmrow[h*qk+s.NopeDim:(h+1)*qk])
	}
}

// attendBF16 is attendSpans for positions [j0, j1) of seq in a bf16 pool,
// read in place: the kernels widen each block of a cached row once for
// four heads, instead of converting every row to float32 first. q is the
// row's queries from bf16Queries; the caller checks hasBF16Attention.
func (b *Backend) attendBF16(out, q []float32, p *pool, layer int, seq *backend.Seq, j0, j1 int, s backend.MLAShape, scale float32, m, l []float32) {
	H, r := s.Heads, s.Rank
	w, bs := p.width(), p.blockSize
	P := j1 - j0
	bp := getFloats(H*P + 4*H)
	defer floatBufs.put(bp)
	sc, tail := (*bp)[:H*P], (*bp)[H*P:H*P+4*H]
	cache := p.bf16[layer]
	for j := j0; j < j1; {
		end := min(j1, (j/bs+1)*bs)
		slot := seq.Slot(j, bs)
		rows := cache[slot*w : (slot+end-j)*w]
		n, k := end-j, j-j0
		// The rows stream from memory (a step visits every layer's cache
		// once): the next four rows are requested before the current four
		// are multiplied, the block's first four at its start.
		prefetchRows(b.isa, rows[:min(n, 4)*w])
		i := 0
		for ; i+4 <= n; i += 4 {
			prefetchRows(b.isa, rows[min(n, i+4)*w:min(n, i+8)*w])
			scoresBF16x4(q, w, H, rows[i*w:], w, w, sc[k+i:], P, scale)
		}
		switch {
		case i == n:
		case n >= 4: // the last four rows again: the same scores again, and the new ones
			scoresBF16x4(q, w, H, rows[(n-4)*w:], w, w, sc[k+n-4:], P, scale)
		default: // fewer than four rows: each one as four copies of itself (row stride 0)
			for ; i < n; i++ {
				scoresBF16x4(q, w, H, rows[i*w:(i+1)*w], 0, w, tail, 4, scale)
				for h := 0; h < H; h++ {
					sc[h*P+k+i] = tail[h*4]
				}
			}
		}
		j = end
	}
	for h := 0; h < H; h++ {
		row := sc[h*P : (h+1)*P]
		m[h] = b.maxF32(row)
		l[h] = b.expF32(row, row, m[h])
	}
	// The weighted sums of the latents: heads in fours, the latent in
	// panels of 64, each block's rows once per panel and four heads. The
	// first block stores, the others add.
	for j := j0; j < j1; {
		end := min(j1, (j/bs+1)*bs)
		slot := seq.Slot(j, bs)
		rows := cache[slot*w : (slot+end-j)*w]
		k := j - j0
		for db := 0; db < r; db += 64 {
			for h := 0; h < H; h += 4 {
				axpyBF16x4x64(sc[h*P+k:], P, rows[db:], w, end-j, out[h*r+db:], r, j > j0)
			}
		}
		j = end
	}
}
