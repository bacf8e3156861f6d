package cpu

import (
	"testing"

	"github.com/mmfp4/mmfp4/internal/benchmode"
)

// BenchmarkInt8Peak runs independent AVX-512 vpdpbusd instructions on every
// thread: the int8 multiply-add peak that the prefill kernels are held to
// (GOP/s counts a multiply and an add per byte pair).
func BenchmarkInt8Peak(b *testing.B) {
	benchmode.Check(b)
	if !hasAVX512 {
		b.Skip("no AVX-512 VNNI")
	}
	be := New(Options{})
	const iters = 1 << 20
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		be.pool.run(be.threads, 1, func(lo, hi int) { vnniPeakAVX512(iters) })
	}
	b.ReportMetric(float64(be.threads)*iters*16*128*float64(b.N)/b.Elapsed().Seconds()/1e9, "GOP/s")
}
