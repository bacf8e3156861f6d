package cpu

import (
	"math"
	"sync"

	"github.com/mmfp4/mmfp4/format"
)

// gemmMinTokens is the smallest batch that takes the blocked prefill
// kernel: below it, widening the tile costs more than it saves.
const gemmMinTokens = 4

// gemmTiles recycles the per-item tile buffers of gemmInt8.
var gemmTiles sync.Pool

// gemmInt8 computes dst = x W^T for a batch of quantized activations with
// the blocked kernel of family b.isa; it reports false where there is none
// (then the caller runs the decode kernel per token). Each work item is a
// block of 16 rows: their codes are widened once into a tile, which then
// serves every block of 8 tokens.
func (b *Backend) gemmInt8(d *mat, a *qacts, m *format.Matrix) bool {
	if m.GroupSize != 128 || a.rows < gemmMinTokens || !hasGemm(b.isa) {
		return false
	}
	T, K, groups := a.rows, m.K, m.K/128
	Tp := (T + 7) &^ 7
	// Pad the batch to a multiple of 8 tokens with zero activations, and
	// interleave each group's scale with its bias correction.
	xq := a.q
	if Tp != T {
		xq = make([]int8, Tp*K)
		copy(xq, a.q)
	}
	xsc := make([]uint32, 2*Tp*groups)
	for i := 0; i < T*groups; i++ {
		xsc[2*i] = math.Float32bits(a.s[i])
		xsc[2*i+1] = uint32(-12 * a.sum[i])
	}

	blocks := (m.N + 15) / 16
	b.pool.run(blocks, 1, func(lo, hi int) {
		bp, _ := gemmTiles.Get().(*[]byte)
		if bp == nil || cap(*bp) < groups*2048 {
			buf := make([]byte, groups*2048)
			bp = &buf
		}
		defer gemmTiles.Put(bp)
		tile := (*bp)[:groups*2048]
		wsc := make([]float32, groups*16)
		var rs [16]float32
		var out [8 * 16]float32
		for blk := lo; blk < hi; blk++ {
			n0 := blk * 16
			rows := min(16, m.N-n0)
			gemmPrep(b.isa, m, n0, rows, tile)
			for r := 0; r < 16; r++ {
				if r >= rows {
					rs[r] = 0
					for g := 0; g < groups; g++ {
						wsc[g*16+r] = 0
					}
					continue
				}
				rs[r] = m.RowScale[n0+r] * 0.5
				for g, s := range m.Scales[(n0+r)*groups : (n0+r+1)*groups] {
					wsc[g*16+r] = e4m3Table[s]
				}
			}
			for t0 := 0; t0 < T; t0 += 8 {
				gemmBlock(b.isa, tile, wsc, groups, xq[t0*K:], K, xsc[2*t0*groups:], &rs, &out)
				for t := t0; t < min(t0+8, T); t++ {
					copy(d.data[t*d.stride+n0:t*d.stride+n0+rows], out[(t-t0)*16:])
				}
			}
		}
	})
	return true
}
