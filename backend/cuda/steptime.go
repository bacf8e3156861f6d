//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"errors"
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
// code, the engine's included. Events around each flush's work give the
// device's busy time; the step's wall time less that is the GPU idling.
type stepTimer struct {
	start   time.Time
	rows    int
	cur     [2]time.Duration // this step's flush and wait
	lead    time.Duration    // this step's host time before its first flush (-1: none yet)
	buckets map[int]*stepTotals

	events  []*Event // a pair a flush: before and after its work
	used    int      // pairs recorded in this step
	harvest *stepTotals
}

// stepTotals sums the steps of one row count.
type stepTotals struct {
	steps                          int
	total, flush, wait, busy, lead time.Duration
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
		t.lead += max(s.lead, 0) // a step without a flush has no lead
		s.harvest = t
	}
	s.start, s.rows, s.cur, s.lead = now, rows, [2]time.Duration{}, -1
}

// around runs work (a flush's launches) between two events, on the device
// thread, after adding the previous step's pairs to its row count's busy
// time (that step has been read back, so they are complete).
func (s *stepTimer) around(c *Ctx, work func() error) error {
	if s == nil {
		return work()
	}
	if s.lead < 0 {
		s.lead = time.Since(s.start)
	}
	if err := s.collect(c); err != nil {
		return err
	}
	for len(s.events) < 2*s.used+2 {
		e, err := c.NewEvent()
		if err != nil {
			return err
		}
		s.events = append(s.events, e)
	}
	if err := c.RecordAt(s.events[2*s.used]); err != nil {
		return err
	}
	if err := work(); err != nil {
		return err
	}
	s.used++
	return c.RecordAt(s.events[2*s.used-1])
}

// collect adds the ended step's event pairs to its row count's busy time.
func (s *stepTimer) collect(c *Ctx) error {
	if s.harvest == nil {
		return nil
	}
	for i := 0; i < s.used; i++ {
		ms, err := c.Elapsed(s.events[2*i], s.events[2*i+1])
		if err != nil {
			return err
		}
		s.harvest.busy += time.Duration(float64(ms) * 1e6)
	}
	s.harvest, s.used = nil, 0
	return nil
}

func (s *stepTimer) add(i int, since time.Time) {
	if s != nil {
		s.cur[i] += time.Since(since)
	}
}

// report prints one line per row count, on the device thread after a
// sync, and frees the events. The step in progress is not counted.
func (s *stepTimer) report(c *Ctx, w io.Writer) error {
	if s == nil {
		return nil
	}
	err := s.collect(c)
	for _, e := range s.events {
		err = errors.Join(err, c.DestroyEvent(e))
	}
	s.events = nil
	rows := make([]int, 0, len(s.buckets))
	for r := range s.buckets {
		rows = append(rows, r)
	}
	slices.Sort(rows)
	for _, r := range rows {
		t := s.buckets[r]
		ms := func(d time.Duration) float64 { return float64(d) / float64(t.steps) / 1e6 }
		fmt.Fprintf(w, "cuda step time: %d steps of %d rows, per step %.3f ms = host %.3f ms (model, engine) + %.3f ms recording and launching + %.3f ms waiting for the device; device busy %.3f ms; first flush after %.3f ms\n",
			t.steps, r, ms(t.total), ms(t.total-t.flush-t.wait), ms(t.flush), ms(t.wait), ms(t.busy), ms(t.lead))
	}
	return err
}
