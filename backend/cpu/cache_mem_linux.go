//go:build linux

package cpu

import (
	"runtime"

	"golang.org/x/sys/unix"
)

// cacheMem returns n zeroed bytes for a cache pool, owned by owner: an
// anonymous mapping advised into 2 MB pages, unmapped once owner is
// unreachable. The Go heap would give 4 KB pages, and a decode step reads
// every layer's rows among a gigabyte of weights, so each 4 KB of rows
// would cost a page walk whose tables are no longer cached. It falls back
// to the heap when the mapping fails.
func cacheMem(owner *pool, n int) []byte {
	if n <= 0 {
		return nil
	}
	mem, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return make([]byte, n)
	}
	_ = unix.Madvise(mem, unix.MADV_HUGEPAGE) // best effort
	runtime.AddCleanup(owner, func(m []byte) { _ = unix.Munmap(m) }, mem)
	return mem
}
