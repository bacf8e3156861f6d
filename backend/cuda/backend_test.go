//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/backend/cpu"
	"github.com/mmfp4/mmfp4/format"
)

// maxRelErr is max|got-ref| / max|ref|.
func maxRelErr(ref, got []float32) float64 {
	var num, den float64
	for i := range ref {
		num = math.Max(num, math.Abs(float64(got[i])-float64(ref[i])))
		den = math.Max(den, math.Abs(float64(ref[i])))
	}
	if num != num || len(ref) != len(got) {
		return math.Inf(1)
	}
	return num / den
}

// testBackends returns a GPU backend (or skips, see testDevice) and the CPU
// reference.
func testBackends(t *testing.T, o Options) (*Backend, *cpu.Backend) {
	d := testDevice(t)
	g := NewOnDevice(d, o)
	t.Cleanup(func() {
		if err := g.Close(); err != nil {
			t.Errorf("close backend: %v", err)
		}
	})
	return g, cpu.New(cpu.Options{Threads: 2})
}

func mustWeight(t testing.TB, b backend.Backend, hw backend.HostWeight) backend.Weight {
	t.Helper()
	w, err := b.NewWeight(hw)
	if err != nil {
		t.Fatal(err)
	}
	return w
}

func quantHost(t testing.TB, r *rand.Rand, name string, n, k, g int) backend.HostWeight {
	m, err := format.Quantize(randVec(r, n*k, 0.05), n, k, format.QuantOptions{GroupSize: g})
	if err != nil {
		t.Fatal(err)
	}
	return backend.HostWeight{Name: name, N: n, K: k, Quant: m}
}

func denseHost(r *rand.Rand, name string, n, k int) backend.HostWeight {
	return backend.HostWeight{Name: name, N: n, K: k, Dense: randVec(r, n*k, 0.1)}
}

// compareOp runs op on both backends and checks the result's max relative
// error against bound.
func compareOp(t *testing.T, g *Backend, c *cpu.Backend, name string, bound float64, op func(b backend.Backend) []float32) {
	t.Helper()
	want := op(c)
	if err := c.Sync(); err != nil {
		t.Fatalf("%s on the CPU: %v", name, err)
	}
	got := op(g)
	if err := g.Sync(); err != nil {
		t.Fatalf("%s on the GPU: %v", name, err)
	}
	if len(got) != len(want) {
		t.Fatalf("%s: %d values, want %d", name, len(got), len(want))
	}
	e := maxRelErr(want, got)
	t.Logf("%-40s max rel err %.2e (%d values)", name, e, len(want))
	if !(e <= bound) {
		t.Errorf("%s: max relative error %.3e above %.0e", name, e, bound)
	}
}

// simpleBatch is one sequence of T rows at positions p0.. with a block
// table of identity blocks.
func simpleBatch(T, p0 int) *backend.Batch {
	b := &backend.Batch{Seqs: []backend.Seq{{Start: 0, Len: T}}}
	for t := 0; t < T; t++ {
		b.Tokens = append(b.Tokens, int32((t*7)%50))
		b.Positions = append(b.Positions, int32(p0+t))
	}
	for i := 0; i <= (p0+T)/16; i++ {
		b.Seqs[0].Blocks = append(b.Seqs[0].Blocks, int32(i))
	}
	b.Outputs = []int32{int32(T - 1), 0}
	return b
}

