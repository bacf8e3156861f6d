package safetensors

import "math"

// BF16ToFloat32 widens a bfloat16 bit pattern. bfloat16 is the top half of a
// float32, so this is exact.
func BF16ToFloat32(h uint16) float32 {
	return math.Float32frombits(uint32(h) << 16)
}

// Float32ToBF16 rounds to the nearest bfloat16, ties to even. NaN stays NaN.
func Float32ToBF16(f float32) uint16 {
	b := math.Float32bits(f)
	if f != f {
		// Truncating could clear every mantissa bit left and turn NaN into
		// Inf, so force the quiet bit.
		return uint16(b>>16) | 0x0040
	}
	// Adding 0x7FFF rounds half down, plus the lowest kept bit turns that
	// into half to even. A carry into the exponent is correct rounding,
	// including the overflow of the largest finite values to Inf.
	b += 0x7FFF + (b>>16)&1
	return uint16(b >> 16)
}

// F16ToFloat32 widens an IEEE 754 half-precision bit pattern, exactly,
// including subnormals, infinities and NaN.
func F16ToFloat32(h uint16) float32 {
	sign := uint32(h&0x8000) << 16
	exp := uint32(h>>10) & 0x1F
	mant := uint32(h & 0x3FF)
	switch {
	case exp == 0:
		// Zero or subnormal: mant * 2^-24, exact in float32.
		v := float32(mant) * (1.0 / (1 << 24))
		return math.Float32frombits(math.Float32bits(v) | sign)
	case exp == 0x1F:
		// Inf (mant == 0) or NaN with its payload kept.
		return math.Float32frombits(sign | 0x7F800000 | mant<<13)
	default:
		// Rebias the exponent from 15 to 127.
		return math.Float32frombits(sign | (exp+127-15)<<23 | mant<<13)
	}
}

// Float32ToF16 rounds to the nearest IEEE half, ties to even. Values beyond
// the half range become ±Inf; NaN stays NaN.
func Float32ToF16(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int(b>>23) & 0xFF
	mant := b & 0x7FFFFF

	if exp == 0xFF {
		if mant != 0 {
			// Keep what fits of the payload; the quiet bit keeps it NaN.
			return sign | 0x7C00 | 0x0200 | uint16(mant>>13)
		}
		return sign | 0x7C00
	}
	e := exp - 127 + 15 // exponent rebiased for half
	switch {
	case e >= 0x1F:
		return sign | 0x7C00
	case e >= 1:
		// Normal: drop 13 mantissa bits. A carry out of the mantissa moves
		// into the exponent, which is the correct rounded result (up to Inf).
		return sign | roundShift(uint32(e)<<23|mant, 13)
	case e >= -10:
		// Subnormal half: the value is (1.mant) * 2^(e-15); in units of the
		// smallest subnormal 2^-24 that is (mant|1<<23) >> (14-e).
		return sign | roundShift(mant|1<<23, uint(14-e))
	default:
		// Below half the smallest subnormal (2^-25): rounds to zero.
		return sign
	}
}

// roundShift returns x >> s rounded to nearest, ties to even (1 <= s < 32).
func roundShift(x uint32, s uint) uint16 {
	q := x >> s
	rem := x & (1<<s - 1)
	half := uint32(1) << (s - 1)
	if rem > half || rem == half && q&1 == 1 {
		q++
	}
	return uint16(q)
}
