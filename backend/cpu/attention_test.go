package cpu

import (
	"math/rand/v2"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
)

// The SIMD latent attention against the Go reference loop, on shapes whose
// sizes are not multiples of the vector width or of the 4-position blocks.
func TestLatentAttentionSIMDMatchesGo(t *testing.T) {
	r := rand.New(rand.NewPCG(40, 1))
	ref := New(Options{Threads: 2, Kernel: "go"})
	shapes := []backend.MLAShape{
		{Heads: 5, NopeDim: 8, RopeDim: 12, VDim: 8, Rank: 40},
		{Heads: 5, NopeDim: 8, RopeDim: 16, VDim: 8, Rank: 128}, // odd heads through the fused kernels
		{Heads: 20, NopeDim: 192, RopeDim: 64, VDim: 256, Rank: 512},
	}
	for _, b := range backends(2)[:len(Kernels())-1] {
		for _, s := range shapes {
			cases := []struct{ T, pos0 int }{{1, 0}, {1, 6}, {3, 0}, {9, 5}, {1, 36}, {1, 300}, {2, 200}, {16, 0}, {37, 70}}
			if s.Rank == 512 { // full size: fewer cases, the race detector slows the reference
				cases = []struct{ T, pos0 int }{{1, 36}, {1, 150}, {17, 3}}
			}
			for _, tc := range cases {
				P := tc.pos0 + tc.T
				cache := b.NewCache(1, P, s.Rank, s.RopeDim)
				lat, kpe := b.NewTensor(P, s.Rank), b.NewTensor(P, s.RopeDim)
				b.Upload(lat, randMat(r, P*s.Rank, 1))
				b.Upload(kpe, randMat(r, P*s.RopeDim, 1))
				b.CacheWrite(cache, 0, 0, lat, kpe)
				qlat, q := b.NewTensor(tc.T, s.Heads*s.Rank), b.NewTensor(tc.T, s.Heads*(s.NopeDim+s.RopeDim))
				b.Upload(qlat, randMat(r, tc.T*s.Heads*s.Rank, 0.1))
				b.Upload(q, randMat(r, tc.T*s.Heads*(s.NopeDim+s.RopeDim), 0.1))
				want, got := ref.NewTensor(tc.T, s.Heads*s.Rank), b.NewTensor(tc.T, s.Heads*s.Rank)
				ref.LatentAttention(want, qlat, q, cache, 0, tc.pos0, s, 0.3)
				b.LatentAttention(got, qlat, q, cache, 0, tc.pos0, s, 0.3)
				// Scores differ by float32 rounding (about 1e-6 relative);
				// the outputs are convex combinations of the latents.
				e := relErr(ref.Download(want), b.Download(got))
				t.Logf("%s heads=%d T=%d pos0=%d: %.2e", b.isa, s.Heads, tc.T, tc.pos0, e)
				if e > 2e-6 { // up to 5.4e-7 measured
					t.Errorf("%s heads=%d rank=%d T=%d pos0=%d: relative error %.2e", b.isa, s.Heads, s.Rank, tc.T, tc.pos0, e)
				}
			}
		}
	}
}

// The one-dispatch value expansion is the per-head matrix products, bit for
// bit, on every kernel family.
func TestExpandValuesInt8MatchesPerHead(t *testing.T) {
	r := rand.New(rand.NewPCG(41, 1))
	s := backend.MLAShape{Heads: 3, NopeDim: 8, RopeDim: 4, VDim: 20, Rank: 256}
	for _, b := range backends(2) {
		m := randQuant(r, s.Heads*(s.NopeDim+s.VDim), s.Rank, 128)
		kvB, err := b.NewWeight(backend.HostWeight{Name: "kv_b", N: m.N, K: m.K, Quant: m})
		if err != nil {
			t.Fatal(err)
		}
		for _, T := range []int{1, 3} {
			olat := b.NewTensor(T, s.Heads*s.Rank)
			b.Upload(olat, randMat(r, T*s.Heads*s.Rank, 1))
			got, want := b.NewTensor(T, s.Heads*s.VDim), b.NewTensor(T, s.Heads*s.VDim)
			if !b.expandValuesInt8(asMat(got), asMat(olat), kvB, s) {
				t.Fatalf("%s: the one-dispatch path did not apply", b.isa)
			}
			for h := 0; h < s.Heads; h++ {
				wuv := weightRows(kvB, h*(s.NopeDim+s.VDim)+s.NopeDim, s.VDim)
				b.MatMul(b.Cols(want, h*s.VDim, (h+1)*s.VDim), b.Cols(olat, h*s.Rank, (h+1)*s.Rank), wuv)
			}
			g, w := b.Download(got), b.Download(want)
			for i := range g {
				if g[i] != w[i] {
					t.Fatalf("%s T=%d element %d: %g, per head %g", b.isa, T, i, g[i], w[i])
				}
			}
		}
	}
}
