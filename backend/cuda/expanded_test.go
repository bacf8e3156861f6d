//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/backend/cpu"
)

// expandedRun writes random cache rows for seqs (as flashRun does), then
// runs a step's attention with random queries and the weights uk, uv:
// in the expanded form (ExpandedAttention) or the latent one (AbsorbQuery,
// LatentAttention, ExpandValues), and returns the output.
func expandedRun(t *testing.T, b backend.Backend, seqs []flashSeq, s backend.MLAShape, dt backend.CacheDType, seed uint64,
	uk, uv backend.HostWeight, expanded bool) []float32 {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, 0x657870))
	step := flashCache(t, b, seqs, s, dt, r)
	T, H := step.Rows(), s.Heads
	q, out := b.NewTensor(T, H*(s.NopeDim+s.RopeDim)), b.NewTensor(T, H*s.VDim)
	b.Upload(q, randVec(r, T*H*(s.NopeDim+s.RopeDim), 1))
	nan := make([]float32, T*H*s.VDim)
	for i := range nan {
		nan[i] = float32(math.NaN())
	}
	b.Upload(out, nan)
	wk, wv := mustWeight(t, b, uk), mustWeight(t, b, uv)
	if expanded && !b.(backend.ExpandedAttender).ExpandedFits(s) {
		t.Fatalf("seqs %v: the step does not take the expanded form", seqs)
	}
	queueAttention(b, out, q, wk, wv, s, expanded)
	got := b.Download(out)
	if err := b.Sync(); err != nil {
		t.Fatal(err)
	}
	return got
}

// queueAttention queues layer 0's attention of the bound step into out, as
// the model does: in the expanded form (ExpandedAttention) or the latent
// one (AbsorbQuery, LatentAttention, ExpandValues).
func queueAttention(b backend.Backend, out, q backend.Tensor, wk, wv backend.Weight, s backend.MLAShape, expanded bool) {
	scale := float32(1 / math.Sqrt(float64(s.NopeDim+s.RopeDim)))
	if expanded {
		b.(backend.ExpandedAttender).ExpandedAttention(out, q, 0, wk, wv, s, scale)
		return
	}
	T := q.Rows()
	qlat, olat := b.NewTensor(T, s.Heads*s.Rank), b.NewTensor(T, s.Heads*s.Rank)
	b.AbsorbQuery(qlat, q, wk, s)
	b.LatentAttention(olat, qlat, q, 0, s, scale)
	b.ExpandValues(out, olat, wv, s)
}

// expandedForms is the expanded form's kernels that d runs: the mma.sync
// ones (false), and the wgmma ones (true) where the kernels are built for
// sm_90a; their absence is logged, not counted as a pass.
func expandedForms(t *testing.T, d *Device) []bool {
	var arch string
	if err := d.Do(func(c *Ctx) (err error) { arch, err = c.Arch(); return err }); err != nil {
		t.Fatal(err)
	}
	if arch != "sm_90a" {
		t.Logf("no wgmma form: the kernels are built for %s", arch)
		return []bool{false}
	}
	return []bool{false, true}
}

