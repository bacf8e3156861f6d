package format

import (
	"fmt"
	"math"
)

// Matrix is one MMFP4-quantized weight W[N,K] (N outputs, K inputs):
//
//	w[n,k] = RowScale[n] * E4M3Decode(Scales[n*K/G + k/G]) * E2M1Decode(code[n,k])
//
// where code[n,k] is the low nibble of Codes[n*K/2 + k/2] for even k and the
// high nibble for odd k.
type Matrix struct {
	N, K, GroupSize int
	Codes           []byte    // N*K/2 bytes, row-major [N][K/2], low nibble = even column
	Scales          []byte    // N*(K/G) E4M3 block scales, row-major [N][K/G]
	RowScale        []float32 // N per-row FP32 scales
}

// ValidGroupSize reports whether g is an allowed group size (32, 64 or 128).
func ValidGroupSize(g int) bool {
	return g == 32 || g == 64 || g == 128
}

// Validate checks that the sizes of m are consistent.
func (m *Matrix) Validate() error {
	switch {
	case m.N <= 0 || m.K <= 0:
		return fmt.Errorf("mmfp4 matrix: shape [%d,%d] must be positive", m.N, m.K)
	case !ValidGroupSize(m.GroupSize):
		return fmt.Errorf("mmfp4 matrix: group size %d: must be 32, 64 or 128", m.GroupSize)
	case m.K%m.GroupSize != 0:
		return fmt.Errorf("mmfp4 matrix: K=%d is not a multiple of the group size %d", m.K, m.GroupSize)
	case len(m.Codes) != m.N*m.K/2:
		return fmt.Errorf("mmfp4 matrix [%d,%d]: %d code bytes, want %d", m.N, m.K, len(m.Codes), m.N*m.K/2)
	case len(m.Scales) != m.N*(m.K/m.GroupSize):
		return fmt.Errorf("mmfp4 matrix [%d,%d] G=%d: %d scales, want %d", m.N, m.K, m.GroupSize, len(m.Scales), m.N*(m.K/m.GroupSize))
	case len(m.RowScale) != m.N:
		return fmt.Errorf("mmfp4 matrix [%d,%d]: %d row scales, want %d", m.N, m.K, len(m.RowScale), m.N)
	}
	return nil
}

// DequantizeRow writes row n of the matrix into dst[:K].
func (m *Matrix) DequantizeRow(n int, dst []float32) {
	g, k := m.GroupSize, m.K
	dst = dst[:k]
	codes := m.Codes[n*k/2 : (n+1)*k/2]
	scales := m.Scales[n*(k/g) : (n+1)*(k/g)]
	for j, s := range scales {
		// The product order matches the quantizer: (row_scale * e4m3) * e2m1.
		d := m.RowScale[n] * E4M3Decode(s)
		out := dst[j*g : (j+1)*g]
		for i, b := range codes[j*g/2 : (j+1)*g/2] {
			out[2*i] = d * E2M1Decode(b&0xF)
			out[2*i+1] = d * E2M1Decode(b>>4)
		}
	}
}

// Dequantize returns the whole matrix as N*K float32 values, row-major.
func (m *Matrix) Dequantize() []float32 {
	w := make([]float32, m.N*m.K)
	for n := 0; n < m.N; n++ {
		m.DequantizeRow(n, w[n*m.K:(n+1)*m.K])
	}
	return w
}

// RelError returns RelError(ref, m.Dequantize()) without holding a
// dequantized copy of the matrix; ref is N*K values, row-major.
func (m *Matrix) RelError(ref []float32) float64 {
	if len(ref) != m.N*m.K {
		panic(fmt.Sprintf("format.Matrix.RelError: %d reference values for a [%d,%d] matrix", len(ref), m.N, m.K))
	}
	var e errSums
	deq := make([]float32, m.K)
	for n := 0; n < m.N; n++ {
		m.DequantizeRow(n, deq)
		e.add(ref[n*m.K:(n+1)*m.K], deq)
	}
	return e.rel()
}

// RelError returns ||ref-got||_2 / ||ref||_2, accumulated in float64. It is 0
// when both are zero and +Inf when only ref is.
func RelError(ref, got []float32) float64 {
	if len(ref) != len(got) {
		panic(fmt.Sprintf("format.RelError: lengths %d and %d differ", len(ref), len(got)))
	}
	var e errSums
	e.add(ref, got)
	return e.rel()
}

// errSums accumulates the squared norms of a difference and of a reference.
type errSums struct{ num, den float64 }

func (e *errSums) add(ref, got []float32) {
	for i, r := range ref {
		d := float64(r) - float64(got[i])
		e.num += d * d
		e.den += float64(r) * float64(r)
	}
}

func (e *errSums) rel() float64 {
	switch {
	case e.num == 0:
		return 0
	case e.den == 0:
		return math.Inf(1)
	}
	return math.Sqrt(e.num / e.den)
}
