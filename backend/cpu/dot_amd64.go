package cpu

import (
	"github.com/mmfp4/mmfp4/format"
	"golang.org/x/sys/cpu"
)

// x/sys/cpu also checks that the OS saves the YMM/ZMM state.
var (
	hasAVX512 = cpu.X86.HasAVX512F && cpu.X86.HasAVX512BW && cpu.X86.HasAVX512VL && cpu.X86.HasAVX512VNNI
	hasAVX2   = cpu.X86.HasAVX2 && cpu.X86.HasFMA
)

func isaAvailable(i isa) bool {
	switch i {
	case isaAVX512:
		return hasAVX512
	case isaAVXVNNI:
		return hasAVX2 && cpu.X86.HasAVXVNNI
	case isaAVX2:
		return hasAVX2
	}
	return true
}

//go:noescape
func gemvAVX512(codes *byte, scales *byte, rowScale *float32, rows, groups int, x *int8, xs *float32, xsum *int32, out *float32)

//go:noescape
func gemvAVXVNNI(codes *byte, scales *byte, rowScale *float32, rows, groups int, x *int8, xs *float32, xsum *int32, out *float32)

//go:noescape
func gemvAVX2(codes *byte, scales *byte, rowScale *float32, rows, groups int, x *int8, xs *float32, xsum *int32, out *float32)

//go:noescape
func quantRow128AVX2(x *float32, groups int, q *int8, s *float32, sum *int32)

//go:noescape
func quantRow128AVX512(x *float32, groups int, q *int8, s *float32, sum *int32)

// quantRow128 runs the assembly quantizer of family i for group size 128;
// it reports false where there is none.
func quantRow128(i isa, row []float32, q []int8, s []float32, sum []int32) bool {
	groups := len(s)
	_, _, _ = row[groups*128-1], q[groups*128-1], sum[groups-1]
	switch i {
	case isaAVX512:
		quantRow128AVX512(&row[0], groups, &q[0], &s[0], &sum[0])
		return true
	case isaAVXVNNI, isaAVX2:
		quantRow128AVX2(&row[0], groups, &q[0], &s[0], &sum[0])
		return true
	}
	return false
}

// gemv128 runs the assembly decode kernel of family i on rows [lo, hi) of
// m (group size 128); it reports false where there is none.
func gemv128(i isa, m *format.Matrix, lo, hi int, a *qacts, t int, out []float32) bool {
	groups := m.K / 128
	codes := m.Codes[lo*m.K/2 : hi*m.K/2]
	scales := m.Scales[lo*groups : hi*groups]
	rs := m.RowScale[lo:hi]
	xq, xs, xsum := a.row(t)
	out = out[:hi-lo]
	switch i {
	case isaAVX512:
		gemvAVX512(&codes[0], &scales[0], &rs[0], hi-lo, groups, &xq[0], &xs[0], &xsum[0], &out[0])
		return true
	case isaAVXVNNI:
		gemvAVXVNNI(&codes[0], &scales[0], &rs[0], hi-lo, groups, &xq[0], &xs[0], &xsum[0], &out[0])
		return true
	case isaAVX2:
		gemvAVX2(&codes[0], &scales[0], &rs[0], hi-lo, groups, &xq[0], &xs[0], &xsum[0], &out[0])
		return true
	}
	return false
}

// axpyCodes128 adds coef[g] * 2*e2m1(code) for the 128 weights of each group
// g to acc, in the de-interleaved order of axpyCodesGo. In dot_amd64.s.
//
//go:noescape
func axpyCodes128(acc *float32, codes *byte, coef *float32, groups int)

//go:noescape
func axpyCodes4x128(acc *float32, codes *byte, rowBytes int, coef *float32, groups int)

//go:noescape
func axpyCodes128AVX2(acc *float32, codes *byte, coef *float32, groups int)

// axpyCodes is the dispatching form of axpyCodesGo.
func (b *Backend) axpyCodes(acc []float32, codes []byte, coef []float32, G int) {
	if b.isa != isaGo && G == 128 && len(coef) > 0 {
		_ = acc[len(coef)*128-1]
		_ = codes[len(coef)*64-1]
		if b.isa == isaAVX512 {
			axpyCodes128(&acc[0], &codes[0], &coef[0], len(coef))
		} else {
			axpyCodes128AVX2(&acc[0], &codes[0], &coef[0], len(coef))
		}
		return
	}
	axpyCodesGo(acc, codes, coef, G)
}

// axpyCodes4 is axpyCodes for the four rows of codes rowBytes apart, with
// coefficients coef[r*groups:(r+1)*groups] for row r; it reports false
// where family i has no kernel for it.
func axpyCodes4(i isa, acc []float32, codes []byte, rowBytes int, coef []float32, G int) bool {
	groups := len(coef) / 4
	if i != isaAVX512 || G != 128 || groups == 0 {
		return false
	}
	_, _ = acc[groups*128-1], codes[3*rowBytes+groups*64-1]
	axpyCodes4x128(&acc[0], &codes[0], rowBytes, &coef[0], groups)
	return true
}
