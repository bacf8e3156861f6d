package format

import (
	"math"
	"math/rand/v2"
	"testing"

	"github.com/mmfp4/mmfp4/internal/benchmode"
)

// refEncodeE2M1 and refEncodeE4M3 are brute-force encoders over the test's
// own value tables.
func refEncodeE2M1(x float32) uint8 {
	c := nearestCode(math.Abs(float64(x)), refE2M1Mag[:])
	if x < 0 && c != 0 {
		c |= 8
	}
	return c
}

func refEncodeE4M3(x float32) uint8 { // x >= 0 here
	return nearestCode(float64(x), refE4M3Pos)
}

// refQuantized is the output of the reference quantizer: codes unpacked, one
// per element, and the reconstructed values.
type refQuantized struct {
	codes    []uint8
	scales   []uint8
	rowScale []float32
	deq      []float32
}

// refQuantize is a plain, single-threaded transcription of the RTN rule and
// its search variant, written independently of quantize.go.
func refQuantize(w []float32, n, k, g int, search bool) refQuantized {
	out := refQuantized{
		codes:    make([]uint8, n*k),
		scales:   make([]uint8, n*k/g),
		rowScale: make([]float32, n),
		deq:      make([]float32, n*k),
	}
	for r := 0; r < n; r++ {
		row := w[r*k : (r+1)*k]
		var amax float32
		for _, v := range row {
			amax = float32(math.Max(float64(amax), math.Abs(float64(v))))
		}
		var rowScale float32 = amax / 2688
		if rowScale == 0 {
			rowScale = 1
		}
		out.rowScale[r] = rowScale
		for j := 0; j < k/g; j++ {
			grp := row[j*g : (j+1)*g]
			var gmax float32
			for _, v := range grp {
				gmax = float32(math.Max(float64(gmax), math.Abs(float64(v))))
			}
			var t float32 = rowScale * 6
			s := refEncodeE4M3(gmax / t)
			// quant returns the codes, the reconstruction and its squared error.
			quant := func(s uint8) ([]uint8, []float32, float64) {
				var d float32 = rowScale * float32(refE4M3(s))
				codes, deq := make([]uint8, g), make([]float32, g)
				var sse float64
				for i, v := range grp {
					if d != 0 {
						codes[i] = refEncodeE2M1(v / d)
						deq[i] = d * float32(refE2M1(codes[i]))
					}
					e := float64(v) - float64(deq[i])
					sse += e * e
				}
				return codes, deq, sse
			}
			codes, deq, sse := quant(s)
			if search {
				for _, c := range []int{int(s) - 2, int(s) - 1, int(s) + 1, int(s) + 2} {
					if c < 1 || c > 0x7E {
						continue
					}
					if c2, d2, e2 := quant(uint8(c)); e2 < sse {
						s, codes, deq, sse = uint8(c), c2, d2, e2
					}
				}
			}
			out.scales[r*k/g+j] = s
			copy(out.codes[r*k+j*g:], codes)
			copy(out.deq[r*k+j*g:], deq)
		}
	}
	return out
}

// testMatrix returns n*k Gaussian weights whose rows span many orders of
// magnitude, with zero rows, zero groups, outliers and near-underflow rows.
func testMatrix(r *rand.Rand, n, k, g int) []float32 {
	w := make([]float32, n*k)
	for i := 0; i < n; i++ {
		row := w[i*k : (i+1)*k]
		switch i % 7 {
		case 0: // zero row
			continue
		case 1: // so small that amax/2688 underflows to zero
			for j := range row {
				row[j] = float32(r.NormFloat64() * 1e-43)
			}
			continue
		case 2: // a subnormal row scale
			for j := range row {
				row[j] = float32(r.NormFloat64() * 1e-40)
			}
			continue
		}
		scale := math.Pow(10, r.Float64()*40-20)
		for j := range row {
			row[j] = float32(r.NormFloat64() * scale)
		}
		if i%3 == 0 { // a zero group
			clear(row[g : 2*g])
		}
		if i%5 == 0 { // an outlier
			row[r.IntN(k)] *= 300
		}
		if i%2 == 0 { // a group so small its scale is near or below the smallest E4M3
			tiny := math.Pow(10, -7+2*r.Float64())
			for j := range row[2*g : 3*g] {
				row[2*g+j] *= float32(tiny)
			}
		}
	}
	return w
}

