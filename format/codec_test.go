package format

import (
	"math"
	"math/rand/v2"
	"testing"
)

// The expected values below come from the formats' definitions, written out
// again here, never from the code under test.

var refE2M1Mag = [8]float64{0, 0.5, 1, 1.5, 2, 3, 4, 6}

func refE2M1(code uint8) float64 {
	v := refE2M1Mag[code&7]
	if code&8 != 0 {
		v = math.Copysign(v, -1)
	}
	return v
}

// refE4M3 decodes E4M3FN from its bit fields: (-1)^s * 2^(e-7) * (1 + m/8),
// or 2^-6 * m/8 when e == 0.
func refE4M3(b uint8) float64 {
	s, e, m := b>>7, int(b>>3&15), float64(b&7)
	if e == 15 && m == 7 {
		return math.NaN()
	}
	var v float64
	if e == 0 {
		v = math.Ldexp(m/8, -6)
	} else {
		v = math.Ldexp(1+m/8, e-7)
	}
	if s == 1 {
		v = math.Copysign(v, -1)
	}
	return v
}

// nearestCode returns the index of the value in vals (non-negative,
// ascending) nearest to a >= 0, the even index on a tie. Brute force.
func nearestCode(a float64, vals []float64) uint8 {
	if a >= vals[len(vals)-1] {
		// Saturate. (Far above the top, float64 distances would tie.)
		return uint8(len(vals) - 1)
	}
	best, bestD := 0, math.Inf(1)
	for c, v := range vals {
		d := math.Abs(a - v)
		if d < bestD || (d == bestD && c&1 == 0) {
			best, bestD = c, d
		}
	}
	return uint8(best)
}

// refE4M3Pos lists the non-negative finite E4M3 values, codes 0x00..0x7E.
var refE4M3Pos = func() []float64 {
	v := make([]float64, 0x7F)
	for c := range v {
		v[c] = refE4M3(uint8(c))
	}
	return v
}()

func TestE2M1DecodeAll(t *testing.T) {
	for c := 0; c < 16; c++ {
		got, want := E2M1Decode(uint8(c)), refE2M1(uint8(c))
		if float64(got) != want || math.Signbit(float64(got)) != math.Signbit(want) {
			t.Errorf("E2M1Decode(%d) = %v, want %v", c, got, want)
		}
		if d := E2M1Doubled[c]; float64(d) != 2*want {
			t.Errorf("E2M1Doubled[%d] = %d, want %v", c, d, 2*want)
		}
	}
}

func TestE2M1RoundTripAll(t *testing.T) {
	for c := uint8(0); c < 16; c++ {
		v := E2M1Decode(c)
		want := c
		if c == 8 { // -0 is stored as code 0
			want = 0
		}
		if got := E2M1Encode(v); got != want {
			t.Errorf("E2M1Encode(%v) = %d, want %d", v, got, want)
		}
		if E2M1Decode(E2M1Encode(v)) != v {
			t.Errorf("decode(encode(decode(%d))) != %v", c, v)
		}
	}
}

func TestE2M1Midpoints(t *testing.T) {
	cases := []struct {
		x    float32
		want float32
	}{
		{0.25, 0}, {0.75, 1}, {1.25, 1}, {1.75, 2}, {2.5, 2}, {3.5, 4}, {5, 4},
		{6.5, 6}, {100, 6}, {float32(math.Inf(1)), 6},
	}
	for _, c := range cases {
		for _, s := range []float32{1, -1} {
			got := E2M1Decode(E2M1Encode(s * c.x))
			if got != s*c.want {
				t.Errorf("E2M1Encode(%v) decodes to %v, want %v", s*c.x, got, s*c.want)
			}
		}
	}
	// Every midpoint, computed from the table, and its two neighbours.
	for c := uint8(0); c < 7; c++ {
		mid := float32((refE2M1Mag[c] + refE2M1Mag[c+1]) / 2)
		even := c
		if c&1 == 1 {
			even = c + 1
		}
		if got := E2M1Encode(mid); got != even {
			t.Errorf("E2M1Encode(midpoint %v) = %d, want even code %d", mid, got, even)
		}
		if got := E2M1Encode(math.Nextafter32(mid, 0)); got != c {
			t.Errorf("E2M1Encode(just below %v) = %d, want %d", mid, got, c)
		}
		if got := E2M1Encode(math.Nextafter32(mid, 10)); got != c+1 {
			t.Errorf("E2M1Encode(just above %v) = %d, want %d", mid, got, c+1)
		}
	}
	for _, x := range []float32{float32(math.NaN()), float32(math.Copysign(0, -1)), -0.1, -0.25} {
		if got := E2M1Encode(x); got != 0 {
			t.Errorf("E2M1Encode(%v) = %d, want 0", x, got)
		}
	}
}

// randomFloat draws values that exercise every part of a small float format:
// random bit patterns, a log-uniform spread over the format's range, and
// values near representable points.
func randomFloat(r *rand.Rand, minExp, maxExp int) float32 {
	switch r.IntN(3) {
	case 0:
		return math.Float32frombits(r.Uint32())
	case 1:
		x := math.Ldexp(1+r.Float64(), minExp+r.IntN(maxExp-minExp+1))
		if r.IntN(2) == 0 {
			x = -x
		}
		return float32(x)
	default:
		// A multiple of a quarter of a fine grid step hits midpoints often.
		e := minExp + r.IntN(maxExp-minExp+1)
		x := math.Ldexp(float64(r.IntN(128)), e-6)
		if r.IntN(2) == 0 {
			x = -x
		}
		return float32(x)
	}
}

