package safetensors

import (
	"math"
	"testing"
)

// Expected values are built with math.Ldexp from the bit layout, not taken
// from the code under test.
func TestBF16ToFloat32Known(t *testing.T) {
	cases := []struct {
		h    uint16
		want float64
	}{
		{0x0000, 0},
		{0x3F80, 1},
		{0xBF80, -1},
		{0xC000, -2},
		{0x3F00, 0.5},
		{0x3E00, 0.125},
		{0x4049, 3.140625},            // 2 * (1 + 73/128)
		{0x0001, math.Ldexp(1, -133)}, // smallest subnormal
		{0x0080, math.Ldexp(1, -126)}, // smallest normal
		{0x7F7F, math.Ldexp(2-math.Ldexp(1, -7), 127)}, // largest finite
		{0x7F80, math.Inf(1)},
		{0xFF80, math.Inf(-1)},
	}
	for _, c := range cases {
		if got := BF16ToFloat32(c.h); float64(got) != c.want {
			t.Errorf("BF16ToFloat32(%#04x) = %g, want %g", c.h, got, c.want)
		}
	}
	if got := BF16ToFloat32(0x8000); got != 0 || !math.Signbit(float64(got)) {
		t.Errorf("BF16ToFloat32(0x8000) = %g, want -0", got)
	}
	for _, h := range []uint16{0x7FC0, 0xFFC0, 0x7F81} {
		if got := BF16ToFloat32(h); !math.IsNaN(float64(got)) {
			t.Errorf("BF16ToFloat32(%#04x) = %g, want NaN", h, got)
		}
	}
}

func TestF16ToFloat32Known(t *testing.T) {
	cases := []struct {
		h    uint16
		want float64
	}{
		{0x0000, 0},
		{0x3C00, 1},
		{0xC000, -2},
		{0x3800, 0.5},
		{0x3555, 1365.0 / 4096},             // (1 + 341/1024) / 4
		{0x0001, math.Ldexp(1, -24)},        // smallest subnormal
		{0x8001, -math.Ldexp(1, -24)},       // and negative
		{0x03FF, 1023 * math.Ldexp(1, -24)}, // largest subnormal
		{0x0400, math.Ldexp(1, -14)},        // smallest normal
		{0x7BFF, 65504},                     // largest finite
		{0x7C00, math.Inf(1)},
		{0xFC00, math.Inf(-1)},
	}
	for _, c := range cases {
		if got := F16ToFloat32(c.h); float64(got) != c.want {
			t.Errorf("F16ToFloat32(%#04x) = %g, want %g", c.h, got, c.want)
		}
	}
	if got := F16ToFloat32(0x8000); got != 0 || !math.Signbit(float64(got)) {
		t.Errorf("F16ToFloat32(0x8000) = %g, want -0", got)
	}
	for _, h := range []uint16{0x7E00, 0xFE00, 0x7C01} {
		if got := F16ToFloat32(h); !math.IsNaN(float64(got)) {
			t.Errorf("F16ToFloat32(%#04x) = %g, want NaN", h, got)
		}
	}
}

func TestFloat32ToF16Known(t *testing.T) {
	cases := []struct {
		f    float64
		want uint16
	}{
		{1, 0x3C00},
		{-2, 0xC000},
		{65504, 0x7BFF},
		{65519, 0x7BFF}, // just below the midpoint to Inf
		{65520, 0x7C00}, // the midpoint: ties to even, which is Inf
		{1e6, 0x7C00},   // overflow
		{-1e6, 0xFC00},
		{math.Inf(1), 0x7C00},
		{math.Ldexp(1, -24), 0x0001},
		{math.Ldexp(1, -25), 0x0000},   // half the smallest subnormal: tie to even 0
		{math.Ldexp(1.5, -25), 0x0001}, // above the tie
		{math.Ldexp(1, -30), 0x0000},
		{-math.Ldexp(1, -30), 0x8000},                     // keeps the sign
		{1 + math.Ldexp(1, -11), 0x3C00},                  // tie between 0x3C00 and 0x3C01: even
		{1 + 3*math.Ldexp(1, -11), 0x3C02},                // tie between 0x3C01 and 0x3C02: even
		{math.Ldexp(1, -14) - math.Ldexp(1, -25), 0x0400}, // rounds up into the normals
	}
	for _, c := range cases {
		if got := Float32ToF16(float32(c.f)); got != c.want {
			t.Errorf("Float32ToF16(%g) = %#04x, want %#04x", c.f, got, c.want)
		}
	}
}

