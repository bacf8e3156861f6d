//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"math"
	"os"
	"strconv"

	"github.com/mmfp4/mmfp4/backend"
)

// The expanded form of a long prompt's attention (kernels/expand.cu):
// each head's keys and values made from the cached latent rows, then
// ordinary causal flash attention, 512 multiply-adds a head and pair of
// positions against the latent form's 1,088, for an expansion of every
// cached position of the sequence each step.

// The head shape expand.cu is compiled for (GLM-4.7-Flash's: EX_DN,
// EX_DR, EX_DV), expand_flash's query rows a block and keys a tile, and
// its shared rows' stride (EX_LD, bf16 values).
const (
	expandedDN   = 192
	expandedDR   = 64
	expandedDV   = 256
	expandedRows = 128
	expandedKeys = 64
	expandedLD   = 264
)

// expandedMinDefault is the default of Backend.expandedMin: the fewest
// positions of a sequence from which its prompt steps take the expanded
// form. On an H200 a prompt of 512 tokens (one step) prefilled 3% faster
// in the expanded form than in the latent form, one of 256 tokens 3%
// slower, one of 1024 10% faster.
const expandedMinDefault = 512

// expandedMinRows is the fewest rows of every sequence of a step that
// takes the expanded form. Expanding a position costs as many products as
// the expanded attention of about 400 rows saves there, so decode steps
// and short chunks stay on the latent kernels. On an H200, with the wgmma
// kernels, one layer's expanded attention of 256 rows took 11% less device
// time than the latent form's after no prefix and 35-55% less after 2048
// to 30720 positions (BenchmarkExpandedAttention); fewer rows are not
// measured.
const expandedMinRows = 256

// expandedMaxBytes bounds one sequence's gathered rows, keys and values
// (workspace; about 112k positions at GLM-4.7-Flash's shapes, past which
// the latent form runs): with the splits' partials and the step's other
// tensors (960 MiB in steps of 2048 rows) it stays inside the 4 GiB a
// device's cache pool leaves free (mmfp4.DeviceCacheReserve).
const expandedMaxBytes = 2 << 30

// expandedMinKeys is expandedMinDefault, or MMFP4_CUDA_EXPANDED_MIN (0
// turns the form off).
func expandedMinKeys() int {
	if v, err := strconv.Atoi(os.Getenv("MMFP4_CUDA_EXPANDED_MIN")); err == nil {
		return v
	}
	return expandedMinDefault
}

// expandedShared is expand_flash's shared memory: the queries and two
// stages of key and value tiles.
const expandedShared = (expandedRows + 4*expandedKeys) * expandedLD * 2

// expandGemmShared is expand_gemm's shared memory: three stages of two
// 128 x 72 tiles.
const expandGemmShared = 3 * 2 * 128 * 72 * 2

// expandGemmWGShared is expand_gemm_wg's shared memory: three stages of
// two tiles of 128 rows of 128 bytes, and the slack that aligns them to
// 1024 bytes; expandedWGShared is expand_flash_wg's: the queries, two
// stages of keys and of values, the slack.
const (
	expandGemmWGShared = 3*2*128*128 + 1024
	expandedWGShared   = 4*128*128 + 2*4*64*128 + 2*256*128 + 1024
)

// expandWGMMA sends the expanded form to its wgmma kernels (expand_gemm_wg,
// expand_flash_wg) where the kernels are built for sm_90a; elsewhere, or
// with MMFP4_CUDA_EXPANDED_WGMMA=0, it runs on mma.sync (expand_gemm,
// expand_flash). On an H200 the wgmma kernels prefilled 8192 tokens 14%
// faster and 32768 tokens 25% faster.
var expandWGMMA = os.Getenv("MMFP4_CUDA_EXPANDED_WGMMA") != "0"

// expandUseWG reports whether c runs the expanded form's wgmma kernels.
func expandUseWG(c *Ctx) bool {
	arch, err := c.Arch()
	return expandWGMMA && err == nil && arch == "sm_90a"
}

// ceil64 is n rounded up to a multiple of 64: the transposed values' row
// length.
func ceil64(n int) int { return (n + 63) &^ 63 }

// expandedBytes is the workspace of one sequence of n positions: its
// gathered rows, keys and values (bf16).
func expandedBytes(n int, s backend.MLAShape) int {
	return 2 * n * (s.Rank + s.RopeDim + s.Heads*(s.NopeDim+s.VDim))
}

// ExpandedFits reports whether the bound step's attention takes the
// expanded form (expandedTakes), with the shared memory expand_flash needs.
func (b *Backend) ExpandedFits(s backend.MLAShape) bool {
	return b.pool != nil && expandedTakes(b.batch, b.pool, s, b.expandedMin) &&
		expandedShared <= b.dev.Info().SharedOptin
}

