//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
)

// attnSeqs is a paged pool holding sequences of the given lengths in
// scattered blocks: the prefill batch that writes them and, for each
// sequence, its block table.
func attnSeqs(r *rand.Rand, lens []int, blockSize int) (prefill *backend.Batch, tables [][]int32, blocks int) {
	for _, n := range lens {
		blocks += (n + blockSize - 1) / blockSize
	}
	blocks += 3
	perm := r.Perm(blocks)
	next := 0
	prefill = &backend.Batch{}
	for _, n := range lens {
		var tb []int32
		for i := 0; i < (n+blockSize-1)/blockSize; i++ {
			tb = append(tb, int32(perm[next]))
			next++
		}
		tables = append(tables, tb)
		prefill.Seqs = append(prefill.Seqs, backend.Seq{Start: len(prefill.Tokens), Len: n, Blocks: tb})
		for j := 0; j < n; j++ {
			prefill.Tokens = append(prefill.Tokens, 0)
			prefill.Positions = append(prefill.Positions, int32(j))
		}
	}
	prefill.Outputs = []int32{0}
	return prefill, tables, blocks
}

// decodeBatch is one row per chosen sequence, at its last position.
func decodeBatch(lens []int, tables [][]int32, which []int) *backend.Batch {
	b := &backend.Batch{Outputs: []int32{0}}
	for _, i := range which {
		b.Seqs = append(b.Seqs, backend.Seq{Start: len(b.Tokens), Len: 1, Blocks: tables[i]})
		b.Tokens = append(b.Tokens, 0)
		b.Positions = append(b.Positions, int32(lens[i]-1))
	}
	return b
}

// The single-launch decode attention against the CPU backend: contexts of
// 1, 7, 1000 and 4099 positions, alone and as one batch of four rows, in
// every cache format, at GLM-4.7-Flash's shapes and at a small odd one
// (three heads, rope 32). The output is poisoned with NaN before each
// launch, so an unwritten value fails; two layers are read in turn, so
// the tickets are reused.
func TestDecodeAttentionMatchesCPU(t *testing.T) {
	defer func(f bool) { decodeMMAF16 = f }(decodeMMAF16)
	g, c := testBackends(t, Options{})
	r := testRand(t)
	lens := []int{1, 7, 1000, 4099}
	const blockSize, layers = 16, 2
	prefill, tables, blocks := attnSeqs(r, lens, blockSize)
	if err := prefill.Validate(1, blocks, blockSize); err != nil {
		t.Fatal(err)
	}
	steps := [][]int{{0}, {1}, {2}, {3}, {0, 1, 2, 3}, {3, 1}}
	shapes := []backend.MLAShape{
		{Heads: 20, NopeDim: 192, RopeDim: 64, VDim: 256, Rank: 512},
		{Heads: 3, NopeDim: 16, RopeDim: 32, VDim: 32, Rank: 256},
	}
	for _, s := range shapes {
		qk := s.NopeDim + s.RopeDim
		P := prefill.Rows()
		lat := [layers][]float32{randVec(r, P*s.Rank, 1), randVec(r, P*s.Rank, 1)}
		kpe := [layers][]float32{randVec(r, P*s.RopeDim, 1), randVec(r, P*s.RopeDim, 1)}
		var qls, qs [][]float32
		for _, st := range steps {
			qls = append(qls, randVec(r, len(st)*s.Heads*s.Rank, 1))
			qs = append(qs, randVec(r, len(st)*s.Heads*qk, 1))
		}
		for _, dt := range []backend.CacheDType{backend.CacheF32, backend.CacheBF16, backend.CacheFP8, backend.CacheFP4} {
			variants := []attnVariant{{pct: 100}, {pct: 250}, {pct: 100, h1: true}}
			if dt != backend.CacheF32 {
				// The tensor-core kernel (the fp8 and fp4 caches through
				// its raw-record instances), merged in the launch or by a
				// second one; 300%: more splits than the short rows have
				// positions (empty splits), and more blocks than the
				// device holds at once (a second launch); 3%: a few
				// splits, one for the batch of four rows.
				variants = append(variants, attnVariant{pct: 100, mma: true}, attnVariant{pct: 300, mma: true},
					attnVariant{pct: 100, mma: true, merge: mergeLaunch}, attnVariant{pct: 3, mma: true},
					attnVariant{pct: 100, mma: true, tile: 16}, attnVariant{pct: 100, mma: true, tile: 32},
					attnVariant{pct: 100, mma: true, merge: mergeInKernel})
			}
			var runs []attnVariant
			for _, v := range variants {
				runs = append(runs, v)
				if v.mma && dt == backend.CacheBF16 {
					v.f16 = true // and the bf16 cache's f16 form
					runs = append(runs, v)
				}
			}
			for _, v := range runs {
				g.decodeAttn, g.decodeBlocks, g.decodeOneHead = true, v.pct, v.h1
				g.decodeMMA, g.decodeMerge, g.decodeMMATile = v.mma, v.merge, v.tile
				decodeMMAF16 = v.f16
				bound := decodeBF16Bound()
				name := fmt.Sprintf("decode attention heads=%d rank=%d rope=%d %v cache, blocks %d%%, one head a warp %v, tensor cores %v (tile %d, merge %d, f16 %v)", s.Heads, s.Rank, s.RopeDim, dt, v.pct, v.h1, v.mma, v.tile, v.merge, v.f16)
				compareOp(t, g, c, name, bound, func(b backend.Backend) []float32 {
					pool, err := b.NewCachePool(layers, blocks, blockSize, s.Rank, s.RopeDim, dt)
					if err != nil {
						t.Fatal(err)
					}
					b.SetBatch(prefill, pool)
					for l := 0; l < layers; l++ {
						lt, kt := b.NewTensor(P, s.Rank), b.NewTensor(P, s.RopeDim)
						b.Upload(lt, lat[l])
						b.Upload(kt, kpe[l])
						b.CacheWrite(l, lt, kt)
					}
					var out []float32
					for i, st := range steps {
						b.SetBatch(decodeBatch(lens, tables, st), pool)
						T := len(st)
						ql, q := b.NewTensor(T, s.Heads*s.Rank), b.NewTensor(T, s.Heads*qk)
						b.Upload(ql, qls[i])
						b.Upload(q, qs[i])
						for l := 0; l < layers; l++ {
							ol := b.NewTensor(T, s.Heads*s.Rank)
							b.Upload(ol, nanVec(T*s.Heads*s.Rank))
							b.LatentAttention(ol, ql, q, l, s, 0.07)
							out = append(out, b.Download(ol)...)
						}
					}
					return out
				})
			}
		}
	}
}

