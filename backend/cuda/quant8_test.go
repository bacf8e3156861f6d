//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"math"
	"math/rand/v2"
	"testing"
)

// quant8Groups makes n groups of 8 values that reach every path of
// quant8_lane8: plain values over 2^-70..2^70 (some groups outside the
// fast path's range), exact ties (the scale a power of two and values at
// (j + 1/2) scale), values one ulp from a tie, zeros, negative zeros, a
// whole zero group, denormals, infinities and NaNs.
func quant8Groups(r *rand.Rand, n int) []float32 {
	x := make([]float32, 8*n)
	for g := range n {
		v := x[8*g : 8*g+8]
		switch g % 8 {
		case 0, 1, 2: // plain, one magnitude a group
			e := r.IntN(140) - 70
			for i := range v {
				v[i] = float32(r.NormFloat64() * math.Ldexp(1, e))
			}
		case 3, 4: // ties and near-ties: amax 127 * 2^k, so the scale is 2^k
			k := r.IntN(80) - 40
			s := math.Ldexp(1, k)
			v[0] = float32(127 * s)
			for i := 1; i < 8; i++ {
				t := float32((float64(r.IntN(254)-127) + 0.5) * s)
				switch r.IntN(3) {
				case 1:
					t = math.Nextafter32(t, float32(math.Inf(1)))
				case 2:
					t = math.Nextafter32(t, float32(math.Inf(-1)))
				}
				if math.Abs(float64(t)) <= 127*s {
					v[i] = t
				}
			}
		case 5: // zeros and signed zeros beside plain values
			for i := range v {
				switch r.IntN(3) {
				case 0:
					v[i] = 0
				case 1:
					v[i] = float32(math.Copysign(0, -1))
				default:
					v[i] = float32(r.NormFloat64())
				}
			}
		case 6: // denormals, and one large value beside tiny ones
			for i := range v {
				v[i] = math.Float32frombits(uint32(r.IntN(1 << 23)))
			}
			if g%16 == 6 {
				v[3] = 1
			}
		case 7: // a zero group, or one with an infinity or a NaN
			switch g % 24 {
			case 15:
				v[2] = float32(math.Inf(1))
			case 23:
				v[5] = float32(math.NaN())
				v[1] = 3
			}
		}
	}
	return x
}

// quant8_lane8 (the fast path's quotients) writes quant8_lane8_div's codes,
// code sums and scales, bit for bit, on a million groups from every path.
func TestQuant8Lane8FastMatchesDivision(t *testing.T) {
	d := testDevice(t)
	r := testRand(t)
	const n = 1 << 20
	x := quant8Groups(r, n)
	out := make([]uint32, 8*n)
	err := d.Do(func(c *Ctx) error {
		xb, err := upload(c, x)
		if err != nil {
			return err
		}
		ob, err := c.Alloc(4 * len(out))
		if err != nil {
			return err
		}
		k, err := c.Kernel("quant", "quant8_lane8_check")
		if err != nil {
			return err
		}
		if err := c.Launch(k, D1(n/256), D1(256), 0, xb, n, ob); err != nil {
			return err
		}
		return CopyOut(c, out, ob.Ptr)
	})
	if err != nil {
		t.Fatal(err)
	}
	bad, codes := 0, 0
	for g := range n {
		o := out[8*g : 8*g+8]
		if o[0] != o[4] || o[1] != o[5] || o[2] != o[6] || o[3] != o[7] {
			if bad++; bad <= 5 {
				t.Errorf("group %d %v: codes %08x %08x sum %d scale %08x, by division %08x %08x sum %d scale %08x",
					g, x[8*g:8*g+8], o[0], o[1], int32(o[2]), o[3], o[4], o[5], int32(o[6]), o[7])
			}
		}
		if o[4] != 0 || o[5] != 0 {
			codes++
		}
	}
	if bad > 0 {
		t.Errorf("%d of %d groups differ", bad, n)
	}
	if codes < n/2 {
		t.Errorf("only %d of %d groups have a nonzero code", codes, n)
	}
}
