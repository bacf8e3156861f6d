package cpu

import (
	"math"
	"sync"

	"github.com/mmfp4/mmfp4/format"
)

// gemmMinTokens is the smallest batch that takes the blocked prefill
// kernel: below it, widening the tile costs more than it saves. It is
// above moeFusedMaxTokens, so the fused MoE path and the per-expert one
// run the same (decode) kernel on the batches both accept.
const gemmMinTokens = moeFusedMaxTokens + 1

// gemmTileBudget is the most bytes of widened tiles per work item.
const gemmTileBudget = 512 << 10

// gemmTiles recycles the per-item tile buffers of gemmInt8.
var gemmTiles sync.Pool

// gemmInt8 computes dst = x W^T for a batch of quantized activations with
// the blocked kernel of family b.isa; it reports false where there is none
// (then the caller runs the decode kernel per token). A kernel multiplies
// a tile of R rows (R = 16 on AVX-512, 8 on AVX2) by TB tokens (8 or 4):
// each tile is widened once and then serves every block of TB tokens.
func (b *Backend) gemmInt8(d *mat, a *qacts, m *format.Matrix) bool {
	R, TB, ok := gemmGeometry(b.isa)
	if m.GroupSize != 128 || a.rows < gemmMinTokens || !ok {
		return false
	}
	T, K, groups := a.rows, m.K, m.K/128
	Tp := (T + TB - 1) / TB * TB
	// Pad the batch to whole token blocks with zero activations, and
	// interleave each group's scale with its bias correction.
	xq := a.q
	if Tp != T {
		xp := int8Bufs.get(Tp * K)
		defer int8Bufs.put(xp)
		xq = *xp
		copy(xq, a.q[:T*K])
		clear(xq[T*K:])
	}
	xp := uint32Buf.get(2 * Tp * groups)
	defer uint32Buf.put(xp)
	xsc := *xp
	clear(xsc[2*T*groups:])
	for i := 0; i < T*groups; i++ {
		xsc[2*i] = math.Float32bits(a.s[i])
		xsc[2*i+1] = uint32(-12 * a.sum[i])
	}

	// A work item is itemRows rows, several tiles: per token block, each
	// token's outputs are then a contiguous run of itemRows floats. The
	// outputs of a batch are scattered over T rows far apart in memory, so
	// long runs keep the cache and TLB misses of those writes few; the
	// item's tiles (K bytes a row) stay within about half the L2 cache, and
	// there are at least 8 items a thread, so that the threads finish
	// together.
	itemRows := min(256, max(R, (gemmTileBudget/K)/R*R))
	itemRows = min(itemRows, max(R, (m.N/(8*b.threads)+R-1)/R*R))
	items := (m.N + itemRows - 1) / itemRows
	tileBytes := groups * R * 128
	tiles := itemRows / R
	b.workers.run(items, 1, func(lo, hi int) {
		bp, _ := gemmTiles.Get().(*[]byte)
		if bp == nil || cap(*bp) < tiles*tileBytes {
			buf := make([]byte, tiles*tileBytes)
			bp = &buf
		}
		defer gemmTiles.Put(bp)
		wsc := make([]float32, itemRows*groups)
		rs := make([]float32, itemRows)
		for item := lo; item < hi; item++ {
			n0 := item * itemRows
			rows := min(itemRows, m.N-n0)
			sub := (rows + R - 1) / R
			// The item's scales first, as one run of reads: read tile by
			// tile between the tiles' codes, each tile's few scale lines
			// were a fresh miss that nothing overlapped (a tenth of a
			// 1024-token prefill).
			for j := 0; j < sub; j++ {
				nj := n0 + R*j
				n := min(R, m.N-nj)
				w, r := wsc[j*R*groups:(j+1)*R*groups], rs[j*R:(j+1)*R]
				for i := 0; i < R; i++ {
					if i >= n {
						r[i] = 0
						for g := 0; g < groups; g++ {
							w[g*R+i] = 0
						}
						continue
					}
					r[i] = m.RowScale[nj+i] * 0.5
					for g, s := range m.Scales[(nj+i)*groups : (nj+i+1)*groups] {
						w[g*R+i] = e4m3Table[s]
					}
				}
			}
			for j := 0; j < sub; j++ {
				nj := n0 + R*j
				gemmPrep(b.isa, m, nj, min(R, m.N-nj), (*bp)[j*tileBytes:(j+1)*tileBytes])
			}
			for t0 := 0; t0 < T; t0 += TB {
				for j := 0; j < sub; j++ {
					nj := n0 + R*j
					gemmBlock(b.isa, (*bp)[j*tileBytes:(j+1)*tileBytes], wsc[j*R*groups:(j+1)*R*groups], groups,
						xq[t0*K:], K, xsc[2*t0*groups:], rs[j*R:(j+1)*R], d.data[t0*d.stride+nj:], d.stride, min(TB, T-t0), min(R, m.N-nj))
				}
			}
		}
	})
	return true
}