// attnVariant is one configuration of the decode attention kernels:
// splits aimed at pct percent of the multiprocessors, one head a warp
// (h1), the tensor-core kernel (mma), its merge (mergeAuto, ...), its
// tile (16 or 32 positions; 0: chosen by the splits) and, over a bf16
// cache, its f16 form (f16; else the exact one).
type attnVariant struct {
	pct, tile, merge int
	h1, mma, f16     bool
}

// decodeBF16Bound is the bound on decode attention over a bf16 cache
// against the CPU where decode_mma may take it: its form's.
func decodeBF16Bound() float64 {
	if decodeMMAF16 {
		return flashBound("f16")
	}
	return 1e-5
}

func nanVec(n int) []float32 {
	v := make([]float32, n)
	for i := range v {
		v[i] = float32(math.NaN())
	}
	return v
}

// decodeBenchStep sets the attention benchmarks' decode step over pool
// (decodeBenchBatch) and returns its random queries (ql: the absorbed
// latent queries, q: the full ones) and the output tensor ol, uploaded.
func decodeBenchStep(b *testing.B, g *Backend, r *rand.Rand, s backend.MLAShape, pool backend.CachePool, rows, per, ctx int) (ql, q, ol backend.Tensor) {
	g.SetBatch(decodeBenchBatch(rows, per, ctx), pool)
	ql, q, ol = g.NewTensor(rows, s.Heads*s.Rank), g.NewTensor(rows, s.Heads*(s.NopeDim+s.RopeDim)), g.NewTensor(rows, s.Heads*s.Rank)
	g.Upload(ql, randVec(r, rows*s.Heads*s.Rank, 1))
	g.Upload(q, randVec(r, rows*s.Heads*(s.NopeDim+s.RopeDim), 1))
	if err := g.Sync(); err != nil {
		b.Fatal(err)
	}
	return ql, q, ol
}

// decodeBenchBatch is the attention benchmarks' decode step: rows
// sequences of one row each at position ctx-1, sequence t over blocks
// t*per .. t*per+per-1 in a scattered order.
func decodeBenchBatch(rows, per, ctx int) *backend.Batch {
	batch := &backend.Batch{Outputs: []int32{0}}
	for t := 0; t < rows; t++ {
		sq := backend.Seq{Start: t, Len: 1}
		for i := 0; i < per; i++ {
			sq.Blocks = append(sq.Blocks, int32(t*per+(i*7)%per))
		}
		batch.Seqs = append(batch.Seqs, sq)
		batch.Tokens = append(batch.Tokens, 0)
		batch.Positions = append(batch.Positions, int32(ctx-1))
	}
	return batch
}

