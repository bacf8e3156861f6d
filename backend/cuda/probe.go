//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"
	"time"
)

// Probe looks for a GPU and NVRTC and compiles every embedded kernel module
// for GPU 0 and loads it there. Without a GPU it compiles them for sm_90 as
// a syntax check only if compileWithoutGPU. It never fails; what is missing
// is in the report.
func Probe(compileWithoutGPU bool) Report {
	var r Report
	if major, minor, path, err := NVRTCVersion(); err != nil {
		r.NVRTCErr = err
	} else {
		r.NVRTC = fmt.Sprintf("%d.%d (%s)", major, minor, path)
	}
	dev, err := Open(0)
	if err != nil {
		r.DeviceErr = err
		if r.NVRTCErr == nil && compileWithoutGPU {
			r.Arch = targetArch(90, rtcVersion[0], rtcArchs)
			for _, m := range Modules() {
				t := time.Now()
				src, err := moduleSource(m)
				if err == nil {
					_, _, err = nvrtcCompile(m, src, r.Arch, compileOptions)
				}
				r.Modules = append(r.Modules, ModuleStatus{Name: m, Err: err, Seconds: time.Since(t).Seconds()})
			}
		}
		return r
	}
	defer dev.Close()
	info := dev.Info()
	r.Device = &info
	dev.Do(func(c *Ctx) error {
		r.FreeMem, _, _ = c.MemInfo()
		if r.NVRTCErr != nil {
			return nil
		}
		r.Arch, _ = c.Arch()
		for _, m := range Modules() {
			t := time.Now()
			_, err := c.module(m)
			r.Modules = append(r.Modules, ModuleStatus{Name: m, Err: err, Seconds: time.Since(t).Seconds()})
		}
		return nil
	})
	return r
}
