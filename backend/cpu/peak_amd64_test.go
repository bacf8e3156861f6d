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
		be.workers.run(be.threads, 1, func(lo, hi int) { vnniPeakAVX512(iters) })
	}
	b.ReportMetric(float64(be.threads)*iters*16*128*float64(b.N)/b.Elapsed().Seconds()/1e9, "GOP/s")
}

// BenchmarkMemoryReadAVX512 reads a 1 GiB buffer with 64-byte loads on
// every thread, in chunks of 1 MiB handed out by the worker pool: the read
// bandwidth the decode kernels are compared with (the scalar Go loop of
// BenchmarkMemoryRead measures the core rather than the memory).
func BenchmarkMemoryReadAVX512(b *testing.B) {
	benchmode.Check(b)
	if !hasAVX512 {
		b.Skip("no AVX-512")
	}
	buf := make([]byte, 1<<30)
	for i := range buf {
		buf[i] = byte(i)
	}
	be := New(Options{})
	const chunk = 1 << 20
	var sink [1024]uint64
	b.SetBytes(int64(len(buf)))
	b.ResetTimer()
	var best passTimer
	for i := 0; i < b.N; i++ {
		best.start()
		be.workers.run(len(buf)/chunk, 1, func(lo, hi int) {
			for c := lo; c < hi; c++ {
				sink[c] = readAVX512(&buf[c*chunk], chunk)
			}
		})
		best.stop(int64(len(buf)))
	}
	b.ReportMetric(float64(len(buf))*float64(b.N)/b.Elapsed().Seconds()/1e9, "GB/s")
	best.report(b)
}

// BenchmarkFloatPeak runs independent AVX-512 float fused multiply-adds on
// every thread: the float32 peak of the attention kernels (GFLOP/s counts
// two operations per lane).
func BenchmarkFloatPeak(b *testing.B) {
	benchmode.Check(b)
	if !hasAVX512 {
		b.Skip("no AVX-512")
	}
	be := New(Options{})
	const iters = 1 << 20
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		be.workers.run(be.threads, 1, func(lo, hi int) { fmaPeakAVX512(iters) })
	}
	b.ReportMetric(float64(be.threads)*iters*16*16*2*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
}
