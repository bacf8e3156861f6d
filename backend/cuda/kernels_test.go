package cuda

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestTargetArch(t *testing.T) {
	all118 := []int{35, 37, 50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90}
	for _, c := range []struct {
		cc, major int
		archs     []int
		want      string
	}{
		{90, 13, nil, "sm_90a"},
		{90, 11, all118, "sm_90"},
		{80, 12, nil, "sm_80"},
		{100, 11, all118, "compute_90"}, // NVRTC older than the device: PTX
		{120, 13, []int{75, 80, 90, 100, 120}, "sm_120"},
	} {
		if got := targetArch(c.cc, c.major, c.archs); got != c.want {
			t.Errorf("targetArch(%d, %d) = %s, want %s", c.cc, c.major, got, c.want)
		}
	}
}

func TestCacheKey(t *testing.T) {
	base := cacheKey("gemv", "src", "sm_90a", []string{"-lineinfo"}, [2]int{13, 0}, 13000)
	if !strings.HasPrefix(base, "gemv-sm_90a-drv13000-") || !strings.HasSuffix(base, ".cubin") {
		t.Fatalf("key %q", base)
	}
	for _, k := range []string{
		cacheKey("gemv", "src2", "sm_90a", []string{"-lineinfo"}, [2]int{13, 0}, 13000),
		cacheKey("gemv", "src", "sm_90", []string{"-lineinfo"}, [2]int{13, 0}, 13000),
		cacheKey("gemv", "src", "sm_90a", nil, [2]int{13, 0}, 13000),
		cacheKey("gemv", "src", "sm_90a", []string{"-lineinfo"}, [2]int{12, 8}, 13000),
		cacheKey("gemv", "src", "sm_90a", []string{"-lineinfo"}, [2]int{13, 0}, 12080),
	} {
		if k == base {
			t.Errorf("key %q does not change with its inputs", k)
		}
	}
	if k := cacheKey("gemv", "src", "compute_90", nil, [2]int{11, 8}, 1); !strings.HasSuffix(k, ".ptx") {
		t.Errorf("PTX key %q", k)
	}
}

func TestCacheReadWrite(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "kernels")
	if readCache(dir, "k") != nil || inCache(dir, "k") {
		t.Fatal("hit in an empty cache")
	}
	writeCache(dir, "k", []byte("image"))
	if got := readCache(dir, "k"); string(got) != "image" || !inCache(dir, "k") {
		t.Fatalf("read back %q (in the cache: %v)", got, inCache(dir, "k"))
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("temporary files left: %v", entries)
	}
	writeCache(dir, "empty", nil)
	if readCache(dir, "empty") != nil || inCache(dir, "empty") {
		t.Fatal("an empty file counts as a cached image")
	}
	t.Setenv("MMFP4_KERNEL_CACHE", "off")
	if cacheDir() != "" {
		t.Fatal("MMFP4_KERNEL_CACHE=off does not disable the cache")
	}
}

func TestModulesEmbedded(t *testing.T) {
	mods := Modules()
	if len(mods) < 2 {
		t.Fatalf("modules %v", mods)
	}
	for _, m := range mods {
		src, err := moduleSource(m)
		if err != nil || !strings.Contains(src, "#line 1 \""+m+".cu\"") || !strings.HasPrefix(src, "#line 1 \"prelude.cuh\"") || !strings.Contains(src, "#line 1 \"matvec.cuh\"") {
			t.Fatalf("module %s: %v", m, err)
		}
	}
	if _, err := moduleSource("nope"); err == nil {
		t.Fatal("unknown module: no error")
	}
}

// Precompile fills an empty disk cache with every module, and each module
// then loads (from that cache) with its kernels callable by name.
func TestPrecompileFillsCache(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("MMFP4_KERNEL_CACHE", dir)
	d := testDevice(t)
	err := d.Do(func(c *Ctx) error {
		if err := c.Precompile(); err != nil {
			return err
		}
		if len(c.compiles) != len(Modules()) {
			t.Errorf("%d compiles started for %d modules in an empty cache", len(c.compiles), len(Modules()))
		}
		for _, name := range Modules() {
			if _, err := c.module(name); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	files, _ := filepath.Glob(filepath.Join(dir, "*"))
	if len(files) != len(Modules()) {
		t.Errorf("%d files in the cache for %d modules: %v", len(files), len(Modules()), files)
	}
}

// Every kernel takes at most maxKernelArgs parameters, the most Launch
// marshals: a kernel past it compiles and fails only at its first launch,
// on a GPU. Read from the sources: the parameters of each __global__
// function (named as the trace names kernels), counted by top-level commas.
func TestKernelParamsFitLaunch(t *testing.T) {
	var kernels []kernelParams
	for _, m := range Modules() {
		src, err := moduleSourcePlain(m)
		if err != nil {
			t.Fatal(err)
		}
		kernels = append(kernels, kernelParamCounts(src)...)
	}
	if len(kernels) < 50 {
		t.Fatalf("%d kernels found in the sources, want at least 50", len(kernels))
	}
	// A known count, so that a parser that miscounts fails here.
	if i := slices.IndexFunc(kernels, func(k kernelParams) bool { return k.name == "moe_router_cluster_norm" }); i < 0 || kernels[i].n != 23 {
		t.Fatalf("moe_router_cluster_norm: parameters not read as its 23")
	}
	for _, k := range kernels {
		if k.n > maxKernelArgs {
			t.Errorf("kernel %s: %d parameters, Launch takes at most %d", k.name, k.n, maxKernelArgs)
		}
	}
}

// kernelParams is a kernel's name (a macro's parameter for kernels that a
// macro defines) and its number of parameters.
type kernelParams struct {
	name string
	n    int
}

// kernelParamCounts lists the __global__ functions of src: after each
// __global__, the first name before a '(' that is not an attribute
// (traceKernelName's rule), and the parameters in its parentheses.
func kernelParamCounts(src string) []kernelParams {
	var out []kernelParams
	for _, part := range strings.Split(src, "__global__")[1:] {
		for _, m := range traceKernelName.FindAllStringSubmatchIndex(part, -1) {
			name := part[m[2]:m[3]]
			if strings.HasPrefix(name, "__") || name == "void" {
				continue
			}
			open := m[1] - 1
			end := matchingParen(part, open)
			if end < 0 {
				break
			}
			params := part[open+1 : end]
			n, depth := 1, 0
			for _, r := range params {
				switch r {
				case '(', '<', '[':
					depth++
				case ')', '>', ']':
					depth--
				case ',':
					if depth == 0 {
						n++
					}
				}
			}
			if strings.TrimSpace(params) == "" {
				n = 0
			}
			out = append(out, kernelParams{name, n})
			break
		}
	}
	return out
}

// matchingParen returns the index of the ')' closing the '(' at s[open],
// or -1.
func matchingParen(s string, open int) int {
	depth := 0
	for i := open; i < len(s); i++ {
		switch s[i] {
		case '(':
			depth++
		case ')':
			depth--
			if depth == 0 {
				return i
			}
		}
	}
	return -1
}
