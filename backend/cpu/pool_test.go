package cpu

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Every item is run exactly once, by any mix of callers: concurrent
// dispatchers, a dispatch from inside a task, and workers that have parked.
func TestPoolCoversEachItemOnce(t *testing.T) {
	p := sharedWorkers(3)
	check := func(n, grain int) {
		counts := make([]atomic.Int32, n)
		p.run(n, grain, func(lo, hi int) {
			if hi-lo > grain || lo >= hi {
				t.Errorf("chunk [%d,%d) with grain %d", lo, hi, grain)
			}
			for i := lo; i < hi; i++ {
				counts[i].Add(1)
			}
		})
		for i := range counts {
			if c := counts[i].Load(); c != 1 {
				t.Fatalf("n=%d grain=%d: item %d ran %d times", n, grain, i, c)
			}
		}
	}
	for _, n := range []int{0, 1, 2, 7, 100, 1000} {
		for _, grain := range []int{1, 3, 64} {
			check(n, grain)
		}
	}
	time.Sleep(2 * spinFor) // let the workers park
	check(50, 1)

	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 50; i++ {
				check(37, 2)
			}
		}()
	}
	wg.Wait()

	var inner atomic.Int32
	p.run(4, 1, func(lo, hi int) {
		p.run(10, 1, func(lo, hi int) { inner.Add(int32(hi - lo)) })
	})
	if inner.Load() != 40 {
		t.Fatalf("nested dispatch ran %d inner items, want 40", inner.Load())
	}
}