// TestExpandedAttentionMatchesCPU checks the expanded form of a prompt
// step's attention against the CPU backend's latent form on the same
// random cache, queries and MMFP4 weights: fresh prompts and chunks after
// a prefix, two sequences in a step, splits of the keys (some of them
// empty for the first query tiles of a fresh prompt), the bf16, fp8 and
// fp4 caches, groups of 128 and 32. The GPU's latent form on the same
// inputs is held to the same bound (on an H200 it was 0.7e-3 to 5.1e-3).
func TestExpandedAttentionMatchesCPU(t *testing.T) {
	defer func(v bool) { expandWGMMA = v }(expandWGMMA)
	g, _ := testBackends(t, Options{})
	g.expandedMin = 1
	c := cpu.New(cpu.Options{Threads: 2})
	cases := []struct {
		s    backend.MLAShape
		seqs []flashSeq
		G    int
	}{
		{backend.MLAShape{Heads: 3, NopeDim: 192, RopeDim: 64, VDim: 256, Rank: 512}, []flashSeq{{0, 300}}, 128},
		{backend.MLAShape{Heads: 3, NopeDim: 192, RopeDim: 64, VDim: 256, Rank: 512}, []flashSeq{{700, 260}}, 32},
		{backend.MLAShape{Heads: 2, NopeDim: 192, RopeDim: 64, VDim: 256, Rank: 512}, []flashSeq{{0, 1024}}, 128},
		{backend.MLAShape{Heads: 5, NopeDim: 192, RopeDim: 64, VDim: 256, Rank: 256}, []flashSeq{{100, 256}, {37, 300}}, 64},
		// GLM-4.7-Flash's 20 heads, a chunk of 448 rows after a prefix.
		{backend.MLAShape{Heads: 20, NopeDim: 192, RopeDim: 64, VDim: 256, Rank: 512}, []flashSeq{{2048, 448}}, 128},
	}
	for i, cs := range cases {
		if testing.Short() && i > 0 {
			continue // the sanitizer's run: the first case only
		}
		r := rand.New(rand.NewPCG(uint64(400+i), 1))
		uk := quantHost(t, r, "wuk", cs.s.Heads*cs.s.NopeDim, cs.s.Rank, cs.G)
		uv := quantHost(t, r, "wuv", cs.s.Heads*cs.s.VDim, cs.s.Rank, cs.G)
		for _, dt := range []backend.CacheDType{backend.CacheBF16, backend.CacheFP8, backend.CacheFP4} {
			name := fmt.Sprintf("%v cache, heads %d rank %d, groups of %d, seqs %v", dt, cs.s.Heads, cs.s.Rank, cs.G, cs.seqs)
			seed := uint64(500 + i)
			want := expandedRun(t, c, cs.seqs, cs.s, dt, seed, uk, uv, false)
			msg := ""
			for _, wg := range expandedForms(t, g.dev) {
				expandWGMMA = wg
				got := expandedRun(t, g, cs.seqs, cs.s, dt, seed, uk, uv, true)
				e := maxRelErr(want, got)
				if !(e <= expandedBound) {
					t.Errorf("%s: expanded form (wgmma %v) max relative error %.3e above %.0e", name, wg, e, expandedBound)
				}
				msg += fmt.Sprintf(" wgmma %v %.2e,", wg, e)
			}
			latent := maxRelErr(want, expandedRun(t, g, cs.seqs, cs.s, dt, seed, uk, uv, false))
			t.Logf("%-75s expanded:%s GPU latent %.2e", name, msg, latent)
			if !(latent <= expandedBound) {
				t.Errorf("%s: GPU latent form max relative error %.3e above %.0e", name, latent, expandedBound)
			}
		}
	}
}

// expandedBound is the expanded form's bound against the CPU's latent
// form: bf16 keys, values, queries and weights (2^-9 each) against the
// latent form's int8 queries and outputs.
const expandedBound = 2e-2

// TestExpandedTakes checks which steps take the expanded form: prompt
// chunks of 256+ rows reaching the positions asked for, every sequence of
// the step, the compiled head shape over a pool of its rank, and the
// workspace cap.
func TestExpandedTakes(t *testing.T) {
	glm := backend.MLAShape{Heads: 20, NopeDim: 192, RopeDim: 64, VDim: 256, Rank: 512}
	pool := &cachePool{rank: 512, ropeDim: 64}
	step := func(seqs ...flashSeq) *backend.Batch {
		_, st, _ := flashBatches(seqs, 16)
		return st
	}
	for _, c := range []struct {
		name string
		st   *backend.Batch
		s    backend.MLAShape
		p    *cachePool
		min  int
		want bool
	}{
		{"a 1024-token prompt", step(flashSeq{0, 1024}), glm, pool, 1024, true},
		{"a 1024-token prompt, 2048 asked for", step(flashSeq{0, 1024}), glm, pool, 2048, false},
		{"the form off", step(flashSeq{0, 1024}), glm, pool, 0, false},
		{"a chunk after a prefix", step(flashSeq{3000, 512}), glm, pool, 1024, true},
		{"255 rows", step(flashSeq{3000, 255}), glm, pool, 1024, false},
		{"256 rows", step(flashSeq{3000, 256}), glm, pool, 1024, true},
		{"two chunks", step(flashSeq{1000, 300}, flashSeq{2000, 400}), glm, pool, 1024, true},
		{"a chunk beside a decode row", step(flashSeq{1000, 300}, flashSeq{5000, 1}), glm, pool, 1024, false},
		{"another head shape", step(flashSeq{0, 1024}), backend.MLAShape{Heads: 20, NopeDim: 128, RopeDim: 64, VDim: 256, Rank: 512}, pool, 1024, false},
		{"a rank not a multiple of 64", step(flashSeq{0, 1024}), backend.MLAShape{Heads: 4, NopeDim: 192, RopeDim: 64, VDim: 256, Rank: 96}, &cachePool{rank: 96, ropeDim: 64}, 1024, false},
		{"a pool of another rank", step(flashSeq{0, 1024}), glm, &cachePool{rank: 256, ropeDim: 64}, 1024, false},
		{"100k positions (1.9 GB of workspace)", step(flashSeq{100000 - 512, 512}), glm, pool, 1024, true},
		{"120k positions (2.3 GB, past the cap)", step(flashSeq{120000 - 512, 512}), glm, pool, 1024, false},
	} {
		if got := expandedTakes(c.st, c.p, c.s, c.min); got != c.want {
			t.Errorf("%s: expandedTakes %v, want %v", c.name, got, c.want)
		}
	}
}

