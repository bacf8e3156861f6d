//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"

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

// decodeAttnConfig sets the decode attention's defaults (tests and
// benchmarks change them): the single-launch kernel, splits aimed at every
// multiprocessor, one head a warp (faster on an H200 than two, docs/perf.md),
// bf16 caches on the tensor-core kernel (decodemma.go), its cache rows
// copied before its wait and olat's int8 form written by whichever launch
// writes olat.
func (b *Backend) decodeAttnConfig() {
	b.decodeAttn = true
	b.decodeBlocks = 100
	b.decodeOneHead = true
	b.decodeMMA = true
	b.decodeAhead = true
	b.combineQuant = true
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
	if b.decodeMMAAttention(om, ql, qm, p, layer, s, scale) {
		return true
	}
	// The kernel's lanes hold 4-value groups of 128 latent dims and two
	// rope dims each; rows and fp8 scales must stay 8-byte aligned.
	if !b.decodeAttn || T < 1 || T > decodeAttnRows || (s.Rank != 128 && s.Rank != 256 && s.Rank != 512) ||
		s.RopeDim%8 != 0 || s.RopeDim > 64 || ql.ld%4 != 0 || ql.ptr%16 != 0 || s.Heads < 1 {
		return false
	}
	format := "bf16"
	switch p.kernelDType() {
	case 1:
		format = "f32"
	case 2:
		format = "fp8"
	case 3:
		format = "fp4"
	}
	name, threads := fmt.Sprintf("attention_decode_%s_r%d", format, s.Rank), 256
	if b.decodeOneHead {
		name, threads = name+"_h1", 512
	}
	optin := b.dev.Info().SharedOptin
	ch, shared := decodeAttnStage(optin, p.slotBytes(), s.Rank)
	if ch < 8 || shared > optin-8<<10 {
		return false
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
	counters, stamps := b.attnCounters.Ptr, b.decodeStamps
	if stamps != 0 {
		b.decodeStampBlocks = splits * pairs * T
	}
	b.do("attention", func(c *Ctx) error {
		k, err := c.kernelShared("attention", name, shared)
		if err != nil {
			return err
		}
		return c.Launch(k, Dim{uint32(splits), uint32(pairs), uint32(T)}, D1(threads), shared,
			om.ptr, om.ld, ql.ptr, ql.ld, qm.ptr, qm.ld, p.layer(layer),
			b.meta.pos, b.meta.rowSeq, b.meta.seqBlocks, b.meta.blocks, p.blockSize,
			s.Heads, s.Rank, s.NopeDim, s.RopeDim, scale, ch, pml, pacc, counters, stamps)
	})
	return true
}

// decodeAttnStage is the kernel's rows per shared-memory stage (two
// stages, at most 128 rows each, a multiple of 8, within optin bytes less
// 8 KiB for its static arrays) and its dynamic shared memory, which also
// holds the warps' value sums at the end (8 warps, 2 heads, rank floats).
func decodeAttnStage(optin, rowBytes, rank int) (ch, shared int) {
	ch = min(128, (optin-8<<10)/(2*rowBytes)) / 8 * 8
	return ch, max(2*ch*rowBytes, 4*8*2*rank)
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

// slotBytes is the size of one cached position: its latent and rope values
// (f32 or bf16), or their E4M3 codes and two float32 scales (fp8), or
// fp4SlotBytes.
func (p *cachePool) slotBytes() int {
	switch p.dtype {
	case backend.CacheF32:
		return 4 * (p.rank + p.ropeDim)
	case backend.CacheFP8:
		return p.rank + p.ropeDim + 8
	case backend.CacheFP4:
		return fp4SlotBytes(p.rank, p.ropeDim)
	}
	return 2 * (p.rank + p.ropeDim)
}

// fp4SlotBytes is the size of an fp4 cache slot (fp4_slot_bytes in ops.cu):
// rank/2 bytes of E2M1 codes of the latent, ropeDim E4M3 codes of k_pe, an
// E4M3 scale per backend.FP4Group latent values, at the next multiple of 8
// the two float32 scales, padded to 16 bytes: 352 for rank 512 and 64
// rope dims, against backend.CacheBytesPerToken's 344.
func fp4SlotBytes(rank, ropeDim int) int {
	return align(fp4ScaleOffset(rank, ropeDim)+8, 16)
}

// fp4ScaleOffset is where an fp4 slot's two float32 scales lie.
func fp4ScaleOffset(rank, ropeDim int) int {
	return align(rank/2+ropeDim+(rank+backend.FP4Group-1)/backend.FP4Group, 8)
}

// flashMixedTiles bounds the serial work of one flash block in a step that
// mixes decode rows (sequences with fewer rows than a block's tokens) with
// prompt chunks: a block takes its sequences one after another, each over
// that sequence's whole cache, so a block of eight decode rows of long
// contexts would hold the grid. Such a step takes the flash kernel when no
// block's sum of cache tiles (FA_N positions each) over its sequences is
// above this; 0 leaves mixed steps on the split kernels. A serving step
// of short prompts and a few decode rows of short contexts (the first
// steps of a batch of requests) otherwise ran latent_attention_heads and
// its merge over hundreds of rows.
var flashMixedTiles = 16

// flashMixedN is FA_N in flash.cu: the positions of one cache tile.
const flashMixedN = 64

// flashMixedUse reports whether a step that flashUse refuses for its
// short sequences takes the flash kernel all the same (flashMixedTiles).
func (b *Backend) flashMixedUse(batch *backend.Batch) bool {
	// Up to decodeAttnRows rows the decode kernels take a mixed step
	// (and a decode step: eight decode rows of 48 positions make one flash
	// block of eight tiles, 51 us a layer at 32 rows against 16 on an H200).
	T := batch.Rows()
	if serveFuseOff || flashMixedTiles <= 0 || b.flashMin <= 0 || T < b.flashMin || T <= decodeAttnRows {
		return false
	}
	tiles := make([]int, (T+flashTokens-1)/flashTokens)
	for _, s := range batch.Seqs {
		// The sequence's rows in each block of flashTokens rows: the last
		// one's position is its longest.
		for r := s.Start; r < s.Start+s.Len; {
			blk := r / flashTokens
			end := min(s.Start+s.Len, (blk+1)*flashTokens)
			n := int(batch.Positions[end-1]) + 1
			tiles[blk] += (n + flashMixedN - 1) / flashMixedN
			if tiles[blk] > flashMixedTiles {
				return false
			}
			r = end
		}
	}
	return true
}

// decodeOneSplitMaxN is the longest context at which a decode step of
// several rows gives each row's 8-head groups a block of their own over
// all its positions (decode_mma_*_h8, one split, nothing to merge) where
// those blocks fit in one wave, rather than all heads a block over splits
// of the positions merged at a barrier. On an H200 at 32 rows
// (BenchmarkServeAttention, us a layer): 6.6 against 11.8 at 48
// positions, 9.9 against 13.4 at 128, 17.4 against 16.5 at 256, 61.6
// against 33.0 at 1024; at 64 rows (two waves) 33.8 against 22.8 at 256.
// At 4-20 rows, where the splits' blocks fill the multiprocessors and
// the one-split blocks do not (BenchmarkServeAttentionFew, us, one split
// against the splits): 4 rows of 48 / 80 positions 5.3 / 6.8 against
// 10.4 / 8.5; 8 rows of 48 / 80 / 128 5.4 / 6.8 / 8.6 against 10.5 / 8.6
// / 8.8; 16 rows 5.6 / 6.9 / 8.6 against 10.7 / 9.7 / 10.2; 20 rows of
// 48 / 80 5.7 / 7.0 against 11.0 / 11.6.
const decodeOneSplitMaxN = 128

// rowsOneSplit reports whether decodeMMAAttention takes blocks of 8 heads
// and one split for T rows (decodeOneSplitMaxN).
func (b *Backend) rowsOneSplit(T int, s backend.MLAShape) bool {
	hg := (s.Heads + 7) / 8
	if serveFuseOff || T < 2 || decodeSplitsFixed != 0 || b.decodeMerge != mergeAuto || !decodeHeadGroups ||
		s.Rank != 512 || s.RopeDim != 64 || b.meta.maxN > decodeOneSplitMaxN || T*hg > b.dev.Info().SMs {
		return false
	}
	return true
}
