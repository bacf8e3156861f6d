//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
)

// The fused single-token products (fused.go) compute what the separate
// norm, quantization and product launches compute, bit for bit: at full
// GLM-4.7-Flash attention shapes (both sum-of-squares layouts, groups of
// 32 and 128), and over decode steps of the MMFP4 fixture.
func TestFusedProductsMatchSeparate(t *testing.T) {
	for _, c := range []struct {
		hidden, qRank, heads, rank, vdim, G int
		launches                            [3]int // fused launches by mode: quant, norm, add+norm
	}{
		// GLM-4.7-Flash, rmsnorm_quant8's order; o_proj's 5120 columns are
		// above fusedQuantMaxK.
		{2048, 768, 20, 512, 256, 128, [3]int{1, 1, 1}},
		// The norms quantize in groups of 128 (groupFor), which products
		// of G = 32 cannot use: they quantize their input themselves.
		{2048, 768, 20, 512, 256, 32, [3]int{3, 0, 0}},
		{1056, 352, 3, 96, 32, 32, [3]int{2, 1, 1}}, // K not a multiple of 256: rmsnorm_quant's order
	} {
		t.Run(fmt.Sprintf("hidden%d_G%d", c.hidden, c.G), func(t *testing.T) {
			run := func(o Options) (map[string][]float32, *Backend) {
				g, _ := testBackends(t, o)
				r := rand.New(rand.NewPCG(11, uint64(c.hidden+c.G)))
				qh := func(name string, n, k int) backend.Weight { return mustWeight(t, g, quantHost(t, r, name, n, k, c.G)) }
				vec := func(name string, k int) backend.Weight {
					return mustWeight(t, g, backend.HostWeight{Name: name, N: 1, K: k, Dense: randVec(r, k, 1)})
				}
				qa, kva, qb := qh("q_a", c.qRank, c.hidden), qh("kv_a", c.rank+64, c.hidden), qh("q_b", c.heads*192, c.qRank)
				uv, ow := qh("uv", c.heads*c.vdim, c.rank), qh("o", c.hidden, c.heads*c.vdim)
				n1, n2 := vec("norm", c.hidden), vec("qa_norm", c.qRank)
				tensor := func(cols int, scale float64) backend.Tensor {
					x := g.NewTensor(1, cols)
					g.Upload(x, randVec(r, cols, scale))
					return x
				}
				g.SetBatch(simpleBatch(1, 0), nil)
				x, a := tensor(c.hidden, 1), tensor(c.hidden, 0.5)
				olat, vIn := tensor(c.heads*c.rank, 0.3), tensor(c.heads*c.vdim, 0.3)
				h, qaOut := g.NewTensor(1, c.hidden), g.NewTensor(1, c.qRank)
				kv, q := g.NewTensor(1, c.rank+64), g.NewTensor(1, c.heads*192)
				v, out := g.NewTensor(1, c.heads*c.vdim), g.NewTensor(1, c.hidden)
				// The decode step's order: residual add and norm, q_a and
				// kv_a of its output, the q_a norm in place and q_b, the
				// value expansion, o_proj of an unquantized row.
				g.Add(x, x, a)
				g.RMSNorm(h, x, n1, 1e-6)
				g.MatMul(qaOut, h, qa)
				g.MatMul(kv, h, kva)
				g.RMSNorm(qaOut, qaOut, n2, 1e-6)
				g.MatMul(q, qaOut, qb)
				g.ExpandValues(v, olat, uv, backend.MLAShape{Heads: c.heads, NopeDim: 128, RopeDim: 64, Rank: c.rank, VDim: c.vdim})
				g.MatMul(out, vIn, ow)
				got := map[string][]float32{}
				for name, x := range map[string]backend.Tensor{"x": x, "h": h, "qa": qaOut, "kv": kv, "q": q, "v": v, "out": out} {
					got[name] = g.Download(x)
				}
				if err := g.Sync(); err != nil {
					t.Fatal(err)
				}
				return got, g
			}
			want, _ := run(Options{})
			got, g := run(Options{FusedGEMV: true})
			t.Logf("fused launches: %v, two products in one: %d", g.fusedLaunches, g.fusedPairs)
			if g.fusedLaunches != c.launches || g.fusedPairs != 1 {
				t.Errorf("fused launches %v (quant, norm, add+norm), pairs %d: want %v and 1", g.fusedLaunches, g.fusedPairs, c.launches)
			}
			for name, w := range want {
				for i := range w {
					if got[name][i] != w[i] {
						t.Fatalf("%s[%d] = %v fused, %v separate", name, i, got[name][i], w[i])
					}
				}
			}
		})
	}
}