// TestExpandGemmMatchesFloat64 checks the keys' and values' product
// kernels (expand_gemm, and expand_gemm_wg where the kernels are built for
// sm_90a) against a float64 product of the same bf16 operands: each output
// within its bf16 rounding (2^-8 of itself) and the fp32 sums' error
// (1e-6 of the largest), on ragged rows and columns (P and N not multiples
// of the tiles), with row scales and without.
func TestExpandGemmMatchesFloat64(t *testing.T) {
	d := testDevice(t)
	r := testRand(t)
	const K = 512
	for _, cs := range []struct{ P, N int }{{300, 576}, {1024, 3840}, {77, 130}} {
		a, w := make([]uint16, cs.P*(K+64)), make([]uint16, cs.N*K)
		bf := func(x float64) uint16 { return uint16(math.Float32bits(float32(x)) >> 16) }
		for i := range a {
			a[i] = bf(r.NormFloat64())
		}
		for i := range w {
			w[i] = bf(r.NormFloat64() * 0.05)
		}
		rs := make([]float32, cs.N)
		for i := range rs {
			rs[i] = float32(0.5 + r.Float64())
		}
		val := func(u uint16) float64 { return float64(math.Float32frombits(uint32(u) << 16)) }
		ref := make([]float64, cs.P*cs.N)
		big := 0.0
		for p := 0; p < cs.P; p++ {
			for n := 0; n < cs.N; n++ {
				s := 0.0
				for k := 0; k < K; k++ {
					s += val(a[p*(K+64)+k]) * val(w[n*K+k])
				}
				ref[p*cs.N+n] = s * float64(rs[n])
				big = math.Max(big, math.Abs(ref[p*cs.N+n]))
			}
		}
		for _, wg := range expandedForms(t, d) {
			name, shared := "expand_gemm", expandGemmShared
			if wg {
				name, shared = "expand_gemm_wg", expandGemmWGShared
			}
			got := make([]uint16, cs.P*cs.N)
			err := d.Do(func(c *Ctx) error {
				k, err := c.kernelShared("expand", name, shared)
				if err != nil {
					return err
				}
				ab, err := c.Alloc(2 * len(a))
				if err != nil {
					return err
				}
				wb, err := c.Alloc(2 * len(w))
				if err != nil {
					return err
				}
				rb, err := c.Alloc(4 * len(rs))
				if err != nil {
					return err
				}
				cb, err := c.Alloc(2 * len(got))
				if err != nil {
					return err
				}
				defer func() { c.Free(ab); c.Free(wb); c.Free(rb); c.Free(cb) }()
				if err := errors.Join(CopyIn(c, ab.Ptr, a), CopyIn(c, wb.Ptr, w), CopyIn(c, rb.Ptr, rs)); err != nil {
					return err
				}
				grid := Dim{uint32((cs.P + 127) / 128), uint32((cs.N + 127) / 128), 1}
				if !wg {
					err = c.Launch(k, grid, D1(256), shared, cb.Ptr, cs.N, ab.Ptr, K+64, wb.Ptr, rb.Ptr, cs.P, cs.N, K)
				} else {
					err = c.Launch(k, grid, D1(256), shared, cb.Ptr, cs.N, ab.Ptr, K+64, cs.P, wb.Ptr, K, cs.N, cs.N, rb.Ptr, 0, K)
				}
				if err != nil {
					return err
				}
				if err := CopyOut(c, got, cb.Ptr); err != nil {
					return err
				}
				if !wg {
					return nil
				}
				// The transposed form (the values of expand_flash_wg): W as
				// A, the rows as B, row scales, zeros to a multiple of 64.
				nc := ceil64(cs.P)
				tb, err := c.Alloc(2 * cs.N * nc)
				if err != nil {
					return err
				}
				defer c.Free(tb)
				if err := c.Launch(k, Dim{uint32((cs.N + 127) / 128), uint32((nc + 127) / 128), 1}, D1(256), shared,
					tb.Ptr, nc, wb.Ptr, K, cs.N, ab.Ptr, K+64, cs.P, nc, rb.Ptr, 1, K); err != nil {
					return err
				}
				tr := make([]uint16, cs.N*nc)
				if err := CopyOut(c, tr, tb.Ptr); err != nil {
					return err
				}
				for n := 0; n < cs.N; n++ {
					for p := 0; p < nc; p++ {
						want := uint16(0)
						if p < cs.P {
							want = got[p*cs.N+n]
						}
						if math.Abs(val(tr[n*nc+p])-val(want)) > math.Abs(val(want))/128+2e-6*big {
							return fmt.Errorf("transposed P=%d N=%d: [%d][%d] = %v, untransposed %v", cs.P, cs.N, n, p, val(tr[n*nc+p]), val(want))
						}
					}
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			worst := 0.0
			for i, g := range got {
				e := math.Abs(val(g) - ref[i])
				if e > math.Abs(ref[i])/256+1e-6*big {
					t.Fatalf("%s P=%d N=%d: output %d (row %d, column %d) = %v, float64 %v", name, cs.P, cs.N, i, i/cs.N, i%cs.N, val(g), ref[i])
				}
				worst = math.Max(worst, e/big)
			}
			t.Logf("%s P=%d N=%d: max error %.2e of the largest output", name, cs.P, cs.N, worst)
		}
	}
}

// BenchmarkExpandedAttention times one layer's prompt attention at
// GLM-4.7-Flash's shapes (20 heads, MMFP4 W_UK and W_UV in groups of 128,
// bf16 cache): T rows after a cached prefix, in the expanded form (the
// gather, the keys' and values' product, the attention and the merge) and
// in the latent form the model runs otherwise (AbsorbQuery, LatentAttention,
// ExpandValues) from expandedMinRows rows up: device time of the queued
// launches (events). Where the expanded form's ms/op is the smaller,
// expandedTakes should take it.
func BenchmarkExpandedAttention(b *testing.B) {
	d := benchDevice(b)
	s := backend.MLAShape{Heads: 20, NopeDim: 192, RopeDim: 64, VDim: 256, Rank: 512}
	r := rand.New(rand.NewPCG(7, 7))
	uk := quantHost(b, r, "wuk", s.Heads*s.NopeDim, s.Rank, 128)
	uv := quantHost(b, r, "wuv", s.Heads*s.VDim, s.Rank, 128)
	for _, prefix := range []int{0, 2048, 8192, 30720} {
		for _, T := range []int{256, 320, 384, 448, 512, 1024, 2048} {
			for _, expanded := range []bool{false, true} {
				name := map[bool]string{false: "latent", true: "expanded"}[expanded]
				b.Run(fmt.Sprintf("prefix%d/T%d/%s", prefix, T, name), func(b *testing.B) {
					g := NewOnDevice(d, Options{NoGraphs: true, NoPieces: true}) // every op in g.pending
					defer g.Close()
					g.expandedMin = 1
					step := flashCache(b, g, []flashSeq{{prefix, T}}, s, backend.CacheBF16, r)
					H := s.Heads
					q, out := g.NewTensor(T, H*(s.NopeDim+s.RopeDim)), g.NewTensor(T, H*s.VDim)
					g.Upload(q, randVec(r, T*H*(s.NopeDim+s.RopeDim), 1))
					wk, wv := mustWeight(b, g, uk), mustWeight(b, g, uv)
					run := func() { queueAttention(g, out, q, wk, wv, s, expanded) }
					if expanded && !g.ExpandedFits(s) {
						b.Fatalf("%d rows after %d: the step does not take the expanded form", step.Rows(), prefix)
					}
					// The timed run reuses the warm-up's step memory: an arena
					// growth while queuing would run (flush) the ops before it.
					mark := g.Mark()
					run() // warm-up (compiles)
					if err := g.Sync(); err != nil {
						b.Fatal(err)
					}
					g.Release(mark)
					flushes := g.flushes
					run()
					if g.flushes != flushes {
						b.Fatalf("ops were flushed while queuing the timed run")
					}
					ops := g.pending
					g.pending = nil
					if err := d.Do(func(c *Ctx) error {
						sec, launches, err := timeQueued(c, ops, 10)
						b.ReportMetric(sec*1e3, "ms/op")
						b.ReportMetric(float64(launches), "launches")
						return err
					}); err != nil {
						b.Fatal(err)
					}
				})
			}
		}
	}
}
