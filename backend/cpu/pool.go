package cpu

import (
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// workerPool is a set of persistent worker goroutines that run one task at a
// time. A decode step issues thousands of small matrix products, so the
// hand-off must cost well under a microsecond when the workers are busy:
// idle workers spin for a short while before they park on a channel.
//
// One pool exists per thread count (sharedWorkers), whatever the number of
// backends. A dispatch that finds the pool busy (another sequence, or a
// task that dispatches from inside a task) runs inline on its caller.
type workerPool struct {
	mu      sync.Mutex // held by the dispatching goroutine
	workers int        // goroutines besides the caller
	task    atomic.Pointer[task]
	gen     atomic.Uint64 // bumped once per task
	asleep  []atomic.Bool // worker w is parked on wake[w]
	wake    []chan struct{}
}

// task is one dispatch: items [0, n) are handed out grain at a time.
type task struct {
	fn     func(lo, hi int)
	n      int64
	grain  int64
	chunks int64
	next   atomic.Int64 // first item not yet handed out
	done   atomic.Int64 // chunks finished
}

// spinFor is how long an idle worker polls before it parks. Between the
// products of a decode step the caller's serial work takes microseconds.
const spinFor = 100 * time.Microsecond

var (
	poolsMu sync.Mutex
	pools   = map[int]*workerPool{}
)

// sharedWorkers returns the pool with threads-1 workers.
func sharedWorkers(threads int) *workerPool {
	poolsMu.Lock()
	defer poolsMu.Unlock()
	if p := pools[threads]; p != nil {
		return p
	}
	p := &workerPool{workers: threads - 1, asleep: make([]atomic.Bool, threads-1), wake: make([]chan struct{}, threads-1)}
	for w := range p.wake {
		p.wake[w] = make(chan struct{}, 1)
	}
	for w := 0; w < p.workers; w++ {
		go p.work(w)
	}
	pools[threads] = p
	return p
}

// run calls fn on disjoint chunks [lo, hi) that cover [0, n), each at most
// grain long (the last may be shorter), on the caller and the workers. It
// returns when all chunks are done.
func (p *workerPool) run(n, grain int, fn func(lo, hi int)) {
	if n <= 0 {
		return
	}
	grain = max(grain, 1)
	if p.workers == 0 || n <= grain || !p.mu.TryLock() {
		for lo := 0; lo < n; lo += grain {
			fn(lo, min(lo+grain, n))
		}
		return
	}
	defer p.mu.Unlock()
	t := &task{fn: fn, n: int64(n), grain: int64(grain), chunks: int64((n + grain - 1) / grain)}
	p.task.Store(t)
	p.gen.Add(1)
	for w := range p.asleep {
		if p.asleep[w].CompareAndSwap(true, false) {
			p.wake[w] <- struct{}{}
		}
	}
	t.do()
	for i := 0; t.done.Load() != t.chunks; i++ {
		if i%1024 == 1023 {
			runtime.Gosched() // a worker was descheduled: let it run
		}
	}
}

// do runs chunks of t until none is left.
func (t *task) do() {
	for {
		lo := t.next.Add(t.grain) - t.grain
		if lo >= t.n {
			return
		}
		t.fn(int(lo), int(min(lo+t.grain, t.n)))
		t.done.Add(1)
	}
}

// work is worker w's loop: wait for a new generation, run its task.
func (p *workerPool) work(w int) {
	seen := p.gen.Load()
	for {
		seen = p.wait(w, seen)
		// A worker that wakes late may find an older task whose items are
		// all handed out; do then returns at once.
		p.task.Load().do()
	}
}

// wait returns the first generation after seen: it polls for spinFor, then
// parks until the dispatcher wakes it.
func (p *workerPool) wait(w int, seen uint64) uint64 {
	start := time.Now()
	for i := 0; ; i++ {
		if g := p.gen.Load(); g != seen {
			return g
		}
		if i%256 != 255 || time.Since(start) < spinFor {
			continue
		}
		p.asleep[w].Store(true)
		if g := p.gen.Load(); g != seen {
			if !p.asleep[w].CompareAndSwap(true, false) {
				<-p.wake[w] // the dispatcher cleared the flag and sent
			}
			return g
		}
		<-p.wake[w]
		start, i = time.Now(), 0
	}
}