// Decode steps of the MMFP4 fixture give the same logits with and without
// the fused products, bit for bit, over f32, fp8 and fp4 caches (without:
// the RoPEs and the cache write in launches of their own too).
func TestFusedDecodeMatchesSeparate(t *testing.T) {
	dir := quantizedFixture(t)
	ref := loadGolden(t)
	const steps = 24
	for _, dt := range []backend.CacheDType{backend.CacheF32, backend.CacheFP8, backend.CacheFP4} {
		t.Run(dt.String(), func(t *testing.T) {
			decode := func(o Options, separate bool) ([]float32, *Backend) {
				defer func(v bool) { ropeCacheOff = v }(ropeCacheOff)
				ropeCacheOff = separate
				g, _ := testBackends(t, o)
				return greedyLogits(t, loadOn(t, dir, g), ref.prompt, steps, dt), g
			}
			want, _ := decode(Options{}, true)
			got, g := decode(Options{FusedGEMV: true, FusedLatent: true}, false)
			t.Logf("fused launches: %v, two products in one: %d, latent norms: %d", g.fusedLaunches, g.fusedPairs, g.fusedLatent)
			if g.fusedLaunches[fuseNorm] == 0 || g.fusedLaunches[fuseAddNorm] == 0 || g.fusedLaunches[fuseQuant] == 0 || g.fusedPairs == 0 || g.fusedLatent == 0 {
				t.Errorf("fused launches %v, pairs %d, latent norms %d: want every kind", g.fusedLaunches, g.fusedPairs, g.fusedLatent)
			}
			for i := range want {
				if got[i] != want[i] {
					t.Fatalf("logit %d (step %d): %v fused, %v separate", i, i/(len(want)/(steps+1)), got[i], want[i])
				}
			}
		})
	}
}

// The router's launch with the norm before it (moe_router_route_norm)
// gives the residual sum, the norm, its int8 form (through a product of
// it), the logits and the chosen experts of the separate launches, bit for
// bit, at GLM-4.7-Flash's shapes and at a K for rmsnorm_quant's order.
func TestFusedRouterMatchesSeparate(t *testing.T) {
	for _, K := range []int{2048, 1056} {
		t.Run(fmt.Sprint(K), func(t *testing.T) {
			const E, topK = 64, 4
			want, wantIDs, _ := runRouterStep(t, Options{}, 21, K, E, topK)
			got, gotIDs, g := runRouterStep(t, Options{FusedRouter: true}, 21, K, E, topK)
			if g.fusedRouters != 1 {
				t.Errorf("%d fused router launches, want 1", g.fusedRouters)
			}
			t.Logf("experts %v / %v", gotIDs, wantIDs)
			sameRouterStep(t, "fused", got, gotIDs, want, wantIDs)
		})
	}
}

// runRouterStep queues, on a backend with options o, the residual add and
// norm before a router of E experts over K columns (top topK), the router's
// product and route, and a product of the norm's int8 form, on inputs drawn
// from seed; it returns the residual, the norm, the logits, the product and
// the routing weights, the chosen experts, and the backend.
func runRouterStep(t *testing.T, o Options, seed uint64, K, E, topK int) (map[string][]float32, []int32, *Backend) {
	g, _ := testBackends(t, o)
	r := rand.New(rand.NewPCG(seed, uint64(K)))
	gain := mustWeight(t, g, backend.HostWeight{Name: "norm", N: 1, K: K, Dense: randVec(r, K, 1)})
	router := mustWeight(t, g, denseHost(r, "router", E, K))
	bias := mustWeight(t, g, backend.HostWeight{Name: "bias", N: 1, K: E, Dense: randVec(r, E, 0.01)})
	// The product after the route reads the norm's int8 form
	// (groups of groupFor(K), as the norm makes it).
	up := mustWeight(t, g, quantHost(t, r, "up", 256, K, groupFor(K)))
	g.SetBatch(simpleBatch(1, 0), nil)
	g.routeCountersFor(1) // allocated before the step: no flush inside it
	x, a := g.NewTensor(1, K), g.NewTensor(1, K)
	g.Upload(x, randVec(r, K, 1))
	g.Upload(a, randVec(r, K, 0.5))
	h, logits, y := g.NewTensor(1, K), g.NewTensor(1, E), g.NewTensor(1, 256)
	g.Add(x, x, a)
	g.RMSNorm(h, x, gain, 1e-5)
	g.MatMul(logits, h, router)
	rt := g.Route(logits, bias, backend.RouterConfig{TopK: topK, Groups: 1, TopKGroups: 1, NormTopKProb: true, RoutedScaling: 1.8, NumExperts: E}).(*routing)
	g.MatMul(y, h, up)
	got := map[string][]float32{}
	for name, v := range map[string]backend.Tensor{"x": x, "h": h, "logits": logits, "y": y} {
		got[name] = g.Download(v)
	}
	ids, wts := make([]int32, topK), make([]float32, topK)
	g.now("read routing", func(c *Ctx) error {
		if err := CopyOut(c, ids, rt.ids); err != nil {
			return err
		}
		return CopyOut(c, wts, rt.wts)
	})
	if err := g.Sync(); err != nil {
		t.Fatal(err)
	}
	got["wts"] = wts
	return got, ids, g
}

