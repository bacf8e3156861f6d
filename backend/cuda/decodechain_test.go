//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/mmfp4/mmfp4/backend"
)

// chainShape is GLM-4.7-Flash's attention.
var chainShape = backend.MLAShape{Heads: 20, NopeDim: 192, RopeDim: 64, VDim: 256, Rank: 512}

// chainSteps are decode steps over three sequences of a paged bf16 pool
// whose first lens positions a prefill wrote: sequence 0 alone four
// times (one row, the splits merged by a second launch), three rows of
// sequence 0 in one step, a row of sequences 0 and 1 (merged in the
// launch), sequence 2 alone (one split), and a row of each.
type chainSteps struct {
	lens   [3]int
	tables [3][]int32
	blocks int
	steps  []*backend.Batch
}

const chainBlockSize = 16

func newChainSteps(r *rand.Rand) *chainSteps {
	cs := &chainSteps{lens: [3]int{1000, 300, 5}}
	extra := 12 // positions the decode steps add at most
	perm := r.Perm(100)
	next := 0
	for i, n := range cs.lens {
		for j := 0; j < (n+extra+chainBlockSize-1)/chainBlockSize; j++ {
			cs.tables[i] = append(cs.tables[i], int32(perm[next]))
			next++
		}
	}
	cs.blocks = 100
	p := cs.lens
	step := func(rows ...int) {
		b := &backend.Batch{Outputs: []int32{0}}
		for k := 0; k < len(rows); {
			sq := rows[k]
			n := 0
			for k+n < len(rows) && rows[k+n] == sq {
				n++
			}
			b.Seqs = append(b.Seqs, backend.Seq{Start: k, Len: n, Blocks: cs.tables[sq]})
			for j := 0; j < n; j++ {
				b.Tokens = append(b.Tokens, 0)
				b.Positions = append(b.Positions, int32(p[sq]))
				p[sq]++
			}
			k += n
		}
		cs.steps = append(cs.steps, b)
	}
	step(0)
	step(0)
	step(0)
	step(0)
	step(0, 0, 0)
	step(0, 1)
	step(2)
	step(0, 1, 2)
	return cs
}

// prefill is the batch that writes both sequences' first positions.
func (cs *chainSteps) prefill() *backend.Batch {
	b := &backend.Batch{Outputs: []int32{0}}
	for i, n := range cs.lens {
		b.Seqs = append(b.Seqs, backend.Seq{Start: len(b.Tokens), Len: n, Blocks: cs.tables[i]})
		for j := 0; j < n; j++ {
			b.Tokens = append(b.Tokens, 0)
			b.Positions = append(b.Positions, int32(j))
		}
	}
	return b
}

// chainInputs are the cache rows and queries: the prefill's, then each
// step's.
type chainInputs struct {
	lat, kpe, q [][]float32
}

func newChainInputs(r *rand.Rand, cs *chainSteps, s backend.MLAShape, layers int) *chainInputs {
	in := &chainInputs{}
	qk := s.NopeDim + s.RopeDim
	for i, b := range append([]*backend.Batch{cs.prefill()}, cs.steps...) {
		T := b.Rows()
		for l := 0; l < layers; l++ {
			in.lat = append(in.lat, randVec(r, T*s.Rank, 1))
			in.kpe = append(in.kpe, randVec(r, T*s.RopeDim, 1))
		}
		if i > 0 {
			in.q = append(in.q, randVec(r, T*s.Heads*qk, 1))
		}
	}
	return in
}