// nudge moves x by -1, 0 or +1 ulp.
func nudge(r *rand.Rand, x float32) float32 {
	switch r.IntN(3) {
	case 0:
		return math.Nextafter32(x, float32(math.Inf(-1)))
	case 1:
		return math.Nextafter32(x, float32(math.Inf(1)))
	}
	return x
}

// tieMatrix returns weights placed on or next to the rounding ties of both
// encoders, where the order of the float32 operations decides the result.
func tieMatrix(r *rand.Rand, n, k, g int) []float32 {
	w := make([]float32, n*k)
	for i := 0; i < n; i++ {
		row := w[i*k : (i+1)*k]
		amax := float32(math.Ldexp(1+r.Float64(), r.IntN(20)-10))
		var rs float32 = amax / 2688
		var t float32 = rs * 6
		row[r.IntN(g)] = amax // group 0 holds the row maximum
		for j := 0; j < k/g; j++ {
			grp := row[j*g : (j+1)*g]
			if j > 0 {
				c := 1 + r.IntN(0x7C)
				mid := (refE4M3(uint8(c)) + refE4M3(uint8(c+1))) / 2
				grp[r.IntN(g)] = nudge(r, float32(float64(t)*mid))
			}
			var gmax float32
			for _, v := range grp {
				gmax = max(gmax, v)
			}
			var d float32 = rs * float32(refE4M3(refEncodeE4M3(gmax/t)))
			for x := range grp {
				if grp[x] != 0 {
					continue
				}
				// An E2M1 midpoint times the group's step, or a random value.
				if r.IntN(2) == 0 {
					c := r.IntN(7)
					grp[x] = nudge(r, float32(float64(d)*(refE2M1Mag[c]+refE2M1Mag[c+1])/2))
				} else {
					grp[x] = float32(r.Float64()) * gmax
				}
				if r.IntN(2) == 0 {
					grp[x] = -grp[x]
				}
			}
		}
	}
	return w
}

func unpackCodes(m *Matrix) []uint8 {
	codes := make([]uint8, 2*len(m.Codes))
	for i, b := range m.Codes {
		codes[2*i], codes[2*i+1] = b&15, b>>4
	}
	return codes
}

func TestQuantizeMatchesReference(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	for _, g := range []int{32, 64, 128} {
		for _, search := range []bool{false, true} {
			n, k := 37, 4*g
			w := append(testMatrix(r, n, k, g), tieMatrix(r, n, k, g)...)
			n *= 2
			m, err := Quantize(w, n, k, QuantOptions{GroupSize: g, Search: search})
			if err != nil {
				t.Fatal(err)
			}
			if err := m.Validate(); err != nil {
				t.Fatal(err)
			}
			ref := refQuantize(w, n, k, g, search)
			for i, rs := range ref.rowScale {
				if math.Float32bits(m.RowScale[i]) != math.Float32bits(rs) {
					t.Fatalf("G=%d search=%v: row scale %d = %v, want %v", g, search, i, m.RowScale[i], rs)
				}
			}
			for i, s := range ref.scales {
				if m.Scales[i] != s {
					t.Fatalf("G=%d search=%v: scale %d = %#02x, want %#02x", g, search, i, m.Scales[i], s)
				}
			}
			codes := unpackCodes(m)
			for i, c := range ref.codes {
				if codes[i] != c {
					t.Fatalf("G=%d search=%v: code [%d,%d] = %d, want %d", g, search, i/k, i%k, codes[i], c)
				}
			}
			deq := m.Dequantize()
			for i, v := range ref.deq {
				if deq[i] != v {
					t.Fatalf("G=%d search=%v: w[%d,%d] = %v, want %v", g, search, i/k, i%k, deq[i], v)
				}
			}
			// testMatrix's zero and underflowing rows (i%7 == 0 or 1) come back as zero.
			for i := 0; i < n/2; i += 7 {
				for _, v := range deq[i*k : (i+2)*k] {
					if v != 0 {
						t.Fatalf("G=%d: rows %d,%d should dequantize to zero, got %v", g, i, i+1, v)
					}
				}
			}
		}
	}
}

