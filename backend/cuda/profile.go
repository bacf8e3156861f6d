//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
)

// profiler times every queued op of one-row (decode) steps on the device
// (MMFP4_CUDA_PROFILE=1): each
// flush first queues a spin kernel long enough for the host to queue the
// ops behind it, then an event between consecutive ops, so each op's time
// is device time without the host's launch gaps (about what a graph replay
// sees). The totals by op name are written to stderr when the backend
// closes.
type profiler struct {
	events            []*Event
	ops               map[string]*opTime
	flushes, launches int
	// all: every step, prefill too (MMFP4_CUDA_PROFILE=all), not only
	// one-row steps.
	all bool
}

type opTime struct {
	calls, launches int
	ms              float64
}

func newProfiler() *profiler {
	v := os.Getenv("MMFP4_CUDA_PROFILE")
	if v != "1" && v != "all" {
		return nil
	}
	return &profiler{ops: map[string]*opTime{}, all: v == "all"}
}

// hostPerOp bounds the host's time to queue one op (a few launches through
// purego), for sizing the spin.
const hostPerOp = 25e-6

// run runs ops on the device thread with events around each.
func (p *profiler) run(c *Ctx, ops []queuedOp) error {
	for len(p.events) < len(ops)+1 {
		e, err := c.NewEvent()
		if err != nil {
			return err
		}
		p.events = append(p.events, e)
	}
	// Ops timed one by one: without programmatic dependent launch, which
	// would let each start inside the one before.
	defer func(on bool) { c.pdl = on }(c.pdl)
	c.pdl = false
	clock := float64(c.info.ClockKHz) * 1e3
	if err := c.Spin(int64(float64(len(ops))*hostPerOp*clock) + 100000); err != nil {
		return err
	}
	before := c.launches
	if err := c.RecordAt(p.events[0]); err != nil {
		return err
	}
	counts := make([]int, len(ops))
	for i, q := range ops {
		n := c.launches
		if err := q.fn(c); err != nil {
			return fmt.Errorf("%s: %w", q.op, err)
		}
		counts[i] = c.launches - n
		if err := c.RecordAt(p.events[i+1]); err != nil {
			return err
		}
	}
	if err := c.Sync(); err != nil {
		return err
	}
	for i, q := range ops {
		ms, err := c.ElapsedDone(p.events[i], p.events[i+1])
		if err != nil {
			return err
		}
		t := p.ops[q.op]
		if t == nil {
			t = &opTime{}
			p.ops[q.op] = t
		}
		t.calls++
		t.launches += counts[i]
		t.ms += float64(ms)
	}
	p.flushes++
	p.launches += c.launches - before
	if p.all && p.flushes%profileEvery == 0 {
		p.report(os.Stderr) // a server may never close the backend
	}
	return nil
}

// profileEvery is how often (in flushes) MMFP4_CUDA_PROFILE=all reports
// the totals so far.
const profileEvery = 10

// report writes the totals, largest first.
func (p *profiler) report(w io.Writer) {
	names := make([]string, 0, len(p.ops))
	total := 0.0
	for n, t := range p.ops {
		names = append(names, n)
		total += t.ms
	}
	slices.SortFunc(names, func(a, b string) int {
		if p.ops[a].ms > p.ops[b].ms {
			return -1
		}
		if p.ops[a].ms < p.ops[b].ms {
			return 1
		}
		return strings.Compare(a, b)
	})
	fmt.Fprintf(w, "cuda profile: %d flushes, %d launches, %.3f ms of device time in ops\n", p.flushes, p.launches, total)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "op\tcalls\tlaunches\ttotal ms\tus/call\tshare\t")
	for _, n := range names {
		t := p.ops[n]
		fmt.Fprintf(tw, "%s\t%d\t%d\t%.3f\t%.2f\t%.1f%%\t\n", n, t.calls, t.launches, t.ms, 1e3*t.ms/float64(t.calls), 100*t.ms/total)
	}
	tw.Flush()
}

func (p *profiler) free(c *Ctx) error {
	var errs []error
	for _, e := range p.events {
		errs = append(errs, c.DestroyEvent(e))
	}
	p.events = nil
	return errors.Join(errs...)
}

// MemoryBandwidth measures the device's copy rate: bytes read plus bytes
// written per second by device-to-device copies of 1 GiB, the ceiling that
// decode's roofline fraction is taken against. kernel names the method.
func (b *Backend) MemoryBandwidth() (bytesPerSec float64, kernel string, err error) {
	const n, reps = 1 << 30, 10
	b.flush()
	err = b.dev.Do(func(c *Ctx) error {
		src, err := c.Alloc(n)
		if err != nil {
			return err
		}
		defer c.Free(src)
		dst, err := c.Alloc(n)
		if err != nil {
			return err
		}
		defer c.Free(dst)
		if err := errors.Join(c.Memset(src.Ptr, 0x5A, n), c.CopyDevice(dst.Ptr, src.Ptr, n)); err != nil { // warm-up
			return err
		}
		start, err := c.Record()
		if err != nil {
			return err
		}
		defer c.DestroyEvent(start)
		for i := 0; i < reps; i++ {
			if err := c.CopyDevice(dst.Ptr, src.Ptr, n); err != nil {
				return err
			}
		}
		end, err := c.Record()
		if err != nil {
			return err
		}
		defer c.DestroyEvent(end)
		ms, err := c.Elapsed(start, end)
		if err != nil {
			return err
		}
		bytesPerSec = 2 * n * reps / (float64(ms) / 1e3)
		return nil
	})
	if err == nil {
		err = b.dev.Do(func(c *Ctx) error { return c.Trim() }) // the 2 GiB back to the driver
	}
	i := b.dev.Info()
	return bytesPerSec, fmt.Sprintf("device-to-device copy, read+write (%s, clock-derived peak %.0f GB/s)", i.Name, i.PeakBandwidth()/1e9), err
}
