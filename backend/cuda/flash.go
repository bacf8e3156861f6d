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
// kernels; 0 leaves it off (tests). On an H200 the flash kernel was the
// faster at every size measured, down to 16 rows: 0.013 against 0.016 ms
// from an empty cache, 0.098 against 0.119 after 1024 positions
// (docs/perf.md). Since then the split kernels take 16 rows after 1024
// positions in 0.023 ms against the flash kernel's 0.075; the threshold
// for steps after a long prefix has not been measured again.
var flashMinRows = 16

// flashTokens and flashHeads are FA_TQ and FA_HB in flash.cu: the tokens
// and heads of one block.
const (
	flashTokens = 8
	flashHeads  = 4
)

// flashForm is an instance of the flash kernel (flash.cu): f16 operands
// with two key tiles (f16 true), or exact, the queries and the softmax
// weights split hi + lo bf16, with one key tile.
type flashForm struct {
	suffix string // of the kernel's name
	f16    bool
}

// flashForms are each form's instances by cache: the f16 form has one a
// cache; the exact form takes the bf16 and fp8 caches in one (it tells
// them apart at run time) and the fp4 cache in its own.
var flashForms = map[string]map[backend.CacheDType]flashForm{
	"f16":   {backend.CacheBF16: {"_h", true}, backend.CacheFP8: {"_h8", true}, backend.CacheFP4: {"_h4", true}},
	"exact": {backend.CacheBF16: {"_exact", false}, backend.CacheFP8: {"_exact", false}, backend.CacheFP4: {"_fp4", false}},
}

// flashFormName is the form the caches take: f16 operands by default
// (the fp4 cache only with flashFP4F16). Over the bf16 cache that is 0.238
// against 0.280 ms a layer at 1024 rows on an H200, the op's output within
// 4e-4 of the CPU's where bf16 operands gave 3e-3, and the tiny test
// model's greedy ids the CPU's. The fp8 cache's f16 form converts its
// codes to f16 exactly, so only the queries and the weights are rounded,
// as over the bf16 cache: on an H200 its prefill at 8192 tokens was
// 10,736 against the exact form's 8,407 tok/s, the op within 5.1e-4 of
// the CPU's and the tiny test model's logits within 6.7e-3 (docs/perf.md).
// MMFP4_CUDA_FLASH_EXACT=1 gives every cache the exact form (an A/B, and
// runs that must track the CPU's float32 closely).
var flashFormName = map[bool]string{false: "f16", true: "exact"}[os.Getenv("MMFP4_CUDA_FLASH_EXACT") == "1"]

// flashFP4F16 lets the fp4 cache take the f16 form where flashFormName
// names it (tests and benchmarks). Off: on an H200 the form's prefill at
// 8192 tokens was 7,759 against 6,464 tok/s and the op within 5.1e-4 of
// the CPU's, but through the next layers' fp4 codes the tiny test model's
// logits moved by 2.2e-2 from the CPU's (13 of 64 greedy ids the same),
// against 2.9e-6 in the exact form. Its quality on a real model is not
// measured.
var flashFP4F16 = false

// flashFormFor is the form a cache of precision dt takes (the exact one
// where flashFormName names no form, as the tests' "split" does).
func flashFormFor(dt backend.CacheDType) flashForm {
	forms, ok := flashForms[flashFormName]
	if !ok || (dt == backend.CacheFP4 && flashFormName == "f16" && !flashFP4F16) {
		forms = flashForms["exact"]
	}
	return forms[dt]
}

// flashShared is the flash kernel's dynamic shared memory for rows of
// width w = rank + rope dims (see flash.cu): the exact form keeps two
// parts of the queries and of the weights and one key tile, the f16 form
// one part and two key tiles.
func flashShared(w int, f flashForm) int {
	ld := w + 8
	parts, tiles := 2, 1
	if f.f16 {
		parts, tiles = 1, 2
	}
	return parts*32*ld*2 + tiles*64*ld*2 + 4*32*72*4 + parts*32*72*2 + (2*64+3*32)*4 + tiles*64*4
}

// flashShapes are the (rank, rope dims) the flash kernel is compiled for:
// the model's, two for the kernel tests and the tiny test model's.
var flashShapes = [][2]int{{512, 64}, {256, 32}, {128, 64}, {128, 16}}

// flashFits reports whether the flash kernel takes this attention: a bf16,
// fp8 or fp4 cache (values exact in bf16, the fp4 cache's once its codes
// meet their group scales), a compiled shape, 16-byte aligned query rows,
// and enough shared memory.
func (b *Backend) flashFits(ql, qm *tensor, p *cachePool, s backend.MLAShape) bool {
	if p.dtype != backend.CacheBF16 && p.dtype != backend.CacheFP8 && p.dtype != backend.CacheFP4 {
		return false
	}
	if !slices.Contains(flashShapes, [2]int{s.Rank, s.RopeDim}) {
		return false
	}
	return s.NopeDim%4 == 0 && ql.ld%4 == 0 && qm.ld%4 == 0 &&
		flashShared(s.Rank+s.RopeDim, flashFormFor(p.dtype)) <= b.dev.Info().SharedOptin
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

// flashQuant lets the flash kernel write the int8 form of its output that
// the value expansion's quantization asks for right after (as the decode
// attention does, lastDecodeAttn and Backend.quantize), which saves that
// launch (tests turn it off to compare).
var flashQuant = true

// flashStamps, when set (a benchmark's probe), sends the model's f16 form
// to its instance with phase clocks, which adds its sums there (8 warps
// x FA_PHASES).
var flashStamps uint64

// flashAttention queues the flash kernel over all T rows.
func (b *Backend) flashAttention(om, ql, qm *tensor, p *cachePool, layer int, s backend.MLAShape, scale float32) {
	T := b.batch.Rows()
	f := flashFormFor(p.dtype)
	shared := flashShared(s.Rank+s.RopeDim, f)
	name := fmt.Sprintf("flash_latent_%d_%d%s", s.Rank/64, s.RopeDim, f.suffix)
	stamps := flashStamps
	if stamps != 0 && name == "flash_latent_8_64_h" {
		name += "_stamp"
	} else {
		stamps = 0
	}
	grid := Dim{uint32((T + flashTokens - 1) / flashTokens), uint32((s.Heads + flashHeads - 1) / flashHeads), 1}
	var cq *decodeAttnOp
	idx, flush := len(b.pending), b.flushes
	b.do("attention", func(c *Ctx) error {
		k, err := c.kernelShared("flash", name, shared)
		if err != nil {
			return err
		}
		// The int8 form of the output, where a quantization asked for it.
		var xq, xs, xsum uint64
		G := 0
		if cq != nil && cq.a != nil {
			xq, xs, xsum, G = cq.a.Q, cq.a.Scales, cq.a.Sums, cq.a.G
		}
		args := []any{om.ptr, om.ld, ql.ptr, ql.ld, qm.ptr, qm.ld, p.layer(layer), p.kernelDType(),
			b.meta.pos, b.meta.rowSeq, b.meta.seqBlocks, b.meta.blocks, p.blockSize,
			T, s.Heads, s.NopeDim, scale, xq, xs, xsum, G}
		if stamps != 0 {
			args = append(args, stamps)
		}
		return c.Launch(k, grid, D1(256), shared, args...)
	})
	// Whole rows of a head are one block's: groups of G dividing 128 (the
	// quantization's fold checks that) never straddle two blocks.
	if flashQuant && b.flushes == flush && len(b.pending) == idx+1 {
		cq = &decodeAttnOp{idx: idx, flush: flush, om: *om}
		b.lastDecodeAttn = cq
	}
}
