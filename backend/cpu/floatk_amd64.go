package cpu

import "unsafe"

//go:noescape
func dotF32AVX512(a, b *float32, n int) float32

//go:noescape
func dots4F32AVX512(q, rows *float32, stride, n int, out *float32)

//go:noescape
func axpy4F32AVX512(dst, rows *float32, stride, n int, coef *float32)

//go:noescape
func expF32AVX512(dst, src *float32, n int, m float32) float32

//go:noescape
func siluMulF32AVX512(dst, gate, up *float32, n int)

//go:noescape
func maxF32AVX512(x *float32, n int) float32

//go:noescape
func maxF32AVX2(x *float32, n int) float32

//go:noescape
func sgemm4x64AVX512(a *float32, aStride int, b *float32, bStride int, n int, c *float32, cStride int, accumulate int)

//go:noescape
func scoresHx4AVX512(q *float32, qStride int, qpe *float32, qpeStride int, heads int, lat, kpe *float32, rowStride, r, dr int, out *float32, outStride int, scale float32)

//go:noescape
func axpyHx4AVX512(out *float32, heads int, lat *float32, r, rowStride int, p *float32, pStride int)

//go:noescape
func bf16ToF32AVX512(dst *float32, src *uint16, n int)

//go:noescape
func bf16ToF32AVX2(dst *float32, src *uint16, n int)

//go:noescape
func dotF32AVX2(a, b *float32, n int) float32

//go:noescape
func dots4F32AVX2(q, rows *float32, stride, n int, out *float32)

//go:noescape
func axpy4F32AVX2(dst, rows *float32, stride, n int, coef *float32)

//go:noescape
func expF32AVX2(dst, src *float32, n int, m float32) float32

//go:noescape
func siluMulF32AVX2(dst, gate, up *float32, n int)

// The SIMD forms below take lengths that are multiples of 16 (callers
// check) and report false where family i has no assembly.

func dotF32SIMD(i isa, x, y []float32) (float32, bool) {
	switch i {
	case isaAVX512:
		return dotF32AVX512(&x[0], &y[0], len(x)), true
	case isaAVXVNNI, isaAVX2:
		return dotF32AVX2(&x[0], &y[0], len(x)), true
	}
	return 0, false
}

func dots4F32SIMD(i isa, q, rows []float32, stride int, out *[4]float32) bool {
	switch i {
	case isaAVX512:
		dots4F32AVX512(&q[0], &rows[0], stride, len(q), &out[0])
		return true
	case isaAVXVNNI, isaAVX2:
		dots4F32AVX2(&q[0], &rows[0], stride, len(q), &out[0])
		return true
	}
	return false
}

func axpy4F32SIMD(i isa, dst, rows []float32, stride int, coef *[4]float32) bool {
	switch i {
	case isaAVX512:
		axpy4F32AVX512(&dst[0], &rows[0], stride, len(dst), &coef[0])
		return true
	case isaAVXVNNI, isaAVX2:
		axpy4F32AVX2(&dst[0], &rows[0], stride, len(dst), &coef[0])
		return true
	}
	return false
}

func expF32SIMD(i isa, dst, src []float32, m float32) (float32, bool) {
	switch i {
	case isaAVX512:
		return expF32AVX512(&dst[0], &src[0], len(dst), m), true
	case isaAVXVNNI, isaAVX2:
		return expF32AVX2(&dst[0], &src[0], len(dst), m), true
	}
	return 0, false
}

func siluMulF32SIMD(i isa, dst, g, u []float32) bool {
	switch i {
	case isaAVX512:
		siluMulF32AVX512(&dst[0], &g[0], &u[0], len(dst))
		return true
	case isaAVXVNNI, isaAVX2:
		siluMulF32AVX2(&dst[0], &g[0], &u[0], len(dst))
		return true
	}
	return false
}

func maxF32SIMD(i isa, x []float32) (float32, bool) {
	switch i {
	case isaAVX512:
		return maxF32AVX512(&x[0], len(x)), true
	case isaAVXVNNI, isaAVX2:
		return maxF32AVX2(&x[0], len(x)), true
	}
	return 0, false
}

func hasSgemm(i isa) bool { return i == isaAVX512 }

// sgemm4x64 is sgemm4x64AVX512 on slices (checked for length), writing c.
func sgemm4x64(a []float32, aStride int, b []float32, bStride, n int, c []float32, cStride int) {
	sgemm4x64Acc(a, aStride, b, bStride, n, c, cStride, false)
}

