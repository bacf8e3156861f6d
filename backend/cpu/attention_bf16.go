package cpu

import (
	"math"

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

// bf16Tile is the most cached rows attendBF16 takes in one pass (74 KB at
// GLM-4.7-Flash's 576 values a row: they stay in L2 between the scores
// and the weighted sums).
const bf16Tile = 64

// attendBF16 is attendSpans for positions [j0, j1) of seq in a bf16 pool,
// read in place, in one pass over the rows: for each tile of up to
// bf16Tile rows (within a cache block), the scores of every head, one step
// of a running softmax (each head's maximum and sum so far; the sums
// accumulated before are scaled when the maximum grows), and the weighted
// sums of the tile's latents, while the rows are still in the caches. The
// next tile's lines are prefetched while the scores of this one are
// computed, and during the last tile the rows in after (the first tile of
// the work item likely to come next). The kernels widen each 64-byte
// block of a row once for four heads; out is left with each block of 32
// in even-then-odd order (evenOdd32), for the caller to put back. q is the
// row's queries from bf16Queries; the caller checks hasBF16Attention.
func (b *Backend) attendBF16(out, q []float32, p *pool, layer int, seq *backend.Seq, j0, j1 int, s backend.MLAShape, scale float32, m, l []float32, after []uint16) {
	H, r, w := s.Heads, s.Rank, p.width()
	const T = bf16Tile
	bp := getFloats(H*T + 5*H)
	defer floatBufs.put(bp)
	sc, tail, alpha := (*bp)[:H*T], (*bp)[H*T:H*T+4*H], (*bp)[H*T+4*H:H*T+5*H]
	for h := 0; h < H; h++ {
		m[h], l[h] = float32(math.Inf(-1)), 0
	}
	rows := p.bf16Tile(layer, seq, j0, j1)
	prefetchRows(b.isa, rows)
	for j := j0; j < j1; {
		n := len(rows) / w
		next := after
		if j+n < j1 {
			next = p.bf16Tile(layer, seq, j+n, j1)
		}
		// Scores: four heads at a time over the tile's rows in fours
		// (their queries stay in L1), each call prefetching a share of
		// the next tile.
		n4 := n &^ 3
		share := (len(next)/32 + H/4 - 1) / (H / 4) * 32
		if n4 > 0 {
			for h := 0; h < H; h += 4 {
				pf := next[:min(share, len(next))]
				next = next[len(pf):]
				scoresBF16Rows(q[h*w:], w, rows, w, n4, w, sc[h*T:], T, scale, pf)
			}
		}
		switch {
		case n4 == n:
		case n >= 4: // the last four rows again: the same scores again, and the new ones
			scoresBF16x4(q, w, H, rows[(n-4)*w:], w, w, sc[n-4:], T, scale)
		default: // fewer than four rows: each one as four copies of itself (row stride 0)
			for i := 0; i < n; i++ {
				scoresBF16x4(q, w, H, rows[i*w:(i+1)*w], 0, w, tail, 4, scale)
				for h := 0; h < H; h++ {
					sc[h*T+i] = tail[h*4]
				}
			}
		}
		softmaxRows(sc, T, H, n, m, l, alpha)
		// Weighted sums: four heads at a time over every panel of 64
		// latent columns; the first tile stores, the others scale what
		// is there by alpha and add.
		for h := 0; h < H; h += 4 {
			var a []float32
			if j > j0 {
				a = alpha[h : h+4]
			}
			axpyBF16Panels(sc[h*T:], T, rows, w, n, r/64, out[h*r:], r, a)
		}
		j += n
		if j < j1 {
			rows = p.bf16Tile(layer, seq, j, j1)
		}
	}
}

// bf16Tile returns the cached rows of the tile of attendBF16 that starts
// at position j of seq in layer, for a range of positions ending at j1:
// up to bf16Tile rows, within j's cache block. It is empty when j >= j1.
func (p *pool) bf16Tile(layer int, seq *backend.Seq, j, j1 int) []uint16 {
	if j >= j1 {
		return nil
	}
	w, bs := p.width(), p.blockSize
	n := min(j1, (j/bs+1)*bs, j+bf16Tile) - j
	slot := seq.Slot(j, bs)
	return p.bf16[layer][slot*w : (slot+n)*w]
}
