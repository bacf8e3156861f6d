//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
)

// quantForm reads back the int8 form (codes, scales, sums) the backend
// remembers for x in groups of G, or nil.
func quantForm(t *testing.T, g *Backend, x backend.Tensor, G int) []byte {
	t.Helper()
	for _, e := range g.quantized {
		if e.src == *asTensor(x) && e.a.G == G {
			a := e.a
			q, s, sums := make([]byte, a.T*a.K), make([]byte, 4*a.T*a.K/a.G), make([]byte, 4*a.T*a.K/32)
			g.now("read int8 form", func(c *Ctx) error {
				if err := CopyOut(c, q, a.Q); err != nil {
					return err
				}
				if err := CopyOut(c, s, a.Scales); err != nil {
					return err
				}
				return CopyOut(c, sums, a.Sums)
			})
			return append(append(q, s...), sums...)
		}
	}
	return nil
}

// The shared launches of a single-token decode layer (chain.go) compute
// what the separate launches compute, bit for bit: q_a and kv_a of one
// input, the q_a norm and the latent's norm around q_b, the RoPEs and
// cache write with the absorbed query (also the cache's bytes, bf16 and
// f32), the value expansion with the int8 form of its output in o_proj's
// groups (also those int8 forms' bytes), at GLM-4.7-Flash's attention shapes with
// groups of 128 and of 32 and 64, and at a shape whose norms are not
// paired (rmsnorm_quant8 does not take 352 or 96 columns), nor where q_b
// quantizes its input again (groups of 32, the norms' of 128).
func TestChainLaunchesMatchSeparate(t *testing.T) {
	for _, c := range []struct {
		hidden, qRank, heads, rank, vdim int
		G, uvG, oG                       int
		dtype                            backend.CacheDType
		merges                           [4]int // pairs, values, norms, absorbed queries with the RoPE
	}{
		{2048, 768, 20, 512, 256, 128, 128, 128, backend.CacheBF16, [4]int{1, 1, 1, 1}},
		{2048, 768, 20, 512, 256, 32, 64, 32, backend.CacheF32, [4]int{1, 1, 0, 1}}, // q_b quantizes the q_a norm again: no pair of norms
		{2048, 768, 20, 512, 256, 128, 32, 64, backend.CacheBF16, [4]int{1, 1, 1, 1}},
		{1056, 352, 3, 96, 32, 32, 32, 32, backend.CacheBF16, [4]int{1, 1, 0, 0}}, // rank 96: no tensor-core absorbed query
	} {
		t.Run(fmt.Sprintf("hidden%d_G%d_uv%d_o%d", c.hidden, c.G, c.uvG, c.oG), func(t *testing.T) {
			const pos = 37
			run := func(o Options) (map[string][]float32, map[string][]byte, *Backend) {
				g, _ := testBackends(t, o)
				r := rand.New(rand.NewPCG(41, uint64(c.hidden+c.G+c.uvG+c.oG)))
				qh := func(name string, n, k, G int) backend.Weight { return mustWeight(t, g, quantHost(t, r, name, n, k, G)) }
				vec := func(name string, k int) backend.Weight {
					return mustWeight(t, g, backend.HostWeight{Name: name, N: 1, K: k, Dense: randVec(r, k, 1)})
				}
				qa, kva, qb := qh("q_a", c.qRank, c.hidden, c.G), qh("kv_a", c.rank+64, c.hidden, c.G), qh("q_b", c.heads*192, c.qRank, c.G)
				uv, ow := qh("uv", c.heads*c.vdim, c.rank, c.uvG), qh("o", c.hidden, c.heads*c.vdim, c.oG)
				uk := qh("uk", c.heads*128, c.rank, c.G)
				qaNorm, kvNorm := vec("qa_norm", c.qRank), vec("kv_norm", c.rank)
				pool, err := g.NewCachePool(1, 4, 16, c.rank, 64, c.dtype)
				if err != nil {
					t.Fatal(err)
				}
				tensor := func(cols int, scale float64) backend.Tensor {
					x := g.NewTensor(1, cols)
					g.Upload(x, randVec(r, cols, scale))
					return x
				}
				g.SetBatch(simpleBatch(1, pos), pool)
				h, olat := tensor(c.hidden, 1), tensor(c.heads*c.rank, 0.3)
				qaOut, kv, q := g.NewTensor(1, c.qRank), g.NewTensor(1, c.rank+64), g.NewTensor(1, c.heads*192)
				latent, v, out := g.NewTensor(1, c.rank), g.NewTensor(1, c.heads*c.vdim), g.NewTensor(1, c.hidden)
				qlat := g.NewTensor(1, c.heads*c.rank)
				sh := backend.MLAShape{Heads: c.heads, NopeDim: 128, RopeDim: 64, Rank: c.rank, VDim: c.vdim}
				// The decode layer's order (glm4moelite.Model.attention).
				g.MatMul(qaOut, h, qa)
				g.MatMul(kv, h, kva)
				g.RMSNorm(qaOut, qaOut, qaNorm, 1e-6)
				g.MatMul(q, qaOut, qb)
				g.RMSNorm(latent, g.Cols(kv, 0, c.rank), kvNorm, 1e-6)
				kpe := g.Cols(kv, c.rank, c.rank+64)
				g.RoPE(q, c.heads, 192, 128, 64, 1e6, true)
				g.RoPE(kpe, 1, 64, 0, 64, 1e6, true)
				g.CacheWrite(0, latent, kpe)
				g.AbsorbQuery(qlat, q, uk, sh)
				g.ExpandValues(v, olat, uv, sh)
				g.MatMul(out, v, ow)
				got := map[string][]float32{}
				for name, x := range map[string]backend.Tensor{"qa": qaOut, "kv": kv, "q": q, "latent": latent, "qlat": qlat, "v": v, "out": out} {
					got[name] = g.Download(x)
				}
				cp := pool.(*cachePool)
				rec := make([]byte, cp.layerBytes)
				g.now("read cache", func(c *Ctx) error { return CopyOut(c, rec, cp.layer(0)) })
				forms := map[string][]byte{
					"qa": quantForm(t, g, qaOut, groupFor(c.qRank)), "latent": quantForm(t, g, latent, groupFor(c.rank)), "v": quantForm(t, g, v, c.oG),
					"cache": rec,
				}
				if err := g.Sync(); err != nil {
					t.Fatal(err)
				}
				return got, forms, g
			}
			want, wantForms, _ := run(Options{SeparateChain: true})
			got, gotForms, g := run(Options{})
			if g.chainMerges != c.merges {
				t.Errorf("merged launches %v (pairs, values, norms), want %v", g.chainMerges, c.merges)
			}
			for name, w := range want {
				nonzero := 0
				for i := range w {
					if got[name][i] != w[i] {
						t.Fatalf("%s[%d] = %v shared, %v separate", name, i, got[name][i], w[i])
					}
					if w[i] != 0 {
						nonzero++
					}
				}
				if nonzero < len(w)/2 {
					t.Errorf("%s: %d of %d values nonzero", name, nonzero, len(w))
				}
			}
			for name, w := range wantForms {
				if w == nil || gotForms[name] == nil {
					t.Fatalf("%s: no int8 form (separate %v, shared %v)", name, w != nil, gotForms[name] != nil)
				}
				if !bytes.Equal(gotForms[name], w) {
					t.Fatalf("%s: int8 forms differ at byte %d", name, firstDiff(gotForms[name], w))
				}
			}
		})
	}
}

// Decode steps of the MMFP4 fixture give the same logits with the shared
// launches as without, bit for bit (its q_a/kv_a pairs and value
// expansions; its 128-column norms are not paired, and its 32 nope columns
// take the CUDA-core absorbed query, which has no RoPE form).
func TestChainDecodeMatchesSeparate(t *testing.T) {
	dir := quantizedFixture(t)
	ref := loadGolden(t)
	const steps = 24
	decode := func(o Options) ([]float32, *Backend) {
		g, _ := testBackends(t, o)
		return greedyLogits(t, loadOn(t, dir, g), ref.prompt, steps, backend.CacheF32), g
	}
	want, _ := decode(Options{SeparateChain: true})
	got, g := decode(Options{})
	t.Logf("merged launches (pairs, values, norms, absorbed queries with the RoPE): %v", g.chainMerges)
	if g.chainMerges[chainPair] == 0 || g.chainMerges[chainValues] == 0 {
		t.Errorf("merged launches %v: want pairs and values", g.chainMerges)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("logit %d (step %d): %v shared, %v separate", i, i/(len(want)/(steps+1)), got[i], want[i])
		}
	}
}
