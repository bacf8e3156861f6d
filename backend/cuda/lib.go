//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/ebitengine/purego"
)

// libDirs are searched, in order, after the dynamic loader's own search.
var libDirs = []string{
	"/usr/local/nvidia/lib64",
	"/usr/local/cuda/lib64",
	"/usr/local/cuda/targets/x86_64-linux/lib",
	"/usr/local/cuda/targets/sbsa-linux/lib",
	"/usr/lib/x86_64-linux-gnu",
	"/usr/lib/aarch64-linux-gnu",
	"/usr/lib64",
	"/usr/lib/wsl/lib",
}

// openLib dlopens the library named by the environment variable env if it is
// set; otherwise each of names through the loader's search, then each name
// (and, for globs, the highest version that matches) in libDirs.
func openLib(env string, names []string) (handle uintptr, path string, err error) {
	if p := os.Getenv(env); p != "" {
		h, err := purego.Dlopen(p, purego.RTLD_NOW|purego.RTLD_GLOBAL)
		if err != nil {
			return 0, "", fmt.Errorf("%s=%s: %v", env, p, err)
		}
		return h, p, nil
	}
	var failed []string // found on disk but not loadable
	for _, n := range names {
		if strings.ContainsAny(n, "*?") {
			continue
		}
		if h, err := purego.Dlopen(n, purego.RTLD_NOW|purego.RTLD_GLOBAL); err == nil {
			return h, n, nil
		}
	}
	for _, dir := range libDirs {
		for _, n := range names {
			matches, _ := filepath.Glob(filepath.Join(dir, n))
			slices.SortFunc(matches, func(a, b string) int { return compareVersions(b, a) })
			for _, p := range matches {
				h, err := purego.Dlopen(p, purego.RTLD_NOW|purego.RTLD_GLOBAL)
				if err == nil {
					return h, p, nil
				}
				failed = append(failed, fmt.Sprintf("%s: %v", p, err))
			}
		}
	}
	msg := fmt.Sprintf("%s: not found by the dynamic loader nor in %s (set %s to its path)",
		strings.Join(names, ", "), strings.Join(libDirs, ":"), env)
	if len(failed) > 0 {
		msg += "; found but failed to load: " + strings.Join(failed, "; ")
	}
	return 0, "", errors.New(msg)
}

// compareVersions orders library file names by the numbers after ".so.",
// so that libnvrtc.so.13 sorts after libnvrtc.so.12.8.
func compareVersions(a, b string) int {
	va, vb := soVersion(a), soVersion(b)
	for i := 0; i < max(len(va), len(vb)); i++ {
		x, y := -1, -1
		if i < len(va) {
			x = va[i]
		}
		if i < len(vb) {
			y = vb[i]
		}
		if x != y {
			return x - y
		}
	}
	return strings.Compare(a, b)
}

func soVersion(name string) []int {
	_, after, ok := strings.Cut(filepath.Base(name), ".so.")
	if !ok {
		return nil
	}
	var v []int
	for _, f := range strings.Split(after, ".") {
		n, err := strconv.Atoi(f)
		if err != nil {
			break
		}
		v = append(v, n)
	}
	return v
}

// bind registers each C symbol of syms (name -> pointer to a Go func
// variable) from the library handle, naming the first one that is missing.
func bind(lib string, handle uintptr, syms map[string]any) error {
	for name, fptr := range syms {
		addr, err := purego.Dlsym(handle, name)
		if err != nil || addr == 0 {
			return fmt.Errorf("%s has no symbol %s", lib, name)
		}
		purego.RegisterFunc(fptr, addr)
	}
	return nil
}