// sgemm4x64Acc is sgemm4x64, adding to c when accumulate is set.
func sgemm4x64Acc(a []float32, aStride int, b []float32, bStride, n int, c []float32, cStride int, accumulate bool) {
	_, _ = a[3*aStride+n-1], c[3*cStride+63]
	if n > 0 {
		_ = b[(n-1)*bStride+63]
	}
	acc := 0
	if accumulate {
		acc = 1
	}
	sgemm4x64AVX512(&a[0], aStride, &b[0], bStride, n, &c[0], cStride, acc)
}

// hasHeadKernels reports whether family i has scoresHx4 and axpyHx4 for
// these sizes.
func hasHeadKernels(i isa, r, dr int) bool {
	return i == isaAVX512 && r%16 == 0 && dr%16 == 0 && r > 0 && dr > 0
}

// scoresHx4 is scoresHx4AVX512 on slices: q and qpe hold heads rows at
// their strides, lat and kpe four rows of r and dr values rowStride apart,
// out heads rows of at least four at outStride; the scores are multiplied
// by scale.
func scoresHx4(q []float32, qStride int, qpe []float32, qpeStride, heads int, lat, kpe []float32, rowStride, r, dr int, out []float32, outStride int, scale float32) {
	_, _ = q[(heads-1)*qStride+r-1], qpe[(heads-1)*qpeStride+dr-1]
	_, _, _ = lat[3*rowStride+r-1], kpe[3*rowStride+dr-1], out[(heads-1)*outStride+3]
	scoresHx4AVX512(&q[0], qStride, &qpe[0], qpeStride, heads, &lat[0], &kpe[0], rowStride, r, dr, &out[0], outStride, scale)
}

// axpyHx4 is axpyHx4AVX512 on slices: out holds heads rows of r, lat four
// rows of r rowStride apart, p heads rows of at least four at pStride.
func axpyHx4(out []float32, heads int, lat []float32, r, rowStride int, p []float32, pStride int) {
	_, _, _ = out[heads*r-1], lat[3*rowStride+r-1], p[(heads-1)*pStride+3]
	axpyHx4AVX512(&out[0], heads, &lat[0], r, rowStride, &p[0], pStride)
}

func bf16ToF32SIMD(i isa, dst []float32, src []uint16) bool {
	switch i {
	case isaAVX512:
		bf16ToF32AVX512(&dst[0], &src[0], len(dst))
		return true
	case isaAVXVNNI, isaAVX2:
		bf16ToF32AVX2(&dst[0], &src[0], len(dst))
		return true
	}
	return false
}

//go:noescape
func scoresBF16x4AVX512(q *float32, qStride, heads int, rows *uint16, rowStride, w int, out *float32, outStride int, scale float32)

//go:noescape
func scoresBF16RowsAVX512(q *float32, qStride int, rows *uint16, rowStride, n, w int, out *float32, outStride int, scale float32, pf *uint16, pfEnd uintptr)

//go:noescape
func axpyBF16PanelsAVX512(p *float32, pStride int, rows *uint16, rowStride, n, panels int, out *float32, outStride int, alpha *float32)

//go:noescape
func interleave32AVX512(dst, src *float32, n int)

// axpyBF16Panels is axpyBF16PanelsAVX512 on slices: p holds four rows of n
// coefficients pStride apart, rows n rows of at least 64*panels bf16
// values rowStride apart, out four rows of 64*panels at outStride (each
// block of 32 in evenOdd32 order), scaled by alpha[h] and added to, or
// overwritten when alpha is nil.
func axpyBF16Panels(p []float32, pStride int, rows []uint16, rowStride, n, panels int, out []float32, outStride int, alpha []float32) {
	if panels <= 0 {
		return
	}
	_ = out[3*outStride+64*panels-1]
	if n > 0 {
		_, _ = p[3*pStride+n-1], rows[(n-1)*rowStride+64*panels-1]
	}
	var a *float32
	if alpha != nil {
		a = &alpha[:4][0]
	}
	axpyBF16PanelsAVX512(&p[0], pStride, &rows[0], rowStride, n, panels, &out[0], outStride, a)
}

