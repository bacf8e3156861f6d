package cpu

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
)

// dotBound is the classic bound on a float32 dot product of n terms in any
// order, with or without fused multiply-adds: (n+2) * 2^-24 * sum|a_k b_k|.
func dotBound(a, b []float32) (exact, bound float64) {
	var mag float64
	for k := range a {
		exact += float64(a[k]) * float64(b[k])
		mag += math.Abs(float64(a[k]) * float64(b[k]))
	}
	return exact, float64(len(a)+2) * math.Ldexp(mag, -24)
}

var floatLens = []int{1, 7, 15, 16, 17, 31, 48, 100, 512, 576, 2048}

func TestDotKernelsWithinBound(t *testing.T) {
	r := rand.New(rand.NewPCG(20, 1))
	for _, b := range backends(1) {
		for _, n := range floatLens {
			stride := n + r.IntN(5)
			q := randMat(r, n, 1)
			rows := randMat(r, 3*stride+n, 1)
			exact, bound := dotBound(q, rows[:n])
			if got := b.dotF32(q, rows[:n]); math.Abs(float64(got)-exact) > bound {
				t.Fatalf("%s dot n=%d: %g, exact %g, bound %.3g", b.isa, n, got, exact, bound)
			}
			var out [4]float32
			b.dots4F32(q, rows, stride, &out)
			for i := range out {
				exact, bound := dotBound(q, rows[i*stride:i*stride+n])
				if math.Abs(float64(out[i])-exact) > bound {
					t.Fatalf("%s dots4 n=%d row %d: %g, exact %g, bound %.3g", b.isa, n, i, out[i], exact, bound)
				}
			}

			dst := randMat(r, n, 1)
			coef := [4]float32{float32(r.NormFloat64()), float32(r.NormFloat64()), 0, float32(r.NormFloat64())}
			want := make([]float64, n)
			for k := range want {
				want[k] = float64(dst[k])
				for i, c := range coef {
					want[k] += float64(c) * float64(rows[i*stride+k])
				}
			}
			before := append([]float32(nil), dst...)
			b.axpy4F32(dst, rows, stride, &coef)
			for k := range dst {
				mag := math.Abs(float64(before[k]))
				for i, c := range coef {
					mag += math.Abs(float64(c) * float64(rows[i*stride+k]))
				}
				// Four fused multiply-adds: at most four roundings.
				if d := math.Abs(float64(dst[k]) - want[k]); d > 6*math.Ldexp(mag, -24) {
					t.Fatalf("%s axpy4 n=%d element %d: %g, exact %g", b.isa, n, k, dst[k], want[k])
				}
			}
		}
	}
}

// The SIMD exp: within 1e-6 relative of math.Exp (its truncation error is
// below 5e-9 and each of its ten roundings adds at most 2^-24), exactly
// clamped below exp(-87), and NaN in, NaN out.
func TestExpKernelWithinBound(t *testing.T) {
	r := rand.New(rand.NewPCG(21, 1))
	for _, b := range backends(1) {
		for _, n := range floatLens {
			src := make([]float32, n)
			for i := range src {
				src[i] = float32(r.Float64()*190 - 110) // the sum stays finite
			}
			m := float32(r.NormFloat64())
			dst := make([]float32, n)
			sum := b.expF32(dst, src, m)
			var wantSum float64
			for i, v := range src {
				y := float64(v - m)
				want := math.Exp(y)
				wantSum += float64(dst[i])
				switch {
				case y < -87:
					if dst[i] < 0 || dst[i] > 2e-38 {
						t.Fatalf("%s exp(%g) = %g, want a value in [0, 2e-38]", b.isa, y, dst[i])
					}
				default:
					if math.Abs(float64(dst[i])-want) > 1e-6*want {
						t.Fatalf("%s exp(%g) = %g, want %g", b.isa, y, dst[i], want)
					}
				}
			}
			if math.Abs(float64(sum)-wantSum) > float64(n+2)*math.Ldexp(wantSum, -24) {
				t.Fatalf("%s exp n=%d: sum %g, elements sum to %g", b.isa, n, sum, wantSum)
			}
		}
		src := make([]float32, 32)
		src[5], src[6] = float32(math.NaN()), 100
		dst := make([]float32, 32)
		if b.expF32(dst, src, 0); !math.IsNaN(float64(dst[5])) || dst[4] != 1 || dst[6] < 1.6e38 {
			t.Fatalf("%s exp: NaN gave %g, 0 gave %g, 100 gave %g", b.isa, dst[5], dst[4], dst[6])
		}
	}
}

