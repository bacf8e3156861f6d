package cpu

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/mmfp4/mmfp4/internal/benchmode"
)

// bf16Rows returns n random rows of w bf16 values and their float32 values.
func bf16Rows(r *rand.Rand, n, w int) ([]uint16, []float32) {
	h := make([]uint16, n*w)
	f := make([]float32, n*w)
	for i := range h {
		h[i] = uint16(math.Float32bits(float32(r.NormFloat64())) >> 16)
		f[i] = math.Float32frombits(uint32(h[i]) << 16)
	}
	return h, f
}

// The bf16 kernels against float64 sums of the same products, within the
// bound of a float32 sum of n terms: gamma(n) times the sum of |terms|.
func TestBF16AttentionKernelsWithinBound(t *testing.T) {
	if !hasBF16Attention(isaAVX512, 4, 64, 0) || !isaAvailable(isaAVX512) {
		t.Skip("no AVX-512")
	}
	r := rand.New(rand.NewPCG(61, 2))
	for _, c := range []struct{ heads, w, n int }{{4, 32, 1}, {8, 96, 3}, {20, 576, 64}} {
		hw, fw := bf16Rows(r, max(c.n, 4), c.w)
		q := randMat(r, c.heads*c.w, 1)
		qp := make([]float32, len(q))
		for h := 0; h < c.heads; h++ {
			evenOdd32(qp[h*c.w:(h+1)*c.w], q[h*c.w:(h+1)*c.w])
		}
		simd := make([]float32, len(q))
		if !evenOdd32SIMD(isaAVX512, simd, q) || !slices.Equal(simd, qp) {
			t.Errorf("heads=%d w=%d: evenOdd32SIMD differs from evenOdd32", c.heads, c.w)
		}
		const scale = 0.3
		out := make([]float32, c.heads*4)
		scoresBF16x4(qp, c.w, c.heads, hw, c.w, c.w, out, 4, scale)
		gamma := func(n int) float64 { return float64(n) * 0x1p-24 / (1 - float64(n)*0x1p-24) }
		for h := 0; h < c.heads; h++ {
			for j := 0; j < 4; j++ {
				var exact, abs float64
				for k := 0; k < c.w; k++ {
					p := float64(q[h*c.w+k]) * float64(fw[j*c.w+k])
					exact += p
					abs += math.Abs(p)
				}
				got := float64(out[h*4+j])
				if e := math.Abs(got - scale*exact); e > scale*gamma(c.w+2)*abs {
					t.Errorf("scores heads=%d w=%d h=%d j=%d: %g, want %g (bound %g)", c.heads, c.w, h, j, got, scale*exact, scale*gamma(c.w+2)*abs)
				}
			}
		}
		// Weighted sums over n rows for four heads: out starts non-zero.
		if c.w < 64 {
			continue
		}
		p := randMat(r, 4*c.n, 1)
		acc := randMat(r, 4*64, 1)
		got := append([]float32(nil), acc...)
		axpyBF16x4x64(p, c.n, hw, c.w, c.n, got, 64, true)
		// Without accumulate, out is overwritten: the same sums less acc.
		set := randMat(r, 4*64, 1)
		axpyBF16x4x64(p, c.n, hw, c.w, c.n, set, 64, false)
		for i := range set {
			if d := math.Abs(float64(got[i]-acc[i]) - float64(set[i])); d > 1e-5*(1+math.Abs(float64(acc[i]))) {
				t.Errorf("values n=%d, stored and added forms differ at %d: %g + %g against %g", c.n, i, set[i], acc[i], got[i])
				break
			}
		}
		for h := 0; h < 4; h++ {
			for k := 0; k < 64; k++ {
				exact, abs := float64(acc[h*64+k]), math.Abs(float64(acc[h*64+k]))
				for i := 0; i < c.n; i++ {
					v := float64(p[h*c.n+i]) * float64(fw[i*c.w+k])
					exact += v
					abs += math.Abs(v)
				}
				if e := math.Abs(float64(got[h*64+k]) - exact); e > gamma(c.n+2)*abs {
					t.Errorf("values n=%d h=%d k=%d: %g, want %g", c.n, h, k, got[h*64+k], exact)
				}
			}
		}
	}
}

// BenchmarkScoresKernels times, on one thread with everything in the L1
// cache, the scores of 20 heads against four cached rows of 576 values: the
// float32 kernel on rows widened beforehand, and the bf16 kernel on the
// rows as cached. GFLOP/s counts two per multiply-add; best of the passes.
func BenchmarkScoresKernels(b *testing.B) {
	benchmode.Check(b)
	if !isaAvailable(isaAVX512) {
		b.Skip("no AVX-512")
	}
	const H, r, dr, w = 20, 512, 64, 576
	rnd := rand.New(rand.NewPCG(1, 2))
	hw, fw := bf16Rows(rnd, 4, w)
	q := randMat(rnd, H*w, 1)
	out := make([]float32, H*4)
	run := func(b *testing.B, f func()) {
		best := math.Inf(1)
		for i := 0; i < b.N; i++ {
			t0 := time.Now()
			for k := 0; k < 100; k++ {
				f()
			}
			best = min(best, time.Since(t0).Seconds()/100)
		}
		b.ReportMetric(2*H*4*w/best/1e9, "GFLOP/s")
	}
	b.Run("f32", func(b *testing.B) {
		run(b, func() { scoresHx4(q, w, q[r:], w, H, fw, fw[r:], w, r, dr, out, 4, 1) })
	})
	b.Run("bf16", func(b *testing.B) {
		run(b, func() { scoresBF16x4(q, w, H, hw, w, w, out, 4, 1) })
	})
	b.Run("f32+widen", func(b *testing.B) {
		buf := make([]float32, 4*w)
		run(b, func() {
			bf16ToF32SIMD(isaAVX512, buf, hw)
			scoresHx4(q, w, q[r:], w, H, buf, buf[r:], w, r, dr, out, 4, 1)
		})
	})
}
