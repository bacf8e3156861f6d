//go:build !unix

package glm4moelite

func offHeap(n int) []byte { return make([]byte, n) }