func TestSiluMulKernelWithinBound(t *testing.T) {
	r := rand.New(rand.NewPCG(22, 1))
	for _, b := range backends(1) {
		for _, n := range floatLens {
			g, u := randMat(r, n, 8), randMat(r, n, 1)
			if n > 3 {
				g[0], g[1], g[2] = -120, 120, float32(math.NaN())
			}
			dst := make([]float32, n)
			b.siluMulF32(dst, g, u)
			for i := range dst {
				x := float64(g[i])
				want := x / (1 + math.Exp(-x)) * float64(u[i])
				if math.IsNaN(x) {
					if !math.IsNaN(float64(dst[i])) {
						t.Fatalf("%s silu(NaN) = %g", b.isa, dst[i])
					}
					continue
				}
				if math.Abs(float64(dst[i])-want) > 2e-6*math.Abs(want)+1e-35 {
					t.Fatalf("%s silu(%g)*%g = %g, want %g", b.isa, x, u[i], dst[i], want)
				}
			}
		}
	}
}

// RMSNorm sums squares in float32 on the SIMD families (float64 in Go): the
// results agree to float32 rounding.
func TestRMSNormFamiliesAgree(t *testing.T) {
	r := rand.New(rand.NewPCG(23, 1))
	ref := New(Options{Kernel: "go"})
	for _, b := range backends(1) {
		for _, n := range []int{7, 512, 2048} {
			x, out, want := b.NewTensor(3, n), b.NewTensor(3, n), b.NewTensor(3, n)
			b.Upload(x, randMat(r, 3*n, 2))
			g, _ := b.NewWeight(backend.HostWeight{Name: "g", N: 1, K: n, Dense: randMat(r, n, 1)})
			b.RMSNorm(out, x, g, 1e-5)
			ref.RMSNorm(want, x, g, 1e-5)
			if e := relErr(ref.Download(want), b.Download(out)); e > 1e-6 {
				t.Errorf("%s n=%d: relative error %.2e", b.isa, n, e)
			}
		}
	}
}

// The AVX-512 interleave against the Go loop, bit for bit (a permutation),
// on 1 to 5 groups of 128 with random values; the Go loop against its
// definition on odd group sizes.
func TestInterleaveGroups(t *testing.T) {
	r := rand.New(rand.NewPCG(8, 9))
	for groups := 1; groups <= 5; groups++ {
		src := randMat(r, groups*128, 1)
		want := make([]float32, len(src))
		interleaveGroupsGo(want, src, 128)
		for g := 0; g < groups; g++ {
			for k := 0; k < 64; k++ {
				if want[g*128+2*k] != src[g*128+k] || want[g*128+2*k+1] != src[g*128+64+k] {
					t.Fatalf("groups=%d: Go order wrong at group %d column %d", groups, g, 2*k)
				}
			}
		}
		if !isaAvailable(isaAVX512) {
			continue
		}
		got := make([]float32, len(src))
		if !interleaveSIMD(isaAVX512, got, src, 128) {
			t.Fatal("interleaveSIMD: no AVX-512 form for groups of 128")
		}
		if !slices.Equal(got, want) {
			t.Errorf("groups=%d: AVX-512 interleave differs from Go", groups)
		}
	}
	for _, G := range []int{2, 6, 34} {
		src := randMat(r, 3*G, 1)
		got := make([]float32, len(src))
		interleaveGroupsGo(got, src, G)
		for g := 0; g < 3; g++ {
			for k := 0; k < G/2; k++ {
				if got[g*G+2*k] != src[g*G+k] || got[g*G+2*k+1] != src[g*G+G/2+k] {
					t.Fatalf("G=%d: wrong at group %d column %d", G, g, 2*k)
				}
			}
		}
	}
}
