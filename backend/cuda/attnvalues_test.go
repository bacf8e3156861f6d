//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"encoding/binary"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/mmfp4/mmfp4/backend"
)

// attnValuesSteps are single-row decode steps over sequences of 1000, 400
// and 40 positions (tiles of 64, 32 and 16 positions at 16 splits), and a
// step of two rows (not fused) between them.
func attnValuesSteps(r *rand.Rand) *chainSteps {
	cs := &chainSteps{lens: [3]int{1000, 400, 40}, blocks: 100}
	perm := r.Perm(cs.blocks)
	next := 0
	for i, n := range cs.lens {
		for j := 0; j < (n+12+chainBlockSize-1)/chainBlockSize; j++ {
			cs.tables[i] = append(cs.tables[i], int32(perm[next]))
			next++
		}
	}
	p := cs.lens
	for _, rows := range [][]int{{0}, {1}, {2}, {0, 1}, {0}, {2}} {
		b := &backend.Batch{Outputs: []int32{0}}
		for k, sq := range rows {
			b.Seqs = append(b.Seqs, backend.Seq{Start: k, Len: 1, Blocks: cs.tables[sq]})
			b.Tokens = append(b.Tokens, 0)
			b.Positions = append(b.Positions, int32(p[sq]))
			p[sq]++
		}
		cs.steps = append(cs.steps, b)
	}
	return cs
}

// attnValuesOut is what runAttnValues returns: olat, the values and
// o_proj's output of every step and layer, and (the CUDA backend's) the
// int8 forms of olat and of the values, as bytes.
type attnValuesOut map[string][]byte

func floatBytes(v []float32) []byte {
	out := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(out[4*i:], math.Float32bits(x))
	}
	return out
}

