//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"
	"math/bits"
	"slices"

	"github.com/mmfp4/mmfp4/backend"
)

// Decode attention on the tensor cores (decode_mma in kernels/flash.cu):
// for a few rows over a bf16, fp8 or fp4 cache, a block per split of a
// row's positions takes all of its heads (or 8 of them). The splits are
// merged in the same launch (the row's blocks meet at a barrier, then
// each merges a share) or by a second launch (decode_combine, or for one
// row the value expansion's decode_combine_values) started early with
// programmatic serialization. On an H200 the second launch is the faster
// for one row at every length measured (end to end +12% at ctx 4096,
// +6.5% at 8192 with blocks of 8 heads; +5.6% at 16384 and +6.4% at 32768
// with blocks of all heads); the barrier for more rows (8 and 32);
// docs/perf.md. Grids larger than the device holds at once always take
// the second launch.

// decodeMMAShapes are the (rank, rope dims) decode_mma is compiled for:
// the model's, the tests' small one, and the built-in and tiny test
// models' (so that their GPU runs against the CPU take it).
var decodeMMAShapes = [][2]int{{512, 64}, {256, 32}, {128, 32}, {128, 16}}

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
	mergeAuto     = iota // mergeLaunch for one row, else mergeInKernel
	mergeInKernel        // a barrier per row in the same launch, where the grid is resident
	mergeLaunch          // decode_combine, launched early (programmatic serialization)
)

// decodeHeadGroups gives each 8 heads of the model's shape blocks of their
// own (decode_mma_*_h8: a third of the queries, products and partials a
// block, three times the blocks) where a second launch merges the splits
// (tests turn it off to compare).
var decodeHeadGroups = true

// decodeMMABF2 gives blocks of 8 heads over the bf16 cache, where the f16
// form would run, decode_mma's two-part form (instances "_h8_bf2": the
// queries and weights as two bf16 parts, the cached fragments as they
// are, no widening, twice the f16 form's products). On an H200 its
// attention took 3-4% less time than the f16 form's at 1,024 and 8,192
// positions, and its output is within 4e-6 of the CPU's where the f16
// form's is within 4e-4 (docs/perf.md, 2026-11-30 (26)). Blocks of all
// heads, with three times the products a block, keep the f16 form (the
// two-part form was 4% slower at 32,768 positions). Tests turn it off
// to compare blocks of 8 heads with blocks of all heads bit for bit.
var decodeMMABF2 = true

// decodeSplitsFixed, when not 0, is decode_mma's split count (tests that
// compare the blocks of 8 heads with all heads a block at one count).
var decodeSplitsFixed int

// decodeMMAQuantized lets the fp8 and fp4 caches take decode_mma (its
// raw-record instances); off, they keep the single-launch CUDA-core
// kernel.
var decodeMMAQuantized = true

// decodeHeadGroupMaxN is the longest row whose splits take blocks of 8
// heads: beyond it a row's 44 splits hold so many tiles (each read by
// three blocks) that blocks of all heads in 132 splits are faster (on an
// H200, even at 8192 positions; at 32768, 248 against 303-309 tok/s).
const decodeHeadGroupMaxN = 12288

// decodeMMAShared is decode_mma's dynamic shared memory for tiles of tp
// positions: the tiles in flight (or the head-major values at the end,
// whichever is larger), eight warps' partial scores, the weights' three
// parts and three floats a head (four for the bf16 cache: the f16 form's
// query scales).
func decodeMMAShared(rank, dr, tp int, dt backend.CacheDType) int {
	ld := rank + dr + 8
	if rb := decodeMMARecord(rank, dr, dt); rb != 0 {
		// Raw records in the stages, one converted tile, the rope steps'
		// partial scores apart (dr/16 tiles) and two scales a position.
		stage := max(decodeMMAStages*tp*rb+tp*ld*2, decodeMMAHeads*(rank+4)*4)
		return stage + (8+dr/16)*tp*decodeMMAHeads*4 + 80*(tp+8)*2 + 3*decodeMMAHeads*4 + 2*tp*4
	}
	stage := max(decodeMMAStages*tp*ld*2, decodeMMAHeads*(rank+4)*4)
	return stage + 8*tp*decodeMMAHeads*4 + 80*(tp+8)*2 + 4*decodeMMAHeads*4
}

// decodeMMARecord is a cache record's bytes for decode_mma's raw stages:
// the fp8 and fp4 caches' slots; 0 for the bf16 cache, whose rows are
// copied as they are.
func decodeMMARecord(rank, dr int, dt backend.CacheDType) int {
	if dt != backend.CacheFP8 && dt != backend.CacheFP4 {
		return 0
	}
	return (&cachePool{rank: rank, ropeDim: dr, dtype: dt}).slotBytes()
}

