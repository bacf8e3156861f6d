//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
)

// The merged launches of a prefill's attention (the value expansion with
// the int8 form of its output, the latent's norm with the q_a norm, the
// absorbed query over two token tiles a block, the RoPEs and cache write
// with every load of a row at once; over an fp8 or fp4 cache the RoPEs
// and cache write in rope2_cache_write) compute what the separate launches
// compute (the RoPEs and cache write each in its own launch), bit for
// bit: the norms and their int8 forms, the rotated queries and keys, the
// cache's bytes, the absorbed queries, the expanded values, their int8
// form and o_proj's product of it, at GLM-4.7-Flash's attention shapes
// (and nope 128), at row counts that fill and that leave short token
// tiles of both GEMM tiles.
func TestPrefillMergesMatchSeparate(t *testing.T) {
	for _, c := range []struct {
		T, nope, uvG int
		dtype        backend.CacheDType
	}{
		{1030, 192, 128, backend.CacheBF16},
		{300, 192, 32, backend.CacheF32},
		{129, 128, 64, backend.CacheBF16},
		{70, 192, 128, backend.CacheBF16}, // the 16-token GEMM tile
		{300, 192, 128, backend.CacheFP8},
		{129, 128, 64, backend.CacheFP4},
	} {
		t.Run(fmt.Sprintf("T%d_nope%d_uv%d_%v", c.T, c.nope, c.uvG, c.dtype), func(t *testing.T) {
			const heads, rank, vdim, hidden, qRank = 20, 512, 256, 2048, 768
			run := func(merged bool) (map[string][]float32, map[string][]byte, *Backend) {
				defer func(v, w bool) { prefillFuseOff, ropeCacheOff = v, w }(prefillFuseOff, ropeCacheOff)
				prefillFuseOff, ropeCacheOff = !merged, !merged
				g, _ := testBackends(t, Options{})
				r := rand.New(rand.NewPCG(43, uint64(c.T+c.nope+c.uvG)))
				qh := func(name string, n, k, G int) backend.Weight { return mustWeight(t, g, quantHost(t, r, name, n, k, G)) }
				qb, uk := qh("q_b", heads*(c.nope+64), qRank, 128), qh("uk", heads*c.nope, rank, 128)
				uv, ow := qh("uv", heads*vdim, rank, c.uvG), qh("o", hidden, heads*vdim, 128)
				vec := func(name string, k int) backend.Weight {
					return mustWeight(t, g, backend.HostWeight{Name: name, N: 1, K: k, Dense: randVec(r, k, 1)})
				}
				qaNorm, kvNorm := vec("qa_norm", qRank), vec("kv_norm", rank)
				pool, err := g.NewCachePool(1, (c.T+15)/16+2, 16, rank, 64, c.dtype)
				if err != nil {
					t.Fatal(err)
				}
				tensor := func(cols int, scale float64) backend.Tensor {
					x := g.NewTensor(c.T, cols)
					g.Upload(x, randVec(r, c.T*cols, scale))
					return x
				}
				g.SetBatch(simpleBatch(c.T, 0), pool)
				qa, kv, olat := tensor(qRank, 1), tensor(rank+64, 1), tensor(heads*rank, 0.3)
				q, qlat := g.NewTensor(c.T, heads*(c.nope+64)), g.NewTensor(c.T, heads*rank)
				v, out := g.NewTensor(c.T, heads*vdim), g.NewTensor(c.T, hidden)
				qaN, latent, kpe := g.NewTensor(c.T, qRank), g.NewTensor(c.T, rank), g.Cols(kv, rank, rank+64)
				sh := backend.MLAShape{Heads: heads, NopeDim: c.nope, RopeDim: 64, Rank: rank, VDim: vdim}
				// The attention's order (glm4moelite.Model.attention).
				g.RMSNorm(qaN, qa, qaNorm, 1e-6)
				g.MatMul(q, qaN, qb)
				g.RMSNorm(latent, g.Cols(kv, 0, rank), kvNorm, 1e-6)
				g.RoPE(q, heads, c.nope+64, c.nope, 64, 1e6, true)
				g.RoPE(kpe, 1, 64, 0, 64, 1e6, true)
				g.CacheWrite(0, latent, kpe)
				g.AbsorbQuery(qlat, q, uk, sh)
				g.ExpandValues(v, olat, uv, sh)
				vq := quantForm(t, g, v, 128)
				g.MatMul(out, v, ow)
				got := map[string][]float32{}
				for name, x := range map[string]backend.Tensor{"qa norm": qaN, "latent": latent, "q": q, "kv": kv, "qlat": qlat, "v": v, "out": out} {
					got[name] = g.Download(x)
				}
				rec := poolLayer(t, g, pool, 0)
				if vq == nil {
					vq = quantForm(t, g, v, 128)
				}
				if err := g.Sync(); err != nil {
					t.Fatal(err)
				}
				return got, map[string][]byte{"v": vq, "cache": rec, "qa norm": quantForm(t, g, qaN, 128), "latent": quantForm(t, g, latent, 128)}, g
			}
			want, wantForms, gs := run(false)
			got, gotForms, g := run(true)
			merges := [4]int{1, 1, 0, 1}
			if c.dtype == backend.CacheFP8 || c.dtype == backend.CacheFP4 {
				merges[prefillRopeRows] = 0 // rope2_cache_write
			}
			if g.prefillMerges != merges {
				t.Errorf("merged launches %v (values with their int8 form, norm pairs, combines, RoPEs by rows), want %v", g.prefillMerges, merges)
			}
			if g.ropeCaches != 1 || gs.ropeCaches != 0 {
				t.Errorf("RoPEs in the cache write: %d merged, %d separate; want 1, 0", g.ropeCaches, gs.ropeCaches)
			}
			checkRecords(t, "cache", wantForms["cache"], slotBytesOf(c.dtype, rank, 64), c.T)
			sameOutputs(t, "merged", got, want, gotForms, wantForms)
		})
	}
}

