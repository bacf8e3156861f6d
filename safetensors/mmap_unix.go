//go:build unix

package safetensors

import (
	"errors"
	"os"

	"golang.org/x/sys/unix"
)

// mapFile maps size bytes of fd read-only, so that opening a multi-GB model
// costs no copying and pages are loaded on first touch.
func mapFile(fd *os.File, size int) ([]byte, func() error, error) {
	data, err := unix.Mmap(int(fd.Fd()), 0, size, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return nil, nil, err
	}
	// Where the kernel keeps file pages in 2 MB folios, pages read from disk
	// through this mapping come in whole folios and are mapped with one
	// entry each: fewer faults and TLB misses. Best effort.
	adviseHugePages(data)
	return data, func() error { return unix.Munmap(data) }, nil
}

// prefaultChunk bounds one madvise call, so a closed file stops a prefault
// within one chunk.
const prefaultChunk = 64 << 20

// prefault maps every page of data into the process, reading from disk what
// the page cache lacks, so that the first pass over the weights takes no
// page faults (a minor fault per 4 KB page cost a 1024-token prefill of a
// 15 GB model several seconds). Kernels before 5.14 lack
// MADV_POPULATE_READ: then pages keep loading on first touch.
func prefault(data []byte) error {
	for off := 0; off < len(data); off += prefaultChunk {
		err := populateRead(data[off:min(off+prefaultChunk, len(data))])
		if errors.Is(err, unix.EINVAL) {
			return nil
		}
		if err != nil {
			return err
		}
	}
	return nil
}
