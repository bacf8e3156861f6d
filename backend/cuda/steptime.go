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

// stepTimer splits the wall time of steps (MMFP4_CUDA_STEPTIME=1), by the
// step's row count, so that batch-1 decode and a serving batch of 32 rows
// are reported apart. A step runs from one SetBatch to the next. On the
// model's thread: handing flushes to the device thread (hand), and waiting
// in every other call that returns only once the device thread has run it
// (wait, Device.Do: read-backs, syncs, and through them the device
// thread's backlog and the device); the rest is the model's and the
// caller's host code, the engine's included. On the device thread, for the
// same steps: running the queued ops' closures (their host code and the
// recording of their launches), finding the graph, and the driver calls
// that launch it. Events around each flush's launches give the device's
// busy time; the step's wall time less that is the GPU idling.
//
// The device thread reads a step's events two steps later, when they are
// complete: a step queued ahead of the one before (Batch.Prev) must not
// wait for that one here.
type stepTimer struct {
	// The model's thread.
	d       *Device
	id      int // of the current step (0: none yet)
	start   time.Time
	rows    int
	hand    time.Duration // this step's time handing flushes over
	lead    time.Duration // this step's host time before its first flush (-1: none yet)
	buckets map[int]*stepTotals
	// waited is the device's Do time (Device.waited) at the step's start,
	// and handWait the part of the step's that flushes spent (waiting for
	// the device thread where flushes wait, WaitFlushes).
	waited, handWait time.Duration

	// The device thread.
	dev    map[int]*deviceTotals
	open   []*stepEvents // steps whose events are not read yet, oldest first
	spares []*Event
}

// stepTotals sums the steps of one row count, on the model's thread.
type stepTotals struct {
	steps, flushes          int
	total, hand, wait, lead time.Duration
}

// deviceTotals sums the device thread's work for steps of one row count.
type deviceTotals struct {
	steps, flushes         int
	direct, captured       int // flushes issued directly, captured as graphs
	record, lookup, launch time.Duration
	busy                   time.Duration
}

// stepEvents are one step's event pairs, a pair a flush.
type stepEvents struct {
	id, rows int
	events   []*Event
}

// flushTimes is what the device thread measured of one flush.
type flushTimes struct {
	record, lookup, launch time.Duration
	// direct: issued without a graph; captured: its graph captured now.
	direct, captured bool
}

func newStepTimer(d *Device) *stepTimer {
	if os.Getenv("MMFP4_CUDA_STEPTIME") != "1" {
		return nil
	}
	return &stepTimer{d: d, buckets: map[int]*stepTotals{}, dev: map[int]*deviceTotals{}}
}

// begin ends the step before and starts one of the given rows (model's
// thread).
func (s *stepTimer) begin(rows int) {
	if s == nil {
		return
	}
	now, waited := time.Now(), s.d.waited()
	if s.id > 0 {
		t := s.buckets[s.rows]
		if t == nil {
			t = &stepTotals{}
			s.buckets[s.rows] = t
		}
		t.steps++
		t.total += now.Sub(s.start)
		t.hand += s.hand
		t.wait += waited - s.waited - s.handWait
		t.lead += max(s.lead, 0) // a step without a flush has no lead
	}
	s.id++
	s.start, s.rows, s.lead = now, rows, -1
	s.hand, s.handWait, s.waited = 0, 0, waited
}

// flushStart notes the start of a flush's hand-over on the model's thread;
// flushEnd its end.
func (s *stepTimer) flushStart() (time.Time, time.Duration) {
	if s == nil {
		return time.Time{}, 0
	}
	if s.lead < 0 {
		s.lead = time.Since(s.start)
	}
	if t := s.buckets[s.rows]; t != nil {
		t.flushes++
	} else {
		s.buckets[s.rows] = &stepTotals{flushes: 1}
	}
	return time.Now(), s.d.waited()
}

func (s *stepTimer) flushEnd(t0 time.Time, waited time.Duration) {
	if s != nil {
		s.hand += time.Since(t0)
		s.handWait += s.d.waited() - waited
	}
}

