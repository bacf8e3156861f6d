package cpu

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/mmfp4/mmfp4/format"
)

// backends returns one backend per kernel family this CPU runs.
func backends(threads int) []*Backend {
	var out []*Backend
	for _, k := range Kernels() {
		out = append(out, New(Options{Threads: threads, Kernel: k}))
	}
	return out
}

func TestKernelSelection(t *testing.T) {
	ks := Kernels()
	if ks[len(ks)-1] != "go" {
		t.Fatalf("Kernels() = %v: the Go reference must always be there, last", ks)
	}
	for _, k := range ks {
		if got := New(Options{Kernel: k}).isa.String(); got != k {
			t.Errorf("Options.Kernel %q gave %q", k, got)
		}
	}
	if err := CheckKernel("sse9"); err == nil {
		t.Error("CheckKernel accepted an unknown name")
	}
	t.Setenv(kernelEnv, "go")
	if got := New(Options{}).isa; got != isaGo {
		t.Errorf("%s=go gave %v", kernelEnv, got)
	}
	t.Setenv(kernelEnv, "nonsense")
	if got := New(Options{}).isa.String(); got != ks[0] {
		t.Errorf("a bad %s gave %v, want the default %s", kernelEnv, got, ks[0])
	}
}

// randActRow fills a row of groups*128 activations with values of varied
// magnitude per group, a few all-zero groups and exact extremes.
func randActRow(r *rand.Rand, groups int) []float32 {
	row := make([]float32, groups*128)
	for g := 0; g < groups; g++ {
		seg := row[g*128 : (g+1)*128]
		switch r.IntN(6) {
		case 0: // zeros
		case 1: // ties: multiples of amax/254 land on .5 after division
			for i := range seg {
				seg[i] = float32(r.IntN(509)-254) * 0.25
			}
		default:
			scale := math.Exp(r.NormFloat64() * 3)
			for i := range seg {
				seg[i] = float32(r.NormFloat64() * scale)
			}
		}
	}
	return row
}

// Every quantizer must reproduce the Go reference bit for bit, NaN and
// infinity included.
func TestQuantizeRowMatchesGo(t *testing.T) {
	r := rand.New(rand.NewPCG(10, 1))
	for _, b := range backends(1) {
		for _, groups := range []int{1, 2, 5, 16, 40} {
			for trial := 0; trial < 20; trial++ {
				row := randActRow(r, groups)
				if trial%5 == 4 { // non-finite values in one group
					row[r.IntN(len(row))] = []float32{float32(math.NaN()), float32(math.Inf(1)), float32(math.Inf(-1))}[r.IntN(3)]
				}
				wq, gq := make([]int8, len(row)), make([]int8, len(row))
				ws, gs := make([]float32, groups), make([]float32, groups)
				wsum, gsum := make([]int32, groups), make([]int32, groups)
				for i := range gq { // stale values must be overwritten
					gq[i] = 99
				}
				quantizeRowGo(row, 128, wq, ws, wsum)
				b.quantizeRow(row, 128, gq, gs, gsum)
				if !slices.Equal(wq, gq) || !slices.Equal(wsum, gsum) {
					t.Fatalf("%s groups=%d trial %d: int8 values or sums differ from the reference", b.isa, groups, trial)
				}
				for g := range ws {
					if math.Float32bits(ws[g]) != math.Float32bits(gs[g]) && !(ws[g] != ws[g] && gs[g] != gs[g]) {
						t.Fatalf("%s groups=%d trial %d: scale %d is %g, reference %g", b.isa, groups, trial, g, gs[g], ws[g])
					}
				}
			}
		}
	}
}

// randQuant builds an N x K MMFP4 matrix with random codes, block scales
// across the E4M3 range and random row scales.
func randQuant(r *rand.Rand, N, K, G int) *format.Matrix {
	m := &format.Matrix{N: N, K: K, GroupSize: G, Codes: make([]byte, N*K/2), Scales: make([]byte, N*K/G), RowScale: make([]float32, N)}
	for i := range m.Codes {
		m.Codes[i] = byte(r.IntN(256))
	}
	for i := range m.Scales {
		m.Scales[i] = byte(r.IntN(0x7f)) // finite, subnormals included
	}
	for i := range m.RowScale {
		m.RowScale[i] = float32(math.Exp(r.NormFloat64()))
	}
	return m
}