func TestBackendOpsMatchCPU(t *testing.T) {
	g, c := testBackends(t, Options{})
	r := testRand(t)
	for _, T := range []int{1, 5, 13} {
		batch := simpleBatch(T, 1000)
		x := randVec(r, T*512, 1)
		y := randVec(r, T*512, 1)
		in := func(b backend.Backend, v []float32, cols int) backend.Tensor {
			tt := b.NewTensor(len(v)/cols, cols)
			b.Upload(tt, v)
			return tt
		}
		for _, wc := range []struct {
			name string
			hw   backend.HostWeight
		}{
			{"mmfp4 g128", quantHost(t, r, "q128", 320, 512, 128)},
			{"mmfp4 g32", quantHost(t, r, "q32", 96, 512, 32)},
			{"dense", denseHost(r, "dense", 72, 512)},
		} {
			compareOp(t, g, c, fmt.Sprintf("T=%d matmul %s", T, wc.name), 1e-5, func(b backend.Backend) []float32 {
				b.SetBatch(batch, nil)
				w := mustWeight(t, b, wc.hw)
				d := b.NewTensor(T, wc.hw.N+8)
				b.MatMul(b.Cols(d, 8, 8+wc.hw.N), in(b, x, 512), w)
				return b.Download(d)
			})
			compareOp(t, g, c, fmt.Sprintf("T=%d embed %s", T, wc.name), 0, func(b backend.Backend) []float32 {
				b.SetBatch(batch, nil)
				w := mustWeight(t, b, wc.hw)
				d := b.NewTensor(T, 512)
				b.Embed(d, w)
				return b.Download(d)
			})
		}
		gain := denseHost(r, "gain", 1, 512)
		compareOp(t, g, c, fmt.Sprintf("T=%d rmsnorm", T), 1e-6, func(b backend.Backend) []float32 {
			b.SetBatch(batch, nil)
			d := b.NewTensor(T, 512)
			b.RMSNorm(d, in(b, x, 512), mustWeight(t, b, gain), 1e-6)
			return b.Download(d)
		})
		for _, il := range []bool{false, true} {
			compareOp(t, g, c, fmt.Sprintf("T=%d rope interleaved=%v", T, il), 1e-6, func(b backend.Backend) []float32 {
				b.SetBatch(batch, nil)
				v := in(b, x, 512)
				b.RoPE(v, 4, 96, 64, 32, 10000, il)
				b.RoPE(b.Cols(v, 448, 512), 1, 64, 0, 64, 1e6, il)
				return b.Download(v)
			})
		}
		// The norm's int8 form (made in the norm's own pass on the GPU)
		// feeds the product: checked through the product's result.
		wq := quantHost(t, r, "q128", 96, 512, 128)
		compareOp(t, g, c, fmt.Sprintf("T=%d rmsnorm+matmul", T), 1e-5, func(b backend.Backend) []float32 {
			b.SetBatch(batch, nil)
			d, o := b.NewTensor(T, 512), b.NewTensor(T, 96)
			b.RMSNorm(d, in(b, x, 512), mustWeight(t, b, gain), 1e-6)
			b.MatMul(o, d, mustWeight(t, b, wq))
			return b.Download(o)
		})
		// A norm right after the add that made its input runs fused on
		// the GPU (add_rmsnorm_quant); both results are compared.
		compareOp(t, g, c, fmt.Sprintf("T=%d add+rmsnorm", T), 1e-6, func(b backend.Backend) []float32 {
			b.SetBatch(batch, nil)
			xs, d := in(b, x, 512), b.NewTensor(T, 512)
			b.Add(xs, xs, in(b, y, 512))
			b.RMSNorm(d, xs, mustWeight(t, b, gain), 1e-6)
			return append(b.Download(xs), b.Download(d)...)
		})
		compareOp(t, g, c, fmt.Sprintf("T=%d add", T), 0, func(b backend.Backend) []float32 {
			b.SetBatch(batch, nil)
			d := b.NewTensor(T, 512)
			b.Add(d, in(b, x, 512), in(b, y, 512))
			return b.Download(d)
		})
		// The CPU's SIMD SiLU and the GPU's take their exponentials in
		// float32 by different means (the CPU's Go code in float64): a
		// few ulp apart (about 1e-7 when the GPU's was float64).
		// Rows of 2500 are wider than one block's 1024 columns, the last
		// slice short.
		for _, sw := range []struct {
			cols int
			v    []float32
		}{{256, x}, {2500, randVec(r, T*2*2500, 4)}} {
			compareOp(t, g, c, fmt.Sprintf("T=%d swiglu %d", T, sw.cols), 5e-7, func(b backend.Backend) []float32 {
				b.SetBatch(batch, nil)
				d := b.NewTensor(T, sw.cols)
				v := in(b, sw.v, 2*sw.cols)
				b.SwiGLU(d, b.Cols(v, 0, sw.cols), b.Cols(v, sw.cols, 2*sw.cols))
				return b.Download(d)
			})
		}
		compareOp(t, g, c, fmt.Sprintf("T=%d select outputs", T), 0, func(b backend.Backend) []float32 {
			b.SetBatch(batch, nil)
			d := b.NewTensor(2, 512)
			b.SelectOutputs(d, in(b, x, 512))
			return b.Download(d)
		})
	}
}