// BenchmarkPrefillMerges times, at prefill shapes (20 heads, dn 192, rank
// 512, groups of 128), each merged and as separate launches: the value
// expansion with the int8 form of its output ("values"), the absorbed
// query ("absorb": merged is two token tiles a block, else one), and the
// q_a norm, q_b's product and the latent's norm ("norms": merged, the two
// norms in one launch), the RoPEs and cache write ("rope": merged,
// rope2_cache_rows). Device time of the queued launches (the attention
// output's own quantization left out).
func BenchmarkPrefillMerges(b *testing.B) {
	d := benchDevice(b)
	for _, T := range []int{1024} {
		for _, what := range []string{"values", "absorb", "norms", "rope"} {
			for _, merged := range []bool{false, true} {
				b.Run(fmt.Sprintf("T%d/%s/merged=%v", T, what, merged), func(b *testing.B) {
					prefillMergeBench(b, d, T, what, merged)
				})
			}
		}
	}
}

func prefillMergeBench(b *testing.B, d *Device, T int, what string, merged bool) {
	defer func(v bool) { prefillFuseOff = v }(prefillFuseOff)
	prefillFuseOff = !merged
	s := backend.MLAShape{Heads: 20, NopeDim: 192, RopeDim: 64, VDim: 256, Rank: 512}
	g := NewOnDevice(d, Options{NoGraphs: true})
	defer g.Close()
	r := rand.New(rand.NewPCG(13, 13))
	weight := func(name string, n, k int) backend.Weight {
		w, err := g.NewWeight(backend.HostWeight{Name: name, N: n, K: k, Quant: synthMatrix(r, n, k, 128)})
		if err != nil {
			b.Fatal(err)
		}
		return w
	}
	uk, uv := weight("uk", s.Heads*s.NopeDim, s.Rank), weight("uv", s.Heads*s.VDim, s.Rank)
	qb := weight("q_b", s.Heads*(s.NopeDim+s.RopeDim), 768)
	vec := func(name string, k int) backend.Weight {
		w, err := g.NewWeight(backend.HostWeight{Name: name, N: 1, K: k, Dense: randVec(r, k, 1)})
		if err != nil {
			b.Fatal(err)
		}
		return w
	}
	qaNorm, kvNorm := vec("qa_norm", 768), vec("kv_norm", s.Rank)
	pool, err := g.NewCachePool(1, T/16+2, 16, s.Rank, s.RopeDim, backend.CacheBF16)
	if err != nil {
		b.Fatal(err)
	}
	g.SetBatch(simpleBatch(T, 0), pool)
	qk := s.NopeDim + s.RopeDim
	q, ql, kv := g.NewTensor(T, s.Heads*qk), g.NewTensor(T, s.Heads*s.Rank), g.NewTensor(T, s.Rank+s.RopeDim)
	olat, v := g.NewTensor(T, s.Heads*s.Rank), g.NewTensor(T, s.Heads*s.VDim)
	qa, qaN, lat := g.NewTensor(T, 768), g.NewTensor(T, 768), g.NewTensor(T, s.Rank)
	g.Upload(qa, randVec(r, T*768, 1))
	g.Upload(q, randVec(r, T*s.Heads*qk, 1))
	g.Upload(kv, randVec(r, T*(s.Rank+s.RopeDim), 1))
	g.Upload(olat, randVec(r, T*s.Heads*s.Rank, 0.3))
	queue := func() {
		if what == "rope" {
			kpe := g.Cols(kv, s.Rank, s.Rank+s.RopeDim)
			g.RoPE(q, s.Heads, qk, s.NopeDim, s.RopeDim, 1e6, true)
			g.RoPE(kpe, 1, s.RopeDim, 0, s.RopeDim, 1e6, true)
			g.CacheWrite(0, g.Cols(kv, 0, s.Rank), kpe)
			return
		}
		if what == "norms" {
			g.RMSNorm(qaN, qa, qaNorm, 1e-6)
			g.MatMul(q, qaN, qb)
			g.RMSNorm(lat, g.Cols(kv, 0, s.Rank), kvNorm, 1e-6)
			return
		}
		if what == "values" {
			g.ExpandValues(v, olat, uv, s)
			if !merged {
				g.quantize(asTensor(v), 128)
			}
			return
		}
		g.AbsorbQuery(ql, q, uk, s)
	}
	mark := g.Mark()
	queue() // warm-up (compiles)
	if err := g.Sync(); err != nil {
		b.Fatal(err)
	}
	// The same arena memory again (no growth, which would run the queued
	// ops), and the int8 forms of the warm-up forgotten.
	g.Release(mark)
	queue()
	ops := g.pending
	g.pending = nil
	if what == "values" && len(ops) > 0 && ops[0].op == "quantize" {
		ops = ops[1:] // the attention output's quantization
	}
	err = d.Do(func(c *Ctx) error {
		sec, launches, err := timeQueued(c, ops, 20)
		if err != nil {
			return err
		}
		b.ReportMetric(sec*1e6, "us/op")
		b.ReportMetric(float64(launches), "launches")
		if what == "values" {
			name := map[bool]string{false: "gemm_t64_g128", true: "gemm_heads_q_t64_g128"}[merged]
			k, err := c.kernelShared("gemm", name, GEMMTile64.shared(s.Rank/128))
			if err != nil {
				return err
			}
			b.ReportMetric(float64(k.Regs), "regs")
			b.ReportMetric(float64(k.LocalBytes), "local-bytes")
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
}

// The prefill's absorbed query over two token tiles a block
// (absorb_query_tc2) writes what absorb_query_tc writes, bit for bit, at
// row counts that end inside the first and the second tile of a block, at
// both compiled nope widths.
func TestAbsorbTilesMatchOneTile(t *testing.T) {
	for _, c := range []struct{ T, nope, G int }{{65, 192, 128}, {130, 192, 32}, {1030, 192, 128}, {200, 128, 64}} {
		t.Run(fmt.Sprintf("T%d_nope%d_G%d", c.T, c.nope, c.G), func(t *testing.T) {
			s := backend.MLAShape{Heads: 20, NopeDim: c.nope, RopeDim: 64, VDim: 256, Rank: 512}
			run := func(tiles int) []float32 {
				defer func(v bool) { prefillFuseOff = v }(prefillFuseOff)
				prefillFuseOff = tiles == 1
				g, _ := testBackends(t, Options{})
				r := rand.New(rand.NewPCG(47, uint64(c.T+c.nope+c.G)))
				w := mustWeight(t, g, quantHost(t, r, "uk", s.Heads*s.NopeDim, s.Rank, c.G))
				q, ql := g.NewTensor(c.T, s.Heads*(s.NopeDim+s.RopeDim)), g.NewTensor(c.T, s.Heads*s.Rank)
				x := randVec(r, c.T*s.Heads*(s.NopeDim+s.RopeDim), 1)
				for i := range x {
					x[i] *= float32(math.Ldexp(1, (i/(s.NopeDim+s.RopeDim))%40-20)) // rows and heads of many magnitudes
				}
				g.Upload(q, x)
				g.AbsorbQuery(ql, q, w, s)
				out := g.Download(ql)
				if err := g.Sync(); err != nil {
					t.Fatal(err)
				}
				return out
			}
			want := run(1)
			for _, tiles := range []int{2} {
				got := run(tiles)
				for i := range want {
					if math.Float32bits(got[i]) != math.Float32bits(want[i]) {
						t.Fatalf("qlat[%d] = %v with %d tiles a block, %v with one", i, got[i], tiles, want[i])
					}
				}
			}
			if nonzero := nonzeroCount(want); nonzero < len(want)/2 {
				t.Errorf("%d of %d values nonzero", nonzero, len(want))
			}
		})
	}
}

// A prefill layer's end, as the model queues it: the batched MoE into a
// cleared tensor, the residual add of its output, the Release of the
// layer's memory, then the next layer's norm and a product of its int8
// form. With the combine, add and norm in one launch (across the Release)
// the residual, the norm's output and the product equal the separate
// launches' bit for bit, at row counts of the 16- and 64-token MoE tiles.
func TestPrefillCombineNormMatchesSeparate(t *testing.T) {
	const K, I, E, topK = 2048, 512, 16, 4
	r := rand.New(rand.NewPCG(53, 53))
	cfg := backend.RouterConfig{TopK: topK, Groups: 1, TopKGroups: 1, NormTopKProb: true, RoutedScaling: 1.8, NumExperts: E}
	router := denseHost(r, "router", E, K)
	bias := backend.HostWeight{Name: "bias", N: 1, K: E, Dense: randVec(r, E, 0.1)}
	gain := backend.HostWeight{Name: "norm", N: 1, K: K, Dense: randVec(r, K, 1)}
	probe := quantHost(t, r, "probe", 256, K, 128)
	hosts := expertHosts(t, r, E+1, I, K, 128)
	for _, T := range []int{100, 700} {
		x, res := randVec(r, T*K, 1), randVec(r, T*K, 1)
		run := func(merged bool) ([]float32, int) {
			defer func(v bool) { prefillFuseOff = v }(prefillFuseOff)
			prefillFuseOff = !merged
			g, _ := testBackends(t, Options{})
			gw, rw, bw, pw := mustWeight(t, g, gain), mustWeight(t, g, router), mustWeight(t, g, bias), mustWeight(t, g, probe)
			var experts []backend.Expert
			for _, h := range hosts {
				experts = append(experts, backend.Expert{Gate: mustWeight(t, g, h[0]), Up: mustWeight(t, g, h[1]), Down: mustWeight(t, g, h[2])})
			}
			var v []float32
			for pass := 0; pass < 2; pass++ { // the first uploads the expert table
				g.SetBatch(simpleBatch(T, 0), nil)
				xt, rt := g.NewTensor(T, K), g.NewTensor(T, K)
				g.Upload(xt, x)
				g.Upload(rt, res)
				mark := g.Mark()
				h := g.NewTensor(T, K)
				// The attention's temporaries, as in a layer: the next
				// norm's output and int8 form take this memory after the
				// Release, not the routing's.
				g.NewTensor(T, 2*K)
				g.RMSNorm(h, xt, gw, 1e-6)
				logits := g.NewTensor(T, E)
				g.MatMul(logits, h, rw)
				routing := g.Route(logits, bw, cfg)
				out := g.NewTensor(T, K)
				g.MoEShared(out, h, routing, experts[:E], experts[E:])
				g.Add(rt, rt, out)
				g.Release(mark)
				h2, p := backend.NewOutput(g, T, K), backend.NewOutput(g, T, 256)
				g.RMSNorm(h2, rt, gw, 1e-6)
				g.MatMul(p, h2, pw)
				v = append(append(g.Download(rt), g.Download(h2)...), g.Download(p)...)
				if err := g.Sync(); err != nil {
					t.Fatal(err)
				}
			}
			return v, g.prefillMerges[prefillCombine]
		}
		want, _ := run(false)
		got, merges := run(true)
		if merges == 0 {
			t.Errorf("T=%d: the combine, add and norm did not share a launch", T)
		}
		for i := range want {
			if math.Float32bits(got[i]) != math.Float32bits(want[i]) {
				t.Fatalf("T=%d: value %d (of residual, norm, product: %d each) = %v merged, %v separate", T, i, T*K, got[i], want[i])
			}
		}
	}
}