// gemvExact returns sum_g dot_g * c_g in float64 and the bound on a float32
// evaluation's error: every lane sum of a group is an exact integer below
// sum_k (|w_k|+24)|x_k| (the bias of 12 may sit in any lane), each is
// rounded a few times and the sum over groups and lanes adds one rounding
// per term, so the error is at most (groups+16) * 2^-23 * sum_g |c_g| * that.
func gemvExact(m *format.Matrix, n int, a *qacts, t int) (want, bound float64) {
	G, groups := m.GroupSize, m.K/m.GroupSize
	xq, xs, _ := a.row(t)
	dots := make([]int32, groups)
	dotGroupsGo(m.Codes[n*m.K/2:(n+1)*m.K/2], xq, G, dots)
	var mag float64
	for g := 0; g < groups; g++ {
		c := float64(m.RowScale[n]) * 0.5 * float64(e4m3Table[m.Scales[n*groups+g]]) * float64(xs[g])
		want += float64(dots[g]) * c
		var abs float64
		for k, code := range m.Codes[n*m.K/2+g*G/2 : n*m.K/2+(g+1)*G/2] {
			e, o := pairTable[code][0], pairTable[code][1]
			abs += float64(abs32(e)+24)*math.Abs(float64(xq[g*G+k])) + float64(abs32(o)+24)*math.Abs(float64(xq[g*G+G/2+k]))
		}
		mag += math.Abs(c) * abs
	}
	return want, float64(groups+16) * math.Ldexp(mag, -23)
}

func abs32(v int32) int32 { return max(v, -v) }

// Every decode kernel against the exact value, within the derived bound, on
// odd row counts and group counts; and exactly where the float arithmetic
// is exact (unit scales: the result is the integer dot product).
func TestGemvMatchesReference(t *testing.T) {
	r := rand.New(rand.NewPCG(11, 2))
	for _, b := range backends(1) {
		for _, shape := range [][2]int{{1, 1}, {3, 2}, {5, 16}, {7, 3}, {37, 17}, {64, 4}, {67, 12}} {
			N, groups := shape[0], shape[1]
			K := groups * 128
			m := randQuant(r, N, K, 128)
			a := newQActs(2, K, 128)
			for tok := 0; tok < 2; tok++ {
				q, s, sum := a.row(tok)
				quantizeRowGo(randActRow(r, groups), 128, q, s, sum)
			}
			for tok := 0; tok < 2; tok++ {
				got := make([]float32, N)
				lo := r.IntN(N)
				b.gemvRows(m, lo, N, a, tok, got[lo:])
				b.gemvRows(m, 0, lo, a, tok, got[:lo])
				for n := range got { // row by row: the same bits
					var one [1]float32
					if b.gemvRows(m, n, n+1, a, tok, one[:]); one[0] != got[n] {
						t.Fatalf("%s %dx%d row %d alone: %g, in a block: %g", b.isa, N, K, n, one[0], got[n])
					}
				}
				for n := range got {
					want, bound := gemvExact(m, n, a, tok)
					if d := math.Abs(float64(got[n]) - want); d > bound {
						t.Fatalf("%s %dx%d token %d row %d: %g, exact %g (|diff| %.3g > bound %.3g)", b.isa, N, K, tok, n, got[n], want, d, bound)
					}
				}
			}

			// Unit scales: e4m3 0x38 = 1, row scale 2, activation scale 1.
			for i := range m.Scales {
				m.Scales[i] = 0x38
			}
			for i := range m.RowScale {
				m.RowScale[i] = 2
			}
			for i := range a.s {
				a.s[i] = 1
			}
			got := make([]float32, N)
			b.gemvRows(m, 0, N, a, 1, got)
			dots := make([]int32, groups)
			xq, _, _ := a.row(1)
			for n := range got {
				dotGroupsGo(m.Codes[n*K/2:(n+1)*K/2], xq, 128, dots)
				var want int32
				for _, d := range dots {
					want += d
				}
				if got[n] != float32(want) {
					t.Fatalf("%s %dx%d unit scales row %d: %g, integer dot product %d", b.isa, N, K, n, got[n], want)
				}
			}
		}
	}
}