func bytesFloats(b []byte) []float32 {
	out := make([]float32, len(b)/4)
	for i := range out {
		out[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
	}
	return out
}

// runAttnValues runs the steps as a decode layer's attention half does:
// the cache write, the absorbed query, the attention, the value
// expansion and o_proj (whose quantization of the values the expansion
// writes).
func runAttnValues(t *testing.T, b backend.Backend, cs *chainSteps, in *chainInputs, uk, uv, wo backend.HostWeight, layers int) attnValuesOut {
	t.Helper()
	s := chainShape
	qk := s.NopeDim + s.RopeDim
	pool, err := b.NewCachePool(layers, cs.blocks, chainBlockSize, s.Rank, s.RopeDim, backend.CacheBF16)
	if err != nil {
		t.Fatal(err)
	}
	wk, wv, wO := mustWeight(t, b, uk), mustWeight(t, b, uv), mustWeight(t, b, wo)
	pre := cs.prefill()
	b.SetBatch(pre, pool)
	for l := 0; l < layers; l++ {
		lt, kt := b.NewTensor(pre.Rows(), s.Rank), b.NewTensor(pre.Rows(), s.RopeDim)
		b.Upload(lt, in.lat[l])
		b.Upload(kt, in.kpe[l])
		b.CacheWrite(l, lt, kt)
	}
	out := attnValuesOut{}
	g, _ := b.(*Backend)
	for i, st := range cs.steps {
		b.SetBatch(st, pool)
		T := st.Rows()
		q := b.NewTensor(T, s.Heads*qk)
		b.Upload(q, in.q[i])
		type forms struct{ ol, v *QActs }
		var ols, vs, os []backend.Tensor
		var fs []forms
		for l := 0; l < layers; l++ {
			lt, kt := b.NewTensor(T, s.Rank), b.NewTensor(T, s.RopeDim)
			b.Upload(lt, in.lat[(i+1)*layers+l])
			b.Upload(kt, in.kpe[(i+1)*layers+l])
			qlat, olat, v, o := b.NewTensor(T, s.Heads*s.Rank), b.NewTensor(T, s.Heads*s.Rank), b.NewTensor(T, s.Heads*s.VDim), b.NewTensor(T, wo.N)
			b.CacheWrite(l, lt, kt)
			b.AbsorbQuery(qlat, q, wk, s)
			b.LatentAttention(olat, qlat, q, l, s, 0.0625)
			b.ExpandValues(v, olat, wv, s)
			b.MatMul(o, v, wO)
			ols, vs, os = append(ols, olat), append(vs, v), append(os, o)
			if g != nil {
				var f forms
				for _, e := range g.quantized {
					switch e.src {
					case *asTensor(olat):
						f.ol = e.a
					case *asTensor(v):
						f.v = e.a
					}
				}
				if f.ol == nil || f.v == nil {
					t.Fatalf("step %d layer %d: no int8 form of olat or of the values", i, l)
				}
				fs = append(fs, f)
			}
		}
		for l := range ols {
			out["olat"] = append(out["olat"], floatBytes(b.Download(ols[l]))...)
			out["values"] = append(out["values"], floatBytes(b.Download(vs[l]))...)
			out["o_proj"] = append(out["o_proj"], floatBytes(b.Download(os[l]))...)
		}
		if err := b.Sync(); err != nil {
			t.Fatal(err)
		}
		for _, f := range fs {
			if err := g.dev.Do(func(c *Ctx) error {
				out["olat int8"] = append(out["olat int8"], qactsBytes(t, c, f.ol)...)
				out["values int8"] = append(out["values int8"], qactsBytes(t, c, f.v)...)
				return nil
			}); err != nil {
				t.Fatal(err)
			}
		}
	}
	return out
}

// The attention of one row with its splits' merge and the value
// expansion in its launch (decode_mma_values, a cluster of 16 blocks a
// tile of 8 heads) writes what decode_mma's blocks of 8 heads and
// decode_combine_values write at the same 16 splits, bit for bit: olat
// and its int8 form, the values and their int8 form (o_proj's groups of
// 128, 64 and 32), and o_proj's output; launched directly and replayed
// from graphs; at tiles of 32 and 16 positions (1000, 400 and 40
// positions); W_UV groups of 128 and 32. The default path (the fused
// launch for the short row only) matches the CPU backend.
func TestDecodeMMAValuesMatchesSeparate(t *testing.T) {
	g, c := testBackends(t, Options{NoGraphs: true})
	if g.dev.Info().CC < 90 {
		t.Skipf("thread-block clusters need compute capability 9.0, the device has %d", g.dev.Info().CC)
	}
	if !g.attnValuesFits() {
		t.Skip("a cluster of 16 decode_mma_values blocks does not fit the device")
	}
	gg := NewOnDevice(g.dev, Options{})
	defer gg.Close()
	r := testRand(t)
	const layers = 2
	s := chainShape
	cs := attnValuesSteps(r)
	in := newChainInputs(r, cs, s, layers)
	defer func(v bool) { attnValues, decodeSplitsFixed = v, 0 }(attnValues)
	for _, v := range []struct{ G, oG int }{{128, 128}, {32, 32}, {128, 64}} {
		uk := quantHost(t, r, "wuk", s.Heads*s.NopeDim, s.Rank, 128)
		uv := quantHost(t, r, "wuv", s.Heads*s.VDim, s.Rank, v.G)
		wo := quantHost(t, r, "wo", 256, s.Heads*s.VDim, v.oG)
		name := fmt.Sprintf("W_UV groups of %d, o_proj groups of %d", v.G, v.oG)
		decodeSplitsFixed = 16
		attnValues = false
		g.attnValuesFused = 0
		want := runAttnValues(t, g, cs, in, uk, uv, wo, layers)
		if g.attnValuesFused != 0 {
			t.Fatalf("%s: %d fused launches with the fusion off", name, g.attnValuesFused)
		}
		attnValues = true
		for _, b := range []*Backend{g, gg} {
			b.attnValuesFused = 0
			got := runAttnValues(t, b, cs, in, uk, uv, wo, layers)
			// Single rows: five steps of two layers.
			if b.attnValuesFused != 5*layers {
				t.Errorf("%s (graphs %v): %d fused launches, want %d", name, b == gg, b.attnValuesFused, 5*layers)
			}
			for _, k := range []string{"olat", "olat int8", "values", "values int8", "o_proj"} {
				if i := firstDiff(want[k], got[k]); i >= 0 {
					t.Errorf("%s (graphs %v): %s differs at byte %d of %d from the separate launches", name, b == gg, k, i, len(want[k]))
				}
			}
		}
		decodeSplitsFixed = 0
		g.attnValuesFused = 0
		got := runAttnValues(t, g, cs, in, uk, uv, wo, layers)
		// The steps of 40 positions (bucketed at most attnValuesMaxN).
		if g.attnValuesFused != 2*layers {
			t.Errorf("%s: the default path fused %d launches, want %d", name, g.attnValuesFused, 2*layers)
		}
		cpu := runAttnValues(t, c, cs, in, uk, uv, wo, layers)
		eo, ev := maxRelErr(bytesFloats(cpu["olat"]), bytesFloats(got["olat"])), maxRelErr(bytesFloats(cpu["values"]), bytesFloats(got["values"]))
		if !(eo <= 1e-5) {
			t.Errorf("%s: olat max relative error %.3e against the CPU, above 1e-5", name, eo)
		}
		// An olat value a last bit apart can move an int8 code by one.
		if !(ev <= 1e-3) {
			t.Errorf("%s: values max relative error %.3e against the CPU, above 1e-3", name, ev)
		}
		t.Logf("%s: olat %.2e, values %.2e from the CPU (the fused default path)", name, eo, ev)
	}
}

// BenchmarkDecodeAttnValues: BenchmarkDecodeChain's layers (cache write,
// absorbed query, attention, value expansion; 48 layers in a graph with
// programmatic dependent launch) at ctx 128-1024, with the attention's
// splits merged and the values expanded in its launch (decode_mma_values,
// 16 splits) against the separate launches at their own split count and
// at 16, timed by turns: device time a layer; and at ctx 256 and 1024 the
// fused launch's timer stamps. Run with -test.benchtime=1x.
func BenchmarkDecodeAttnValues(b *testing.B) {
	d := benchDevice(b)
	t0 := time.Now()
	if err := d.Do(func(c *Ctx) error { return compileModules(c, "flash", "absorb", "ops", "gemv", "quant") }); err != nil {
		b.Fatal(err)
	}
	fmt.Printf("attention with the values: modules ready in %.1f s\n", time.Since(t0).Seconds())
	r := rand.New(rand.NewPCG(7, 7))
	pattern := make([]uint16, 1<<19)
	for i := range pattern {
		pattern[i] = uint16(math.Float32bits(float32(r.NormFloat64())) >> 16)
	}
	defer func(v bool, n int) { attnValues, attnValuesMaxN, decodeSplitsFixed = v, n, 0 }(attnValues, attnValuesMaxN)
	type mode struct {
		what  string
		fused bool
		S     int
	}
	modes := []mode{{"separate", false, 0}, {"fused", true, 0}, {"separate, 16 splits", false, 16}}
	for _, ctx := range []int{256, 1024, 128, 512} {
		decodeChainAt(b, d, r, pattern, ctx, func(g *Backend, queue func() []queuedOp, layers int) {
			if ctx == 256 || ctx == 1024 {
				attnValues, attnValuesMaxN, decodeSplitsFixed = true, 1<<20, 0
				attnValuesPhases(b, g, queue, fmt.Sprintf("fused, ctx %d: ", ctx))
			}
			var opss [][]queuedOp
			for _, m := range modes {
				attnValues, attnValuesMaxN, decodeSplitsFixed = m.fused, 1<<20, m.S
				g.attnValuesFused = 0
				opss = append(opss, queue())
				if (g.attnValuesFused > 0) != m.fused {
					b.Fatalf("ctx %d, %s: %d fused launches", ctx, m.what, g.attnValuesFused)
				}
			}
			err := d.Do(func(c *Ctx) error {
				return withPDL(c, true, func() error {
					var execs []uintptr
					for _, ops := range opss {
						gr, release, err := capturedPDL(c, func() error { return runOps(c, ops) })
						if err != nil {
							return err
						}
						defer release()
						execs = append(execs, gr.exec)
					}
					sums := make([]float64, len(modes))
					const turns = 3
					for turn := 0; turn < turns; turn++ {
						for i, ex := range execs {
							us, err := timeReplay(c, ex, 5)
							if err != nil {
								return err
							}
							sums[i] += us / float64(layers)
						}
					}
					for i, m := range modes {
						// Printed, not logged: a benchmark's log is cut at ten lines.
						fmt.Printf("%s: ctx %d, %-20s: %6.2f us a layer (mean of %d turns)\n", d.Info().Name, ctx, m.what, sums[i]/turns, turns)
					}
					return nil
				})
			})
			if err != nil {
				b.Fatal(err)
			}
		})
	}
}

// attnValuesPhases prints decode_mma_values' timer stamps in the replayed
// chain (PDL on, the last layer's launch): decode_mma's six a block, then
// the fused part's five (median and latest over the blocks that wrote
// them, us after the first block's entry).
func attnValuesPhases(b *testing.B, g *Backend, queue func() []queuedOp, prefix string) {
	const most = 4096
	var buf Buffer
	if err := g.dev.Do(func(c *Ctx) error {
		var err error
		if buf, err = c.Alloc(11 * 8 * most); err != nil {
			return err
		}
		return c.Memset(buf.Ptr, 0, 11*8*most)
	}); err != nil {
		b.Fatal(err)
	}
	g.decodeStamps = buf.Ptr
	ops := queue()
	g.decodeStamps = 0
	n := g.decodeStampBlocks
	st := make([]uint64, 11*n)
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
	line := stampSummary(prefix, st[:6*n], n, []string{"entry", "wait returned", "queries", "first tile", "summed", "written"})
	t0 := st[0]
	for i := 0; i < n; i++ {
		t0 = min(t0, st[6*i])
	}
	for k, what := range []string{"barrier passed", "partials asked, splits weighed", "merged", "values", "done"} {
		var v []float64
		for i := 0; i < n; i++ {
			if x := st[6*n+5*i+k]; x != 0 {
				v = append(v, float64(x-t0)/1e3)
			}
		}
		if len(v) == 0 {
			continue
		}
		slices.Sort(v)
		line += fmt.Sprintf(" %s %.2f / %.2f (%d);", what, v[len(v)/2], v[len(v)-1], len(v))
	}
	fmt.Println(line)
}