func TestFloat32ToBF16Known(t *testing.T) {
	cases := []struct {
		f    float64
		want uint16
	}{
		{1, 0x3F80},
		{-2, 0xC000},
		{1 + math.Ldexp(1, -8), 0x3F80},   // tie: even
		{1 + 3*math.Ldexp(1, -8), 0x3F82}, // tie: even
		{1 + math.Ldexp(1, -9), 0x3F80},   // below the tie
		{math.MaxFloat32, 0x7F80},         // rounds past the largest bf16
		{math.Inf(-1), 0xFF80},
	}
	for _, c := range cases {
		if got := Float32ToBF16(float32(c.f)); got != c.want {
			t.Errorf("Float32ToBF16(%g) = %#04x, want %#04x", c.f, got, c.want)
		}
	}
}

func TestNaNStaysNaN(t *testing.T) {
	// 0x7F800001 has its only mantissa bit where truncation drops it.
	for _, b := range []uint32{0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7F802000} {
		f := math.Float32frombits(b)
		if h := Float32ToBF16(f); h&0x7F80 != 0x7F80 || h&0x7F == 0 {
			t.Errorf("Float32ToBF16(NaN %#08x) = %#04x, not a NaN", b, h)
		}
		if h := Float32ToF16(f); h&0x7C00 != 0x7C00 || h&0x3FF == 0 {
			t.Errorf("Float32ToF16(NaN %#08x) = %#04x, not a NaN", b, h)
		}
	}
}

func TestBF16RoundTripAll(t *testing.T) {
	for i := range 1 << 16 {
		h := uint16(i)
		f := BF16ToFloat32(h)
		if math.IsNaN(float64(f)) {
			continue
		}
		if got := Float32ToBF16(f); got != h {
			t.Errorf("Float32ToBF16(BF16ToFloat32(%#04x)) = %#04x", h, got)
		}
	}
}

func TestF16RoundTripAll(t *testing.T) {
	for i := range 1 << 16 {
		h := uint16(i)
		f := F16ToFloat32(h)
		if math.IsNaN(float64(f)) {
			continue
		}
		if got := Float32ToF16(f); got != h {
			t.Errorf("Float32ToF16(F16ToFloat32(%#04x)) = %#04x", h, got)
		}
	}
}

// checkMidpoints checks rounding between every pair of adjacent finite
// values h, h+1 (both signs): the exact midpoint goes to the even pattern,
// one float32 step either side goes to the nearer one.
func checkMidpoints(t *testing.T, name string, maxFinite uint16, widen func(uint16) float32, narrow func(float32) uint16) {
	t.Helper()
	for h := uint16(0); h < maxFinite; h++ {
		lo, hi := float64(widen(h)), float64(widen(h+1))
		mid := float32((lo + hi) / 2)
		if float64(mid) != (lo+hi)/2 {
			t.Fatalf("%s: midpoint of %#04x not exact in float32", name, h)
		}
		even := h
		if h&1 == 1 {
			even = h + 1
		}
		for _, sign := range []float32{1, -1} {
			sbit := uint16(0)
			if sign < 0 {
				sbit = 0x8000
			}
			m := sign * mid
			if got := narrow(m); got != even|sbit {
				t.Errorf("%s(%g) = %#04x, want %#04x (tie)", name, m, got, even|sbit)
			}
			up := math.Nextafter32(m, sign*float32(math.Inf(1)))
			if got := narrow(up); got != (h+1)|sbit {
				t.Errorf("%s(%g) = %#04x, want %#04x", name, up, got, (h+1)|sbit)
			}
			down := math.Nextafter32(m, 0)
			if got := narrow(down); got != h|sbit {
				t.Errorf("%s(%g) = %#04x, want %#04x", name, down, got, h|sbit)
			}
		}
	}
}

func TestBF16RoundingMidpoints(t *testing.T) {
	checkMidpoints(t, "Float32ToBF16", 0x7F7F, BF16ToFloat32, Float32ToBF16)
	// Between the largest finite bf16 and where Inf would be.
	top := float32(math.Ldexp(2-math.Ldexp(1, -8), 127))
	if got := Float32ToBF16(top); got != 0x7F80 {
		t.Errorf("Float32ToBF16(%g) = %#04x, want Inf", top, got)
	}
	if got := Float32ToBF16(math.Nextafter32(top, 0)); got != 0x7F7F {
		t.Errorf("Float32ToBF16(just below %g) = %#04x, want 0x7f7f", top, got)
	}
}

func TestF16RoundingMidpoints(t *testing.T) {
	checkMidpoints(t, "Float32ToF16", 0x7BFF, F16ToFloat32, Float32ToF16)
}
