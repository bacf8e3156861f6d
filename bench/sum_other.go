//go:build !amd64

package bench

func readKernel() string { return "go" }

func sum(buf []uint64) uint64 { return sumGo(buf) }
