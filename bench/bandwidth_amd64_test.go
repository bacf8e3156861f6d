package bench

import "testing"

func testVectorKernels(t *testing.T, buf []uint64, want uint64) {
	t.Helper()
	if hasAVX512 {
		n := len(buf) &^ 63
		var got uint64
		if n > 0 {
			got = sumAVX512(&buf[0], n)
		}
		if got+sumGo(buf[n:]) != want {
			t.Errorf("n=%d: avx512 kernel disagrees with Go", len(buf))
		}
	}
	if hasAVX2 {
		n := len(buf) &^ 31
		var got uint64
		if n > 0 {
			got = sumAVX2(&buf[0], n)
		}
		if got+sumGo(buf[n:]) != want {
			t.Errorf("n=%d: avx2 kernel disagrees with Go", len(buf))
		}
	}
}