// MLA ops on a paged pool: two sequences written over two steps (a prefill
// chunk each, then one decode token each), attention read through
// scattered block tables.
func TestBackendAttentionMatchesCPU(t *testing.T) {
	s := backend.MLAShape{Heads: 4, NopeDim: 32, RopeDim: 64, VDim: 48, Rank: 128}
	qk := s.NopeDim + s.RopeDim
	const blockSize, blocks, layers = 4, 64, 2
	// Sequence C is long enough for several splits of the split kernel.
	var blocksC []int32
	for i := 0; i < 38; i++ {
		blocksC = append(blocksC, int32(63-i))
	}
	steps := []*backend.Batch{
		{Seqs: []backend.Seq{{Start: 0, Len: 7, Blocks: []int32{9, 2, 14}}, {Start: 7, Len: 3, Blocks: []int32{5, 0}}, {Start: 10, Len: 150, Blocks: blocksC}}},
		{Seqs: []backend.Seq{{Start: 0, Len: 1, Blocks: []int32{9, 2, 14}}, {Start: 1, Len: 2, Blocks: []int32{5, 0}}, {Start: 3, Len: 1, Blocks: blocksC}}},
		{Seqs: []backend.Seq{{Start: 0, Len: 1, Blocks: []int32{9, 2, 14}}}},
	}
	seqStart := [][]int32{{0, 0, 0}, {7, 3, 150}, {8}}
	for i, st := range steps {
		var p []int32
		for k, sq := range st.Seqs {
			for j := 0; j < sq.Len; j++ {
				p = append(p, seqStart[i][k]+int32(j))
			}
		}
		steps[i].Positions = p
		steps[i].Tokens = make([]int32, len(p))
		steps[i].Outputs = []int32{0}
		if err := st.Validate(1, blocks, blockSize); err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
	}
	g, c := testBackends(t, Options{})
	g.flashMin = 0 // the split kernels (TestFlashAttentionMatchesCPU covers the flash kernel)
	r := testRand(t)
	wUK := []backend.HostWeight{quantHost(t, r, "wuk", s.Heads*s.NopeDim, s.Rank, 32), denseHost(r, "wuk", s.Heads*s.NopeDim, s.Rank)}
	wUV := []backend.HostWeight{quantHost(t, r, "wuv", s.Heads*s.VDim, s.Rank, 128), denseHost(r, "wuv", s.Heads*s.VDim, s.Rank)}
	type stepIn struct{ lat, kpe, q []float32 }
	var ins []stepIn
	for _, st := range steps {
		T := st.Rows()
		ins = append(ins, stepIn{randVec(r, T*s.Rank, 1), randVec(r, T*s.RopeDim, 1), randVec(r, T*s.Heads*qk, 1)})
	}
	for _, split := range []string{"decode", "decode2", "heads", "split", "rows", "chunks"} {
		// decode: the single-launch kernel for the few-row steps (the
		// others for the 160-row one), one head a warp (decode2: two);
		// heads: blocks of positions for all
		// heads; split: a block per head and block of positions; rows: a
		// block per head and row; chunks: heads over chunks of 7 rows (8
		// splits at 150 positions), as a long prefill runs.
		g.splitFloats, g.noHeadsAttention = maxSplitFloats, split == "split"
		g.decodeAttn, g.decodeOneHead = split == "decode" || split == "decode2", split == "decode"
		switch split {
		case "rows":
			g.splitFloats = 0
		case "chunks":
			g.splitFloats = 7 * s.Heads * 8 * s.Rank
		}
		for _, dt := range []backend.CacheDType{backend.CacheF32, backend.CacheBF16, backend.CacheFP8, backend.CacheFP4} {
			for wi, wname := range []string{"mmfp4", "dense"} {
				// Part 0: qlat and olat; part 1: the expanded values, which on
				// MMFP4 weights quantize olat to int8, where a last-bit
				// difference can move a value by one step.
				for part := 0; part < 2; part++ {
					bound, what := 1e-5, "qlat, olat"
					if part == 1 {
						what = "values"
						if wname == "mmfp4" {
							bound = 1e-3
						}
					}
					compareOp(t, g, c, fmt.Sprintf("attention split=%v %v cache, %s weights: %s", split, dt, wname, what), bound, func(b backend.Backend) []float32 {
						pool, err := b.NewCachePool(layers, blocks, blockSize, s.Rank, s.RopeDim, dt)
						if err != nil {
							t.Fatal(err)
						}
						uk, uv := mustWeight(t, b, wUK[wi]), mustWeight(t, b, wUV[wi])
						var out []float32
						for i, st := range steps {
							b.SetBatch(st, pool)
							T := st.Rows()
							lat, kpe, q := b.NewTensor(T, s.Rank), b.NewTensor(T, s.RopeDim), b.NewTensor(T, s.Heads*qk)
							b.Upload(lat, ins[i].lat)
							b.Upload(kpe, ins[i].kpe)
							b.Upload(q, ins[i].q)
							for l := 0; l < layers; l++ {
								b.CacheWrite(l, lat, kpe)
							}
							qlat, olat := b.NewTensor(T, s.Heads*s.Rank), b.NewTensor(T, s.Heads*s.Rank)
							b.AbsorbQuery(qlat, q, uk, s)
							b.LatentAttention(olat, qlat, q, 1, s, 0.07)
							o := b.NewTensor(T, s.Heads*s.VDim)
							b.ExpandValues(o, olat, uv, s)
							if part == 0 {
								out = append(out, b.Download(qlat)...)
								out = append(out, b.Download(olat)...)
							} else {
								out = append(out, b.Download(o)...)
							}
						}
						return out
					})
				}
			}
		}
	}
}

