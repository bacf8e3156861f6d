//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"errors"
	"testing"
)

// BenchmarkMoEReadPattern times moe_read_pattern's three forms over 86
// tiles of 3 MB (258 MB, five times L2), as many blocks as a 32-token
// batched MoE's gate/up launch.
func BenchmarkMoEReadPattern(b *testing.B) {
	d := benchDevice(b)
	const tiles, tileBytes = 86, 2 * 1536 * 1024
	err := d.Do(func(c *Ctx) error {
		k, err := c.Kernel("util", "moe_read_pattern")
		if err != nil {
			return err
		}
		src, err1 := c.Alloc(tiles * tileBytes)
		sink, err2 := c.Alloc(4 * 12 * tiles * 256)
		if err := errors.Join(err1, err2); err != nil {
			return err
		}
		defer c.Free(src)
		defer c.Free(sink)
		if err := c.Memset(src.Ptr, 0x5a, tiles*tileBytes); err != nil {
			return err
		}
		for round := 0; round < 2; round++ {
			for mode := 0; mode < 3; mode++ {
				run := func() error { return c.Launch(k, Dim{12, tiles, 1}, D1(256), 0, src.Ptr, mode, sink.Ptr) }
				const reps = 20
				ms, err := timeDevice(c, reps, 1, run)
				if err != nil {
					return err
				}
				sec := float64(ms) / 1e3 / reps
				b.Logf("mode %d: %.2f us, %.0f GB/s", mode, sec*1e6, float64(tiles*tileBytes)/sec/1e9)
			}
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
}
