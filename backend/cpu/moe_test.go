package cpu

import (
	"math"
	"math/rand/v2"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
)

// randExperts makes n SwiGLU experts of MMFP4 weights.
func randExperts(t *testing.T, b *Backend, r *rand.Rand, n, hidden, inter int) []backend.Expert {
	t.Helper()
	w := func(N, K int) backend.Weight {
		m := randQuant(r, N, K, 128)
		for i := range m.Scales {
			m.Scales[i] = byte(0x30 + r.IntN(8))
		}
		for i := range m.RowScale {
			m.RowScale[i] = 0.01
		}
		wt, err := b.NewWeight(backend.HostWeight{Name: "w", N: N, K: K, Quant: m})
		if err != nil {
			t.Fatal(err)
		}
		return wt
	}
	ex := make([]backend.Expert, n)
	for e := range ex {
		ex[e] = backend.Expert{Gate: w(inter, hidden), Up: w(inter, hidden), Down: w(hidden, inter)}
	}
	return ex
}

// The fused small-batch MoE is the per-expert path, bit for bit, on every
// kernel family; and that path (for larger batches too, where experts run
// several tokens through the blocked kernel) agrees with float64 arithmetic
// to the precision of the int8 activations.
func TestMoEFusedMatchesByExpert(t *testing.T) {
	r := rand.New(rand.NewPCG(30, 1))
	const hidden, inter, E, topK = 256, 384, 6, 3
	for _, b := range backends(2) {
		experts := randExperts(t, b, r, E, hidden, inter)
		deq := make([][3][]float32, E)
		for e, ex := range experts {
			deq[e] = [3][]float32{ex.Gate.(*quant).m.Dequantize(), ex.Up.(*quant).m.Dequantize(), ex.Down.(*quant).m.Dequantize()}
		}
		for _, T := range []int{1, 2, 3, 4, 9, 16, 24} { // past 16: the per-expert path alone
			rt := &routing{topK: topK, experts: make([]int, T*topK), weights: make([]float32, T*topK)}
			for tok := 0; tok < T; tok++ {
				perm := r.Perm(E)
				for k := 0; k < topK; k++ {
					rt.experts[tok*topK+k] = perm[k]
					rt.weights[tok*topK+k] = float32(r.Float64())
				}
			}
			x := b.NewTensor(T, hidden)
			b.Upload(x, randMat(r, T*hidden, 1))
			fused, byExpert := asMat(b.NewTensor(T, hidden)), asMat(b.NewTensor(T, hidden))
			b.moeByExpert(byExpert, asMat(x), rt, experts)
			// Where the per-expert path runs every expert token by token,
			// the fused path must equal it bit for bit; where it widens
			// tiles for an expert's many tokens, both are checked against
			// float64 below.
			perExpert := map[int]int{}
			for _, e := range rt.experts {
				perExpert[e]++
			}
			bitwise := true
			for _, n := range perExpert {
				bitwise = bitwise && n < gemmMinTokens
			}
			if T <= moeFusedMaxTokens {
				if !b.moeFused(fused, asMat(x), rt, experts, nil) {
					t.Fatalf("%s T=%d: the fused path did not apply", b.isa, T)
				}
				for i := range fused.data {
					if bitwise && math.Float32bits(fused.data[i]) != math.Float32bits(byExpert.data[i]) {
						t.Fatalf("%s T=%d element %d: fused %g, per expert %g", b.isa, T, i, fused.data[i], byExpert.data[i])
					}
				}
			}

			// Against float64 on dequantized weights.
			want := make([]float64, T*hidden)
			xs := b.Download(x)
			for tok := 0; tok < T; tok++ {
				for k := 0; k < topK; k++ {
					w := deq[rt.experts[tok*topK+k]]
					g := naiveMatMul(xs[tok*hidden:(tok+1)*hidden], 1, hidden, w[0], inter)
					u := naiveMatMul(xs[tok*hidden:(tok+1)*hidden], 1, hidden, w[1], inter)
					for i := range g {
						g[i] = silu(g[i]) * u[i]
					}
					y := naiveMatMul(g, 1, inter, w[2], hidden)
					for i, v := range y {
						want[tok*hidden+i] += float64(rt.weights[tok*topK+k]) * float64(v)
					}
				}
			}
			w32 := make([]float32, len(want))
			for i, v := range want {
				w32[i] = float32(v)
			}
			paths := map[string]*mat{"per expert": byExpert}
			if T <= moeFusedMaxTokens {
				paths["fused"] = fused
			}
			for name, got := range paths {
				e := relErr(w32, got.data)
				t.Logf("%s T=%d %s: relative error %.2e against float64", b.isa, T, name, e)
				if e > 3e-2 { // int8 activations twice: about 1.7e-2 measured
					t.Fatalf("%s T=%d %s: relative error %.3g against float64", b.isa, T, name, e)
				}
			}
		}
	}
}

// MoEShared equals MoE followed by the shared expert's block added to the
// output: bit for bit where both run every product token by token (the
// shared block then goes through MatMul's decode kernel), and to the int8
// error model where the block's products widen tiles (5 tokens and more).
func TestMoESharedMatchesMoEThenBlock(t *testing.T) {
	r := rand.New(rand.NewPCG(31, 1))
	const hidden, inter, E, topK = 256, 384, 6, 2
	for _, b := range backends(2) {
		experts := randExperts(t, b, r, E+1, hidden, inter)
		shared := experts[E:]
		experts = experts[:E]
		for _, T := range []int{1, 3, 4, 7, 16, 20} {
			rt := &routing{topK: topK, experts: make([]int, T*topK), weights: make([]float32, T*topK)}
			perExpert := map[int]int{}
			for tok := 0; tok < T; tok++ {
				perm := r.Perm(E)
				for k := 0; k < topK; k++ {
					rt.experts[tok*topK+k] = perm[k]
					rt.weights[tok*topK+k] = float32(r.Float64())
					perExpert[perm[k]]++
				}
			}
			x := b.NewTensor(T, hidden)
			b.Upload(x, randMat(r, T*hidden, 1))
			got, want := b.NewTensor(T, hidden), b.NewTensor(T, hidden)
			b.MoEShared(got, x, rt, experts, shared)
			b.MoE(want, x, rt, experts)
			g, u := b.NewTensor(T, inter), b.NewTensor(T, inter)
			b.MatMul(g, x, shared[0].Gate)
			b.MatMul(u, x, shared[0].Up)
			b.SwiGLU(g, g, u)
			out := b.NewTensor(T, hidden)
			b.MatMul(out, g, shared[0].Down)
			b.Add(want, want, out)
			if err := b.Sync(); err != nil {
				t.Fatal(err)
			}
			gd, wd := b.Download(got), b.Download(want)
			bitwise := T < gemmMinTokens
			for _, n := range perExpert {
				bitwise = bitwise && n < gemmMinTokens
			}
			if bitwise {
				for i := range gd {
					if math.Float32bits(gd[i]) != math.Float32bits(wd[i]) {
						t.Fatalf("%s T=%d element %d: MoEShared %g, MoE then block %g", b.isa, T, i, gd[i], wd[i])
					}
				}
				continue
			}
			e := relErr(wd, gd)
			t.Logf("%s T=%d: relative difference %.2e", b.isa, T, e)
			// Measured up to 5.1e-4 (an int8 step of the shared block's
			// SwiGLU output that rounds the other way), 6e-8 otherwise.
			if e > 5e-3 {
				t.Fatalf("%s T=%d: MoEShared differs from MoE then block by %.3g", b.isa, T, e)
			}
		}
	}
}
