//go:build !unix

package glm4moelite

func offHeap(n int) []byte { return make([]byte, n) }

func minorFaults() int64 { return 0 }
