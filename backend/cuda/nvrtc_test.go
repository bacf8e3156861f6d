//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestCompileKernels compiles every embedded module with the local NVRTC,
// without a GPU, so that a syntax or type error shows before any GPU time
// is spent. CI installs NVRTC (Debian's 11.8) and sets MMFP4_REQUIRE_NVRTC=1:
// there a missing library fails the test instead of skipping it.
func TestCompileKernels(t *testing.T) {
	major, minor, path, err := NVRTCVersion()
	if errors.Is(err, ErrNoNVRTC) {
		if os.Getenv("MMFP4_REQUIRE_NVRTC") == "1" {
			t.Fatalf("MMFP4_REQUIRE_NVRTC=1 but NVRTC cannot be loaded: %v", err)
		}
		t.Skipf("SKIPPED: kernels not compile-checked: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("NVRTC %d.%d from %s, archs %v", major, minor, path, rtcArchs)
	// A compile answered from a cache prints no ptxas report, which would
	// let the spill check below pass unseen (seen with NVRTC 13.0 on a
	// machine that had compiled the modules before, even with
	// CUDA_CACHE_DISABLE set here: the library reads it when it loads,
	// which an earlier test may have done). So each source gets a device
	// variable of its own, a PTX no cache has seen, and a module whose
	// report is missing fails.
	t.Setenv("CUDA_CACHE_DISABLE", "1")
	t.Setenv("CUDA_CACHE_PATH", t.TempDir())
	fresh := fmt.Sprintf("\n__device__ int compile_check_%d_%d;\n", os.Getpid(), time.Now().UnixNano())
	// The target a Hopper device gets from this NVRTC (sm_90a from 12 on):
	// the code whose spills matter. sm_90 under NVRTC 12 or later runs on
	// no device, so it is not compiled here.
	arch := targetArch(90, major, nil)
	opts := append([]string{"-Xptxas=-v"}, compileOptions...)
	// One compile a CPU at a time (as Precompile does), reported in order.
	type job struct {
		m, arch, log string
		errs         []string
	}
	var jobs []*job
	for _, m := range Modules() {
		jobs = append(jobs, &job{m: m, arch: arch})
	}
	slots := make(chan struct{}, runtime.NumCPU())
	var wg sync.WaitGroup
	for _, j := range jobs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			slots <- struct{}{}
			defer func() { <-slots }()
			j.log, j.errs = compileChecked(j.m, j.arch, opts, fresh)
		}()
	}
	wg.Wait()
	for _, j := range jobs {
		if j.log != "" {
			t.Logf("%s (%s):\n%s", j.m, j.arch, strings.TrimSpace(j.log))
		}
		for _, e := range j.errs {
			t.Error(e)
		}
	}
}

// compileChecked compiles module m, with suffix appended, for arch and
// returns NVRTC's log and what is wrong: a failed or empty compile, a
// missing ptxas report, or a kernel that uses local memory without being
// in spillMeasured.
func compileChecked(m, arch string, opts []string, suffix string) (string, []string) {
	src, err := moduleSource(m)
	if err != nil {
		return "", []string{err.Error()}
	}
	src += suffix
	img, log, err := nvrtcCompile(m, src, arch, opts)
	if err != nil {
		return "", []string{fmt.Sprintf("%s for %s: %v", m, arch, err)}
	}
	var errs []string
	if len(img) == 0 {
		errs = append(errs, fmt.Sprintf("%s for %s: empty image", m, arch))
	}
	// Local memory in these kernels means an array indexed at run time or a
	// spill: both slow the memory-bound loops badly (but for
	// spillMeasured's kernels).
	if !strings.Contains(log, "Compiling entry function '") {
		errs = append(errs, fmt.Sprintf("%s for %s: no ptxas report in the log, so its spills are unchecked (a compile cache answered?)", m, arch))
	}
	fn := ""
	for _, line := range strings.Split(log, "\n") {
		if i := strings.Index(line, "Compiling entry function '"); i >= 0 {
			fn, _, _ = strings.Cut(line[i+len("Compiling entry function '"):], "'")
		}
		// A stack frame without spills is an array indexed at run time (seen
		// where a loop's bound halved each pass and was not unrolled).
		spills := strings.Contains(line, "bytes spill") && !strings.Contains(line, "0 bytes spill stores, 0 bytes spill loads")
		stack := strings.Contains(line, "bytes stack frame") && !strings.Contains(line, " 0 bytes stack frame")
		if (spills || stack) && !spillMeasured[fn] {
			errs = append(errs, fmt.Sprintf("%s for %s uses local memory (%s): %s", m, arch, fn, line))
		}
	}
	return log, errs
}

// spillMeasured lists the kernels whose few spilled bytes were measured
// to cost less than the occupancy their register bound buys: the
// streaming MoE pair at three and four blocks a multiprocessor (80 and 64
// registers, 40 and 8 bytes spilled under NVRTC 11.8) runs 7-9% faster
// than at two without spills (docs/perf.md, 2026-11-29 (8)); the wide-tile
// pairs as measured (12, 44 and 4 bytes; w4u's down without its 4 bytes,
// two groups a batch at four blocks, 1-5% slower: 2026-11-29 (9)).
var spillMeasured = map[string]bool{"moeb_gate_up_s2f34": true, "moeb_down_s2f34": true,
	"moeb_gate_up_w2u": true, "moeb_down_w2u": true, "moeb_down_w4u": true}