// Router and experts: one token (the fused kernels) and several (the
// grouped path), MMFP4 and dense experts.
func TestBackendMoEMatchesCPU(t *testing.T) {
	const K, I, E, topK = 256, 128, 16, 4
	r := testRand(t)
	cfgs := []backend.RouterConfig{
		{TopK: topK, Groups: 4, TopKGroups: 2, NormTopKProb: true, RoutedScaling: 1.8, NumExperts: E},
		{TopK: topK, Groups: 1, TopKGroups: 1, NormTopKProb: true, RoutedScaling: 2.5, NumExperts: E}, // one warp per token
	}
	router := denseHost(r, "router", E, K)
	bias := backend.HostWeight{Name: "bias", N: 1, K: E, Dense: randVec(r, E, 0.1)}
	hosts := map[string][][3]backend.HostWeight{}
	for _, kind := range []string{"mmfp4", "dense"} {
		for e := 0; e < E; e++ {
			var h [3]backend.HostWeight
			for i, sh := range [3][2]int{{I, K}, {I, K}, {K, I}} {
				if kind == "mmfp4" {
					h[i] = quantHost(t, r, "expert", sh[0], sh[1], 128)
				} else {
					h[i] = denseHost(r, "expert", sh[0], sh[1])
				}
			}
			hosts[kind] = append(hosts[kind], h)
		}
	}
	for _, fused := range []bool{true, false} {
		g, c := testBackends(t, Options{NoFusedMoE: !fused})
		for _, cfg := range cfgs {
			for _, kind := range []string{"mmfp4", "dense"} {
				for _, T := range []int{1, 6} {
					x := randVec(r, T*K, 1)
					// MMFP4 experts requantize the SwiGLU product to int8, where
					// a last-bit difference can move a value by one step.
					bound := 1e-5
					if kind == "mmfp4" {
						bound = 1e-3
					}
					compareOp(t, g, c, fmt.Sprintf("moe %s T=%d fused=%v groups=%d", kind, T, fused, cfg.Groups), bound, func(b backend.Backend) []float32 {
						b.SetBatch(simpleBatch(T, 0), nil)
						var experts []backend.Expert
						for _, h := range hosts[kind] {
							experts = append(experts, backend.Expert{Gate: mustWeight(t, b, h[0]), Up: mustWeight(t, b, h[1]), Down: mustWeight(t, b, h[2])})
						}
						xt := b.NewTensor(T, K)
						b.Upload(xt, x)
						logits := b.NewTensor(T, E)
						b.MatMul(logits, xt, mustWeight(t, b, router))
						rt := b.Route(logits, mustWeight(t, b, bias), cfg)
						out := b.NewTensor(T, K)
						b.MoE(out, xt, rt, experts)
						return append(b.Download(logits), b.Download(out)...)
					})
					// The last expert doubles as a shared expert: the GPU runs it
					// in the same pass (MoEShared), the CPU as its own block.
					compareOp(t, g, c, fmt.Sprintf("moe+shared %s T=%d fused=%v groups=%d", kind, T, fused, cfg.Groups), bound, func(b backend.Backend) []float32 {
						b.SetBatch(simpleBatch(T, 0), nil)
						var experts []backend.Expert
						for _, h := range hosts[kind] {
							experts = append(experts, backend.Expert{Gate: mustWeight(t, b, h[0]), Up: mustWeight(t, b, h[1]), Down: mustWeight(t, b, h[2])})
						}
						shared := experts[E-1:]
						xt := b.NewTensor(T, K)
						b.Upload(xt, x)
						logits := b.NewTensor(T, E)
						b.MatMul(logits, xt, mustWeight(t, b, router))
						rt := b.Route(logits, mustWeight(t, b, bias), cfg)
						out := b.NewTensor(T, K)
						if sm, ok := b.(backend.SharedMoE); ok {
							sm.MoEShared(out, xt, rt, experts, shared)
							return b.Download(out)
						}
						b.MoE(out, xt, rt, experts)
						gt, ut, o := b.NewTensor(T, I), b.NewTensor(T, I), b.NewTensor(T, K)
						b.MatMul(gt, xt, shared[0].Gate)
						b.MatMul(ut, xt, shared[0].Up)
						b.SwiGLU(gt, gt, ut)
						b.MatMul(o, gt, shared[0].Down)
						b.Add(out, out, o)
						return b.Download(out)
					})
				}
			}
		}
	}
}

