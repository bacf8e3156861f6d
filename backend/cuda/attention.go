//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"os"
	"strconv"

	"github.com/mmfp4/mmfp4/backend"
)

// Single-launch decode attention (kernels/attention.cu): for a few rows, a
// block per split of the positions and pair of heads, the splits merged
// by the last block of each row and head pair to finish. The older path
// (latent_attention_heads and attention_merge, two launches) stays for
// prefill and for shapes the new kernel does not take.

// decodeAttnRows is the most rows the single-launch kernel takes; longer
// batches (prefill) keep the blocked kernels.
const decodeAttnRows = 64

// decodeAttnMaxSplits is AD_MAXS in attention.cu; decodeAttnMinPos the
// fewest positions worth a split of their own (eight warps, a step or two
// each).
const (
	decodeAttnMaxSplits = 256
	decodeAttnMinPos    = 32
)

// decodeAttnConfig reads MMFP4_CUDA_ATTN (0 turns the single-launch
// kernel off) and MMFP4_CUDA_ATTN_BLOCKS (the blocks the splits aim at,
// in percent of the multiprocessors; default 100).
func (b *Backend) decodeAttnConfig() {
	b.decodeAttn = true
	b.decodeBlocks = 100
	if os.Getenv("MMFP4_CUDA_ATTN") == "0" {
		b.decodeAttn = false
	}
	if v, err := strconv.Atoi(os.Getenv("MMFP4_CUDA_ATTN_BLOCKS")); err == nil && v > 0 && v <= 800 {
		b.decodeBlocks = v
	}
}

// decodeSplits is how many blocks share a row's positions: enough, with
// the rows and head pairs, to make decodeBlocks percent of the
// multiprocessors' count of blocks, but no more than the longest row has
// positions for (bucketed as the other split kernels are, so a decode
// step keeps its graph).
func (b *Backend) decodeSplits(T, pairs, maxN int) int {
	target := max(1, b.decodeBlocks*b.dev.Info().SMs/100)
	s := max(1, target/(T*pairs)) // rounded down: one block a multiprocessor holds
	s = min(s, splitBucket((maxN+decodeAttnMinPos-1)/decodeAttnMinPos), decodeAttnMaxSplits)
	return max(s, 1)
}

// decodeAttention queues the single-launch kernel when it applies and
// reports whether it did.
func (b *Backend) decodeAttention(om, ql, qm *tensor, p *cachePool, layer int, s backend.MLAShape, scale float32) bool {
	T := b.batch.Rows()
	// The kernel's lanes hold 4-value groups of 128 latent dims and two
	// rope dims each; rows and fp8 scales must stay 8-byte aligned.
	if !b.decodeAttn || T < 1 || T > decodeAttnRows || s.Rank%128 != 0 || s.Rank > 512 ||
		s.RopeDim%8 != 0 || s.RopeDim > 64 || ql.ld%4 != 0 || ql.ptr%16 != 0 || s.Heads < 1 {
		return false
	}
	name := "attention_decode_bf16"
	switch p.kernelDType() {
	case 1:
		name = "attention_decode_f32"
	case 2:
		name = "attention_decode_fp8"
	}
	pairs := (s.Heads + 1) / 2
	splits := b.decodeSplits(T, pairs, b.meta.maxN)
	if !b.attnCountersFor(T * pairs) {
		return false
	}
	var pml, pacc uint64
	if splits > 1 {
		pml, pacc = b.alloc(4*4*T*pairs*splits), b.alloc(4*2*T*pairs*splits*s.Rank)
	}
	shared := 4 * 8 * 2 * s.Rank // AD_WARPS warps' sums of two heads
	counters := b.attnCounters.Ptr
	b.do("attention", func(c *Ctx) error {
		k, err := c.Kernel("attention", name)
		if err != nil {
			return err
		}
		return c.Launch(k, Dim{uint32(splits), uint32(pairs), uint32(T)}, D1(256), shared,
			om.ptr, om.ld, ql.ptr, ql.ld, qm.ptr, qm.ld, p.layer(layer),
			b.meta.pos, b.meta.rowSeq, b.meta.seqBlocks, b.meta.blocks, p.blockSize,
			s.Heads, s.Rank, s.NopeDim, s.RopeDim, scale, pml, pacc, counters)
	})
	return true
}

// attnCountersFor makes sure there are zeroed tickets for n row and head
// pairs (the kernel's last block resets each after use).
func (b *Backend) attnCountersFor(n int) bool {
	if b.attnCounters.Size >= 4*n {
		return true
	}
	ok := false
	b.now("attention counters", func(c *Ctx) error {
		if err := c.Free(b.attnCounters); err != nil {
			return err
		}
		buf, err := c.Alloc(4 * max(n, 1024))
		if err != nil {
			return err
		}
		b.attnCounters = buf
		ok = true
		return c.Memset(buf.Ptr, 0, buf.Size)
	})
	return ok
}