func TestSearchNeverWorse(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	for _, g := range []int{32, 64, 128} {
		n, k := 64, 8*g
		w := testMatrix(r, n, k, g)
		rtn, err := Quantize(w, n, k, QuantOptions{GroupSize: g})
		if err != nil {
			t.Fatal(err)
		}
		srch, err := Quantize(w, n, k, QuantOptions{GroupSize: g, Search: true})
		if err != nil {
			t.Fatal(err)
		}
		a, b := rtn.Dequantize(), srch.Dequantize()
		better := 0
		for i := 0; i < n*k; i += g {
			var ea, eb float64
			for j := i; j < i+g; j++ {
				da, db := float64(w[j])-float64(a[j]), float64(w[j])-float64(b[j])
				ea += da * da
				eb += db * db
			}
			if eb > ea {
				t.Fatalf("G=%d group at %d: search error %g > RTN error %g", g, i, eb, ea)
			}
			if eb < ea {
				better++
			}
		}
		t.Logf("G=%d: search improved %d of %d groups", g, better, n*k/g)
		if better == 0 {
			t.Errorf("G=%d: search never improved a group", g)
		}
	}
}

func TestQuantizeRepresentableExact(t *testing.T) {
	r := rand.New(rand.NewPCG(9, 10))
	for _, g := range []int{32, 64, 128} {
		n, k := 16, 3*g
		m := &Matrix{N: n, K: k, GroupSize: g,
			Codes: make([]byte, n*k/2), Scales: make([]byte, n*k/g), RowScale: make([]float32, n)}
		codes := make([]uint8, n*k)
		for i := range codes {
			codes[i] = uint8(r.IntN(16))
			if codes[i] == 8 { // -0 is never produced
				codes[i] = 0
			}
		}
		for i := 0; i < n; i++ {
			m.RowScale[i] = float32(math.Ldexp(1, r.IntN(40)-20))
			for j := 0; j < k/g; j++ {
				s := uint8(1 + r.IntN(0x7E))
				if j == 0 {
					s = 0x7E // the row's largest value is 6*448*row_scale
				}
				m.Scales[i*k/g+j] = s
				// Each group holds a ±6 so its scale is the one RTN picks.
				codes[i*k+j*g+r.IntN(g)] = uint8(7 | 8*r.IntN(2))
			}
		}
		for i := range m.Codes {
			m.Codes[i] = codes[2*i] | codes[2*i+1]<<4
		}
		w := m.Dequantize()
		for _, search := range []bool{false, true} {
			q, err := Quantize(w, n, k, QuantOptions{GroupSize: g, Search: search})
			if err != nil {
				t.Fatal(err)
			}
			for i := range m.RowScale {
				if q.RowScale[i] != m.RowScale[i] {
					t.Fatalf("G=%d search=%v: row scale %d = %v, want %v", g, search, i, q.RowScale[i], m.RowScale[i])
				}
			}
			for i := range m.Scales {
				if q.Scales[i] != m.Scales[i] {
					t.Fatalf("G=%d search=%v: scale %d = %#02x, want %#02x", g, search, i, q.Scales[i], m.Scales[i])
				}
			}
			for i := range m.Codes {
				if q.Codes[i] != m.Codes[i] {
					t.Fatalf("G=%d search=%v: code byte %d = %#02x, want %#02x", g, search, i, q.Codes[i], m.Codes[i])
				}
			}
		}
	}
}

func TestDequantizePacking(t *testing.T) {
	// One row, one group of 32: byte 0 = 0x21 holds column 0 = code 1 (0.5)
	// in the low nibble and column 1 = code 2 (1.0) in the high nibble.
	m := &Matrix{N: 1, K: 32, GroupSize: 32, Codes: make([]byte, 16), Scales: []byte{0x40}, RowScale: []float32{0.25}}
	m.Codes[0] = 0x21
	m.Codes[15] = 0xF9 // column 30 = code 9 (-0.5), column 31 = code 15 (-6)
	// 0x40 is E4M3 2.0, so every element is 0.5 times its E2M1 value.
	want := make([]float32, 32)
	want[0], want[1], want[30], want[31] = 0.25, 0.5, -0.25, -3
	got := m.Dequantize()
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("column %d = %v, want %v", i, got[i], want[i])
		}
	}
}

