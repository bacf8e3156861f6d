package cpu

import (
	"math"
	"math/bits"
	"sync"
)

// Float32 kernels with a pure-Go reference and SIMD forms per kernel
// family (floatk_amd64.go). The SIMD forms round differently (fused
// multiply-adds, other summation orders, a polynomial exp), so their tests
// hold them to derived bounds instead of equality.

// slicePool recycles scratch slices, one pool per power-of-two capacity so
// that a request is not handed a smaller slice to throw away: a fresh
// allocation of a few hundred KB comes from new pages of memory (or must
// be zeroed), and that can cost more than the work done in it.
type slicePool[T any] [40]sync.Pool

// get returns a pooled slice of n elements, not zeroed; give it back with
// put.
func (p *slicePool[T]) get(n int) *[]T {
	class := bits.Len(uint(max(n, 1) - 1))
	bp, _ := p[class].Get().(*[]T)
	if bp == nil {
		buf := make([]T, 1<<class)
		bp = &buf
	}
	*bp = (*bp)[:n]
	return bp
}

func (p *slicePool[T]) put(bp *[]T) { p[bits.Len(uint(cap(*bp)-1))].Put(bp) }

var (
	floatBufs slicePool[float32]
	int8Bufs  slicePool[int8]
	int32Bufs slicePool[int32]
	uint32Buf slicePool[uint32]
)

// getFloats is floatBufs.get.
func getFloats(n int) *[]float32 { return floatBufs.get(n) }

// dotF32 is sum_k a[k]*b[k] over len(a).
func (b *Backend) dotF32(x, y []float32) float32 {
	y = y[:len(x)]
	n := len(x) &^ 15
	if n > 0 {
		if s, ok := dotF32SIMD(b.isa, x[:n], y[:n]); ok {
			return s + dot(x[n:], y[n:])
		}
	}
	return dot(x, y)
}

// dots4F32 sets out[i] = q . rows[i*stride : i*stride+len(q)] for i < 4.
func (b *Backend) dots4F32(q, rows []float32, stride int, out *[4]float32) {
	n := len(q) &^ 15
	_ = rows[3*stride+len(q)-1]
	if n > 0 && dots4F32SIMD(b.isa, q[:n], rows, stride, out) {
		for i := range out {
			out[i] += dot(q[n:], rows[i*stride+n:i*stride+len(q)])
		}
		return
	}
	for i := range out {
		out[i] = dot(q, rows[i*stride:i*stride+len(q)])
	}
}

// axpy4F32 adds sum_i coef[i] * rows[i*stride : i*stride+len(dst)] to dst.
func (b *Backend) axpy4F32(dst, rows []float32, stride int, coef *[4]float32) {
	n := len(dst) &^ 15
	_ = rows[3*stride+len(dst)-1]
	if n == 0 || !axpy4F32SIMD(b.isa, dst[:n], rows, stride, coef) {
		n = 0
	}
	for i, c := range coef {
		axpy(dst[n:], c, rows[i*stride+n:i*stride+len(dst)])
	}
}

// maxF32 is the largest element of x (a NaN may or may not be returned).
func (b *Backend) maxF32(x []float32) float32 {
	m := float32(math.Inf(-1))
	n := len(x) &^ 15
	if n > 0 {
		if v, ok := maxF32SIMD(b.isa, x[:n]); ok {
			m = v
		} else {
			n = 0
		}
	}
	for _, v := range x[n:] {
		m = max(m, v)
	}
	return m
}

// bf16ToF32 widens bfloat16 values (exactly: a bfloat16 is the high half
// of a float32).
func (b *Backend) bf16ToF32(dst []float32, src []uint16) {
	src = src[:len(dst)]
	n := len(dst) &^ 15
	if n == 0 || !bf16ToF32SIMD(b.isa, dst[:n], src[:n]) {
		n = 0
	}
	for i, v := range src[n:] {
		dst[n+i] = math.Float32frombits(uint32(v) << 16)
	}
}

// expF32 sets dst[i] = exp(src[i] - m) and returns the sum of dst.
func (b *Backend) expF32(dst, src []float32, m float32) float32 {
	src = src[:len(dst)]
	n := len(dst) &^ 15
	var sum float32
	if n > 0 {
		if s, ok := expF32SIMD(b.isa, dst[:n], src[:n], m); ok {
			sum = s
		} else {
			n = 0
		}
	}
	return sum + expF32Go(dst[n:], src[n:], m)
}

// expF32Go is the reference for expF32.
func expF32Go(dst, src []float32, m float32) float32 {
	var sum float32
	for i, v := range src[:len(dst)] {
		dst[i] = float32(math.Exp(float64(v - m)))
		sum += dst[i]
	}
	return sum
}

// siluMulF32 sets dst[i] = silu(g[i]) * u[i].
func (b *Backend) siluMulF32(dst, g, u []float32) {
	g, u = g[:len(dst)], u[:len(dst)]
	n := len(dst) &^ 15
	if n == 0 || !siluMulF32SIMD(b.isa, dst[:n], g[:n], u[:n]) {
		n = 0
	}
	for i := n; i < len(dst); i++ {
		dst[i] = silu(g[i]) * u[i]
	}
}
