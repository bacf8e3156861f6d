package bench

import (
	"math/rand/v2"
	"testing"

	"github.com/mmfp4/mmfp4/internal/benchmode"
)

// Every kernel available here gives the Go reference's sum, on lengths that
// are and are not multiples of the vector loops' blocks.
func TestSumKernelsMatchGo(t *testing.T) {
	r := rand.New(rand.NewPCG(11, 12))
	for _, n := range []int{0, 1, 31, 32, 33, 63, 64, 65, 127, 1000, 4096, 4096 + 17} {
		buf := make([]uint64, n)
		for i := range buf {
			buf[i] = r.Uint64()
		}
		want := sumGo(buf)
		// The definition, one add at a time.
		var def uint64
		for _, v := range buf {
			def += v
		}
		if want != def {
			t.Fatalf("n=%d: sumGo %d, definition %d", n, want, def)
		}
		if got := sum(buf); got != want {
			t.Errorf("n=%d: %s kernel %d, Go %d", n, readKernel(), got, want)
		}
		testVectorKernels(t, buf, want)
	}
}

func TestForceGoUsesReference(t *testing.T) {
	forceGo = true
	defer func() { forceGo = false }()
	if readKernel() != "go" {
		t.Errorf("kernel %s with forceGo", readKernel())
	}
	buf := []uint64{1, 2, 3, 1 << 63, 1 << 63}
	if got := sum(buf); got != 6 {
		t.Errorf("sum %d, want 6 (wrapping)", got)
	}
}

// MeasureReadBandwidth runs on a small buffer and reports what it did; its
// figure is not checked (no timing thresholds in tests).
func TestMeasureReadBandwidthSmall(t *testing.T) {
	bw := MeasureReadBandwidth(1<<20, 3, 2)
	if bw.Threads != 3 || bw.Passes != 2 || bw.Bytes != 1<<20 || bw.Kernel != readKernel() || !(bw.GBPerSec > 0) {
		t.Errorf("got %+v", bw)
	}
}

func BenchmarkReadBandwidth(b *testing.B) {
	benchmode.Check(b)
	for i := 0; i < b.N; i++ {
		bw := MeasureReadBandwidth(1<<30, 0, 10)
		b.ReportMetric(bw.GBPerSec, "GB/s")
	}
}
