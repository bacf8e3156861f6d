package cpu

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/format"
)

func randMat(r *rand.Rand, n int, scale float64) []float32 {
	v := make([]float32, n)
	for i := range v {
		v[i] = float32(r.NormFloat64() * scale)
	}
	return v
}

func relErr(ref, got []float32) float64 {
	var num, den float64
	for i := range ref {
		d := float64(got[i] - ref[i])
		num += d * d
		den += float64(ref[i]) * float64(ref[i])
	}
	return math.Sqrt(num / den)
}

// naiveMatMul is the plain definition, in float64.
func naiveMatMul(x []float32, T, K int, w []float32, N int) []float32 {
	out := make([]float32, T*N)
	for t := 0; t < T; t++ {
		for n := 0; n < N; n++ {
			var s float64
			for k := 0; k < K; k++ {
				s += float64(x[t*K+k]) * float64(w[n*K+k])
			}
			out[t*N+n] = float32(s)
		}
	}
	return out
}

// unitRoundoff is 2^-24, the relative rounding error of one float32
// operation.
const unitRoundoff = 1.0 / (1 << 24)

// gamma is the classic bound n u / (1 - n u) on the relative error of a
// chain of n float32 operations (Higham, Accuracy and Stability, 3.1).
func gamma(n int) float64 { return float64(n) * unitRoundoff / (1 - float64(n)*unitRoundoff) }

// quantizeGroupRef is the int8 activation rule of docs/format.md section 9,
// written from the definition: scale = amax/127 in float32, then
// round-half-away-from-zero(x/scale) clamped to [-127, 127].
func quantizeGroupRef(x []float32) (q []int32, scale float32) {
	var amax float32
	for _, v := range x {
		amax = max(amax, float32(math.Abs(float64(v))))
	}
	q = make([]int32, len(x))
	if amax == 0 {
		return q, 0
	}
	scale = amax / 127
	for i, v := range x {
		q[i] = int32(max(-127, min(127, math.Round(float64(v/scale)))))
	}
	return q, scale
}

// TestQuantMatMulKernels checks the MMFP4 matrix products against
// references whose error is known, so the bounds are derived, not tuned:
//
//   - float activations: the float64 product of the dequantized weights.
//     Only float32 rounding differs, at most gamma(K+1) sum|w x| per output.
//   - int8 activations: the float64 product of the weight codes and the int8
//     activations of quantizeGroupRef. The integer group sums are exact, so
//     only the float32 scaling and the sum over groups round, at most
//     gamma(groups+2) sum_g |term_g|.
//   - int8 against float activations: |x - scale q| <= scale/2 per value, so
//     the two products differ by at most sum_k |w_k| scale_g(k) / 2 (plus the
//     rounding of both).
//
// The inputs are fixed-seed random, with an all-zero group and an outlier
// mixed in.
func TestQuantMatMulKernels(t *testing.T) {
	for _, k := range Kernels() {
		testQuantMatMulKernels(t, k)
	}
}

func testQuantMatMulKernels(t *testing.T, kernel string) {
	r := rand.New(rand.NewPCG(1, 1))
	const N, K = 37, 256
	for _, G := range []int{32, 64, 128} {
		for _, T := range []int{1, 3, 17} {
			groups := K / G
			w := randMat(r, N*K, 0.05)
			q, err := format.Quantize(w, N, K, format.QuantOptions{GroupSize: G})
			if err != nil {
				t.Fatal(err)
			}
			deq := q.Dequantize()
			x := randMat(r, T*K, 1)
			for k := 0; k < G; k++ { // row 0, group 0 is all zeros
				x[k] = 0
			}
			x[K-1] = 40 // an outlier sets its group's scale: the other values there keep few levels

			// References in float64, with the bound each kernel must meet.
			wantFloat, boundFloat := make([]float64, T*N), make([]float64, T*N)
			wantInt8, boundInt8 := make([]float64, T*N), make([]float64, T*N)
			modelInt8 := make([]float64, T*N) // the int8 error model's bound on |int8 - float|
			for ti := 0; ti < T; ti++ {
				xq := make([]int32, K)
				xs := make([]float32, groups)
				for g := 0; g < groups; g++ {
					qg, s := quantizeGroupRef(x[ti*K+g*G : ti*K+(g+1)*G])
					copy(xq[g*G:], qg)
					xs[g] = s
				}
				for n := 0; n < N; n++ {
					i := ti*N + n
					var absFloat, absInt8 float64
					for k := 0; k < K; k++ {
						p := float64(deq[n*K+k]) * float64(x[ti*K+k])
						wantFloat[i] += p
						absFloat += math.Abs(p)
						modelInt8[i] += math.Abs(float64(deq[n*K+k])) * float64(xs[k/G]) * (0.5 + 1e-5)
					}
					for g := 0; g < groups; g++ {
						var acc int64
						for k := g * G; k < (g+1)*G; k++ {
							code := q.Codes[(n*K+k)/2] >> (4 * (k % 2)) & 15
							acc += int64(format.E2M1Doubled[code]) * int64(xq[k])
						}
						d := q.RowScale[n] * format.E4M3Decode(q.Scales[n*groups+g])
						term := float64(acc) * 0.5 * float64(d) * float64(xs[g])
						wantInt8[i] += term
						absInt8 += math.Abs(term)
					}
					boundFloat[i] = gamma(K+1) * absFloat
					boundInt8[i] = gamma(groups+2) * absInt8
				}
			}

			for _, floatActs := range []bool{false, true} {
				b := New(Options{Threads: 3, FloatActivations: floatActs, Kernel: kernel})
				wt, err := b.NewWeight(backend.HostWeight{Name: "w", N: N, K: K, Quant: q})
				if err != nil {
					t.Fatal(err)
				}
				xt, out := b.NewTensor(T, K), b.NewTensor(T, N)
				b.Upload(xt, x)
				b.MatMul(out, xt, wt)
				got := b.Download(out)
				name := fmt.Sprintf("G=%d T=%d float=%v kernel=%s", G, T, floatActs, kernel)
				want, bound := wantInt8, boundInt8
				if floatActs {
					want, bound = wantFloat, boundFloat
				}
				var worst, worstModel float64 // largest error / bound
				for i := range got {
					e := math.Abs(float64(got[i]) - want[i])
					if e > bound[i] {
						t.Fatalf("%s: output %d (row %d, column %d): %.9g, reference %.9g: error %.3g > bound %.3g",
							name, i, i/N, i%N, got[i], want[i], e, bound[i])
					}
					worst = math.Max(worst, e/bound[i])
					if !floatActs {
						// The int8 result lies within the error model of the float product.
						em := math.Abs(float64(got[i])-wantFloat[i]) / (modelInt8[i] + boundInt8[i] + boundFloat[i])
						if em > 1 {
							t.Fatalf("%s: output %d: int8 result %.9g is %.3g from the float product %.9g, beyond the int8 error model's %.3g",
								name, i, got[i], math.Abs(float64(got[i])-wantFloat[i]), wantFloat[i], modelInt8[i])
						}
						worstModel = math.Max(worstModel, em)
					}
				}
				t.Logf("%s: largest error / bound %.3f (int8 vs float product / error model %.3f)", name, worst, worstModel)
			}
		}
	}
}