// Errors reach Sync and are cleared by it.
func TestBackendSyncReportsErrors(t *testing.T) {
	g, _ := testBackends(t, Options{})
	g.SetBatch(simpleBatch(2, 0), nil)
	g.Add(g.NewTensor(2, 4), g.NewTensor(2, 4), g.NewTensor(3, 4))
	if err := g.Sync(); err == nil {
		t.Fatal("shape mismatch not reported")
	}
	if err := g.Sync(); err != nil {
		t.Fatalf("error not cleared: %v", err)
	}
}

// The fp8 cache's encoder against format.E4M3Encode on values spread over
// every exponent (float32 bit patterns in steps), ties and both signs.
func TestE4M3EncodeMatchesFormat(t *testing.T) {
	d := testDevice(t)
	var xs []float32
	for u := uint32(0); u < 0x44000000; u += 0x1001 { // up to 512
		f := math.Float32frombits(u)
		xs = append(xs, f, -f)
	}
	for c := 0; c < 127; c++ { // midpoints between neighbouring codes
		a, b := format.E4M3Decode(uint8(c)), format.E4M3Decode(uint8(c+1))
		xs = append(xs, (a+b)/2, -(a+b)/2)
	}
	xs = append(xs, float32(math.NaN()), float32(math.Inf(1)), float32(math.Inf(-1)), 448, 464, 470, 1e30)
	got := make([]byte, len(xs))
	err := d.Do(func(c *Ctx) error {
		in, err := upload(c, xs)
		if err != nil {
			return err
		}
		defer c.Free(in)
		out, err := c.Alloc(len(xs))
		if err != nil {
			return err
		}
		defer c.Free(out)
		k, err := c.Kernel("ops", "e4m3_encode_n")
		if err != nil {
			return err
		}
		if err := c.Launch(k, D1((len(xs)+255)/256), D1(256), 0, in, out, len(xs)); err != nil {
			return err
		}
		return CopyOut(c, got, out.Ptr)
	})
	if err != nil {
		t.Fatal(err)
	}
	bad := 0
	for i, x := range xs {
		if want := format.E4M3Encode(x); got[i] != want {
			if bad++; bad <= 5 {
				t.Errorf("e4m3(%g) = %#x, want %#x", x, got[i], want)
			}
		}
	}
	t.Logf("%d values, %d mismatches", len(xs), bad)
}
