//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"
	"io"
	"os"
	"time"
)

// stepTimer splits the wall time of single-row steps (decode at batch 1)
// into the host's work and the wait for the device (MMFP4_CUDA_STEPTIME=1):
// a step runs from one SetBatch to the next; flush is the time spent
// recording the queued ops and launching them (or their graph), wait the
// time in the device calls after a flush (read-backs and syncs, which wait
// for the launched work). The rest is the model's and the caller's host
// code, the engine's included.
type stepTimer struct {
	start              time.Time
	single             bool
	steps              int
	total, flush, wait time.Duration
	cur                [2]time.Duration // this step's flush and wait
}

func newStepTimer() *stepTimer {
	if os.Getenv("MMFP4_CUDA_STEPTIME") != "1" {
		return nil
	}
	return &stepTimer{}
}

// begin ends the step before (counted when it had one row) and starts one.
func (s *stepTimer) begin(rows int) {
	if s == nil {
		return
	}
	now := time.Now()
	if s.single && !s.start.IsZero() {
		s.steps++
		s.total += now.Sub(s.start)
		s.flush += s.cur[0]
		s.wait += s.cur[1]
	}
	s.start, s.single, s.cur = now, rows == 1, [2]time.Duration{}
}

func (s *stepTimer) add(i int, since time.Time) {
	if s != nil {
		s.cur[i] += time.Since(since)
	}
}

func (s *stepTimer) report(w io.Writer) {
	if s == nil || s.steps == 0 {
		return
	}
	ms := func(d time.Duration) float64 { return float64(d) / float64(s.steps) / 1e6 }
	fmt.Fprintf(w, "cuda step time: %d single-row steps, per step %.3f ms = host %.3f ms (model, engine) + %.3f ms recording and launching + %.3f ms waiting for the device\n",
		s.steps, ms(s.total), ms(s.total-s.flush-s.wait), ms(s.flush), ms(s.wait))
}
