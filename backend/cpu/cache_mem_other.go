//go:build !linux

package cpu

// cacheMem returns n zeroed bytes for a cache pool from the heap.
func cacheMem(owner *pool, n int) []byte { return make([]byte, n) }
