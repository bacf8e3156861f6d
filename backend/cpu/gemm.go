package cpu

import (
	"math"
	"sync"

	"github.com/mmfp4/mmfp4/format"
)

// gemmMinTokens is the smallest batch that takes the blocked prefill
// kernel: below it, widening the tile costs more than it saves.
const gemmMinTokens = 4

// gemmItemRows is the number of weight rows per work item (four tiles).
const gemmItemRows = 64

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

	// A work item is gemmItemRows rows: per block of 8 tokens, each token's
	// outputs are then 256 contiguous bytes, which keeps the scattered
	// writes into the output rows few.
	items := (m.N + gemmItemRows - 1) / gemmItemRows
	tileBytes := groups * 2048
	b.pool.run(items, 1, func(lo, hi int) {
		bp, _ := gemmTiles.Get().(*[]byte)
		if bp == nil || cap(*bp) < gemmItemRows/16*tileBytes {
			buf := make([]byte, gemmItemRows/16*tileBytes)
			bp = &buf
		}
		defer gemmTiles.Put(bp)
		wsc := make([]float32, gemmItemRows*groups)
		var rs [gemmItemRows]float32
		var out [gemmItemRows / 16][8 * 16]float32
		for item := lo; item < hi; item++ {
			n0 := item * gemmItemRows
			sub := (min(gemmItemRows, m.N-n0) + 15) / 16
			for j := 0; j < sub; j++ {
				nj := n0 + 16*j
				rows := min(16, m.N-nj)
				gemmPrep(b.isa, m, nj, rows, (*bp)[j*tileBytes:(j+1)*tileBytes])
				w, r := wsc[j*16*groups:(j+1)*16*groups], rs[j*16:(j+1)*16]
				for i := 0; i < 16; i++ {
					if i >= rows {
						r[i] = 0
						for g := 0; g < groups; g++ {
							w[g*16+i] = 0
						}
						continue
					}
					r[i] = m.RowScale[nj+i] * 0.5
					for g, s := range m.Scales[(nj+i)*groups : (nj+i+1)*groups] {
						w[g*16+i] = e4m3Table[s]
					}
				}
			}
			rows := min(gemmItemRows, m.N-n0)
			for t0 := 0; t0 < T; t0 += 8 {
				for j := 0; j < sub; j++ {
					gemmBlock(b.isa, (*bp)[j*tileBytes:(j+1)*tileBytes], wsc[j*16*groups:(j+1)*16*groups], groups,
						xq[t0*K:], K, xsc[2*t0*groups:], (*[16]float32)(rs[j*16:]), &out[j])
				}
				for t := t0; t < min(t0+8, T); t++ {
					row := d.data[t*d.stride+n0 : t*d.stride+n0+rows]
					for j := 0; j < sub; j++ {
						copy(row[16*j:], out[j][(t-t0)*16:(t-t0+1)*16])
					}
				}
			}
		}
	})
	return true
}
