//go:build linux || darwin || freebsd || netbsd

package cuda

import "github.com/mmfp4/mmfp4/backend"

// DeviceMemory reports the bytes held for weights, cache pools and the step
// arena, the device's free memory now, and the time spent uploading weights.
func (b *Backend) DeviceMemory() (backend.DeviceMemory, error) {
	b.flush()
	m := backend.DeviceMemory{
		CacheBytes:    b.cacheBytes,
		UploadSeconds: b.uploadTime.Seconds(),
	}
	err := b.dev.Do(func(c *Ctx) error {
		m.WeightBytes = int64(b.weights.used) // a queued op may have taken some
		for _, ch := range b.arena.chunks {
			m.WorkspaceBytes += int64(ch.Size)
		}
		free, total, err := c.MemInfo()
		m.FreeBytes, m.TotalBytes = int64(free), int64(total)
		return err
	})
	return m, err
}
