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

// The one-pass kernels against float64 references: the scores of four
// heads over n rows (with and without prefetching), a running softmax step
// per head, the weighted sums over panels in even-then-odd order, and the
// reorder back to columns.
func TestBF16TileKernelsWithinBound(t *testing.T) {
	if !hasBF16Attention(isaAVX512, 4, 64, 0) || !isaAvailable(isaAVX512) {
		t.Skip("no AVX-512")
	}
	r := rand.New(rand.NewPCG(62, 3))
	gamma := func(n int) float64 { return float64(n) * 0x1p-24 / (1 - float64(n)*0x1p-24) }
	const scale = 0.3
	for _, c := range []struct{ w, n, panels int }{{64, 4, 1}, {96, 8, 1}, {576, 64, 8}, {576, 20, 8}} {
		hw, fw := bf16Rows(r, c.n, c.w)
		q := randMat(r, 4*c.w, 1)
		qp := make([]float32, len(q))
		for h := 0; h < 4; h++ {
			evenOdd32(qp[h*c.w:(h+1)*c.w], q[h*c.w:(h+1)*c.w])
		}
		const outStride = 70
		sc := make([]float32, 4*outStride)
		pf := []uint16(nil)
		if c.n > 4 {
			pf = hw[4*c.w:] // rows this call reads too: prefetching changes nothing
		}
		scoresBF16Rows(qp, c.w, hw, c.w, c.n, c.w, sc, outStride, scale, pf)
		for h := 0; h < 4; h++ {
			for j := 0; j < c.n; j++ {
				var exact, abs float64
				for k := 0; k < c.w; k++ {
					p := float64(q[h*c.w+k]) * float64(fw[j*c.w+k])
					exact += p
					abs += math.Abs(p)
				}
				if e := math.Abs(float64(sc[h*outStride+j]) - scale*exact); e > scale*gamma(c.w+2)*abs {
					t.Errorf("scores w=%d n=%d h=%d j=%d: %g, want %g", c.w, c.n, h, j, sc[h*outStride+j], scale*exact)
				}
			}
		}

		// A softmax step from a running state (one head still at -Inf).
		m := []float32{float32(math.Inf(-1)), 0.5, 4, -1}
		l := []float32{0, 2, 3, 0.25}
		m0, l0 := slices.Clone(m), slices.Clone(l)
		s0 := slices.Clone(sc)
		alpha := make([]float32, 4)
		softmaxRows(sc, outStride, 4, c.n, m, l, alpha)
		for h := 0; h < 4; h++ {
			want := float64(m0[h])
			for j := 0; j < c.n; j++ {
				want = max(want, float64(s0[h*outStride+j]))
			}
			if float64(m[h]) != want {
				t.Errorf("softmax n=%d h=%d: max %g, want %g", c.n, h, m[h], want)
			}
			// exp of the float32 difference, as the kernel takes it.
			a := math.Exp(float64(m0[h] - float32(want)))
			if h > 0 && math.Abs(float64(alpha[h])-a) > 5e-7*a {
				t.Errorf("softmax n=%d h=%d: alpha %g, want %g", c.n, h, alpha[h], a)
			}
			sum := float64(l0[h]) * a
			for j := 0; j < c.n; j++ {
				e := math.Exp(float64(s0[h*outStride+j] - float32(want)))
				sum += e
				if d := math.Abs(float64(sc[h*outStride+j]) - e); d > 5e-7*e {
					t.Errorf("softmax n=%d h=%d j=%d: %g, want %g", c.n, h, j, sc[h*outStride+j], e)
				}
			}
			if d := math.Abs(float64(l[h]) - sum); d > 1e-6*sum {
				t.Errorf("softmax n=%d h=%d: sum %g, want %g", c.n, h, l[h], sum)
			}
			if j := c.n; j < outStride && sc[h*outStride+j] != s0[h*outStride+j] {
				t.Errorf("softmax n=%d h=%d: wrote past the tile", c.n, h)
			}
		}

		// Weighted sums over panels, added to a scaled start and stored.
		cols := 64 * c.panels
		if cols > c.w {
			continue
		}
		p := randMat(r, 4*c.n, 1)
		acc := randMat(r, 4*cols, 1)
		al := []float32{1, 0.5, 0.25, 2}
		got := slices.Clone(acc)
		axpyBF16Panels(p, c.n, hw, c.w, c.n, c.panels, got, cols, al)
		set := randMat(r, 4*cols, 1)
		axpyBF16Panels(p, c.n, hw, c.w, c.n, c.panels, set, cols, nil)
		for _, out := range []struct {
			name string
			v    []float32
			a    []float32
		}{{"added", got, al}, {"stored", set, nil}} {
			cv := make([]float32, len(out.v))
			interleave32(cv, out.v)
			ref := make([]float32, len(out.v))
			interleaveGroupsGo(ref, out.v, 32)
			if !slices.Equal(cv, ref) {
				t.Errorf("interleave32 differs from interleaveGroupsGo")
			}
			for h := 0; h < 4; h++ {
				for k := 0; k < cols; k++ {
					var exact, abs float64
					if out.a != nil {
						// acc is in the kernels' order: column k sits at the
						// place evenOdd32 gives it.
						at := k&^31 + (k&1)*16 + (k&31)/2
						v := float64(out.a[h]) * float64(acc[h*cols+at])
						exact, abs = v, math.Abs(v)
					}
					for i := 0; i < c.n; i++ {
						v := float64(p[h*c.n+i]) * float64(fw[i*c.w+k])
						exact += v
						abs += math.Abs(v)
					}
					if e := math.Abs(float64(cv[h*cols+k]) - exact); e > gamma(c.n+2)*abs {
						t.Errorf("values %s n=%d h=%d k=%d: %g, want %g", out.name, c.n, h, k, cv[h*cols+k], exact)
					}
				}
			}
		}
	}
}
