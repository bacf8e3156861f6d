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
			want, _ := run(Options{NoFusedGEMV: true})
			got, g := run(Options{})
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
// the fused products, bit for bit.
func TestFusedDecodeMatchesSeparate(t *testing.T) {
	dir := quantizedFixture(t)
	ref := loadGolden(t)
	const steps = 24
	decode := func(o Options) ([]float32, *Backend) {
		g, _ := testBackends(t, o)
		m := loadOn(t, dir, g)
		s, err := m.NewState(len(ref.prompt)+steps+1, backend.CacheF32)
		if err != nil {
			t.Fatal(err)
		}
		logits, err := m.ForwardSeq(s, ref.prompt, false)
		if err != nil {
			t.Fatal(err)
		}
		all := append([]float32(nil), logits...)
		for i := 0; i < steps; i++ {
			if logits, err = m.ForwardSeq(s, []int{argmaxOf(logits)}, false); err != nil {
				t.Fatal(err)
			}
			all = append(all, logits...)
		}
		return all, g
	}
	want, _ := decode(Options{NoFusedGEMV: true})
	got, g := decode(Options{})
	t.Logf("fused launches: %v, two products in one: %d", g.fusedLaunches, g.fusedPairs)
	if g.fusedLaunches[fuseNorm] == 0 || g.fusedLaunches[fuseAddNorm] == 0 || g.fusedLaunches[fuseQuant] == 0 || g.fusedPairs == 0 {
		t.Errorf("fused launches %v, pairs %d: want every kind", g.fusedLaunches, g.fusedPairs)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("logit %d (step %d): %v fused, %v separate", i, i/(len(want)/(steps+1)), got[i], want[i])
		}
	}
}
