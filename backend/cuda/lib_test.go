//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"slices"
	"testing"
)

func TestCompareVersions(t *testing.T) {
	names := []string{"/l/libnvrtc.so.12", "/l/libnvrtc.so.11.2", "/l/libnvrtc.so.13.0.48", "/l/libnvrtc.so", "/l/libnvrtc.so.12.8"}
	slices.SortFunc(names, func(a, b string) int { return compareVersions(b, a) })
	want := []string{"/l/libnvrtc.so.13.0.48", "/l/libnvrtc.so.12.8", "/l/libnvrtc.so.12", "/l/libnvrtc.so.11.2", "/l/libnvrtc.so"}
	if !slices.Equal(names, want) {
		t.Fatalf("order %v, want %v", names, want)
	}
}

// Where there is no driver, Open fails with ErrNoDriver or ErrNoDevice and
// does not panic; an override that names a missing file is reported.
func TestOpenWithoutDriverOverride(t *testing.T) {
	_, _, err := openLib("MMFP4_TEST_LIB", []string{"libmmfp4-does-not-exist.so.1"})
	if err == nil {
		t.Fatal("missing library: no error")
	}
	t.Setenv("MMFP4_TEST_LIB", "/nonexistent/libcuda.so.1")
	if _, _, err := openLib("MMFP4_TEST_LIB", []string{"libc.so.6"}); err == nil {
		t.Fatal("override naming a missing file: no error")
	}
}