// runChain runs the steps on b: each step writes its rows into the cache
// of every layer, absorbs the query, attends and expands the values, as a
// decode layer does (order 0), or with the cache write right before the
// attention (order 1: the kernel before the attention writes the step's
// rows). It returns each step's olat and values of every layer.
func runChain(t *testing.T, b backend.Backend, cs *chainSteps, in *chainInputs, uk, uv backend.HostWeight, layers, order int) (olats, vals []float32) {
	t.Helper()
	s := chainShape
	qk := s.NopeDim + s.RopeDim
	pool, err := b.NewCachePool(layers, cs.blocks, chainBlockSize, s.Rank, s.RopeDim, backend.CacheBF16)
	if err != nil {
		t.Fatal(err)
	}
	wk, wv := mustWeight(t, b, uk), mustWeight(t, b, uv)
	pre := cs.prefill()
	b.SetBatch(pre, pool)
	for l := 0; l < layers; l++ {
		lt, kt := b.NewTensor(pre.Rows(), s.Rank), b.NewTensor(pre.Rows(), s.RopeDim)
		b.Upload(lt, in.lat[l])
		b.Upload(kt, in.kpe[l])
		b.CacheWrite(l, lt, kt)
	}
	for i, st := range cs.steps {
		b.SetBatch(st, pool)
		T := st.Rows()
		q := b.NewTensor(T, s.Heads*qk)
		b.Upload(q, in.q[i])
		var lats, kpes, ols, vs []backend.Tensor
		for l := 0; l < layers; l++ {
			lt, kt := b.NewTensor(T, s.Rank), b.NewTensor(T, s.RopeDim)
			b.Upload(lt, in.lat[(i+1)*layers+l])
			b.Upload(kt, in.kpe[(i+1)*layers+l])
			lats, kpes = append(lats, lt), append(kpes, kt)
		}
		for l := 0; l < layers; l++ {
			qlat, olat, v := b.NewTensor(T, s.Heads*s.Rank), b.NewTensor(T, s.Heads*s.Rank), b.NewTensor(T, s.Heads*s.VDim)
			if order == 0 {
				b.CacheWrite(l, lats[l], kpes[l])
				b.AbsorbQuery(qlat, q, wk, s)
			} else {
				b.AbsorbQuery(qlat, q, wk, s)
				b.CacheWrite(l, lats[l], kpes[l])
			}
			b.LatentAttention(olat, qlat, q, l, s, 0.0625)
			b.ExpandValues(v, olat, wv, s)
			ols, vs = append(ols, olat), append(vs, v)
		}
		for l := range ols {
			olats = append(olats, b.Download(ols[l])...)
			vals = append(vals, b.Download(vs[l])...)
		}
	}
	if err := b.Sync(); err != nil {
		t.Fatal(err)
	}
	return olats, vals
}

// decodeF16ValuesBound is TestDecodeChainMatchesSerial's bound on the
// values after decode_mma's f16 form against the CPU: olat's rounding
// (about 5e-4 of its largest value) moves some of its int8 codes, each
// step of a code about 1/127 of its group's largest value (1.69e-3 to
// 2.23e-3 measured on an H200).
const decodeF16ValuesBound = 5e-3

// sameBits reports the first index where a and b differ in bits, or -1.
func sameBits(a, b []float32) int {
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	for i := range a {
		if math.Float32bits(a[i]) != math.Float32bits(b[i]) {
			return i
		}
	}
	return -1
}

