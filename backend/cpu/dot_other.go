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