// The blocked prefill kernel: against the exact value within the bound of
// gemvExact (it rounds less: one conversion, product and fused add per
// group), on row counts that leave partial 16-row blocks and token counts
// that leave partial 8-token blocks; exactly with unit scales.
func TestGemmMatchesReference(t *testing.T) {
	r := rand.New(rand.NewPCG(12, 3))
	for _, b := range backends(2) {
		if _, _, ok := gemmGeometry(b.isa); !ok {
			continue
		}
		for _, shape := range [][3]int{{1, 1, 5}, {16, 3, 8}, {17, 2, 9}, {37, 16, 13}, {64, 5, 24}, {150, 2, 9}} {
			N, groups, T := shape[0], shape[1], shape[2]
			K := groups * 128
			m := randQuant(r, N, K, 128)
			a := newQActs(T, K, 128)
			for tok := 0; tok < T; tok++ {
				q, s, sum := a.row(tok)
				quantizeRowGo(randActRow(r, groups), 128, q, s, sum)
			}
			d := &mat{rows: T, cols: N, stride: N + 3, data: make([]float32, T*(N+3))}
			if !b.gemmInt8(d, a, m) {
				t.Fatalf("%s: the blocked kernel did not run", b.isa)
			}
			for tok := 0; tok < T; tok++ {
				for n := 0; n < N; n++ {
					want, bound := gemvExact(m, n, a, tok)
					if got := d.data[tok*d.stride+n]; math.Abs(float64(got)-want) > bound {
						t.Fatalf("%s %dx%d T=%d token %d row %d: %g, exact %g, bound %.3g", b.isa, N, K, T, tok, n, got, want, bound)
					}
				}
			}

			for i := range m.Scales {
				m.Scales[i] = 0x38
			}
			for i := range m.RowScale {
				m.RowScale[i] = 2
			}
			for i := range a.s {
				a.s[i] = 1
			}
			b.gemmInt8(d, a, m)
			dots := make([]int32, groups)
			for tok := 0; tok < T; tok++ {
				xq, _, _ := a.row(tok)
				for n := 0; n < N; n++ {
					dotGroupsGo(m.Codes[n*K/2:(n+1)*K/2], xq, 128, dots)
					var want int32
					for _, v := range dots {
						want += v
					}
					if got := d.data[tok*d.stride+n]; got != float32(want) {
						t.Fatalf("%s %dx%d unit scales token %d row %d: %g, integer dot product %d", b.isa, N, K, tok, n, got, want)
					}
				}
			}
		}
	}
}

// The kernels decode E4M3 scales arithmetically: negative scales (which
// the quantizer never writes but readers accept), subnormals and the NaN
// codes 0x7f and 0xff must give what the table gives.
func TestGemvSpecialScales(t *testing.T) {
	r := rand.New(rand.NewPCG(13, 4))
	for _, b := range backends(1) {
		for _, groups := range []int{3, 16, 19} {
			const N = 40
			K := groups * 128
			m := randQuant(r, N, K, 128)
			for i := range m.Scales {
				m.Scales[i] = byte(r.IntN(256))
				if m.Scales[i]&0x7f == 0x7f && i/groups%4 != 0 {
					m.Scales[i] = 0x38 // NaN in every fourth row only
				}
			}
			a := newQActs(1, K, 128)
			q, s, sum := a.row(0)
			quantizeRowGo(randActRow(r, groups), 128, q, s, sum)
			got, want := make([]float32, N), make([]float32, N)
			b.gemvRows(m, 0, N, a, 0, got)
			gemvRowsGo(m, 0, N, a, 0, want)
			for n := range got {
				wantNaN := math.IsNaN(float64(want[n]))
				if math.IsNaN(float64(got[n])) != wantNaN {
					t.Fatalf("%s groups=%d row %d: %g, reference %g", b.isa, groups, n, got[n], want[n])
				}
				if wantNaN {
					continue
				}
				exact, bound := gemvExact(m, n, a, 0)
				if d := math.Abs(float64(got[n]) - exact); d > bound {
					t.Fatalf("%s groups=%d row %d: %g, exact %g, bound %.3g", b.isa, groups, n, got[n], exact, bound)
				}
			}
		}
	}
}