// Decode attention in a chain of programmatic dependent launches: the
// tensor-core kernel copying earlier steps' cache rows before it waits
// for the kernel before, and its merge writing the int8 form of its
// output for the value expansion, compute what the serial launches
// compute without either (the separate quantization), bit for bit,
// launched directly and replayed from graphs, with the step's cache write
// two launches before the attention (as a decode layer runs) and right
// before it; and olat and the values match the CPU backend. The steps
// take every way the output is written (one split; splits merged by a
// second launch; merged in the launch). W_UV groups of 128 (the model's)
// and 32; the bf16 cache's exact and f16 forms (the f16 form's blocks of 8
// heads in two bf16 parts).
func TestDecodeChainMatchesSerial(t *testing.T) {
	g, c := testBackends(t, Options{NoGraphs: true})
	if g.dev.Info().CC < 90 {
		t.Skipf("programmatic dependent launch needs compute capability 9.0, the device has %d", g.dev.Info().CC)
	}
	gg := NewOnDevice(g.dev, Options{})
	defer gg.Close()
	r := testRand(t)
	const layers = 2
	s := chainShape
	cs := newChainSteps(r)
	in := newChainInputs(r, cs, s, layers)
	setPDL := func(on bool) {
		if err := g.dev.Do(func(c *Ctx) error { c.pdl = on; return nil }); err != nil {
			t.Fatal(err)
		}
	}
	defer setPDL(g.dev.c.pdlOK)
	defer func(h, f, b bool) { decodeHeadGroups, decodeSplitsFixed, decodeMMAF16, decodeMMABF2 = h, 0, f, b }(decodeHeadGroups, decodeMMAF16, decodeMMABF2)
	for _, G := range []int{128, 32} {
		uk := quantHost(t, r, "wuk", s.Heads*s.NopeDim, s.Rank, 128)
		uv := quantHost(t, r, "wuv", s.Heads*s.VDim, s.Rank, G)
		cpuOl, cpuV := runChain(t, c, cs, in, uk, uv, layers, 0)
		for fo := 0; fo < 4; fo++ {
			order, f16 := fo%2, fo >= 2
			decodeMMAF16 = f16
			// The exact form's olat within float32 summation of the CPU's;
			// the f16 form's within its op bound, its values within
			// decodeF16ValuesBound.
			olBound, vBound := decodeBF16Bound(), 1e-3
			if f16 {
				vBound = decodeF16ValuesBound
			}
			setPDL(false)
			g.decodeAhead, g.combineQuant = false, false
			decodeHeadGroups = false // all heads in a block, decode_combine, the separate quantization
			wantOl, wantV := runChain(t, g, cs, in, uk, uv, layers, order)
			name := fmt.Sprintf("W_UV groups of %d, order %d, f16 form %v", G, order, f16)
			if e := maxRelErr(cpuOl, wantOl); !(e <= olBound) {
				t.Errorf("%s: olat max relative error %.3e against the CPU, above %.0e", name, e, olBound)
			}
			// An olat value a last bit apart can move an int8 code by one.
			if e := maxRelErr(cpuV, wantV); !(e <= vBound) {
				t.Errorf("%s: values max relative error %.3e against the CPU, above %.0e", name, e, vBound)
			}
			setPDL(true)
			for _, v := range []struct {
				what         string
				b            *Backend
				ahead, quant bool
			}{{"direct", g, true, true}, {"direct, loads after the wait", g, false, true},
				{"direct, separate quantization", g, true, false}, {"graphs", gg, true, true}} {
				v.b.decodeAhead, v.b.combineQuant = v.ahead, v.quant
				ol, vals := runChain(t, v.b, cs, in, uk, uv, layers, order)
				if i := sameBits(wantOl, ol); i >= 0 {
					t.Errorf("%s, PDL (%s): olat value %d of %d differs from the serial launches", name, v.what, i, len(ol))
				}
				if i := sameBits(wantV, vals); i >= 0 {
					t.Errorf("%s, PDL (%s): value %d of %d differs from the serial launches", name, v.what, i, len(vals))
				}
			}
			// Blocks of 8 heads give all-heads blocks' bits at the same
			// split count (32: one tile of 32 positions; 64: one of 16), in
			// the same form (all-heads blocks have no two-part form).
			decodeMMABF2 = false
			for _, S := range []int{32, 64} {
				decodeSplitsFixed = S
				setPDL(false)
				g.decodeAhead, g.combineQuant = false, false
				decodeHeadGroups = false
				wOl, wV := runChain(t, g, cs, in, uk, uv, layers, order)
				setPDL(true)
				decodeHeadGroups = true
				for _, v := range []struct {
					what         string
					b            *Backend
					ahead, quant bool
				}{{"direct", g, true, true}, {"graphs", gg, true, true}, {"direct, separate quantization", g, true, false}} {
					v.b.decodeAhead, v.b.combineQuant = v.ahead, v.quant
					ol, vals := runChain(t, v.b, cs, in, uk, uv, layers, order)
					if i := sameBits(wOl, ol); i >= 0 {
						t.Errorf("%s, %d splits, blocks of 8 heads, PDL (%s): olat value %d of %d differs from all heads a block", name, S, v.what, i, len(ol))
					}
					if i := sameBits(wV, vals); i >= 0 {
						t.Errorf("%s, %d splits, blocks of 8 heads, PDL (%s): value %d of %d differs from all heads a block", name, S, v.what, i, len(vals))
					}
				}
				decodeSplitsFixed = 0
				decodeHeadGroups = false
			}
			decodeMMABF2 = true
			// The default path at batch 1 (blocks of 8 heads, their own
			// split count, the merge in the values) against the CPU.
			decodeHeadGroups = true
			g.decodeAhead, g.combineQuant = true, true
			hOl, hV := runChain(t, g, cs, in, uk, uv, layers, order)
			decodeHeadGroups = false
			if e := maxRelErr(cpuOl, hOl); !(e <= olBound) {
				t.Errorf("%s, blocks of 8 heads: olat max relative error %.3e against the CPU, above %.0e", name, e, olBound)
			}
			if e := maxRelErr(cpuV, hV); !(e <= vBound) {
				t.Errorf("%s, blocks of 8 heads: values max relative error %.3e against the CPU, above %.0e", name, e, vBound)
			}
			t.Logf("%s: blocks of 8 heads: olat %.2e, values %.2e from the CPU", name, maxRelErr(cpuOl, hOl), maxRelErr(cpuV, hV))
			t.Logf("%s: olat %.2e, values %.2e from the CPU; PDL variants bit for bit as the serial launches unless reported", name, maxRelErr(cpuOl, wantOl), maxRelErr(cpuV, wantV))
		}
	}
	// The merge wrote the quantization: one fewer launch a layer.
	g.decodeAhead, g.combineQuant = true, true
	if n := chainLaunches(t, g, cs, in); n[true] != n[false]-1 {
		t.Errorf("launches a layer with the merge quantizing %d, without %d: want one fewer", n[true], n[false])
	}
}

