//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"
	"math/bits"
	"runtime"
	"slices"
	"unsafe"

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

// decodeHeadGroups gives each 8 heads of the model's shape blocks of their
// own (decode_mma_*_h8: a third of the queries, products and partials a
// block, three times the blocks) where a second launch merges the splits
// (tests turn it off to compare).
var decodeHeadGroups = true

// decodeSplitsFixed, when not 0, is decode_mma's split count (tests that
// compare the blocks of 8 heads with all heads a block at one count).
var decodeSplitsFixed int

// attnValues lets one row's decode attention of blocks of 8 heads take
// the merge of its splits and the value expansion into its launch
// (decode_mma_values_*: a cluster of attnValuesSplits blocks a tile of 8
// heads) where the bucketed context is at most attnValuesMaxN (tests turn
// it off to compare).
var attnValues = true

// attnValuesSplits is the fused launch's split count (its cluster size,
// the non-portable most).
const attnValuesSplits = 16

// attnValuesMaxN is the longest bucketed context the fused launch takes (a
// variable for benchmarks). On an H200 (BenchmarkDecodeAttnValues, us a
// layer of the attention's chain, separate launches at their own split
// count against fused): 13.91 against 13.68-13.70 at 256 positions, 15.16
// against 15.40 at 512, 15.21 against 16.93 at 1024, 17.41 against 20.03
// at 2048: the fused launch's merge and value expansion, 256 threads a
// block, take about 5 us after the positions are summed (docs/perf.md).
var attnValuesMaxN = 256

// attnValuesBytes is DMV_BYTES in flash.cu.
const attnValuesBytes = 32768 + 2048 + 512 + 8192 + 64 + 64 + 32 + 512 + 512 + 64 + 64

