//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"
	"os"
	"slices"

	"github.com/mmfp4/mmfp4/backend"
)

// flashMinRows is the smallest step (in rows) whose attention runs the
// tensor-core flash kernel (kernels/flash.cu) instead of the split
// kernels; 0 leaves it off (MMFP4_CUDA_FLASH=0). On an H200 the flash
// kernel was the faster at every size measured, down to 16 rows: 0.013
// against 0.016 ms from an empty cache, 0.098 against 0.119 after 1024
// positions (docs/perf.md).
var flashMinRows = 16

// flashTokens and flashHeads are FA_TQ and FA_HB in flash.cu: the tokens
// and heads of one block.
const (
	flashTokens = 8
	flashHeads  = 4
)

// flashVariant picks the flash kernel's variant (suffix qQpPdD of its
// name): Q, P 1 when the queries' and the weights' lo halves are
// multiplied too, D 1 with two key tiles.
var flashVariant = "q0p0d1"

// flashVariants are the compiled variants.
var flashVariants = []string{"q1p1d0", "q1p0d0", "q0p0d1"}

func init() {
	switch v := os.Getenv("MMFP4_CUDA_FLASH"); {
	case v == "0":
		flashMinRows = 0
	case slices.Contains(flashVariants, v):
		flashVariant = v
	}
}

// flashShared is the flash kernel's dynamic shared memory for rows of
// width w = rank + rope dims (see flash.cu) in variant v.
func flashShared(w int, v string) int {
	ld := w + 8
	qn, pn, nb, tn := 1, 1, 1, 64
	if v[1] == '1' {
		qn = 2
	}
	if v[3] == '1' {
		pn = 2
	}
	if v[5] == '1' {
		nb = 2
	}
	return qn*32*ld*2 + nb*tn*ld*2 + 4*32*(tn+8)*4 + pn*32*(tn+8)*2 + (2*tn+2*32)*4 + nb*tn*4
}

// flashShapes are the (rank, rope dims) the flash kernel is compiled for:
// the model's, two for the kernel tests and the tiny test model's.
var flashShapes = [][2]int{{512, 64}, {256, 32}, {128, 64}, {128, 16}}

// flashFits reports whether the flash kernel takes this attention: a bf16
// or fp8 cache (values exact in bf16), a compiled shape, 16-byte aligned
// query rows, and enough shared memory.
func (b *Backend) flashFits(ql, qm *tensor, p *cachePool, s backend.MLAShape) bool {
	if p.dtype != backend.CacheBF16 && p.dtype != backend.CacheFP8 {
		return false
	}
	if !slices.Contains(flashShapes, [2]int{s.Rank, s.RopeDim}) {
		return false
	}
	return s.NopeDim%4 == 0 && ql.ld%4 == 0 && qm.ld%4 == 0 &&
		flashShared(s.Rank+s.RopeDim, flashVariant) <= b.dev.Info().SharedOptin
}

// flashUse reports whether a step takes the flash kernel: at least
// flashMin rows, and every sequence at least flashTokens of them (or
// always, flashAlways, in tests). A block's tokens from different
// sequences are done one sequence after another, each pass over that
// sequence's whole cache, so a step mixing decode rows (one a sequence)
// with a prompt chunk stays on the split kernels.
func (b *Backend) flashUse(batch *backend.Batch) bool {
	if b.flashAlways {
		return true
	}
	if b.flashMin <= 0 || batch.Rows() < b.flashMin {
		return false
	}
	for _, s := range batch.Seqs {
		if s.Len < flashTokens {
			return false
		}
	}
	return true
}

// flashAttention queues the flash kernel over all T rows.
func (b *Backend) flashAttention(om, ql, qm *tensor, p *cachePool, layer int, s backend.MLAShape, scale float32) {
	T := b.batch.Rows()
	shared := flashShared(s.Rank+s.RopeDim, flashVariant)
	name := fmt.Sprintf("flash_latent_%d_%d_%s", s.Rank/64, s.RopeDim, flashVariant)
	grid := Dim{uint32((T + flashTokens - 1) / flashTokens), uint32((s.Heads + flashHeads - 1) / flashHeads), 1}
	b.do("attention", func(c *Ctx) error {
		k, err := c.kernelShared("flash", name, shared)
		if err != nil {
			return err
		}
		return c.Launch(k, grid, D1(256), shared,
			om.ptr, om.ld, ql.ptr, ql.ld, qm.ptr, qm.ld, p.layer(layer), p.kernelDType(),
			b.meta.pos, b.meta.rowSeq, b.meta.seqBlocks, b.meta.blocks, p.blockSize,
			T, s.Heads, s.NopeDim, scale)
	})
}