// chainLaunches counts the ops one decode layer of the first step queues,
// with and without the merge's quantization.
func chainLaunches(t *testing.T, g *Backend, cs *chainSteps, in *chainInputs) map[bool]int {
	s := chainShape
	r := rand.New(rand.NewPCG(3, 3))
	uk := quantHost(t, r, "wuk", s.Heads*s.NopeDim, s.Rank, 128)
	uv := quantHost(t, r, "wuv", s.Heads*s.VDim, s.Rank, 128)
	pool, err := g.NewCachePool(1, cs.blocks, chainBlockSize, s.Rank, s.RopeDim, backend.CacheBF16)
	if err != nil {
		t.Fatal(err)
	}
	wk, wv := mustWeight(t, g, uk), mustWeight(t, g, uv)
	out := map[bool]int{}
	for _, quant := range []bool{false, true} {
		g.combineQuant = quant
		g.SetBatch(cs.steps[0], pool)
		q := g.NewTensor(1, s.Heads*(s.NopeDim+s.RopeDim))
		g.Upload(q, in.q[0])
		qlat, olat, v := g.NewTensor(1, s.Heads*s.Rank), g.NewTensor(1, s.Heads*s.Rank), g.NewTensor(1, s.Heads*s.VDim)
		if err := g.Sync(); err != nil {
			t.Fatal(err)
		}
		n0 := len(g.pending)
		g.AbsorbQuery(qlat, q, wk, s)
		g.LatentAttention(olat, qlat, q, 0, s, 0.0625)
		g.ExpandValues(v, olat, wv, s)
		out[quant] = len(g.pending) - n0
		if err := g.Sync(); err != nil {
			t.Fatal(err)
		}
	}
	return out
}

