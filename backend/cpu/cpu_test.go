package cpu

import (
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

// The int8-activation and float-activation MMFP4 kernels against the naive
// product of the dequantized weights, on fresh random inputs.
func TestQuantMatMulKernels(t *testing.T) {
	for _, k := range Kernels() {
		testQuantMatMulKernels(t, k)
	}
}

func testQuantMatMulKernels(t *testing.T, kernel string) {
	r := rand.New(rand.NewPCG(1, 1))
	for _, G := range []int{32, 64, 128} {
		for _, T := range []int{1, 3, 17} {
			N, K := 37, 256
			w := randMat(r, N*K, 0.05)
			q, err := format.Quantize(w, N, K, format.QuantOptions{GroupSize: G})
			if err != nil {
				t.Fatal(err)
			}
			x := randMat(r, T*K, 1)
			want := naiveMatMul(x, T, K, q.Dequantize(), N)
			for _, floatActs := range []bool{false, true} {
				b := New(Options{Threads: 3, FloatActivations: floatActs, Kernel: kernel})
				wt, err := b.NewWeight(backend.HostWeight{Name: "w", N: N, K: K, Quant: q})
				if err != nil {
					t.Fatal(err)
				}
				xt, out := b.NewTensor(T, K), b.NewTensor(T, N)
				b.Upload(xt, x)
				b.MatMul(out, xt, wt)
				e := relErr(want, b.Download(out))
				// int8 activations lose about 2^-8 relative per element.
				tol := 1e-5
				if !floatActs {
					tol = 1e-2
				}
				t.Logf("G=%d T=%d float=%v kernel=%s: %.2e", G, T, floatActs, kernel, e)
				if e > tol {
					t.Errorf("G=%d T=%d float=%v kernel=%s: relative error %.2e > %.0e", G, T, floatActs, kernel, e, tol)
				}
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
