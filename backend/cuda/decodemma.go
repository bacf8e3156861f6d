//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"
	"slices"

	"github.com/mmfp4/mmfp4/backend"
)

// Decode attention on the tensor cores (decode_mma in kernels/flash.cu):
// for a few rows over a bf16 cache, a block per split of a row's
// positions takes all of its heads. The splits are merged in the same
// launch (the row's blocks meet at a barrier, then each merges a share)
// or by a second launch (decode_combine) started early with programmatic
// serialization: on an H200 the second launch was the faster for one row
// of up to 1024 positions (12.6 against 14.9 us at 1024), the barrier for
// everything else measured (8 and 32 rows, and one row of 8192 positions:
// 21.7 against 23.3 us); docs/perf.md. Grids larger than the device holds
// at once always take the second launch.

// decodeMMAShapes are the (rank, rope dims) decode_mma is compiled for:
// the model's and the tests' small one.
var decodeMMAShapes = [][2]int{{512, 64}, {256, 32}}

// Constants of flash.cu: heads a block at most (three tiles of 8),
// threads, tiles in flight, the most splits, positions a split is rounded
// to.
const (
	decodeMMAHeads   = 24
	decodeMMAThreads = 256
	decodeMMAStages  = 4
	decodeMMAMaxS    = 256
	decodeMMAAlign   = 16
)

// Merge modes of decode_mma's splits (Backend.decodeMerge; tests and
// benchmarks fix one).
const (
	mergeAuto     = iota // mergeLaunch for one row of at most decodeMMALaunchMaxN positions, else mergeInKernel
	mergeInKernel        // a barrier per row in the same launch, where the grid is resident
	mergeLaunch          // decode_combine, launched early (programmatic serialization)
)

// decodeMMALaunchMaxN is the longest single row whose splits mergeAuto
// merges by the second launch.
const decodeMMALaunchMaxN = 4096

// decodeMMAShared is decode_mma's dynamic shared memory for tiles of tp
// positions: the tiles in flight (or the head-major values at the end,
// whichever is larger), eight warps' partial scores, the weights' three
// parts and three floats a head.
func decodeMMAShared(rank, dr, tp int) int {
	ld := rank + dr + 8
	stage := max(decodeMMAStages*tp*ld*2, decodeMMAHeads*(rank+4)*4)
	return stage + 8*tp*decodeMMAHeads*4 + 80*(tp+8)*2 + 3*decodeMMAHeads*4
}

// decodeMMASplits is how many blocks share a row's positions: about
// decodeBlocks percent of the multiprocessors in blocks over all rows,
// at least 16 positions a split (bucketed as the other split kernels
// are, so that a decode step keeps its graph).
func (b *Backend) decodeMMASplits(T, maxN int) int {
	target := max(1, b.decodeBlocks*b.dev.Info().SMs/100)
	s := max(1, target/T)
	s = min(s, splitBucket((maxN+decodeMMAAlign-1)/decodeMMAAlign), decodeMMAMaxS)
	return max(s, 1)
}

// decodeMMAAttention queues the tensor-core decode kernel when it applies
// and reports whether it did: a bf16 cache, a compiled shape, at most 24
// heads and the float2/float4 alignment of its loads and stores.
func (b *Backend) decodeMMAAttention(om, ql, qm *tensor, p *cachePool, layer int, s backend.MLAShape, scale float32) bool {
	T := b.batch.Rows()
	if !b.decodeAttn || !b.decodeMMA || T < 1 || T > decodeAttnRows || p.dtype != backend.CacheBF16 ||
		!slices.Contains(decodeMMAShapes, [2]int{s.Rank, s.RopeDim}) || s.Heads < 1 || s.Heads > decodeMMAHeads ||
		ql.ld%2 != 0 || ql.ptr%8 != 0 || qm.ld%2 != 0 || qm.ptr%8 != 0 || s.NopeDim%2 != 0 ||
		om.ld%4 != 0 || om.ptr%16 != 0 {
		return false
	}
	S := b.decodeMMASplits(T, b.meta.maxN)
	// Tiles of 16 positions when no split has more (one tile, half the
	// products of 32), else 32.
	tp := 32
	if (b.meta.maxN+S-1)/S <= 16 {
		tp = 16
	}
	if b.decodeMMATile != 0 {
		tp = b.decodeMMATile
	}
	shared := decodeMMAShared(s.Rank, s.RopeDim, tp)
	if shared > b.dev.Info().SharedOptin {
		return false
	}
	var pml, pacc, counters uint64
	if S > 1 {
		pml, pacc = b.alloc(4*2*T*S*s.Heads), b.alloc(4*T*S*s.Heads*s.Rank)
		merge := b.decodeMerge
		if merge == mergeAuto {
			merge = mergeInKernel
			if T == 1 && b.meta.maxN <= decodeMMALaunchMaxN {
				merge = mergeLaunch
			}
		}
		// Arrivals and departures of each row's barrier.
		if merge == mergeInKernel && b.attnCountersFor(2*T) {
			counters = b.attnCounters.Ptr
		}
	}
	stamps := b.decodeStamps
	if stamps != 0 {
		b.decodeStampBlocks = S * T
	}
	ahead := 0
	if b.decodeAhead {
		ahead = 1
	}
	var cq *decodeAttnOp
	name := fmt.Sprintf("decode_mma_%d_%d_t%d", s.Rank, s.RopeDim, tp)
	sms := b.dev.Info().SMs
	idx, flush := len(b.pending), b.flushes
	b.do("attention", func(c *Ctx) error {
		k, err := c.kernelShared("flash", name, shared)
		if err != nil {
			return err
		}
		cnt := counters
		if cnt != 0 {
			// The barrier needs every block of the grid resident at once.
			occ, err := c.Occupancy(k, decodeMMAThreads, shared)
			if err != nil {
				return err
			}
			if S*T > occ*sms {
				cnt = 0
			}
		}
		// The int8 form of the output, where a quantization asked for it.
		var xq, xs, xsum uint64
		G := 0
		if cq != nil && cq.a != nil {
			xq, xs, xsum, G = cq.a.Q, cq.a.Scales, cq.a.Sums, cq.a.G
		}
		if err := c.Launch(k, Dim{uint32(S), uint32(T), 1}, D1(decodeMMAThreads), shared,
			om.ptr, om.ld, ql.ptr, ql.ld, qm.ptr, qm.ld, p.layer(layer),
			b.meta.pos, b.meta.rowSeq, b.meta.seqBlocks, b.meta.blocks, p.blockSize,
			s.Heads, s.NopeDim, scale, pml, pacc, cnt, ahead, xq, xs, xsum, G, stamps); err != nil || S == 1 || cnt != 0 {
			return err
		}
		m, err := c.Kernel("flash", "decode_combine")
		if err != nil {
			return err
		}
		m.early = true
		return c.Launch(m, Dim{uint32(s.Rank / 128), uint32(s.Heads), uint32(T)}, D1(256), 0,
			om.ptr, om.ld, pml, pacc, S, s.Heads, s.Rank, xq, xs, xsum, G)
	})
	if b.combineQuant && b.flushes == flush && len(b.pending) == idx+1 {
		cq = &decodeAttnOp{idx: idx, flush: flush, om: *om}
		b.lastDecodeAttn = cq
	}
	return true
}

// decodeAttnOp is a queued decode_mma op: a quantization of its output
// queued right after it (Backend.quantize) sets a, and whichever launch
// writes the output (decode_mma itself with one split or merging in the
// launch, else decode_combine) writes its int8 form too.
type decodeAttnOp struct {
	idx, flush int
	om         tensor
	a          *QActs
}