// BenchmarkDecodeChain: the attention of a batch-1 decode layer at
// GLM-4.7-Flash's shapes, ctx 1024 and 8192 (bf16 cache): the cache write
// of the step's row, the absorbed query, the attention (two launches, or
// one with its splits merged by the value expansion), and the value
// expansion, over 48 layers in turn (cache and weights over 100 MB), in a
// graph with programmatic dependent launch (and off for the first line):
// device time a layer, with the splits aimed at several shares of the
// multiprocessors, merged by a second launch, in the launch or by the
// value expansion, and with all heads in a block or blocks of 8 heads;
// and decode_mma's timer stamps. Run with -test.benchtime=1x.
func BenchmarkDecodeChain(b *testing.B) {
	d := benchDevice(b)
	// The modules first, with their time printed: compiling the flash
	// module alone takes about 10 s on a fresh machine, and a benchmark
	// cut by its time limit there prints nothing.
	t0 := time.Now()
	if err := d.Do(func(c *Ctx) error { return compileModules(c, "flash", "absorb", "ops", "gemv", "quant") }); err != nil {
		b.Fatal(err)
	}
	fmt.Printf("decode chain: modules ready in %.1f s\n", time.Since(t0).Seconds())
	r := rand.New(rand.NewPCG(7, 7))
	// A megabyte of random bf16 values, repeated over the cache.
	pattern := make([]uint16, 1<<19)
	for i := range pattern {
		pattern[i] = uint16(math.Float32bits(float32(r.NormFloat64())) >> 16)
	}
	type mode struct {
		pct, merge, tile int
		values, h8       bool // splits merged by the value expansion; blocks of 8 heads
		pdlOff           bool // also timed with PDL off
	}
	defer func(v, h bool) { mergeValues, decodeHeadGroups = v, h }(mergeValues, decodeHeadGroups)
	for _, run := range []struct {
		ctx    int
		phases []mode
		modes  []mode
	}{
		{1024, []mode{{pct: 100}, {pct: 73, values: true, h8: true}}, []mode{{100, mergeAuto, 0, false, false, true}, {100, mergeAuto, 0, true, false, false},
			{25, mergeAuto, 0, true, false, false}, {73, mergeAuto, 0, true, true, false}, {100, mergeAuto, 0, true, true, false},
			{150, mergeAuto, 0, true, true, false}, {50, mergeAuto, 0, true, true, false}, {73, mergeAuto, 0, false, true, false}}},
		{8192, nil, []mode{{100, mergeAuto, 0, false, false, false}, {100, mergeLaunch, 0, false, false, false}, {100, mergeLaunch, 0, true, false, false},
			{100, mergeLaunch, 0, true, true, false}, {73, mergeLaunch, 0, true, true, false}}},
	} {
		decodeChainAt(b, d, r, pattern, run.ctx, func(g *Backend, queue func() []queuedOp, layers int) {
			set := func(m mode) {
				g.decodeBlocks, g.decodeMerge, g.decodeMMATile = m.pct, m.merge, m.tile
				mergeValues, decodeHeadGroups = m.values, m.h8
			}
			for _, m := range run.phases {
				set(m)
				chainPhases(b, g, queue)
			}
			for _, m := range run.modes {
				set(m)
				ops := queue()
				for _, on := range []bool{false, true} {
					if !on && !m.pdlOff {
						continue
					}
					err := d.Do(func(c *Ctx) error {
						return withPDL(c, on, func() error {
							gr, release, err := capturedPDL(c, func() error { return runOps(c, ops) })
							if err != nil {
								return err
							}
							defer release()
							us, err := timeReplay(c, gr.exec, 5)
							if err != nil {
								return err
							}
							// Printed, not logged: a benchmark's log is cut at ten lines.
							fmt.Printf("%s: ctx %d, splits at %3d%% of the SMs, merge %d, tile %2d, merge in the values %-5v, blocks of 8 heads %-5v, PDL %-5v: %6.2f us a layer\n",
								d.Info().Name, run.ctx, m.pct, m.merge, m.tile, m.values, m.h8, on, us/float64(layers))
							return nil
						})
					})
					if err != nil {
						b.Fatal(err)
					}
				}
			}
		})
	}
}

