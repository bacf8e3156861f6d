package cpu

import "golang.org/x/sys/cpu"

// hasVNNI: AVX-512 BW for byte shuffles and VNNI for vpdpbusd; x/sys/cpu
// also checks that the OS saves the ZMM state.
var hasVNNI = cpu.X86.HasAVX512F && cpu.X86.HasAVX512BW && cpu.X86.HasAVX512VNNI

// simdKernel names the dot-product kernel in use.
var simdKernel = map[bool]string{true: "avx512-vnni", false: "go"}[hasVNNI]

// dotGroups128VNNI computes, for each of groups groups of 128 weights (64
// code bytes) and 128 de-interleaved int8 activations, the exact int32 dot
// product into out. It is implemented in dot_amd64.s.
//
//go:noescape
func dotGroups128VNNI(codes *byte, x *int8, xsum *int32, out *int32, groups int)

// dotGroups fills out[g] with the exact int32 dot product of group g; see
// dotGroupsGo, its reference. xsum[g] is the sum of group g's activations.
func dotGroups(codes []byte, x []int8, xsum []int32, G int, out []int32) {
	if hasVNNI && !forceGo && G == 128 && len(out) > 0 {
		_ = codes[len(out)*64-1]
		_ = x[len(out)*128-1]
		_ = xsum[len(out)-1]
		dotGroups128VNNI(&codes[0], &x[0], &xsum[0], &out[0], len(out))
		return
	}
	dotGroupsGo(codes, x, G, out)
}

// axpyCodes128 adds coef[g] * 2*e2m1(code) for the 128 weights of each group
// g to acc, in the de-interleaved order of axpyCodesGo. In dot_amd64.s.
//
//go:noescape
func axpyCodes128(acc *float32, codes *byte, coef *float32, groups int)

// axpyCodes is the dispatching form of axpyCodesGo.
func axpyCodes(acc []float32, codes []byte, coef []float32, G int) {
	if hasVNNI && !forceGo && G == 128 && len(coef) > 0 {
		_ = acc[len(coef)*128-1]
		_ = codes[len(coef)*64-1]
		axpyCodes128(&acc[0], &codes[0], &coef[0], len(coef))
		return
	}
	axpyCodesGo(acc, codes, coef, G)
}
