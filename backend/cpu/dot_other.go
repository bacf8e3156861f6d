//go:build !amd64

package cpu

// dotGroups is the plain Go kernel on this architecture.
func dotGroups(codes []byte, x []int8, xsum []int32, G int, out []int32) {
	dotGroupsGo(codes, x, G, out)
}

// simdKernel names the dot-product kernel in use.
const simdKernel = "go"

// axpyCodes is the plain Go kernel on this architecture.
func axpyCodes(acc []float32, codes []byte, coef []float32, G int) {
	axpyCodesGo(acc, codes, coef, G)
}