// interleave32 writes each block of 32 values of src (in evenOdd32 order)
// to dst in column order; len(src) is a multiple of 32.
func interleave32(dst, src []float32) {
	if len(src) == 0 {
		return
	}
	_ = dst[len(src)-1]
	interleave32AVX512(&dst[0], &src[0], len(src))
}

//go:noescape
func softmaxRowsAVX512(sc *float32, scStride, heads, n int, m, l, alpha *float32)

// hasBF16Attention reports whether family i reads a bf16 cache in place in
// decode attention for these sizes: heads in fours, the latent in panels
// of 64 and each cached row (latent and rotary key) in blocks of 32.
func hasBF16Attention(i isa, heads, r, dr int) bool {
	return i == isaAVX512 && heads > 0 && heads%4 == 0 && r > 0 && r%64 == 0 && dr >= 0 && dr%32 == 0
}

// scoresBF16x4 is scoresBF16x4AVX512 on slices: q holds heads rows of w
// values qStride apart, each block of 32 in even-then-odd order (evenOdd32),
// rows four rows of w bf16 values rowStride apart, out heads rows of at
// least four at outStride.
func scoresBF16x4(q []float32, qStride, heads int, rows []uint16, rowStride, w int, out []float32, outStride int, scale float32) {
	_, _, _ = q[(heads-1)*qStride+w-1], rows[3*rowStride+w-1], out[(heads-1)*outStride+3]
	scoresBF16x4AVX512(&q[0], qStride, heads, &rows[0], rowStride, w, &out[0], outStride, scale)
}

// scoresBF16Rows is scoresBF16RowsAVX512 on slices: q holds four heads'
// rows of w values qStride apart (in evenOdd32 order), rows n rows (a
// multiple of 4) of w bf16 values rowStride apart, out four rows of n at
// outStride; the whole 64-byte lines of pf are prefetched on the way.
func scoresBF16Rows(q []float32, qStride int, rows []uint16, rowStride, n, w int, out []float32, outStride int, scale float32, pf []uint16) {
	if n <= 0 {
		return
	}
	_, _, _ = q[3*qStride+w-1], rows[(n-1)*rowStride+w-1], out[3*outStride+n-1]
	var pp *uint16
	var end uintptr
	if len(pf) >= 32 {
		pp = &pf[0]
		end = uintptr(unsafe.Pointer(pp)) + uintptr(len(pf)/32*64)
	}
	scoresBF16RowsAVX512(&q[0], qStride, &rows[0], rowStride, n, w, &out[0], outStride, scale, pp, end)
}

// softmaxRows is softmaxRowsAVX512 on slices: sc holds heads rows of n
// scores scStride apart; m, l and alpha one value per head.
func softmaxRows(sc []float32, scStride, heads, n int, m, l, alpha []float32) {
	if heads <= 0 || n <= 0 {
		return
	}
	_, _, _, _ = sc[(heads-1)*scStride+n-1], m[heads-1], l[heads-1], alpha[heads-1]
	softmaxRowsAVX512(&sc[0], scStride, heads, n, &m[0], &l[0], &alpha[0])
}

//go:noescape
func evenOdd32AVX512(dst, src *float32, n int)

// evenOdd32SIMD is evenOdd32 on AVX-512; it reports false elsewhere.
func evenOdd32SIMD(i isa, dst, src []float32) bool {
	if i != isaAVX512 || len(src) < 32 {
		return false
	}
	_ = dst[len(src)-1]
	evenOdd32AVX512(&dst[0], &src[0], len(src)&^31)
	return true
}

//go:noescape
func prefetchLines(p *uint16, n int)

// prefetchRows asks for the cache lines of rows (whole 64-byte lines
// only) ahead of their use; it does nothing where there is no AVX-512
// attention.
func prefetchRows(i isa, rows []uint16) {
	if i == isaAVX512 && len(rows) >= 32 {
		prefetchLines(&rows[0], len(rows)&^31)
	}
}

//go:noescape
func interleave128AVX512(dst, src *float32, groups int)

// interleaveSIMD is interleaveGroups for groups of 128 on AVX-512; it
// reports false elsewhere.
func interleaveSIMD(i isa, dst, src []float32, G int) bool {
	if i != isaAVX512 || G != 128 || len(src) < 128 {
		return false
	}
	_ = dst[len(src)-1]
	interleave128AVX512(&dst[0], &src[0], len(src)/128)
	return true
}
