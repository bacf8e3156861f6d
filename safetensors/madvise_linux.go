package safetensors

import "golang.org/x/sys/unix"

// adviseHugePages asks for data's file pages in 2 MB folios (best effort).
func adviseHugePages(data []byte) { _ = unix.Madvise(data, unix.MADV_HUGEPAGE) }

// populateRead maps b's pages into the process, reading what the page
// cache lacks (EINVAL before Linux 5.14).
func populateRead(b []byte) error { return unix.Madvise(b, unix.MADV_POPULATE_READ) }
