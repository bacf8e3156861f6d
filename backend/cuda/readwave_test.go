//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"errors"
	"fmt"
	"slices"
	"testing"
)

// The one-wave read probes (util.cu wave_*): how long one launch takes to
// read 13.4 MB that is not in L2 (the routed gate/up weights of a
// GLM-4.7-Flash layer), or 19.2 MB (those and the routed down weights, as
// one launch taking gate/up and down together would read them), by plain
// 16-byte loads, D a thread at once, or by bulk copies into shared memory.
// The wave's time is from its first block's start to its last block's
// last read (%globaltimer stamps), the median of 48 launches, each over
// another of 16 regions (214 or 307 MB, four or more times L2).
func BenchmarkReadWave(b *testing.B) {
	for _, region := range []int{13_400_000, 19_200_000} {
		b.Run(fmt.Sprintf("%.1fMB", float64(region)/1e6), func(b *testing.B) { readWave(b, region) })
	}
}

// waveStages is WAVE_STAGES in util.cu: wave_tma's shared buffers.
const waveStages = 4

func readWave(b *testing.B, region int) {
	d := benchDevice(b)
	const regions, launches = 16, 48
	type form struct {
		kernel          string
		blocks, threads int
		chunk           int // wave_tma's bytes a copy
	}
	forms := []form{
		{"wave_ld16", 480, 128, 0}, {"wave_ld16", 264, 256, 0}, {"wave_ld16", 132, 512, 0},
		{"wave_ld32", 480, 128, 0}, {"wave_ld32", 132, 512, 0},
		{"wave_tma", 132, 128, 16384}, {"wave_tma", 264, 128, 16384}, {"wave_tma", 132, 128, 32768}, {"wave_tma", 528, 128, 8192},
	}
	var lines []string
	old := false
	err := d.Do(func(c *Ctx) error {
		if _, err := c.Arch(); err != nil {
			return err
		}
		if old = rtcVersion[0] < 12; old {
			return nil
		}
		src, err1 := c.Alloc(region * regions)
		out, err2 := c.Alloc(4 * 528 * 512)
		st, err3 := c.Alloc(8 * 2 * 528 * launches)
		if err := errors.Join(err1, err2, err3); err != nil {
			return err
		}
		if err := c.Memset(src.Ptr, 0x5a, region*regions); err != nil {
			return err
		}
		for round := 1; round <= 2; round++ {
			for _, f := range forms {
				unit, shared := 16*f.threads, 0
				if f.chunk > 0 {
					unit, shared = f.chunk, waveStages*f.chunk
				}
				per := region / f.blocks / unit * unit
				k, err := c.kernelShared("util", f.kernel, shared)
				if err != nil {
					return err
				}
				for l := 0; l < launches; l++ {
					p := src.Ptr + uint64((l%regions)*region)
					stamp := st.Ptr + uint64(8*2*f.blocks*l)
					var err error
					if f.chunk > 0 {
						err = c.Launch(k, D1(f.blocks), D1(f.threads), shared, p, uint32(per), uint32(f.chunk), out.Ptr, stamp)
					} else {
						err = c.Launch(k, D1(f.blocks), D1(f.threads), 0, p, uint32(per), out.Ptr, stamp)
					}
					if err != nil {
						return err
					}
				}
				ts := make([]uint64, 2*f.blocks*launches)
				if err := CopyOut(c, ts, st.Ptr); err != nil {
					return err
				}
				var us []float64
				for l := 0; l < launches; l++ {
					w := ts[2*f.blocks*l : 2*f.blocks*(l+1)]
					lo, hi := w[0], w[1]
					for i := 0; i < len(w); i += 2 {
						lo, hi = min(lo, w[i]), max(hi, w[i+1])
					}
					us = append(us, float64(hi-lo)/1e3)
				}
				slices.Sort(us)
				med := us[len(us)/2]
				bytes := float64(per * f.blocks)
				lines = append(lines, fmt.Sprintf("round %d %-9s %3d x %3d chunk %5d: %.2f MB in %.2f us (min %.2f, max %.2f): %.2f TB/s",
					round, f.kernel, f.blocks, f.threads, f.chunk, bytes/1e6, med, us[0], us[len(us)-1], bytes/med/1e6))
			}
		}
		return errors.Join(c.Free(src), c.Free(out), c.Free(st))
	})
	if err != nil {
		b.Fatal(err)
	}
	if old {
		b.Skipf("wave_tma needs NVRTC 12 or later (PTX 8.0)")
	}
	for _, l := range lines {
		b.Log(l)
	}
}
