// Package format is the MMFP4 weight codec: FP4 E2M1 element codes, FP8 E4M3
// block scales, packing and the quantizer.
package format

import "math"

// e2m1Values holds the value of each 4-bit E2M1 code: bit 3 is the sign,
// bits 0-2 index the magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}.
var e2m1Values = [16]float32{
	0, 0.5, 1, 1.5, 2, 3, 4, 6,
	// A Go constant -0.0 is plain 0, so spell out the negative zero.
	float32(math.Copysign(0, -1)), -0.5, -1, -1.5, -2, -3, -4, -6,
}

// E2M1Doubled holds twice the value of each E2M1 code. Every entry is an
// exact int8, so a group's dot product with int8 activations is exact in int32.
var E2M1Doubled = [16]int8{0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12}

// E2M1Decode returns the value of a 4-bit E2M1 code (only the low 4 bits of
// code are used).
func E2M1Decode(code uint8) float32 {
	return e2m1Values[code&0xF]
}

// E2M1Encode rounds x to the nearest E2M1 value, ties to the even code.
// Magnitudes above 6 saturate to 6 and NaN gives 0. A value that rounds to
// zero, negative ones included, gives code 0, so code 8 is never produced.
func E2M1Encode(x float32) uint8 {
	a := math.Float32frombits(math.Float32bits(x) &^ (1 << 31))
	// The magnitude code counts the midpoints between neighbouring
	// magnitudes that a lies above. At a midpoint, > or >= sends it to the
	// even code. NaN compares false everywhere and gets 0. Branch-free,
	// because the quantizer calls this for every weight.
	m := b2u(a > 0.25) + b2u(a >= 0.75) + b2u(a > 1.25) + b2u(a >= 1.75) +
		b2u(a > 2.5) + b2u(a >= 3.5) + b2u(a > 5)
	return m | (b2u(x < 0)&b2u(m != 0))<<3
}

// b2u compiles to a flag move, not a branch.
func b2u(b bool) uint8 {
	if b {
		return 1
	}
	return 0
}

// E4M3Max is the largest finite FP8 E4M3FN value.
const E4M3Max = 448

// e4m3NaN is the positive NaN code; 0xFF is the negative one.
const e4m3NaN = 0x7F

var e4m3Values = func() (t [256]float32) {
	for b := range t {
		t[b] = e4m3FromBits(uint8(b))
	}
	return t
}()

// e4m3FromBits decodes OCP FP8 E4M3FN: 1 sign bit, 4 exponent bits with
// bias 7, 3 mantissa bits, subnormals at exponent 0, no infinities, and
// S.1111.111 is NaN.
func e4m3FromBits(b uint8) float32 {
	e := int(b>>3) & 0xF
	m := int(b & 7)
	var v float64
	switch {
	case e == 15 && m == 7:
		return float32(math.NaN())
	case e == 0:
		v = math.Ldexp(float64(m), -9) // m/8 * 2^(1-7)
	default:
		v = math.Ldexp(float64(8+m), e-10) // (1+m/8) * 2^(e-7)
	}
	if b&0x80 != 0 {
		v = -v
	}
	return float32(v)
}

// E4M3Decode returns the value of an FP8 E4M3FN byte. 0x7F and 0xFF are NaN.
func E4M3Decode(b uint8) float32 {
	return e4m3Values[b]
}

// E4M3Encode rounds x to the nearest E4M3FN value, ties to even. Finite
// values beyond ±448 saturate to ±448 (never NaN), and NaN gives 0x7F.
// The sign is kept, so negative values that round to zero give 0x80.
func E4M3Encode(x float32) uint8 {
	if x != x {
		return e4m3NaN
	}
	var sign uint8
	a := float64(x)
	if math.Signbit(a) {
		sign = 0x80
		a = -a
	}
	if a >= E4M3Max {
		return sign | 0x7E
	}
	frac, exp := math.Frexp(a) // a = frac * 2^exp, frac in [0.5, 1)
	e := exp - 1               // a = f * 2^e with f in [1, 2)
	if a == 0 || e < -6 {
		// Subnormal range: the grid step is 2^-9, and a count of 8 steps is
		// exactly the smallest normal, code 0x08.
		return sign | uint8(math.RoundToEven(math.Ldexp(a, 9)))
	}
	// Normal: round the mantissa to 3 bits. A carry (m == 8) moves into the
	// exponent field, which is what adding it to the code does.
	m := int(math.RoundToEven((2*frac - 1) * 8))
	// a < 448 here, so the result is at most 448 (0x7E).
	return sign | uint8((e+7)<<3+m)
}