// decodeChainAt sets up BenchmarkDecodeChain's layers at context ctx (the
// cache filled with pattern) and hands over the queue of their ops.
func decodeChainAt(b *testing.B, d *Device, r *rand.Rand, pattern []uint16, ctx int, fn func(g *Backend, queue func() []queuedOp, layers int)) {
	g := NewOnDevice(d, Options{NoGraphs: true, NoPieces: true})
	defer g.Close()
	s := chainShape
	qk := s.NopeDim + s.RopeDim
	const layers = 48
	pool, err := g.NewCachePool(layers, ctx/chainBlockSize, chainBlockSize, s.Rank, s.RopeDim, backend.CacheBF16)
	if err != nil {
		b.Fatal(err)
	}
	cp := pool.(*cachePool)
	bits := make([]uint16, cp.buf.Size/2)
	for i := 0; i < len(bits); i += len(pattern) {
		copy(bits[i:], pattern)
	}
	if err := d.Do(func(c *Ctx) error { return CopyIn(c, cp.buf.Ptr, bits) }); err != nil {
		b.Fatal(err)
	}
	var uks, uvs []backend.Weight
	for l := 0; l < layers; l++ {
		uks = append(uks, mustWeight(b, g, backend.HostWeight{Name: "wuk", N: s.Heads * s.NopeDim, K: s.Rank, Quant: synthMatrix(r, s.Heads*s.NopeDim, s.Rank, 128)}))
		uvs = append(uvs, mustWeight(b, g, backend.HostWeight{Name: "wuv", N: s.Heads * s.VDim, K: s.Rank, Quant: synthMatrix(r, s.Heads*s.VDim, s.Rank, 128)}))
	}
	batch := &backend.Batch{Outputs: []int32{0}, Tokens: []int32{0}, Positions: []int32{int32(ctx - 1)}}
	sq := backend.Seq{Start: 0, Len: 1}
	for i := 0; i < ctx/chainBlockSize; i++ {
		sq.Blocks = append(sq.Blocks, int32((i*7)%(ctx/chainBlockSize)))
	}
	batch.Seqs = []backend.Seq{sq}
	g.SetBatch(batch, pool)
	q, lat, kpe := g.NewTensor(1, s.Heads*qk), g.NewTensor(1, s.Rank), g.NewTensor(1, s.RopeDim)
	g.Upload(q, randVec(r, s.Heads*qk, 1))
	g.Upload(lat, randVec(r, s.Rank, 1))
	g.Upload(kpe, randVec(r, s.RopeDim, 1))
	qlat, olat, v := g.NewTensor(1, s.Heads*s.Rank), g.NewTensor(1, s.Heads*s.Rank), g.NewTensor(1, s.Heads*s.VDim)
	if err := g.Sync(); err != nil {
		b.Fatal(err)
	}
	// queue returns the layers' ops, taken from the queue layer by layer
	// (a layer queued again if the arena's growth flushed it).
	queue := func() []queuedOp {
		var ops []queuedOp
		for l, tries := 0, 0; l < layers; {
			f, n0 := g.flushes, len(g.pending)
			g.CacheWrite(l, lat, kpe)
			g.AbsorbQuery(qlat, q, uks[l], s)
			g.LatentAttention(olat, qlat, q, l, s, 0.0625)
			g.ExpandValues(v, olat, uvs[l], s)
			if g.flushes != f && tries < 3 {
				tries++
				continue
			}
			if g.flushes != f {
				b.Fatal("the queue flushes in every try")
			}
			ops = append(ops, g.pending[n0:]...)
			g.pending = g.pending[:n0]
			l++
		}
		g.quantized = nil
		return ops
	}
	g.decodeAhead, g.combineQuant = true, true
	fn(g, queue, layers)
}

// compileModules loads the named kernel modules (compiling those not in
// the disk cache).
func compileModules(c *Ctx, mods ...string) error {
	for _, m := range mods {
		if _, err := c.module(m); err != nil {
			return err
		}
	}
	return nil
}