func TestE2M1EncodeRandom(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 1_000_000; i++ {
		x := randomFloat(r, -4, 4)
		if x != x {
			continue
		}
		a := math.Abs(float64(x))
		want := nearestCode(a, refE2M1Mag[:])
		if x < 0 && want != 0 {
			want |= 8
		}
		if got := E2M1Encode(x); got != want {
			t.Fatalf("E2M1Encode(%v) = %d, want %d", x, got, want)
		}
	}
}

func TestE4M3DecodeAll(t *testing.T) {
	for c := 0; c < 256; c++ {
		got, want := float64(E4M3Decode(uint8(c))), refE4M3(uint8(c))
		if math.IsNaN(want) {
			if !math.IsNaN(got) {
				t.Errorf("E4M3Decode(%#02x) = %v, want NaN", c, got)
			}
			continue
		}
		if got != want || math.Signbit(got) != math.Signbit(want) {
			t.Errorf("E4M3Decode(%#02x) = %v, want %v", c, got, want)
		}
	}
	// A few anchors from the OCP specification.
	for b, want := range map[uint8]float64{0x38: 1, 0x7E: 448, 0xFE: -448, 0x01: 0x1p-9, 0x08: 0x1p-6, 0x07: 0.875 * 0x1p-6} {
		if got := float64(E4M3Decode(b)); got != want {
			t.Errorf("E4M3Decode(%#02x) = %v, want %v", b, got, want)
		}
	}
}

func TestE4M3RoundTripAll(t *testing.T) {
	for c := 0; c < 256; c++ {
		if c&0x7F == 0x7F {
			continue
		}
		v := E4M3Decode(uint8(c))
		if got := E4M3Encode(v); got != uint8(c) {
			t.Errorf("E4M3Encode(%v) = %#02x, want %#02x", v, got, c)
		}
		if E4M3Decode(E4M3Encode(v)) != v {
			t.Errorf("decode(encode(decode(%#02x))) != %v", c, v)
		}
	}
}

func TestE4M3Midpoints(t *testing.T) {
	for c := 0; c < 0x7E; c++ {
		lo, hi := refE4M3(uint8(c)), refE4M3(uint8(c+1))
		mid := float32((lo + hi) / 2) // exact: at most 5 significant bits
		if float64(mid) != (lo+hi)/2 {
			t.Fatalf("midpoint of %#02x not exact", c)
		}
		even := uint8(c)
		if c&1 == 1 {
			even++
		}
		for _, s := range []uint8{0, 0x80} {
			x := mid
			if s != 0 {
				x = -x
			}
			if got := E4M3Encode(x); got != s|even {
				t.Errorf("E4M3Encode(midpoint %v) = %#02x, want %#02x", x, got, s|even)
			}
		}
		if got := E4M3Encode(math.Nextafter32(mid, 0)); got != uint8(c) {
			t.Errorf("E4M3Encode(just below %v) = %#02x, want %#02x", mid, got, c)
		}
		if got := E4M3Encode(math.Nextafter32(mid, 1000)); got != uint8(c+1) {
			t.Errorf("E4M3Encode(just above %v) = %#02x, want %#02x", mid, got, c+1)
		}
	}
}

func TestE4M3Saturation(t *testing.T) {
	for _, x := range []float32{448, 449, 464, 465, 479, 480, 1e6, math.MaxFloat32, float32(math.Inf(1))} {
		if got := E4M3Encode(x); got != 0x7E {
			t.Errorf("E4M3Encode(%v) = %#02x, want 0x7e", x, got)
		}
		if got := E4M3Encode(-x); got != 0xFE {
			t.Errorf("E4M3Encode(%v) = %#02x, want 0xfe", -x, got)
		}
	}
	if got := E4M3Encode(float32(math.NaN())); got != 0x7F {
		t.Errorf("E4M3Encode(NaN) = %#02x, want 0x7f", got)
	}
	// Below half the smallest subnormal everything rounds to zero; exactly
	// half is a tie that goes to the even code 0.
	for _, x := range []float32{0x1p-10, 0x1p-11, 1e-40} {
		if got := E4M3Encode(x); got != 0 {
			t.Errorf("E4M3Encode(%v) = %#02x, want 0", x, got)
		}
	}
	if got := E4M3Encode(math.Nextafter32(0x1p-10, 1)); got != 1 {
		t.Errorf("E4M3Encode(just above 2^-10) = %#02x, want 1", got)
	}
}

func TestE4M3EncodeRandom(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	n := 1_000_000
	if testing.Short() {
		n = 100_000
	}
	for i := 0; i < n; i++ {
		x := randomFloat(r, -12, 9)
		if x != x {
			continue
		}
		want := nearestCode(math.Abs(float64(x)), refE4M3Pos)
		if math.Signbit(float64(x)) {
			want |= 0x80
		}
		if got := E4M3Encode(x); got != want {
			t.Fatalf("E4M3Encode(%v) = %#02x, want %#02x", x, got, want)
		}
	}
}
