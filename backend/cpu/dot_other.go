//go:build !amd64

package cpu

import "github.com/mmfp4/mmfp4/format"

// Only the pure-Go kernels exist on this architecture.
func isaAvailable(i isa) bool { return i == isaGo }

func quantRow128(isa, []float32, []int8, []float32, []int32) bool { return false }

func gemv128(isa, *format.Matrix, int, int, *qacts, int, []float32) bool { return false }

// axpyCodes is the plain Go kernel on this architecture.
func (b *Backend) axpyCodes(acc []float32, codes []byte, coef []float32, G int) {
	axpyCodesGo(acc, codes, coef, G)
}

func dotF32SIMD(isa, []float32, []float32) (float32, bool) { return 0, false }

func dots4F32SIMD(isa, []float32, []float32, int, *[4]float32) bool { return false }

func axpy4F32SIMD(isa, []float32, []float32, int, *[4]float32) bool { return false }

func expF32SIMD(isa, []float32, []float32, float32) (float32, bool) { return 0, false }

func siluMulF32SIMD(isa, []float32, []float32, []float32) bool { return false }

func gemmGeometry(isa) (rows, tokens int, ok bool) { return 0, 0, false }

func gemmPrep(isa, *format.Matrix, int, int, []byte) {}

func gemmBlock(isa, []byte, []float32, int, []int8, int, []uint32, []float32, []float32, int, int, int) {
}

func maxF32SIMD(isa, []float32) (float32, bool) { return 0, false }

func hasSgemm(isa) bool { return false }

func sgemm4x64([]float32, int, []float32, int, int, []float32, int) {}

func sgemm4x64Acc([]float32, int, []float32, int, int, []float32, int, bool) {}

func hasHeadKernels(isa, int, int) bool { return false }

func scoresHx4([]float32, int, []float32, int, int, []float32, []float32, int, int, int, []float32, int, float32) {
}

func axpyHx4([]float32, int, []float32, int, int, []float32, int) {}

func bf16ToF32SIMD(isa, []float32, []uint16) bool { return false }

func axpyCodes4(isa, []float32, []byte, int, []float32, int) bool { return false }

func hasBF16Attention(isa, int, int, int) bool { return false }

func scoresBF16x4([]float32, int, int, []uint16, int, int, []float32, int, float32) {}

func scoresBF16Rows([]float32, int, []uint16, int, int, int, []float32, int, float32, []uint16) {}

func softmaxRows([]float32, int, int, int, []float32, []float32, []float32) {}

func evenOdd32SIMD(isa, []float32, []float32) bool { return false }

func prefetchRows(isa, []uint16) {}

func interleaveSIMD(isa, []float32, []float32, int) bool { return false }

func axpyBF16Panels([]float32, int, []uint16, int, int, int, []float32, int, []float32) {}

func interleave32([]float32, []float32) {}