// around runs work (a flush's launches) between two events, on the device
// thread, for step id of rows.
func (s *stepTimer) around(c *Ctx, id, rows int, work func() error) error {
	if s == nil {
		return work()
	}
	if err := s.collect(c, id-1); err != nil {
		return err
	}
	var st *stepEvents
	if n := len(s.open); n > 0 && s.open[n-1].id == id {
		st = s.open[n-1]
	} else {
		st = &stepEvents{id: id, rows: rows}
		s.open = append(s.open, st)
		s.totals(rows).steps++
	}
	for range 2 {
		if len(s.spares) == 0 {
			e, err := c.NewEvent()
			if err != nil {
				return err
			}
			s.spares = append(s.spares, e)
		}
		st.events = append(st.events, s.spares[len(s.spares)-1])
		s.spares = s.spares[:len(s.spares)-1]
	}
	if err := c.RecordAt(st.events[len(st.events)-2]); err != nil {
		return err
	}
	if err := work(); err != nil {
		return err
	}
	return c.RecordAt(st.events[len(st.events)-1])
}

// note adds a flush's times to its row count's totals (device thread).
func (s *stepTimer) note(rows int, ft *flushTimes) {
	t := s.totals(rows)
	t.flushes++
	t.record += ft.record
	t.lookup += ft.lookup
	t.launch += ft.launch
	if ft.direct {
		t.direct++
	}
	if ft.captured {
		t.captured++
	}
}

func (s *stepTimer) totals(rows int) *deviceTotals {
	t := s.dev[rows]
	if t == nil {
		t = &deviceTotals{}
		s.dev[rows] = t
	}
	return t
}

// collect adds the event pairs of the steps before step before to their
// row counts' busy time (those steps' ids have been read back, so the
// events are complete; before < 0: every step, after a sync).
func (s *stepTimer) collect(c *Ctx, before int) error {
	for len(s.open) > 0 && (before < 0 || s.open[0].id < before) {
		st := s.open[0]
		for i := 0; i+1 < len(st.events); i += 2 {
			ms, err := c.Elapsed(st.events[i], st.events[i+1])
			if err != nil {
				return err
			}
			s.totals(st.rows).busy += time.Duration(float64(ms) * 1e6)
		}
		s.spares = append(s.spares, st.events...)
		s.open = s.open[1:]
	}
	return nil
}

// report prints two lines per row count, and the graph cache's counts
// (gc may be nil), on the device thread after a sync, and frees the
// events. The step in progress is not counted.
func (s *stepTimer) report(c *Ctx, w io.Writer, gc *graphCache) error {
	if s == nil {
		return nil
	}
	if gc != nil {
		fmt.Fprintf(w, "cuda step time: graphs: %d flushes replayed, %d captured, %d issued directly; %d graphs cached\n", gc.Replays, gc.Captures, gc.Direct, len(gc.graphs))
	}
	err := s.collect(c, -1)
	for _, e := range s.spares {
		err = errors.Join(err, c.DestroyEvent(e))
	}
	s.spares = nil
	rows := make([]int, 0, len(s.buckets))
	for r := range s.buckets {
		rows = append(rows, r)
	}
	slices.Sort(rows)
	for _, r := range rows {
		t := s.buckets[r]
		if t.steps == 0 {
			continue
		}
		ms := func(d time.Duration) float64 { return float64(d) / float64(t.steps) / 1e6 }
		d := s.dev[r]
		if d == nil || d.steps == 0 {
			d = &deviceTotals{steps: 1}
		}
		dms := func(x time.Duration) float64 { return float64(x) / float64(d.steps) / 1e6 }
		// The device thread's figures are a step's averages over the steps
		// it saw (the one in progress included).
		fmt.Fprintf(w, "cuda step time: %d steps of %d rows, per step %.3f ms = host %.3f ms (model, engine) + %.3f ms handing over + %.3f ms waiting; device busy %.3f ms; first flush after %.3f ms\n",
			t.steps, r, ms(t.total), ms(t.total-t.hand-t.wait), ms(t.hand), ms(t.wait), dms(d.busy), ms(t.lead))
		fmt.Fprintf(w, "cuda step time, device thread: %d steps of %d rows, per step %.3f ms running the ops' closures + %.3f ms finding graphs + %.3f ms launching, %.1f flushes (in all %d issued directly, %d captured, the rest replayed)\n",
			d.steps, r, dms(d.record), dms(d.lookup), dms(d.launch), float64(d.flushes)/float64(d.steps), d.direct, d.captured)
	}
	return err
}