// decodeMMASuffix names decode_mma's instances for a cache precision.
var decodeMMASuffix = map[backend.CacheDType]string{backend.CacheBF16: "", backend.CacheFP8: "_fp8", backend.CacheFP4: "_fp4"}

// decodeMMAF16 gives the bf16 cache decode_mma's f16 form (instances
// "_f16": f16 queries and weights, a third of the three-part exact form's
// tensor work; flash.cu) where the prefill takes the f16 form
// (flashFormName: MMFP4_CUDA_FLASH_EXACT=1 turns both off).
var decodeMMAF16 = flashFormName == "f16"

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
// and reports whether it did: a bf16, fp8 or fp4 cache (the last two
// through the raw-record instances, decodeMMAQuantized), a compiled
// shape, at most 24 heads and the float2/float4 alignment of its loads
// and stores.
func (b *Backend) decodeMMAAttention(om, ql, qm *tensor, p *cachePool, layer int, s backend.MLAShape, scale float32) bool {
	T := b.batch.Rows()
	suffix, ok := decodeMMASuffix[p.dtype]
	if !b.decodeAttn || !b.decodeMMA || T < 1 || T > decodeAttnRows || !ok || (p.dtype != backend.CacheBF16 && !decodeMMAQuantized) ||
		!slices.Contains(decodeMMAShapes, [2]int{s.Rank, s.RopeDim}) || s.Heads < 1 || s.Heads > decodeMMAHeads ||
		ql.ld%2 != 0 || ql.ptr%8 != 0 || qm.ld%2 != 0 || qm.ptr%8 != 0 || s.NopeDim%2 != 0 ||
		om.ld%4 != 0 || om.ptr%16 != 0 {
		return false
	}
	// Blocks of 8 heads (grid z), where their splits are merged by a
	// second launch (or there is one split).
	hg := 1
	merge := b.decodeMerge
	if merge == mergeAuto {
		merge = mergeInKernel
		if T == 1 {
			merge = mergeLaunch
		}
	}
	if decodeHeadGroups && s.Rank == 512 && s.RopeDim == 64 && merge == mergeLaunch && b.meta.maxN <= decodeHeadGroupMaxN {
		hg = (s.Heads + 7) / 8
	}
	one := b.rowsOneSplit(T, s)
	if one {
		hg = (s.Heads + 7) / 8 // one split: nothing to merge (attention.go)
	}
	S := b.decodeMMASplits(T*hg, b.meta.maxN)
	if decodeSplitsFixed > 0 {
		S = decodeSplitsFixed
	} else if one {
		S = 1 // (below 23 rows the multiprocessors would take more splits)
	} else if hg > 1 {
		// As few splits as give the same chunk of the bucketed length
		// (no blocks past the row's end: at ctx 1024, 32 splits of 32
		// positions rather than 44).
		n16 := splitBucket((b.meta.maxN + decodeMMAAlign - 1) / decodeMMAAlign)
		S = (n16 + (n16+S-1)/S - 1) / ((n16 + S - 1) / S)
	}
	// Tiles of 16 positions when no split has more (one tile, half the
	// products of 32), else 32.
	tp := 32
	if (b.meta.maxN+S-1)/S <= 16 {
		tp = 16
	}
	if b.decodeMMATile != 0 {
		tp = b.decodeMMATile
	}
	shared := decodeMMAShared(s.Rank, s.RopeDim, tp, p.dtype)
	if shared > b.dev.Info().SharedOptin {
		return false
	}
	var pml, pacc, counters uint64
	launchMerge := false
	if S > 1 {
		pml, pacc = b.alloc(4*2*T*S*s.Heads), b.alloc(4*T*S*s.Heads*s.Rank)
		// Arrivals and departures of each row's barrier.
		if merge == mergeInKernel && b.attnCountersFor(2*T) {
			counters = b.attnCounters.Ptr
		}
		launchMerge = counters == 0
	}
	stamps := b.decodeStamps
	if stamps != 0 {
		b.decodeStampBlocks = S * T * hg
	}
	ahead := 0
	if b.decodeAhead {
		ahead = 1
	}
	var cq *decodeAttnOp
	name := fmt.Sprintf("decode_mma_%d_%d_t%d", s.Rank, s.RopeDim, tp)
	if hg > 1 {
		name += "_h8"
	}
	name += suffix
	switch {
	case p.dtype == backend.CacheBF16 && decodeMMAF16 && decodeMMABF2 && hg > 1:
		name += "_bf2"
	case p.dtype == backend.CacheBF16 && decodeMMAF16:
		name += "_f16"
	}
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
		if err := c.Launch(k, Dim{uint32(S), uint32(T), uint32(hg)}, D1(decodeMMAThreads), shared,
			om.ptr, om.ld, ql.ptr, ql.ld, qm.ptr, qm.ld, p.layer(layer),
			b.meta.pos, b.meta.rowSeq, b.meta.seqBlocks, b.meta.blocks, p.blockSize,
			s.Heads, s.NopeDim, scale, pml, pacc, cnt, ahead, xq, xs, xsum, G, stamps); err != nil || S == 1 || cnt != 0 {
			return err
		}
		if cq != nil && cq.merged {
			return nil // the value expansion's launch merges the splits
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
		if launchMerge && T == 1 {
			cq.split = &splitParts{ml: pml, acc: pacc, S: S}
		}
		b.lastDecodeAttn = cq
	}
	return true
}

