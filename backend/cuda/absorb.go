//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"
	"os"

	"github.com/mmfp4/mmfp4/backend"
)

// absorbTCMinTokens is the smallest batch whose absorbed query runs on the
// tensor cores (kernels/absorb.cu); 0 leaves it off (tests). On an H200
// (20 heads, dn 192, rank 512) the kernel was the fastest at every size
// measured, down to one row: 5.8 us against absorb_query_q's 7.7 at 1 row,
// 6.0 against 19.7 at 16, 55 against absorb_query_many's 288 at 1024
// (docs/perf.md).
var absorbTCMinTokens = 1

// absorbRopeOff keeps a prefill's RoPEs and cache write in a launch of
// their own (MMFP4_CUDA_ABSORB_ROPE=0; A/B runs).
var absorbRopeOff = os.Getenv("MMFP4_CUDA_ABSORB_ROPE") == "0"

// absorbTiles is the token tiles of a block of a prefill's absorbed query:
// 2 (absorb_query_tc2), or 1 (absorb_query_tc, MMFP4_CUDA_ABSORB_TILES=1).
var absorbTiles = map[bool]int{false: 2, true: 1}[os.Getenv("MMFP4_CUDA_ABSORB_TILES") == "1"]

// absorbTCM and absorbTCN are AT_M and AT_N in absorb.cu: the tokens and
// columns of one block.
const (
	absorbTCM = 64
	absorbTCN = 128
)

// absorbTCShared is the kernel's dynamic shared memory for dn contraction
// rows (see absorb.cu).
func absorbTCShared(dn int) int {
	return 4*absorbTCM*(dn+8) + 2*dn*(absorbTCN+8) + 4*absorbTCM + 4*256 + 4*dn
}

// absorbTC queues the tensor-core absorbed query when it applies (MMFP4
// W_UK, at least absorbTCMinTokens rows, a compiled dn, whole column
// slabs, aligned rows) and reports whether it did.
func (b *Backend) absorbTC(ql, qm *tensor, w *weight, s backend.MLAShape) bool {
	if absorbTCMinTokens <= 0 || ql.rows < absorbTCMinTokens || w.q == nil ||
		(s.NopeDim != 128 && s.NopeDim != 192) || s.Rank%absorbTCN != 0 || w.q.G%32 != 0 ||
		qm.ld%4 != 0 || (s.NopeDim+s.RopeDim)%4 != 0 || qm.ptr%16 != 0 || ql.ld%2 != 0 || ql.ptr%8 != 0 {
		return false
	}
	shared := absorbTCShared(s.NopeDim)
	if shared > b.dev.Info().SharedOptin {
		return false
	}
	q := w.q
	name := fmt.Sprintf("absorb_query_tc_%d", s.NopeDim)
	tiles := 1
	if ql.rows >= absorbRopeMinRows && absorbTiles > 1 {
		tiles, name = absorbTiles, fmt.Sprintf("absorb_query_tc%d_%d", absorbTiles, s.NopeDim)
	}
	grid := Dim{uint32(s.Rank / absorbTCN), uint32((ql.rows + tiles*absorbTCM - 1) / (tiles * absorbTCM)), uint32(s.Heads)}
	if b.absorbRope(ql, qm, q, s, grid, shared) || b.absorbRopeMany(ql, qm, q, s, grid, shared, tiles) {
		return true
	}
	b.do("absorb query", func(c *Ctx) error {
		k, err := c.kernelShared("absorb", name, shared)
		if err != nil {
			return err
		}
		return c.Launch(k, grid, D1(256), shared,
			ql.ptr, ql.ld, qm.ptr, qm.ld, q.Codes, q.Scales, q.RowScale, q.G, s.Rank, s.RopeDim, ql.rows)
	})
	return true
}

// absorbRopeMinRows is the smallest step whose RoPEs and cache write, queued
// just before its absorbed query, run in the absorbed query's launch
// (absorb_query_tc_rope_many): a prefill's rows, above the serving steps'.
// absorbRopeRows is ABSORB_ROPE_ROWS in absorb.cu: the rows of each block
// of the extra head slices.
const (
	absorbRopeMinRows = StreamMaxTokens + 1
	absorbRopeRows    = 8
)

// absorbRopeMany is absorbRope for the rows of a prefill: the RoPEs and
// cache write in blocks of extra head slices of the absorbed query's grid,
// absorbRopeRows rows a block. It reports whether it queued it.
func (b *Backend) absorbRopeMany(ql, qm *tensor, w *QMatrix, s backend.MLAShape, grid Dim, shared, tiles int) bool {
	rc := b.lastRopeCache
	if absorbRopeOff || !b.chained() || rc == nil || rc.flush != b.flushes || rc.idx != len(b.pending)-1 {
		return false
	}
	r1, r2 := rc.r1, rc.r2
	T := ql.rows
	if T < absorbRopeMinRows || r1.m != *qm || rc.lat.rows != T || r1.headStride != s.NopeDim+s.RopeDim || r1.offset < s.NopeDim ||
		r1.offset+r1.dim > r1.headStride || rc.rank != s.Rank || rc.rope != s.RopeDim || overlapsAny(ql, []tensor{*qm, rc.kpe, rc.lat}) {
		return false
	}
	if tiles != 2 {
		return false
	}
	slab, blocks := int(grid.X*grid.Y), (T+absorbRopeRows-1)/absorbRopeRows
	grid.Z += uint32((blocks + slab - 1) / slab)
	name := fmt.Sprintf("absorb_query_tc2_rope_many_%d", s.NopeDim)
	b.pending[rc.idx] = queuedOp{"absorb query+rope+cache write", func(c *Ctx) error {
		k, err := c.kernelShared("absorb", name, shared)
		if err != nil {
			return err
		}
		return c.Launch(k, grid, D1(256), shared,
			ql.ptr, ql.ld, qm.ptr, qm.ld, w.Codes, w.Scales, w.RowScale, w.G, s.Rank, s.RopeDim, T, s.Heads,
			r1.m.ptr, r1.heads, r1.headStride, r1.offset, rc.kpe.ptr, rc.kpe.ld, r2.heads, r2.headStride, r2.offset, r2.dim, r2.il, r2.table,
			rc.layer, rc.dtype, rc.slots, rc.lat.ptr, rc.lat.ld)
	}}
	b.lastRopeCache = nil
	b.prefillMerges[prefillRope]++
	return true
}

// The prefill's merged launches counted in Backend.prefillMerges (tests).
const (
	prefillValues  = iota // value expansions with the int8 form of their output
	prefillRope           // absorbed queries with the RoPEs and cache write
	prefillNorms          // latent norms in the q_a norm's launch
	prefillCombine        // MoE combines with the residual add and the next norm
)