// expandedTakes reports whether a step takes the expanded form: the
// compiled head shape over a pool of the same rank, and every sequence a
// prompt chunk of at least expandedMinRows rows reaching minKeys positions
// (0: never) within the workspace cap.
func expandedTakes(batch *backend.Batch, p *cachePool, s backend.MLAShape, minKeys int) bool {
	if minKeys <= 0 || batch == nil || len(batch.Seqs) == 0 ||
		s.NopeDim != expandedDN || s.RopeDim != expandedDR || s.VDim != expandedDV || s.Heads < 1 ||
		s.Rank%64 != 0 || p.rank != s.Rank || p.ropeDim != s.RopeDim || s.Heads*s.VDim*s.Rank >= 1<<30 {
		return false
	}
	for _, q := range batch.Seqs {
		n := seqKeys(batch, q)
		if q.Len < expandedMinRows || n < minKeys || expandedBytes(n, s) > expandedMaxBytes {
			return false
		}
	}
	return true
}

// seqKeys is the positions sequence q's last row attends to (its
// positions ascend).
func seqKeys(batch *backend.Batch, q backend.Seq) int {
	return int(batch.Positions[q.Start+q.Len-1]) + 1
}

// expandedSplits is how many blocks share a query tile's keys. One where
// the rows are at least half the keys: the query tiles then differ in
// their keys, the longest start first, and the short ones fill the last
// wave. Else enough blocks for about four waves of the multiprocessors
// (tiles of equal keys leave a partial last wave idle), each split at
// least four key tiles.
func (b *Backend) expandedSplits(rows, keys, heads int) int {
	if 2*rows >= keys {
		return 1
	}
	blocks := (rows + expandedRows - 1) / expandedRows * heads
	s := (4*b.dev.Info().SMs + blocks - 1) / blocks
	return max(1, min(s, 16, (keys+expandedKeys-1)/expandedKeys/4))
}

// ExpandedAttention runs the bound step's attention in the expanded form
// (ExpandedFits must hold), one sequence after another.
func (b *Backend) ExpandedAttention(out, q backend.Tensor, layer int, wUK, wUV backend.Weight, s backend.MLAShape, scale float32) {
	b.flushPiece()
	om, qm, uk, uv, p := asTensor(out), asTensor(q), asWeight(wUK), asWeight(wUV), b.pool
	switch {
	case !b.ExpandedFits(s):
		b.fail("expanded attention: the step does not fit the expanded form (ExpandedFits)")
		return
	case layer < 0 || layer >= p.layers:
		b.fail("expanded attention over layer %d of %d", layer, p.layers)
		return
	}
	T, H, dn, dv, r := b.batch.Rows(), s.Heads, s.NopeDim, s.VDim, s.Rank
	if b.badShape("expanded attention out", [2]int{om.rows, om.cols}, [2]int{T, H * dv}) ||
		b.badShape("expanded attention q", [2]int{qm.rows, qm.cols}, [2]int{T, H * (dn + s.RopeDim)}) ||
		b.badShape("expanded attention W_UK", [2]int{uk.n, uk.k}, [2]int{H * dn, r}) ||
		b.badShape("expanded attention W_UV", [2]int{uv.n, uv.k}, [2]int{H * dv, r}) {
		return
	}
	if om.ld%4 != 0 || qm.ld%4 != 0 || om.ptr%16 != 0 || qm.ptr%16 != 0 {
		b.fail("expanded attention: rows not 16-byte aligned (out ld %d, q ld %d)", om.ld, qm.ld)
		return
	}
	b.countCached(p)
	b.count(weightBytes(uk) + weightBytes(uv))
	b.wrote(om)
	b.expandedSteps++

	// The longest sequence's workspace serves each in turn; the splits'
	// partials only where a sequence splits its keys.
	maxN, maxParts := b.meta.maxN, 0
	for _, sq := range b.batch.Seqs {
		if S := b.expandedSplits(sq.Len, seqKeys(b.batch, sq), H); S > 1 {
			maxParts = max(maxParts, S*sq.Len*H)
		}
	}
	bf := expandedBufs{
		rows: b.alloc(2 * maxN * (r + s.RopeDim)), keys: b.alloc(2 * maxN * H * dn), vals: b.alloc(2 * ceil64(maxN) * H * dv),
		wk: b.alloc(2 * H * dn * r), wv: b.alloc(2 * H * dv * r),
	}
	if maxParts > 0 {
		bf.po, bf.pml = b.alloc(4*maxParts*dv), b.alloc(8*maxParts)
	}
	// Both weights as bf16, once for every sequence.
	for _, w := range []struct {
		dst uint64
		w   *weight
	}{{bf.wk, uk}, {bf.wv, uv}} {
		var codes, scales uint64
		G := 32
		if w.w.q != nil {
			codes, scales, G = w.w.q.Codes, w.w.q.Scales, w.w.q.G
		}
		b.launch("expand weights", "expand", "expand_weights", D1((w.w.n*w.w.k/2+255)/256), D1(256),
			w.dst, codes, scales, w.w.dense, w.w.n, w.w.k, G)
	}
	for si, sq := range b.batch.Seqs {
		b.expandedSeq(si, sq, om, qm, uk, uv, s, layer, scale, bf)
	}
}

