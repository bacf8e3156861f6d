package cpu

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
)

// ropeRef rotates one head's rotary dims by pos in float64, from the
// definition: pair i turns by pos * theta^(-2i/dim).
func ropeRef(v []float32, pos int, theta float64, interleaved bool) []float64 {
	dim := len(v)
	half := dim / 2
	out := make([]float64, dim)
	for i := 0; i < half; i++ {
		a, c := 2*i, 2*i+1
		if !interleaved {
			a, c = i, i+half
		}
		angle := float64(pos) * math.Pow(theta, -float64(2*i)/float64(dim))
		cos, sin := math.Cos(angle), math.Sin(angle)
		x0, x1 := float64(v[a]), float64(v[c])
		out[a] = x0*cos - x1*sin
		out[c] = x1*cos + x0*sin
	}
	return out
}

// TestRoPELongPositions checks RoPE up to position 200,000 (GLM-4.7-Flash's
// context is 202,752) against the float64 definition. There an angle is up to
// 2e5 rad, and float32 keeps it only to about 1e-2 rad: an inverse frequency
// or an angle rounded to float32 is off by up to that much, while cos and sin
// rounded once to float32 and a float32 rotation are off by at most a few
// units of 2^-24. The bound allows 4 such units of |x0|+|x1| per output.
func TestRoPELongPositions(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 5))
	b := New(Options{Threads: 2})
	cases := []struct {
		heads, dn, dr int
		theta         float64
	}{
		{4, 32, 16, 10000}, // the test fixture
		{3, 192, 64, 1e6},  // GLM-4.7-Flash (heads reduced)
		{1, 0, 64, 1e6},    // the shared k_pe
	}
	for _, tc := range cases {
		for _, interleaved := range []bool{true, false} {
			for _, pos0 := range []int{0, 27, 4093, 65530, 131068, 199993} {
				const T = 8 // rows at pos0 .. pos0+7
				stride := tc.dn + tc.dr
				x := randMat(r, T*tc.heads*stride, 1)
				batch := &backend.Batch{Tokens: make([]int32, T), Positions: make([]int32, T), Seqs: []backend.Seq{{Len: T}}}
				for i := range batch.Positions {
					batch.Positions[i] = int32(pos0 + i)
				}
				b.SetBatch(batch, nil)
				xt := b.NewTensor(T, tc.heads*stride)
				b.Upload(xt, x)
				b.RoPE(xt, tc.heads, stride, tc.dn, tc.dr, tc.theta, interleaved)
				got := b.Download(xt)
				name := fmt.Sprintf("theta=%g dim=%d interleaved=%v", tc.theta, tc.dr, interleaved)
				var worst float64
				for row := 0; row < T; row++ {
					for h := 0; h < tc.heads; h++ {
						base := row*tc.heads*stride + h*stride
						for k := 0; k < tc.dn; k++ { // the non-rotary dims stay untouched
							if got[base+k] != x[base+k] {
								t.Fatalf("%s: position %d head %d: non-rotary dim %d changed", name, pos0+row, h, k)
							}
						}
						in := x[base+tc.dn : base+stride]
						want := ropeRef(in, pos0+row, tc.theta, interleaved)
						half := tc.dr / 2
						for k := range want {
							pair := k + half
							if interleaved {
								pair = k ^ 1
							} else if k >= half {
								pair = k - half
							}
							bound := 4 * unitRoundoff * (math.Abs(float64(in[k])) + math.Abs(float64(in[pair])))
							e := math.Abs(float64(got[base+tc.dn+k]) - want[k])
							if e > bound {
								t.Fatalf("%s: position %d head %d rotary dim %d: %.9g, float64 reference %.9g: error %.3g > bound %.3g",
									name, pos0+row, h, k, got[base+tc.dn+k], want[k], e, bound)
							}
							worst = math.Max(worst, e/bound)
						}
					}
				}
				t.Logf("%s positions %d..%d: largest error / bound %.3f", name, pos0, pos0+T-1, worst)
			}
		}
	}
}