// decodeMMAValuesShared is decode_mma_values' dynamic shared memory: one
// tile of 8 heads' decode_mma (tiles of tp positions), then the value
// expansion's.
func decodeMMAValuesShared(rank, dr, tp int) int {
	ld := rank + dr + 8
	stage := max(decodeMMAStages*tp*ld*2, 8*(rank+4)*4)
	return (stage+8*tp*8*4+32*(tp+8)*2+3*8*4+15)&^15 + attnValuesBytes
}

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
	// Blocks of 8 heads (grid z), where their splits are merged by a
	// second launch (or there is one split).
	hg := 1
	merge := b.decodeMerge
	if merge == mergeAuto {
		merge = mergeInKernel
		if T == 1 && b.meta.maxN <= decodeMMALaunchMaxN {
			merge = mergeLaunch
		}
	}
	if decodeHeadGroups && s.Rank == 512 && s.RopeDim == 64 && merge == mergeLaunch {
		hg = (s.Heads + 7) / 8
	}
	one := b.rowsOneSplit(T, s)
	if one {
		hg = (s.Heads + 7) / 8 // one split: nothing to merge (attention.go)
	}
	S := b.decodeMMASplits(T*hg, b.meta.maxN)
	// One row's splits merged by the value expansion may be merged in a
	// cluster of the attention's launch instead (mergedValues decides):
	// attnValuesSplits of them, where the bucketed context is short.
	n16 := splitBucket((b.meta.maxN + decodeMMAAlign - 1) / decodeMMAAlign)
	cluster := attnValues && T == 1 && hg > 1 && !one && n16*decodeMMAAlign <= attnValuesMaxN && S > 1 && b.attnValuesFits()
	if decodeSplitsFixed > 0 {
		S = decodeSplitsFixed
	} else if cluster {
		S = attnValuesSplits
	} else if one {
		S = 1 // (below 23 rows the multiprocessors would take more splits)
	} else if hg > 1 {
		// As few splits as give the same chunk of the bucketed length
		// (no blocks past the row's end: at ctx 1024, 32 splits of 32
		// positions rather than 44).
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
	shared := decodeMMAShared(s.Rank, s.RopeDim, tp)
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
		if cq != nil && cq.fused != nil {
			return c.decodeMMAValues(cq.fused, tp, hg, om.ptr, ql.ptr, qm.ptr, p.layer(layer),
				b.meta.pos, b.meta.rowSeq, b.meta.seqBlocks, b.meta.blocks, p.blockSize, s.Heads, s.NopeDim, scale,
				ahead, xq, xs, xsum, G, stamps)
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
			cq.cluster = hg > 1 && S == attnValuesSplits && s.Rank == 512 && s.RopeDim == 64 && attnValues && b.attnValuesFits()
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
		lc.split.S > decodeMMAMaxS || !headsQuantOK(s.Heads, s.VDim, s.Rank, w.G, 128) || s.VDim%128 != 0 {
		return false
	}
	lc.merged = true
	m := *lc.split
	y, oa, heads, rows := om.ptr, *a, s.Heads, s.VDim
	olat := ol.ptr
	if lc.cluster && 8*rows <= 128*attnValuesSplits && w.K == 512 && w.N == heads*rows && oa.G == w.G {
		// The attention's launch merges and expands (decode_mma_values);
		// an empty op keeps the queue's places.
		f := &fusedValues{y: y, w: w, rows: rows}
		lc.fused = f
		b.do("attention merge+expand values (in the attention)", func(c *Ctx) error { return nil })
		b.noteValues(om, w, a, s.Heads, s.VDim)
		if b.lastValues != nil {
			b.lastValues.merge = &mergeIn{parts: m, olat: olat, oa: oa, fused: f}
		}
		b.attnValuesFused++
		return true
	}
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
	fused *fusedValues // the attention's launch expands the values
}

// fusedValues is the value expansion a decode_mma_values launch runs:
// y = W_UV olat, and with q set (valuesQuant) its int8 form.
type fusedValues struct {
	y    uint64
	w    *QMatrix
	rows int
	q    *QActs
}

// decodeMMAValues launches decode_mma_values (tiles of tp positions) for
// one row over hg tiles of 8 heads: decode_mma's arguments (one row: no
// strides), then the value expansion's.
func (c *Ctx) decodeMMAValues(f *fusedValues, tp, hg int, olat, ql, q uint64,
	layer, pos, rowSeq, seqBlocks, blocks uint64, blockSize, heads, dn int, scale float32, ahead int,
	xq, xs, xsum uint64, G int, stamps uint64) error {
	w := f.w
	if G != w.G || w.K != 512 || f.rows%128 != 0 || 8*f.rows > 128*attnValuesSplits {
		return fmt.Errorf("cuda: attention with the values: olat groups of %d, W_UV [%d,%d] G=%d, %d rows a head", G, w.N, w.K, w.G, f.rows)
	}
	k, shared, err := c.attnValuesKernel(tp)
	if err != nil {
		return err
	}
	var yq, ys, ysum uint64
	qg := 128
	if f.q != nil {
		yq, ys, ysum, qg = f.q.Q, f.q.Scales, f.q.Sums, f.q.G
	}
	return c.Launch(k, Dim{attnValuesSplits, 1, uint32(hg)}, D1(decodeMMAThreads), shared,
		olat, ql, q, layer, pos, rowSeq, seqBlocks, blocks, blockSize, heads, dn, scale, ahead,
		xq, xs, xsum, G, stamps, w.Codes, w.Scales, w.RowScale, bits.TrailingZeros(uint(w.G/32)),
		f.y, f.rows, qg, yq, ys, ysum)
}

// attnValuesKernel is decode_mma_values for tiles of tp positions, allowed
// its shared memory (returned) and its cluster of 16 blocks, past the
// portable size of 8.
func (c *Ctx) attnValuesKernel(tp int) (*Kernel, int, error) {
	shared := decodeMMAValuesShared(512, 64, tp)
	k, err := c.Kernel("flash", fmt.Sprintf("decode_mma_values_t%d_c%d", tp, attnValuesSplits))
	if err != nil {
		return nil, 0, err
	}
	if k.maxShared < shared {
		if r := drv.cuFuncSetAttribute(k.fn, attrNonPortableClusterSize, 1); r != 0 {
			return nil, 0, newError("cuFuncSetAttribute", k.Module+"."+k.Name, r)
		}
		if err := c.SetMaxShared(k, shared); err != nil {
			return nil, 0, err
		}
		k.maxShared = shared
	}
	return k, shared, nil
}

// attnValuesFits reports whether a cluster of decode_mma_values fits the
// device at all (cuOccupancyMaxActiveClusters, asked once: a part whose
// GPCs hold fewer than 16 such blocks keeps the separate launches).
func (b *Backend) attnValuesFits() bool {
	if b.attnValuesFit == 0 {
		b.attnValuesFit = -1
		fits := true
		err := b.dev.Do(func(c *Ctx) error {
			for _, tp := range []int{16, 32} {
				k, shared, err := c.attnValuesKernel(tp)
				if err != nil {
					return err
				}
				cfg := &launchConfig{gridX: attnValuesSplits, gridY: 1, gridZ: 1, blockX: decodeMMAThreads, blockY: 1, blockZ: 1,
					shared: uint32(shared), stream: c.stream}
				var n int32
				r := drv.cuOccupancyMaxActiveClusters(&n, k.fn, unsafe.Pointer(cfg))
				runtime.KeepAlive(cfg)
				fits = fits && r == 0 && n >= 1
			}
			return nil
		})
		if err == nil && fits {
			b.attnValuesFit = 1
		}
	}
	return b.attnValuesFit > 0
}

// attrNonPortableClusterSize is
// CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED.
const attrNonPortableClusterSize = 14

// DecodeCombineValues is decode_combine of one row's S splits (parts) into
// olat and its int8 form oa, and GEMVHeadsQuant of it (q nil: GEMVHeads),
// in one launch of blocks of 128 rows (rows a multiple of 128).
func (c *Ctx) DecodeCombineValues(y uint64, w *QMatrix, heads, rows int, q *QActs, qg int, parts splitParts, olat uint64, oa *QActs) error {
	k := w.K
	if q != nil {
		qg = q.G
	}
	switch {
	case k != 512 || oa.T != 1 || oa.K != heads*k || oa.G != w.G || w.N != heads*rows || parts.S < 1 || parts.S > decodeMMAMaxS:
		return fmt.Errorf("cuda: merge and expand values: olat %dx%d G=%d for %d heads of [%d,%d] G=%d, %d splits", oa.T, oa.K, oa.G, heads, w.N, w.K, w.G, parts.S)
	case !headsQuantOK(heads, rows, k, w.G, qg) || rows%128 != 0 || (q != nil && (q.T != 1 || q.K != w.N)):
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
	return c.Launch(kern, D1(w.N/128), D1(512), 0, w.Codes, w.Scales, w.RowScale, k, bits.TrailingZeros(uint(w.G/32)),
		y, rows, qg, yq, ys, ysum, parts.ml, parts.acc, parts.S, heads, olat, oa.Q, oa.Scales, oa.Sums, oa.G)
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
	// cluster: the launch may take the merge and the values instead
	// (decode_mma_values: attnValuesSplits splits, blocks of 8 heads);
	// fused: it does (mergedValues).
	cluster bool
	fused   *fusedValues
}
