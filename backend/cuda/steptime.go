//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"
	"io"
	"os"
	"slices"
	"time"
)

// stepTimer splits the wall time of steps into the host's work and the
// wait for the device (MMFP4_CUDA_STEPTIME=1), by the step's row count, so
// that batch-1 decode and a serving batch of 32 rows are reported apart: a
// step runs from one SetBatch to the next; flush is the time spent
// recording the queued ops and launching them (or their graph), wait the
// time in the device calls after a flush (read-backs and syncs, which wait
// for the launched work). The rest is the model's and the caller's host
// code, the engine's included.
type stepTimer struct {
	start   time.Time
	rows    int
	cur     [2]time.Duration // this step's flush and wait
	buckets map[int]*stepTotals
}

// stepTotals sums the steps of one row count.
type stepTotals struct {
	steps              int
	total, flush, wait time.Duration
}

func newStepTimer() *stepTimer {
	if os.Getenv("MMFP4_CUDA_STEPTIME") != "1" {
		return nil
	}
	return &stepTimer{buckets: map[int]*stepTotals{}}
}

// begin ends the step before and starts one of the given rows.
func (s *stepTimer) begin(rows int) {
	if s == nil {
		return
	}
	now := time.Now()
	if !s.start.IsZero() {
		t := s.buckets[s.rows]
		if t == nil {
			t = &stepTotals{}
			s.buckets[s.rows] = t
		}
		t.steps++
		t.total += now.Sub(s.start)
		t.flush += s.cur[0]
		t.wait += s.cur[1]
	}
	s.start, s.rows, s.cur = now, rows, [2]time.Duration{}
}

func (s *stepTimer) add(i int, since time.Time) {
	if s != nil {
		s.cur[i] += time.Since(since)
	}
}

// report prints one line per row count.
func (s *stepTimer) report(w io.Writer) {
	if s == nil {
		return
	}
	rows := make([]int, 0, len(s.buckets))
	for r := range s.buckets {
		rows = append(rows, r)
	}
	slices.Sort(rows)
	for _, r := range rows {
		t := s.buckets[r]
		ms := func(d time.Duration) float64 { return float64(d) / float64(t.steps) / 1e6 }
		fmt.Fprintf(w, "cuda step time: %d steps of %d rows, per step %.3f ms = host %.3f ms (model, engine) + %.3f ms recording and launching + %.3f ms waiting for the device\n",
			t.steps, r, ms(t.total), ms(t.total-t.flush-t.wait), ms(t.flush), ms(t.wait))
	}
}