// expandedBufs is the workspace of a step's expanded attention: the
// gathered rows, keys and values of its longest sequence, the weights as
// bf16, and the splits' partial outputs.
type expandedBufs struct{ rows, keys, vals, wk, wv, po, pml uint64 }

// expandedSeq queues the expanded attention of sequence si of the step:
// its cached rows gathered, its keys and values, the attention's splits
// and their merge.
func (b *Backend) expandedSeq(si int, sq backend.Seq, om, qm *tensor, uk, uv *weight, s backend.MLAShape, layer int, scale float32, bf expandedBufs) {
	p, H, dn, dv, r := b.pool, s.Heads, s.NopeDim, s.VDim, s.Rank
	width := r + s.RopeDim
	n := seqKeys(b.batch, sq)
	b.launch("expand gather", "ops", "cache_gather_bf16", D1(n), D1(256),
		bf.rows, p.layer(layer), p.kernelDType(), b.meta.seqBlocks, b.meta.blocks, si, p.blockSize, r, s.RopeDim)
	nc := ceil64(n)
	b.do("expand keys and values", func(c *Ctx) error {
		ukScale, uvScale := uint64(0), uint64(0)
		if uk.q != nil {
			ukScale = uk.q.RowScale
		}
		if uv.q != nil {
			uvScale = uv.q.RowScale
		}
		if expandUseWG(c) {
			k, err := c.kernelShared("expand", "expand_gemm_wg", expandGemmWGShared)
			if err != nil {
				return err
			}
			// The keys [n][H dn], then the values transposed [H dv][nc].
			if err := c.Launch(k, Dim{uint32((n + 127) / 128), uint32((H*dn + 127) / 128), 1}, D1(256), expandGemmWGShared,
				bf.keys, H*dn, bf.rows, width, n, bf.wk, r, H*dn, H*dn, ukScale, 0, r); err != nil {
				return err
			}
			return c.Launch(k, Dim{uint32((H*dv + 127) / 128), uint32((nc + 127) / 128), 1}, D1(256), expandGemmWGShared,
				bf.vals, nc, bf.wv, r, H*dv, bf.rows, width, n, nc, uvScale, 1, r)
		}
		gemm, err := c.kernelShared("expand", "expand_gemm", expandGemmShared)
		if err != nil {
			return err
		}
		for _, e := range []struct {
			dst, w, scale uint64
			m             *weight
		}{{bf.keys, bf.wk, ukScale, uk}, {bf.vals, bf.wv, uvScale, uv}} {
			if err := c.Launch(gemm, Dim{uint32((n + 127) / 128), uint32((e.m.n + 127) / 128), 1}, D1(256), expandGemmShared,
				e.dst, e.m.n, bf.rows, width, e.w, e.scale, n, e.m.n, r); err != nil {
				return err
			}
		}
		return nil
	})
	S := b.expandedSplits(sq.Len, n, H)
	nq := (sq.Len + expandedRows - 1) / expandedRows
	scale2 := scale * float32(math.Log2E)
	b.do("attention", func(c *Ctx) error {
		// The values: [n][H dv] for expand_flash, transposed [H dv][nc]
		// for expand_flash_wg.
		name, shared, ldv := "expand_flash", expandedShared, H*dv
		if expandUseWG(c) {
			name, shared, ldv = "expand_flash_wg", expandedWGShared, nc
		}
		flash, err := c.kernelShared("expand", name, shared)
		if err != nil {
			return err
		}
		return c.Launch(flash, Dim{uint32(nq * S), uint32(H), 1}, D1(256), shared,
			om.row(sq.Start), om.ld, bf.po, bf.pml, qm.row(sq.Start), qm.ld, bf.keys, H*dn, bf.rows, width, r, bf.vals, ldv,
			b.meta.pos+4*uint64(sq.Start), sq.Len, H, S, scale2)
	})
	if S > 1 {
		b.launch("attention merge", "expand", "expand_merge", Dim{uint32(sq.Len), uint32(H), 1}, D1(expandedDV/4),
			om.row(sq.Start), om.ld, bf.po, bf.pml, sq.Len, H, S)
	}
}