// splitParts are decode_mma's partial results of one row's S splits
// (part_ml, part_acc), which a second launch merges.
type splitParts struct {
	ml, acc uint64
	S       int
}

// mergeValues lets the value expansion of one row merge the attention's
// splits in its own launch (decode_combine_values) instead of
// decode_combine (tests turn it off to compare).
var mergeValues = true

// mergedValues queues the value expansion of olat (one row, its int8 form
// a just handed to the decode attention op lc) with the merge of lc's
// splits in its launch, and reports whether it did.
func (b *Backend) mergedValues(lc *decodeAttnOp, om, ol *tensor, w *QMatrix, a *QActs, s backend.MLAShape) bool {
	if !mergeValues || !b.chained() || lc == nil || lc.a != a || lc.split == nil || lc.om != *ol || ol.rows != 1 || s.Rank != 512 ||
		lc.split.S > decodeMMAMaxS || !headsQuantOK(s.Heads, s.VDim, s.Rank, w.G, 128) || s.VDim != combineValuesRows {
		return false
	}
	lc.merged = true
	m := *lc.split
	y, oa, heads, rows := om.ptr, *a, s.Heads, s.VDim
	olat := ol.ptr
	b.do("attention merge+expand values", func(c *Ctx) error {
		return c.DecodeCombineValues(y, w, heads, rows, nil, 128, m, olat, &oa)
	})
	b.noteValues(om, w, a, s.Heads, s.VDim)
	if b.lastValues != nil {
		b.lastValues.merge = &mergeIn{parts: m, olat: olat, oa: oa}
	}
	return true
}

// mergeIn is what a value expansion that merges the splits reads.
type mergeIn struct {
	parts splitParts
	olat  uint64
	oa    QActs
}

// combineValuesRows is the head's value rows that decode_combine_values
// takes: a cluster of combineValuesCluster blocks (DCV_CL in flash.cu).
const (
	combineValuesRows    = 256
	combineValuesCluster = 2
)

// DecodeCombineValues is decode_combine of one row's S splits (parts) into
// olat and its int8 form oa, and GEMVHeadsQuant of it (q nil: GEMVHeads),
// in one launch, a cluster of combineValuesCluster blocks a head of
// combineValuesRows rows.
func (c *Ctx) DecodeCombineValues(y uint64, w *QMatrix, heads, rows int, q *QActs, qg int, parts splitParts, olat uint64, oa *QActs) error {
	k := w.K
	if q != nil {
		qg = q.G
	}
	switch {
	case k != 512 || oa.T != 1 || oa.K != heads*k || oa.G != w.G || w.N != heads*rows || parts.S < 1 || parts.S > decodeMMAMaxS:
		return fmt.Errorf("cuda: merge and expand values: olat %dx%d G=%d for %d heads of [%d,%d] G=%d, %d splits", oa.T, oa.K, oa.G, heads, w.N, w.K, w.G, parts.S)
	case !headsQuantOK(heads, rows, k, w.G, qg) || rows != combineValuesRows || (q != nil && (q.T != 1 || q.K != w.N)):
		return fmt.Errorf("cuda: merge and expand values: blocks of %d rows for %d heads of %d rows", qg, heads, rows)
	}
	kern, err := c.Kernel("flash", "decode_combine_values")
	if err != nil {
		return err
	}
	var yq, ys, ysum uint64
	if q != nil {
		yq, ys, ysum = q.Q, q.Scales, q.Sums
	}
	return c.Launch(kern, D1(heads*combineValuesCluster), D1(1024/combineValuesCluster), 0, w.Codes, w.Scales, w.RowScale, k, bits.TrailingZeros(uint(w.G/32)),
		y, qg, yq, ys, ysum, parts.ml, parts.acc, parts.S, heads, olat, oa.Q, oa.Scales, oa.Sums, oa.G)
}

// decodeAttnOp is a queued decode_mma op: a quantization of its output
// queued right after it (Backend.quantize) sets a, and whichever launch
// writes the output (decode_mma itself with one split or merging in the
// launch, else decode_combine) writes its int8 form too.
type decodeAttnOp struct {
	idx, flush int
	om         tensor
	a          *QActs
	// split: the splits' partials when a second launch merges them (one
	// row); merged: the value expansion's launch does (mergedValues).
	split  *splitParts
	merged bool
}
