package cuda

import (
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

//go:embed kernels/*.cu kernels/*.cuh
var kernelFS embed.FS

// preludeFile is prepended to every module, then the other headers
// (kernels/*.cuh) in name order: shared device code.
const preludeFile = "kernels/prelude.cuh"

// compileOptions are the NVRTC options besides -arch. No fast-math: the
// kernels divide and round as the CPU reference does, and choose where
// they do not (the norms' rsqrtf, prelude.cuh).
// No -lineinfo: with it, NVRTC 11.8 recurses without end on gemv.cu.
// MMFP4_CUDA_NVRTC_OPTIONS adds options (space-separated), for example a
// -D that picks a kernel variant under measurement, so that one build can
// time both forms; the cache key includes them.
var compileOptions = func() []string {
	o := append([]string{"-std=c++17"}, strings.Fields(os.Getenv("MMFP4_CUDA_NVRTC_OPTIONS"))...)
	if delaying {
		o = append(o, "-DMM_DELAY")
	}
	return o
}()

// delaying reports whether MMFP4_CUDA_DELAY is set: the modules then
// compile with MM_DELAY (delay.go).
var delaying = os.Getenv("MMFP4_CUDA_DELAY") != ""

// Modules lists the embedded kernel modules (one per kernels/*.cu file).
func Modules() []string {
	entries, _ := fs.Glob(kernelFS, "kernels/*.cu")
	var names []string
	for _, e := range entries {
		names = append(names, strings.TrimSuffix(filepath.Base(e), ".cu"))
	}
	slices.Sort(names)
	return names
}

// moduleSource is the full translation unit of a module: the headers, then
// the module's file, with #line directives so that compiler messages name
// the right file and line.
func moduleSource(name string) (string, error) {
	if traceFile != "" {
		traceOnce.Do(traceNumber)
		if traceErr != nil {
			return "", traceErr
		}
		if src, ok := traceSrc[name]; ok {
			return src, nil
		}
	}
	return moduleSourcePlain(name)
}

// moduleSourcePlain is moduleSource without the trace's rewriting.
func moduleSourcePlain(name string) (string, error) {
	body, err := kernelFS.ReadFile("kernels/" + name + ".cu")
	if err != nil {
		return "", fmt.Errorf("cuda: no kernel module %q", name)
	}
	headers, _ := fs.Glob(kernelFS, "kernels/*.cuh")
	slices.SortFunc(headers, func(a, b string) int {
		switch {
		case a == preludeFile:
			return -1
		case b == preludeFile:
			return 1
		}
		return strings.Compare(a, b)
	})
	var src strings.Builder
	for _, h := range append(headers, "kernels/"+name+".cu") {
		text := body
		if h != "kernels/"+name+".cu" {
			if text, err = kernelFS.ReadFile(h); err != nil {
				return "", err
			}
		}
		fmt.Fprintf(&src, "#line 1 \"%s\"\n%s\n", filepath.Base(h), text)
	}
	return src.String(), nil
}

// targetArch picks the NVRTC target for a device of compute capability cc
// (10*major + minor): the device's own machine code, sm_90a on Hopper where
// NVRTC knows it (CUDA 12 and later: wgmma, setmaxnreg), or, where NVRTC is
// older than the device, PTX for the newest architecture it supports, which
// the driver compiles at load.
func targetArch(cc, nvrtcMajor int, supported []int) string {
	if len(supported) > 0 && !slices.Contains(supported, cc) {
		best := 0
		for _, a := range supported {
			if a <= cc && a > best {
				best = a
			}
		}
		if best > 0 {
			return fmt.Sprintf("compute_%d", best)
		}
	}
	if cc == 90 && nvrtcMajor >= 12 {
		return "sm_90a"
	}
	return fmt.Sprintf("sm_%d", cc)
}

// cacheKey names a compiled module in the disk cache: module, target and
// driver version in clear, then a hash of everything that changes the output
// (source, options, NVRTC version).
func cacheKey(module, source, arch string, opts []string, nvrtcVersion [2]int, driverVersion int) string {
	h := sha256.New()
	fmt.Fprintf(h, "%s\x00%s\x00%q\x00%d.%d\x00", module, arch, opts, nvrtcVersion[0], nvrtcVersion[1])
	h.Write([]byte(source))
	ext := ".cubin"
	if strings.HasPrefix(arch, "compute_") {
		ext = ".ptx"
	}
	return fmt.Sprintf("%s-%s-drv%d-%s%s", module, arch, driverVersion, hex.EncodeToString(h.Sum(nil))[:20], ext)
}

// cacheDir is where compiled modules are kept, or "" when caching is off.
func cacheDir() string {
	if d := os.Getenv("MMFP4_KERNEL_CACHE"); d != "" {
		if d == "off" {
			return ""
		}
		return d
	}
	d, err := os.UserCacheDir()
	if err != nil {
		return ""
	}
	return filepath.Join(d, "mmfp4", "kernels")
}

// readCache returns a cached image, or nil.
func readCache(dir, key string) []byte {
	if dir == "" {
		return nil
	}
	b, err := os.ReadFile(filepath.Join(dir, key))
	if err != nil || len(b) == 0 {
		return nil
	}
	return b
}

// inCache reports whether readCache would find a non-empty image, without
// reading it.
func inCache(dir, key string) bool {
	if dir == "" {
		return false
	}
	fi, err := os.Stat(filepath.Join(dir, key))
	return err == nil && fi.Size() > 0
}

// writeCache stores an image atomically (temporary file, then rename), so
// that concurrent processes never read a half-written file. Failures only
// cost a recompile next time, so they are ignored.
func writeCache(dir, key string, image []byte) {
	if dir == "" {
		return
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return
	}
	f, err := os.CreateTemp(dir, key+".tmp*")
	if err != nil {
		return
	}
	_, werr := f.Write(image)
	cerr := f.Close()
	if werr != nil || cerr != nil || os.Rename(f.Name(), filepath.Join(dir, key)) != nil {
		os.Remove(f.Name())
	}
}
