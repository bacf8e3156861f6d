package cuda

import (
	"math"
	"math/rand/v2"
	"testing"

	"github.com/mmfp4/mmfp4/format"
)

// The GEMV kernels decode E2M1 codes with byte permutes and dp4a. These are
// models of the two PTX instructions, written from the PTX ISA text, so that
// the arithmetic of the decode (tables, selectors, the +128 offset) is
// checked here against the format's own decoder; the GPU tests then check
// that the hardware agrees.

// prmtModel is prmt.b32 in its default mode.
func prmtModel(a, b, sel uint32) uint32 {
	src := uint64(b)<<32 | uint64(a)
	var d uint32
	for i := 0; i < 4; i++ {
		s := sel >> (4 * i) & 0xF
		byt := uint32(src >> (8 * (s & 7)) & 0xFF)
		if s&8 != 0 {
			if byt&0x80 != 0 {
				byt = 0xFF
			} else {
				byt = 0
			}
		}
		d |= byt << (8 * i)
	}
	return d
}

// dp4aModel is dp4a with a's bytes unsigned (aSigned false) or signed, b's signed.
func dp4aModel(a, b uint32, c int32, aSigned bool) int32 {
	for i := 0; i < 4; i++ {
		x := int32(a >> (8 * i) & 0xFF)
		if aSigned {
			x = int32(int8(x))
		}
		c += x * int32(int8(b>>(8*i)))
	}
	return c
}

const e2m1Lo, e2m1Hi = 0x03020100, 0x0C080604

func biasedModel(sel uint32) uint32 {
	pos := prmtModel(e2m1Lo, e2m1Hi, sel)
	neg := prmtModel(e2m1Lo, e2m1Hi, sel^0x8888)
	return pos + 0x80808080 - neg
}

// Every code in every byte position: the biased word holds 128 + 2*e2m1.
func TestBiasedDecodeModel(t *testing.T) {
	for code := 0; code < 16; code++ {
		for pos := 0; pos < 4; pos++ {
			for _, other := range []uint32{0x0000, 0xFFFF, 0x7878, 0x8F8F} {
				sel := other&^(0xF<<(4*pos)) | uint32(code)<<(4*pos)
				w := biasedModel(sel)
				for i := 0; i < 4; i++ {
					c := sel >> (4 * i) & 0xF
					if got, want := int(w>>(8*i)&0xFF)-128, int(format.E2M1Doubled[c]); got != want {
						t.Fatalf("sel %#x byte %d (code %d): %d, want %d", sel, i, c, got, want)
					}
				}
			}
		}
	}
}

// One 32-bit word of codes against 8 activations, both decode forms,
// against the plain sum of products.
func TestDot8Models(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for it := 0; it < 20000; it++ {
		q := r.Uint32()
		x0, x1 := r.Uint32(), r.Uint32()
		if it < 16 { // extremes: all -127 / all 127 / all -128 bytes
			x0 = []uint32{0x81818181, 0x7F7F7F7F, 0x80808080, 0}[it%4]
			x1 = x0
			q = []uint32{0x77777777, 0xFFFFFFFF, 0x88888888, 0x0F0F0F0F}[it/4]
		}
		var want int32
		for i := 0; i < 8; i++ {
			xi := x0
			if i >= 4 {
				xi = x1
			}
			want += int32(format.E2M1Doubled[q>>(4*i)&0xF]) * int32(int8(xi>>(8*(i%4))))
		}
		// Offset form: start at -128 * sum(x).
		var sum int32
		for i := 0; i < 4; i++ {
			sum += int32(int8(x0>>(8*i))) + int32(int8(x1>>(8*i)))
		}
		acc := -128 * sum
		acc = dp4aModel(biasedModel(q), x0, acc, false)
		acc = dp4aModel(biasedModel(q>>16), x1, acc, false)
		if acc != want {
			t.Fatalf("biased: q=%#x x=%#x,%#x: %d, want %d", q, x0, x1, acc, want)
		}
		// Split form.
		n := q ^ 0x88888888
		var p, m int32
		p = dp4aModel(prmtModel(e2m1Lo, e2m1Hi, q), x0, p, true)
		p = dp4aModel(prmtModel(e2m1Lo, e2m1Hi, q>>16), x1, p, true)
		m = dp4aModel(prmtModel(e2m1Lo, e2m1Hi, n), x0, m, true)
		m = dp4aModel(prmtModel(e2m1Lo, e2m1Hi, n>>16), x1, m, true)
		if p-m != want {
			t.Fatalf("split: q=%#x x=%#x,%#x: %d, want %d", q, x0, x1, p-m, want)
		}
	}
}

// The kernels' E4M3 decode: the magnitude bits as float bits, times 2^120.
func TestE4M3DecodeModel(t *testing.T) {
	for b := 0; b < 256; b++ {
		v := math.Float32frombits(uint32(b&0x7F)<<20) * 0x1p120
		if b&0x7F == 0x7F {
			v = float32(math.NaN())
		}
		if b&0x80 != 0 {
			v = -v
		}
		want := format.E4M3Decode(uint8(b))
		if math.Float32bits(v) != math.Float32bits(want) && !(v != v && want != want) {
			t.Fatalf("e4m3 %#02x: %g, want %g", b, v, want)
		}
	}
}
