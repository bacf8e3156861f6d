//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"
	"runtime"
	"strings"
	"sync"
	"unsafe"
)

// The NVRTC functions used here, bound with purego.
var rtc struct {
	nvrtcVersion              func(major, minor *int32) int32
	nvrtcGetNumSupportedArchs func(n *int32) int32
	nvrtcGetSupportedArchs    func(archs *int32) int32
	nvrtcCreateProgram        func(prog *uintptr, src, name string, nHeaders int32, headers, includeNames unsafe.Pointer) int32
	nvrtcCompileProgram       func(prog uintptr, nOpts int32, opts **byte) int32
	nvrtcGetProgramLogSize    func(prog uintptr, n *uint64) int32
	nvrtcGetProgramLog        func(prog uintptr, log *byte) int32
	nvrtcGetCUBINSize         func(prog uintptr, n *uint64) int32
	nvrtcGetCUBIN             func(prog uintptr, out *byte) int32
	nvrtcGetPTXSize           func(prog uintptr, n *uint64) int32
	nvrtcGetPTX               func(prog uintptr, out *byte) int32
	nvrtcDestroyProgram       func(prog *uintptr) int32
	nvrtcGetErrorString       func(r int32) string
}

var (
	rtcOnce    sync.Once
	rtcErr     error
	rtcPath    string
	rtcVersion [2]int // major, minor
	rtcArchs   []int  // supported sm_XX, as 10*major+minor
)

// loadNVRTC opens libnvrtc once and binds its functions.
func loadNVRTC() error {
	rtcOnce.Do(func() {
		h, path, err := openLib("MMFP4_NVRTC_LIB", []string{"libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so.11.2", "libnvrtc.so.[0-9]*"})
		if err != nil {
			rtcErr = fmt.Errorf("%w: %v", ErrNoNVRTC, err)
			return
		}
		rtcPath = path
		r := &rtc
		err = bind(path, h, map[string]any{
			"nvrtcVersion":              &r.nvrtcVersion,
			"nvrtcGetNumSupportedArchs": &r.nvrtcGetNumSupportedArchs,
			"nvrtcGetSupportedArchs":    &r.nvrtcGetSupportedArchs,
			"nvrtcCreateProgram":        &r.nvrtcCreateProgram,
			"nvrtcCompileProgram":       &r.nvrtcCompileProgram,
			"nvrtcGetProgramLogSize":    &r.nvrtcGetProgramLogSize,
			"nvrtcGetProgramLog":        &r.nvrtcGetProgramLog,
			"nvrtcGetCUBINSize":         &r.nvrtcGetCUBINSize,
			"nvrtcGetCUBIN":             &r.nvrtcGetCUBIN,
			"nvrtcGetPTXSize":           &r.nvrtcGetPTXSize,
			"nvrtcGetPTX":               &r.nvrtcGetPTX,
			"nvrtcDestroyProgram":       &r.nvrtcDestroyProgram,
			"nvrtcGetErrorString":       &r.nvrtcGetErrorString,
		})
		if err != nil {
			rtcErr = fmt.Errorf("%w: %v", ErrNoNVRTC, err)
			return
		}
		var major, minor, n int32
		if res := rtc.nvrtcVersion(&major, &minor); res != 0 {
			rtcErr = fmt.Errorf("%w: nvrtcVersion: %s", ErrNoNVRTC, rtc.nvrtcGetErrorString(res))
			return
		}
		rtcVersion = [2]int{int(major), int(minor)}
		if rtc.nvrtcGetNumSupportedArchs(&n) == 0 && n > 0 {
			archs := make([]int32, n)
			if rtc.nvrtcGetSupportedArchs(&archs[0]) == 0 {
				for _, a := range archs {
					rtcArchs = append(rtcArchs, int(a))
				}
			}
		}
	})
	return rtcErr
}

// NVRTCVersion loads NVRTC and returns its version and library path.
func NVRTCVersion() (major, minor int, path string, err error) {
	if err := loadNVRTC(); err != nil {
		return 0, 0, "", err
	}
	return rtcVersion[0], rtcVersion[1], rtcPath, nil
}

// CompileError is a kernel source that NVRTC rejected, with its log.
type CompileError struct {
	Module, Arch string
	Log          string
	Err          string
}

func (e *CompileError) Error() string {
	return fmt.Sprintf("cuda: nvrtcCompileProgram (module %s, %s): %s\n%s", e.Module, e.Arch, e.Err, strings.TrimSpace(e.Log))
}

// nvrtcCompile compiles one translation unit. For an arch "sm_XX" it
// returns a cubin; for "compute_XX", PTX for the driver to finish.
func nvrtcCompile(name, src, arch string, opts []string) (image []byte, log string, err error) {
	if err := loadNVRTC(); err != nil {
		return nil, "", err
	}
	var prog uintptr
	if r := rtc.nvrtcCreateProgram(&prog, src, name+".cu", 0, nil, nil); r != 0 {
		return nil, "", fmt.Errorf("cuda: nvrtcCreateProgram (module %s): %s", name, rtc.nvrtcGetErrorString(r))
	}
	defer rtc.nvrtcDestroyProgram(&prog)

	// The option strings are NUL-terminated Go byte slices; the pinner keeps
	// them in place while C reads the pointer array.
	all := append([]string{"-arch=" + arch}, opts...)
	var pin runtime.Pinner
	defer pin.Unpin()
	ptrs := make([]*byte, len(all))
	for i, o := range all {
		b := append([]byte(o), 0)
		pin.Pin(&b[0])
		ptrs[i] = &b[0]
	}
	res := rtc.nvrtcCompileProgram(prog, int32(len(ptrs)), &ptrs[0])

	var n uint64
	if rtc.nvrtcGetProgramLogSize(prog, &n) == 0 && n > 1 {
		buf := make([]byte, n)
		if rtc.nvrtcGetProgramLog(prog, &buf[0]) == 0 {
			log = string(buf[:n-1])
		}
	}
	if res != 0 {
		return nil, log, &CompileError{Module: name, Arch: arch, Log: log, Err: rtc.nvrtcGetErrorString(res)}
	}

	getSize, get := rtc.nvrtcGetCUBINSize, rtc.nvrtcGetCUBIN
	if strings.HasPrefix(arch, "compute_") {
		getSize, get = rtc.nvrtcGetPTXSize, rtc.nvrtcGetPTX
	}
	if r := getSize(prog, &n); r != 0 || n == 0 {
		return nil, log, fmt.Errorf("cuda: nvrtc output size (module %s, %s): %s", name, arch, rtc.nvrtcGetErrorString(r))
	}
	image = make([]byte, n)
	if r := get(prog, &image[0]); r != 0 {
		return nil, log, fmt.Errorf("cuda: nvrtc output (module %s, %s): %s", name, arch, rtc.nvrtcGetErrorString(r))
	}
	return image, log, nil
}
