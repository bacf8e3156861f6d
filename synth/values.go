package synth

import (
	"encoding/binary"
	"hash/fnv"
	"math"
	"math/bits"

	"github.com/mmfp4/mmfp4/format"
	"github.com/mmfp4/mmfp4/safetensors"
)

// rng is wyrand: one multiply per 64 random bits, deterministic from its
// seed, and good enough to pick codes.
type rng struct{ s uint64 }

func (r *rng) next() uint64 {
	r.s += 0xa0761d6478bd642f
	hi, lo := bits.Mul64(r.s, r.s^0xe7037ed1a0b428db)
	return hi ^ lo
}

// float returns a uniform value in [0, 1).
func (r *rng) float() float64 { return float64(r.next()>>11) / (1 << 53) }

// normal returns a standard Gaussian value (Box-Muller).
func (r *rng) normal() float64 {
	u := 1 - r.float() // (0, 1]
	return math.Sqrt(-2*math.Log(u)) * math.Cos(2*math.Pi*r.float())
}

// seedFor derives the stream of one piece of one tensor, so every piece can
// be made on any thread and the result depends on the seed alone.
func seedFor(seed uint64, name string, piece int) *rng {
	h := fnv.New64a()
	h.Write([]byte(name))
	r := &rng{s: seed ^ h.Sum64()*0x9e3779b97f4a7c15 ^ uint64(piece)*0xbf58476d1ce4e5b9}
	r.next()
	return r
}

// codeSigma is the spread of the codes, in E2M1 units, before rounding: a
// Gaussian group whose largest value the quantizer maps to 6 has a standard
// deviation of about 6/2.8.
const codeSigma = 2.1

// codeTable maps a random byte to a 4-bit E2M1 code: 7 bits pick the
// magnitude with the probabilities of a Gaussian of codeSigma rounded to the
// nearest E2M1 value (clipped at 6), and the top bit is the sign.
var codeTable, codeRMS = func() (t [256]byte, rms float64) {
	mags := []float64{0, 0.5, 1, 1.5, 2, 3, 4, 6}
	cdf := func(x float64) float64 { return math.Erf(x / (codeSigma * math.Sqrt2)) } // P(|v| < x)
	var ms float64
	slot := 0
	for i, m := range mags {
		hi := 1.0
		if i+1 < len(mags) {
			hi = cdf((m + mags[i+1]) / 2)
		}
		end := int(math.Round(hi * 128))
		for ; slot < end; slot++ {
			t[slot] = byte(i)           // +m
			t[slot+128] = byte(i) | 0x8 // -m
			ms += m * m / 128
		}
	}
	return t, math.Sqrt(ms)
}()

// pairTable maps 16 random bits to a code byte: two codes of codeTable.
var pairTable = func() (t [1 << 16]byte) {
	for i := range t {
		t[i] = codeTable[byte(i)] | codeTable[byte(i>>8)]<<4
	}
	return
}()

// scaleBytes are the E4M3 block scales used: 0.75 to 1.375, so groups differ
// in scale as a quantizer's do.
var scaleBytes = [8]byte{0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a, 0x3b}

var scaleRMS = func() float64 {
	var ms float64
	for _, b := range scaleBytes {
		v := float64(format.E4M3Decode(b))
		ms += v * v / float64(len(scaleBytes))
	}
	return math.Sqrt(ms)
}()

// fillMatrix writes rows [lo, hi) of an MMFP4 matrix whose values have
// standard deviation about std: random codes, random group scales, and row
// scales (within 10% of each other) that set the magnitude.
func fillMatrix(r *rng, t *tensor, g, lo, hi int, codes, scales, rowScale []byte) {
	half, groups := t.k/2, t.k/g
	base := t.std / (codeRMS * scaleRMS)
	for n := lo; n < hi; n++ {
		c := codes[n*half : (n+1)*half]
		i := 0
		for ; i+4 <= len(c); i += 4 {
			v := r.next()
			binary.LittleEndian.PutUint32(c[i:], uint32(pairTable[uint16(v)])|uint32(pairTable[uint16(v>>16)])<<8|
				uint32(pairTable[uint16(v>>32)])<<16|uint32(pairTable[uint16(v>>48)])<<24)
		}
		for ; i < len(c); i++ {
			c[i] = pairTable[uint16(r.next())]
		}
		s := scales[n*groups : (n+1)*groups]
		for j := 0; j < len(s); j += 16 {
			v := r.next()
			for k := j; k < min(j+16, len(s)); k++ {
				s[k] = scaleBytes[v&7]
				v >>= 3
			}
		}
		rs := float32(base * (0.9 + 0.2*r.float()))
		binary.LittleEndian.PutUint32(rowScale[4*n:], math.Float32bits(rs))
	}
}

// fillVector writes a norm gain, router or bias tensor.
func fillVector(r *rng, t *tensor, out []byte) {
	switch t.kind {
	case normBF16:
		for i := 0; i < t.k; i++ {
			binary.LittleEndian.PutUint16(out[2*i:], safetensors.Float32ToBF16(float32(0.9+0.2*r.float())))
		}
	default: // router gate or bias, F32
		for i := 0; i < t.n*t.k; i++ {
			binary.LittleEndian.PutUint32(out[4*i:], math.Float32bits(float32(t.std*r.normal())))
		}
	}
}