// dotGroupsGo itself against the definition: sum of 2*e2m1(code)*x over the
// interleaved columns.
func TestDotGroupsGoMatchesDefinition(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 3))
	const G = 64
	codes := make([]byte, G/2)
	for i := range codes {
		codes[i] = byte(r.IntN(256))
	}
	cols := make([]int8, G) // natural column order
	for i := range cols {
		cols[i] = int8(r.IntN(255) - 127)
	}
	x := make([]int8, G) // de-interleaved, as quantizeActivations stores it
	var want int32
	for k, v := range cols {
		x[k/2+(k%2)*G/2] = v
		code := codes[k/2] >> (4 * (k % 2)) & 15
		want += int32(2*format.E2M1Decode(code)) * int32(v)
	}
	got := make([]int32, 1)
	dotGroupsGo(codes, x, G, got)
	if got[0] != want {
		t.Fatalf("dotGroupsGo %d, definition %d", got[0], want)
	}
}

// TestAxpyCodesMatchesGo: the dispatching kernel against the Go reference
// (the assembly fuses multiply and add, so allow float rounding), and the Go
// reference against the dequantized rows.
func TestAxpyCodesMatchesGo(t *testing.T) {
	for _, k := range Kernels() {
		testAxpyCodesMatchesGo(t, New(Options{Kernel: k}))
	}
}

func testAxpyCodesMatchesGo(t *testing.T, b *Backend) {
	r := rand.New(rand.NewPCG(4, 4))
	for _, G := range []int{32, 64, 128} {
		const groups, rows = 4, 9
		w := randMat(r, rows*groups*G, 0.1)
		q, err := format.Quantize(w, rows, groups*G, format.QuantOptions{GroupSize: G})
		if err != nil {
			t.Fatal(err)
		}
		coefs := randMat(r, rows, 1)
		fast, ref := make([]float32, groups*G), make([]float32, groups*G)
		want := make([]float32, groups*G) // natural column order
		row := make([]float32, groups*G)
		coef := make([]float32, groups)
		for n := 0; n < rows; n++ {
			for g := range coef {
				coef[g] = coefs[n] * q.RowScale[n] * 0.5 * format.E4M3Decode(q.Scales[n*groups+g])
			}
			codes := q.Codes[n*groups*G/2 : (n+1)*groups*G/2]
			b.axpyCodes(fast, codes, coef, G)
			axpyCodesGo(ref, codes, coef, G)
			q.DequantizeRow(n, row)
			for k := range want {
				want[k] += coefs[n] * row[k]
			}
		}
		var scale float64
		for _, v := range want {
			scale = math.Max(scale, math.Abs(float64(v)))
		}
		for k := range want {
			g, j := k/G, k%G
			natural := g*G + 2*j
			if j >= G/2 {
				natural = g*G + 2*(j-G/2) + 1
			}
			if d := math.Abs(float64(fast[k] - ref[k])); d > 1e-5*scale {
				t.Fatalf("G=%d element %d: kernel %g, Go %g", G, k, fast[k], ref[k])
			}
			if d := math.Abs(float64(ref[k] - want[natural])); d > 1e-5*scale {
				t.Fatalf("G=%d element %d (column %d): Go %g, dequantized %g", G, k, natural, ref[k], want[natural])
			}
		}
	}
}