// BenchmarkAttention times decode latent attention at GLM-4.7-Flash's
// shapes (20 heads, rank 512, rope 64, bf16 cache): 1, 8 and 32 rows (one
// a sequence) at ctx 128, 1024 and 8192 (not 32 rows at 8192), and one
// row at 32768. Device time
// per call (events around back-to-back launches behind a spin kernel,
// what a graph replay sees) for the two-launch CUDA-core kernels, the
// single-launch one (and its variant with one head a warp), and the
// tensor-core kernel with splits aimed at 25-200% of the multiprocessors
// in blocks (merged as mergeAuto chooses), its two merges, its tiles
// of 32 positions and its exact form beside the f16 one; and per-block
// timer stamps of both kernels (phases).
// Calls rotate over enough layers (over 100 MB) that the cache is read
// from memory, not L2. GB/s counts the cache bytes read. Run with
// -test.benchtime=1x: each call measures reps launches itself.
func BenchmarkAttention(b *testing.B) {
	d := benchDevice(b)
	g := NewOnDevice(d, Options{NoGraphs: true})
	defer g.Close()
	r := testRand(b)
	s := backend.MLAShape{Heads: 20, NopeDim: 192, RopeDim: 64, VDim: 256, Rank: 512}
	width := s.Rank + s.RopeDim
	for _, cs := range []struct{ rows, ctx int }{{1, 128}, {1, 1024}, {1, 8192}, {1, 32768}, {8, 128}, {8, 1024}, {8, 8192}, {32, 128}, {32, 1024}} {
		const blockSize = 64
		per := cs.ctx / blockSize // blocks a sequence
		nb := cs.rows * per
		layers := max(2, (128<<20)/(cs.rows*cs.ctx*2*width))
		pool, err := g.NewCachePool(layers, nb, blockSize, s.Rank, s.RopeDim, backend.CacheBF16)
		if err != nil {
			b.Fatal(err)
		}
		cp := pool.(*cachePool)
		bits := make([]uint16, layers*nb*blockSize*width)
		for i := range bits {
			bits[i] = uint16(math.Float32bits(float32(r.NormFloat64())) >> 16)
		}
		if err := d.Do(func(c *Ctx) error { return CopyIn(c, cp.buf.Ptr, bits) }); err != nil {
			b.Fatal(err)
		}
		T := cs.rows
		ql, q, ol := decodeBenchStep(b, g, r, s, pool, T, per, cs.ctx)
		bytes := float64(T * cs.ctx * 2 * width)
		for _, mode := range []struct {
			name string
			on   bool
			attnVariant
		}{{"two_launch", false, attnVariant{pct: 100}}, {"single_b100", true, attnVariant{pct: 100}},
			{"single_h1_b100", true, attnVariant{pct: 100, h1: true}},
			{"mma_b25", true, attnVariant{pct: 25, mma: true, f16: true}}, {"mma_b50", true, attnVariant{pct: 50, mma: true, f16: true}},
			{"mma_b100", true, attnVariant{pct: 100, mma: true, f16: true}}, {"mma_b200", true, attnVariant{pct: 200, mma: true, f16: true}},
			{"mma_exact_b100", true, attnVariant{pct: 100, mma: true}},
			{"mma_launch_b100", true, attnVariant{pct: 100, mma: true, merge: mergeLaunch, f16: true}},
			{"mma_inkernel_b100", true, attnVariant{pct: 100, mma: true, merge: mergeInKernel, f16: true}},
			{"mma_t32_b100", true, attnVariant{pct: 100, mma: true, tile: 32, f16: true}},
			{"mma_exact_t32_b100", true, attnVariant{pct: 100, mma: true, tile: 32}}} {
			name := fmt.Sprintf("rows%d_ctx%d_%s", T, cs.ctx, mode.name)
			b.Run(name, func(b *testing.B) {
				g.decodeAttn, g.decodeBlocks, g.decodeOneHead = mode.on, mode.pct, mode.h1
				g.decodeMMA, g.decodeMerge, g.decodeMMATile = mode.mma, mode.merge, mode.tile
				defer func(f bool) { decodeMMAF16 = f }(decodeMMAF16)
				decodeMMAF16 = mode.f16
				fns := attentionLaunches(g, ol, ql, q, layers, s)
				us, err := timeRotated(d, fns, 200)
				if err != nil {
					b.Fatal(err)
				}
				b.ReportMetric(us, "us/call")
				b.ReportMetric(bytes/(us*1e-6)/1e9, "GB/s")
				b.Logf("%s: %.2f us/call, %.0f GB/s of cache (%d layers rotated)", name, us, bytes/(us*1e-6)/1e9, layers)
			})
		}
		for _, mma := range []bool{false, true} {
			b.Run(fmt.Sprintf("rows%d_ctx%d_phases_mma_%v", T, cs.ctx, mma), func(b *testing.B) {
				g.decodeOneHead, g.decodeMMA, g.decodeMerge, g.decodeMMATile = true, mma, mergeAuto, 0
				attentionPhases(b, g, layers, ol, ql, q, s)
			})
		}
	}
}

