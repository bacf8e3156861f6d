//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"errors"
	"strings"
	"testing"
)

func TestParseStageDelays(t *testing.T) {
	d, err := parseStageDelays("3=2000,7=15")
	if err != nil || d != [8]uint32{3: 2000, 7: 15} {
		t.Errorf("3=2000,7=15: %v, %v", d, err)
	}
	if d, err := parseStageDelays(""); err != nil || d != [8]uint32{} {
		t.Errorf("empty: %v, %v", d, err)
	}
	for _, bad := range []string{"8=1", "-1=5", "2", "2=x", "2=-5", "1=5,"} {
		if _, err := parseStageDelays(bad); err == nil || !strings.Contains(err.Error(), "MMFP4_CUDA_DELAY") {
			t.Errorf("%q: want an error naming MMFP4_CUDA_DELAY, got %v", bad, err)
		}
	}
}

// The stage delays' device code (STAGE_DELAY under MM_DELAY) compiles:
// one module that takes a delay, compiled with NVRTC where it loads.
func TestStageDelayCompiles(t *testing.T) {
	major, _, _, err := NVRTCVersion()
	if errors.Is(err, ErrNoNVRTC) {
		t.Skipf("SKIPPED: NVRTC cannot be loaded: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	src, err := moduleSource("gemv")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(src, "STAGE_DELAY(4)") {
		t.Fatal("gemv.cu has no STAGE_DELAY(4)")
	}
	if _, _, err := nvrtcCompile("gemv", src, targetArch(90, major, nil), append([]string{"-DMM_DELAY"}, compileOptions...)); err != nil {
		t.Fatal(err)
	}
}
