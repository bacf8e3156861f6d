//go:build unix && !linux

package safetensors

import "golang.org/x/sys/unix"

// adviseHugePages: Linux's hint only.
func adviseHugePages([]byte) {}

// populateRead: no MADV_POPULATE_READ outside Linux; EINVAL makes prefault
// leave the pages to load on first touch.
func populateRead([]byte) error { return unix.EINVAL }