// attentionPhases logs where a single-launch kernel's time goes: the
// blocks' timer stamps (entry, metadata and queries, first stage in
// shared memory, positions summed, ticket, done) of the last of 50
// back-to-back launches, in us after the first block's entry: median and
// latest over the blocks.
func attentionPhases(b *testing.B, g *Backend, layers int, ol, ql, q backend.Tensor, s backend.MLAShape) {
	g.decodeAttn, g.decodeBlocks = true, 100
	var buf Buffer
	if err := g.dev.Do(func(c *Ctx) error {
		var err error
		buf, err = c.Alloc(6 * 8 * 4096)
		return err
	}); err != nil {
		b.Fatal(err)
	}
	g.decodeStamps = buf.Ptr
	fns := attentionLaunches(g, ol, ql, q, layers, s)
	g.decodeStamps = 0
	n := g.decodeStampBlocks
	st := make([]uint64, 6*n)
	err := g.dev.Do(func(c *Ctx) error {
		for _, fn := range fns {
			if err := fn(c); err != nil {
				return err
			}
		}
		i := 0
		if _, err := timeDevice(c, 50, 1, func() error {
			i++
			return fns[i%len(fns)](c)
		}); err != nil {
			return err
		}
		if err := c.Sync(); err != nil {
			return err
		}
		if err := CopyOut(c, st, buf.Ptr); err != nil {
			return err
		}
		return c.Free(buf)
	})
	if err != nil {
		b.Fatal(err)
	}
	whats := []string{"entry", "metadata", "first stage", "summed", "ticket or barrier", "done"}
	if g.decodeMMA {
		whats = []string{"entry", "wait returned", "queries", "first tile", "summed", "written"}
	}
	b.Log(stampSummary("", st, n, whats))
}

// stampSummary reports the timer stamps of n blocks (six a block, in
// nanoseconds, the block's entry first), for each of whats the median and
// the latest in microseconds after the earliest entry.
func stampSummary(prefix string, st []uint64, n int, whats []string) string {
	t0 := st[0]
	for i := 0; i < n; i++ {
		t0 = min(t0, st[6*i])
	}
	line := fmt.Sprintf("%s%d blocks, us after the first entry (median / latest):", prefix, n)
	for k, what := range whats {
		v := make([]float64, n)
		for i := range v {
			v[i] = float64(st[6*i+k]-t0) / 1e3
		}
		slices.Sort(v)
		line += fmt.Sprintf(" %s %.2f / %.2f;", what, v[n/2], v[n-1])
	}
	return line
}

// attentionLaunches queues one decode attention a layer (the cache's
// layers 0..layers-1) and takes their launches out of g's queue, for the
// benchmarks to replay.
func attentionLaunches(g *Backend, ol, ql, q backend.Tensor, layers int, s backend.MLAShape) []func(c *Ctx) error {
	var fns []func(c *Ctx) error
	for l := 0; l < layers; l++ {
		g.LatentAttention(ol, ql, q, l, s, 0.0417)
		fns = append(fns, g.pending[len(g.pending)-1].fn)
		g.pending = g.pending[:len(g.pending)-1]
	}
	return fns
}

// timeRotated runs each of fns once (module loads, warm caches), then
// reports the device time of reps calls taking fns in turn, in us a call
// (each fn one layer's op, so that a call finds its weights or cache out
// of L2 as in a step).
func timeRotated(d *Device, fns []func(c *Ctx) error, reps int) (float64, error) {
	var ms float32
	err := d.Do(func(c *Ctx) error {
		for _, fn := range fns {
			if err := fn(c); err != nil {
				return err
			}
		}
		if err := c.Sync(); err != nil {
			return err
		}
		i := 0
		var err error
		ms, err = timeDevice(c, reps, 2, func() error {
			i++
			return fns[i%len(fns)](c)
		})
		return err
	})
	return float64(ms) * 1e3 / float64(reps), err
}