func TestValidate(t *testing.T) {
	good := func() *Matrix {
		return &Matrix{N: 2, K: 128, GroupSize: 64, Codes: make([]byte, 128), Scales: make([]byte, 4), RowScale: make([]float32, 2)}
	}
	if err := good().Validate(); err != nil {
		t.Fatalf("valid matrix rejected: %v", err)
	}
	bad := map[string]func(m *Matrix){
		"group 16":       func(m *Matrix) { m.GroupSize = 16 },
		"group 0":        func(m *Matrix) { m.GroupSize = 0 },
		"K not multiple": func(m *Matrix) { m.K = 96; m.Codes = make([]byte, 96); m.Scales = make([]byte, 3) },
		"N zero":         func(m *Matrix) { m.N = 0; m.Codes = nil; m.Scales = nil; m.RowScale = nil },
		"codes short":    func(m *Matrix) { m.Codes = m.Codes[:127] },
		"scales long":    func(m *Matrix) { m.Scales = make([]byte, 5) },
		"row scales":     func(m *Matrix) { m.RowScale = m.RowScale[:1] },
	}
	for name, mutate := range bad {
		m := good()
		mutate(m)
		if err := m.Validate(); err == nil {
			t.Errorf("%s: Validate accepted %+v", name, *m)
		}
	}
}

func TestQuantizeRejects(t *testing.T) {
	w := make([]float32, 2*64)
	if _, err := Quantize(w, 2, 64, QuantOptions{GroupSize: 48}); err == nil {
		t.Error("group size 48 accepted")
	}
	if _, err := Quantize(w, 2, 64, QuantOptions{GroupSize: 128}); err == nil {
		t.Error("K=64 with G=128 accepted")
	}
	if _, err := Quantize(w[:100], 2, 64, QuantOptions{GroupSize: 32}); err == nil {
		t.Error("short input accepted")
	}
	for _, bad := range []float64{math.NaN(), math.Inf(1), math.Inf(-1)} {
		w[70] = float32(bad)
		if _, err := Quantize(w, 2, 64, QuantOptions{GroupSize: 32}); err == nil {
			t.Errorf("%v accepted", bad)
		}
	}
}

func TestRelError(t *testing.T) {
	if e := RelError([]float32{3, 4}, []float32{3, 4}); e != 0 {
		t.Errorf("identical: %v", e)
	}
	if e := RelError([]float32{0, 0}, []float32{0, 0}); e != 0 {
		t.Errorf("both zero: %v", e)
	}
	if e := RelError([]float32{3, 4}, []float32{0, 0}); e != 1 {
		t.Errorf("got zero: %v, want 1", e)
	}
	if e := RelError([]float32{3, 4}, []float32{3, 5}); math.Abs(e-0.2) > 1e-15 {
		t.Errorf("%v, want 0.2", e)
	}
}

func TestGaussianError(t *testing.T) {
	r := rand.New(rand.NewPCG(11, 12))
	n, k := 256, 2048
	w := make([]float32, n*k)
	for i := range w {
		w[i] = float32(r.NormFloat64() * 0.02)
	}
	for _, g := range []int{32, 64, 128} {
		for _, search := range []bool{false, true} {
			m, err := Quantize(w, n, k, QuantOptions{GroupSize: g, Search: search})
			if err != nil {
				t.Fatal(err)
			}
			e := RelError(w, m.Dequantize())
			if e2 := m.RelError(w); e2 != e { // same sums in the same order
				t.Errorf("G=%d search=%v: Matrix.RelError %v, RelError of the dequantized copy %v", g, search, e2, e)
			}
			t.Logf("Gaussian %dx%d G=%d search=%v: relative error %.4f", n, k, g, search, e)
			// E2M1 with per-group scales lands near 0.1; far above means a bug.
			if e > 0.13 {
				t.Errorf("G=%d search=%v: relative error %.4f too large", g, search, e)
			}
		}
	}
}

func BenchmarkQuantize(b *testing.B) {
	benchmode.Check(b)
	r := rand.New(rand.NewPCG(13, 14))
	n, k := 1536, 2048
	w := make([]float32, n*k)
	for i := range w {
		w[i] = float32(r.NormFloat64())
	}
	for _, search := range []bool{false, true} {
		name := "rtn"
		if search {
			name = "search"
		}
		b.Run(name, func(b *testing.B) {
			b.SetBytes(int64(2 * n * k)) // as bf16 source bytes
			for b.Loop() {
				if _, err := Quantize(w, n, k, QuantOptions{GroupSize: 128, Search: search}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
