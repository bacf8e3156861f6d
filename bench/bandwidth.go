package bench

import (
	"runtime"
	"runtime/debug"
	"sync"
	"time"
)

// forceGo makes sum use the Go reference; tests set it.
var forceGo bool

// sumGo is the reference for the vector read kernels: the wrapping sum of
// buf. Four accumulators; a scalar loop like this one measures the core
// rather than the memory, which is why the bandwidth test uses the vector
// kernels where the CPU has them.
func sumGo(buf []uint64) uint64 {
	var s0, s1, s2, s3 uint64
	i := 0
	for ; i+4 <= len(buf); i += 4 {
		b := buf[i : i+4 : i+4]
		s0 += b[0]
		s1 += b[1]
		s2 += b[2]
		s3 += b[3]
	}
	for ; i < len(buf); i++ {
		s0 += buf[i]
	}
	return s0 + s1 + s2 + s3
}

// Bandwidth is a measured read bandwidth.
type Bandwidth struct {
	GBPerSec float64 // 1e9 bytes per second, best pass
	Threads  int
	Kernel   string // "avx512", "avx2" or "go"
	Bytes    int64  // buffer size
	Passes   int
}

// sink keeps the sums alive so the reads cannot be optimised away.
var sink uint64

// MeasureReadBandwidth sums a buffer of size bytes (rounded down to 4 KiB)
// with every one of threads goroutines reading its own contiguous part, and
// returns the best of passes passes. The buffer is written first so its
// pages are real memory, not the shared zero page, and handed back to the
// system at the end.
func MeasureReadBandwidth(size int64, threads, passes int) Bandwidth {
	if threads <= 0 {
		threads = runtime.GOMAXPROCS(0)
	}
	passes = max(passes, 1)
	n := int(size/8) &^ 511
	buf := make([]uint64, n)
	// Each thread owns an equal part, a multiple of 512 bytes.
	bounds := make([]int, threads+1)
	for i := range bounds {
		bounds[i] = (n / 64 * i / threads) * 64
	}
	run := func(fn func(part []uint64, t int)) {
		var wg sync.WaitGroup
		for t := 0; t < threads; t++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				fn(buf[bounds[t]:bounds[t+1]], t)
			}()
		}
		wg.Wait()
	}
	run(func(part []uint64, t int) {
		for i := range part {
			part[i] = uint64(bounds[t] + i)
		}
	})
	sums := make([]uint64, threads)
	best := time.Duration(1<<63 - 1)
	for p := 0; p < passes; p++ {
		start := time.Now()
		run(func(part []uint64, t int) { sums[t] = sum(part) })
		best = min(best, time.Since(start))
		for _, s := range sums {
			sink += s
		}
	}
	bytes := int64(8 * n)
	buf = nil
	debug.FreeOSMemory()
	return Bandwidth{GBPerSec: float64(bytes) / best.Seconds() / 1e9, Threads: threads, Kernel: readKernel(),
		Bytes: bytes, Passes: passes}
}
