package bench

import "golang.org/x/sys/cpu"

// x/sys/cpu also checks that the OS saves the vector registers.
var (
	hasAVX512 = cpu.X86.HasAVX512F
	hasAVX2   = cpu.X86.HasAVX2
)

// sumAVX512 adds n uint64 values (n a multiple of 64) with 64-byte loads.
// In sum_amd64.s.
//
//go:noescape
func sumAVX512(p *uint64, n int) uint64

// sumAVX2 adds n uint64 values (n a multiple of 32) with 32-byte loads.
//
//go:noescape
func sumAVX2(p *uint64, n int) uint64

// readKernel names the kernel sum uses on this machine.
func readKernel() string {
	switch {
	case forceGo:
		return "go"
	case hasAVX512:
		return "avx512"
	case hasAVX2:
		return "avx2"
	}
	return "go"
}

// sum adds the values of buf (wrapping): the vector kernel on the largest
// prefix it takes, the Go reference on the rest.
func sum(buf []uint64) uint64 {
	var s uint64
	n := 0
	switch readKernel() {
	case "avx512":
		if n = len(buf) &^ 63; n > 0 {
			s = sumAVX512(&buf[0], n)
		}
	case "avx2":
		if n = len(buf) &^ 31; n > 0 {
			s = sumAVX2(&buf[0], n)
		}
	}
	return s + sumGo(buf[n:])
}
