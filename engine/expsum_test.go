package engine

import (
	"math"
	"math/rand/v2"
	"testing"
)

// expSum against math.Exp term by term, on logits spread as a model's
// (and wider, so that terms below the cut-off occur) and on edge values.
func TestExpSum(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 7))
	for _, spread := range []float64{0.5, 3, 12, 60} {
		v := make([]float32, 154880)
		for i := range v {
			v[i] = float32(r.NormFloat64() * spread)
		}
		v[17] = 0 // a zero logit
		m := float32(math.Inf(-1))
		for _, x := range v {
			m = max(m, x)
		}
		var want float64
		for _, x := range v {
			want += math.Exp(float64(x) - float64(m))
		}
		got := expSum(v, m)
		if e := math.Abs(got-want) / want; !(e <= 1e-8) {
			t.Errorf("spread %g: sum %.17g, math.Exp gives %.17g (relative error %.3g)", spread, got, want, e)
		}
	}
	// Single terms across the range, the cut-off and the largest one.
	for _, d := range []float32{0, -1e-7, -0.5, -0.75, -1, -2.5, -10, -33.3, -79.9} {
		got, want := expSum([]float32{d}, 0), math.Exp(float64(d))
		if e := math.Abs(got-want) / want; !(e <= 1e-8) {
			t.Errorf("e^%g = %.17g, want %.17g", d, got, want)
		}
	}
	if got := expSum([]float32{-81, -1000, float32(math.Inf(-1))}, 0); got != 0 {
		t.Errorf("terms under e^-80: sum %g, want 0", got)
	}
}

func BenchmarkExpSum(b *testing.B) {
	r := rand.New(rand.NewPCG(7, 7))
	v := make([]float32, 154880)
	for i := range v {
		v[i] = float32(r.NormFloat64() * 3)
	}
	b.Run("expSum", func(b *testing.B) {
		for b.Loop() {
			expSum(v, 20)
		}
	})
	b.Run("math.Exp", func(b *testing.B) {
		for b.Loop() {
			var s float64
			for _, x := range v {
				s += math.Exp(float64(x) - 20)
			}
			_ = s
		}
	})
}