// sameRouterStep fails t where two runRouterStep results differ in any bit;
// how names the first run's launches in the message.
func sameRouterStep(t *testing.T, how string, got map[string][]float32, gotIDs []int32, want map[string][]float32, wantIDs []int32) {
	t.Helper()
	for i := range wantIDs {
		if gotIDs[i] != wantIDs[i] {
			t.Fatalf("expert %d: %d %s, %d separate", i, gotIDs[i], how, wantIDs[i])
		}
	}
	for name, w := range want {
		for i := range w {
			if got[name][i] != w[i] {
				t.Fatalf("%s[%d] = %v %s, %v separate", name, i, got[name][i], how, w[i])
			}
		}
	}
}

// The latent's norm inside the RoPE and cache write launch
// (rope2_norm_cache_write) gives the latent, the rotated query and key and
// the cached record of the separate launches (the norm, both RoPEs and the
// cache write each in its own launch), bit for bit, over bf16, fp8 and fp4
// caches, at GLM-4.7-Flash's shapes (rmsnorm_quant8's order) and at a rank
// for rmsnorm_quant's.
func TestFusedLatentNormMatchesSeparate(t *testing.T) {
	for _, rank := range []int{512, 96} {
		for _, dt := range []backend.CacheDType{backend.CacheBF16, backend.CacheFP8, backend.CacheFP4} {
			t.Run(fmt.Sprintf("%d_%v", rank, dt), func(t *testing.T) {
				const heads, dn, dr, pos = 20, 192, 64, 37
				run := func(o Options, separate bool) (map[string][]float32, []byte, *Backend) {
					defer func(v bool) { ropeCacheOff = v }(ropeCacheOff)
					ropeCacheOff = separate
					g, _ := testBackends(t, o)
					r := rand.New(rand.NewPCG(31, uint64(rank)))
					gain := mustWeight(t, g, backend.HostWeight{Name: "kv_a_norm", N: 1, K: rank, Dense: randVec(r, rank, 1)})
					pool, err := g.NewCachePool(1, 4, 16, rank, dr, dt)
					if err != nil {
						t.Fatal(err)
					}
					g.SetBatch(simpleBatch(1, pos), pool)
					q, kv, latent := g.NewTensor(1, heads*(dn+dr)), g.NewTensor(1, rank+dr), g.NewTensor(1, rank)
					g.Upload(q, randVec(r, heads*(dn+dr), 1))
					g.Upload(kv, randVec(r, rank+dr, 1))
					kpe := g.Cols(kv, rank, rank+dr)
					// The step's RoPE table is made by its first RoPE (an upload
					// between the norm and the RoPEs, as in a decode step's first
					// layer): a RoPE of another row first.
					g.RoPE(g.NewTensor(1, dr), 1, dr, 0, dr, 10000, true)
					g.RMSNorm(latent, g.Cols(kv, 0, rank), gain, 1e-6)
					g.RoPE(q, heads, dn+dr, dn, dr, 10000, true)
					g.RoPE(kpe, 1, dr, 0, dr, 10000, true)
					g.CacheWrite(0, latent, kpe)
					got := map[string][]float32{"latent": g.Download(latent), "q": g.Download(q), "kv": g.Download(kv)}
					rec := poolLayer(t, g, pool, 0)
					return got, rec, g
				}
				want, wantRec, _ := run(Options{}, true)
				got, gotRec, g := run(Options{FusedLatent: true}, false)
				if g.fusedLatent != 1 {
					t.Errorf("%d fused latent norms, want 1", g.fusedLatent)
				}
				for name, w := range want {
					for i := range w {
						if got[name][i] != w[i] {
							t.Fatalf("%s[%d] = %v fused, %v separate", name, i, got[name][i], w[i])
						}
					}
				}
				if j := firstDiff(wantRec, gotRec); j >= 0 {
					t.Errorf("cache byte %d (slot byte %d) = %#02x fused, %#02x separate", j, j%slotBytesOf(dt, rank, dr), gotRec[j], wantRec[j])
				}
				checkRecords(t, "cache", wantRec, slotBytesOf(dt, rank, dr), 1)
			})
		}
	}
}
