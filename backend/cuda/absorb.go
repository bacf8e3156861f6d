//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"

	"github.com/mmfp4/mmfp4/backend"
)

// absorbTCMinTokens is the smallest batch whose absorbed query runs on the
// tensor cores (kernels/absorb.cu); 0 leaves it off (tests). On an H200
// (20 heads, dn 192, rank 512) the kernel was the fastest at every size
// measured, down to one row: 5.8 us against absorb_query_q's 7.7 at 1 row,
// 6.0 against 19.7 at 16, 55 against absorb_query_many's 288 at 1024
// (docs/perf.md).
var absorbTCMinTokens = 1

// absorbTilesMinRows is the smallest step whose absorbed query takes two
// token tiles a block (absorb_query_tc2): a prefill's rows, above the
// serving steps' (at 1024 rows 47.3 against absorb_query_tc's 50.3 us on
// an H200, docs/perf.md).
const absorbTilesMinRows = StreamMaxTokens + 1

// prefillFuseOff turns off the merged launches and kernels of a prefill's
// small ops, so that tests can compare them with the separate ones: the
// value expansion with the int8 form of its output, the latent's norm in
// the q_a norm's launch, the MoE's combine with the residual add and the
// next norm, the absorbed query's two tiles a block, the RoPEs and cache
// write by rope2_cache_rows.
var prefillFuseOff bool

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
	if ql.rows >= absorbTilesMinRows && !prefillFuseOff {
		tiles, name = 2, fmt.Sprintf("absorb_query_tc2_%d", s.NopeDim)
	}
	grid := Dim{uint32(s.Rank / absorbTCN), uint32((ql.rows + tiles*absorbTCM - 1) / (tiles * absorbTCM)), uint32(s.Heads)}
	if b.absorbRope(ql, qm, q, s, grid, shared) || b.absorbRopeRows(ql, qm, q, s, grid, shared) {
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

// The prefill's merged launches counted in Backend.prefillMerges (tests).
const (
	prefillValues   = iota // value expansions with the int8 form of their output
	prefillNorms           // latent norms in the q_a norm's launch
	prefillCombine         // MoE combines with the residual add and the next norm
	prefillRopeRows        // RoPEs and cache writes by rope2_cache_rows
)

// ropeRowsFit reports whether the RoPEs r1 (the queries') and r2 (the
// key's) and the cache write of rows rows take rope2_cache_rows
// (absorb.cu): a prefill's rows (as absorbTilesMinRows), one key head
// rotated whole, RC_Q, RC_L's bounds, and a bf16 or f32 cache (dtype, as
// kernelDType: the kernel writes no fp8 or fp4 records; rope2_cache_write
// takes those).
func ropeRowsFit(rows int, r1, r2 *ropeOp, rank, rope, dtype int) bool {
	const rcQ, rcL = 4, 4 // RC_Q, RC_L
	return !prefillFuseOff && dtype <= 1 && rows >= absorbTilesMinRows && r2.heads == 1 && r2.offset == 0 && r2.dim == rope &&
		r1.dim == r2.dim && r1.heads*r1.dim/2 <= 256*rcQ && rank <= 256*rcL && r1.dim/2 <= 256
}