// chainPhases logs decode_mma's timer stamps (median over the blocks of
// the last layer's launch, us after its first block's entry) in the
// replayed chain, PDL on.
func chainPhases(b *testing.B, g *Backend, queue func() []queuedOp) {
	var buf Buffer
	if err := g.dev.Do(func(c *Ctx) error {
		var err error
		buf, err = c.Alloc(6 * 8 * 4096)
		return err
	}); err != nil {
		b.Fatal(err)
	}
	g.decodeStamps = buf.Ptr
	ops := queue()
	g.decodeStamps = 0
	n := g.decodeStampBlocks
	st := make([]uint64, 6*n)
	err := g.dev.Do(func(c *Ctx) error {
		return withPDL(c, true, func() error {
			gr, release, err := capturedPDL(c, func() error { return runOps(c, ops) })
			if err != nil {
				return err
			}
			defer release()
			if _, err := timeReplay(c, gr.exec, 2); err != nil {
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
	})
	if err != nil {
		b.Fatal(err)
	}
	fmt.Println(stampSummary(fmt.Sprintf("splits at %d%%, blocks of 8 heads %v (%d blocks): ", g.decodeBlocks, decodeHeadGroups, n), st, n,
		[]string{"entry", "wait returned", "queries", "first tile", "summed", "written"}))
}

// decode_combine_values (the splits' merge in the value expansion's
// launch) writes what decode_combine and the value expansion write, bit
// for bit: olat and its int8 form, the values and (with o_proj's groups)
// their int8 form; on fresh random partials with empty splits, 5, 16, 32,
// 33, 64 and 100 splits (two rounds of loads), W_UV groups of 128 and 32,
// o_proj groups of 128, 64 and 32.
func TestDecodeCombineValuesMatchesSeparate(t *testing.T) {
	d := testDevice(t)
	r := testRand(t)
	const heads, rank, rows = 20, 512, 256
	err := d.Do(func(c *Ctx) error {
		read := func(p uint64, n int) []byte { return readBytes(t, c, p, n) }
		form := func(a *QActs) []byte { return qactsBytes(t, c, a) }
		for _, v := range []struct{ S, G, qg int }{{64, 128, 128}, {33, 32, 64}, {100, 128, 32}, {64, 128, 0}, {16, 128, 128}, {32, 128, 64}, {5, 128, 128}} {
			w, err := c.UploadMatrix(synthMatrix(r, heads*rows, rank, v.G))
			if err != nil {
				return err
			}
			ml := make([]float32, 2*v.S*heads)
			for i := 0; i < v.S*heads; i++ {
				ml[2*i] = float32(r.NormFloat64() * 3)
				if r.IntN(5) > 0 {
					ml[2*i+1] = float32(1 + 10*r.Float64())
				}
			}
			mlb, e1 := upload(c, ml)
			accb, e2 := upload(c, randVec(r, v.S*heads*rank, 1))
			if err := errors.Join(e1, e2); err != nil {
				return err
			}
			parts := splitParts{ml: mlb.Ptr, acc: accb.Ptr, S: v.S}
			run := func(fused bool) map[string][]byte {
				olat, e1 := c.Alloc(4 * heads * rank)
				y, e2 := c.Alloc(4 * heads * rows)
				oa, e3 := c.NewQActs(1, heads*rank, v.G)
				if err := errors.Join(e1, e2, e3, poison(c, olat.Ptr, 4*heads*rank), poison(c, y.Ptr, 4*heads*rows)); err != nil {
					t.Fatal(err)
				}
				var q *QActs
				if v.qg != 0 {
					if q, err = c.NewQActs(1, heads*rows, v.qg); err != nil {
						t.Fatal(err)
					}
				}
				if fused {
					err = c.DecodeCombineValues(y.Ptr, w, heads, rows, q, 128, parts, olat.Ptr, oa)
				} else {
					var m *Kernel
					if m, err = c.Kernel("flash", "decode_combine"); err == nil {
						err = c.Launch(m, Dim{rank / 128, heads, 1}, D1(256), 0, olat.Ptr, heads*rank, parts.ml, parts.acc, v.S, heads, rank,
							oa.Q, oa.Scales, oa.Sums, oa.G)
					}
					if err == nil && q != nil {
						err = c.GEMVHeadsQuant(y.Ptr, w, oa, heads, rows, q)
					} else if err == nil {
						err = c.GEMVHeads(y.Ptr, w, oa, heads, rows)
					}
				}
				if err == nil {
					err = c.Sync()
				}
				if err != nil {
					t.Fatal(err)
				}
				out := map[string][]byte{"olat": read(olat.Ptr, 4*heads*rank), "olat int8": form(oa), "values": read(y.Ptr, 4*heads*rows)}
				if q != nil {
					out["values int8"] = form(q)
				}
				if err := errors.Join(c.Free(olat), c.Free(y)); err != nil {
					t.Fatal(err)
				}
				return out
			}
			want, got := run(false), run(true)
			for name, wb := range want {
				if i := firstDiff(wb, got[name]); i >= 0 {
					t.Errorf("%d splits, W_UV groups of %d, o_proj groups of %d: %s differs at byte %d of %d", v.S, v.G, v.qg, name, i, len(wb))
				}
			}
			if err := errors.Join(c.Free(mlb), c.Free(accb)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
