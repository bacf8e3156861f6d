//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"bufio"
	"fmt"
	"os"
	"unsafe"
)

// tracer holds the device histogram and the step count.
type tracer struct {
	buf          Buffer
	steps        int // steps of traceRows rows seen
	started      bool
	lastID, done int
}

// traceModule points a freshly loaded module's mm_trace at the histogram.
func (c *Ctx) traceModule(m *module) error {
	if traceFile == "" {
		return nil
	}
	if c.trace == nil {
		buf, err := c.Alloc(traceMaxSites * traceBuckets * 4)
		if err != nil {
			return err
		}
		c.trace = &tracer{buf: buf, lastID: -1}
	}
	var ptr, size uint64
	if r := drv.cuModuleGetGlobal(&ptr, &size, m.handle, "mm_trace"); r != 0 {
		return newError("cuModuleGetGlobal", "mm_trace", r)
	}
	v := c.trace.buf.Ptr
	if err := check("cuMemcpyHtoDAsync", drv.cuMemcpyHtoDAsync(ptr, unsafe.Pointer(&v), 8, c.stream)); err != nil {
		return err
	}
	return c.Sync()
}

// What a flush does to the trace.
const (
	traceNone  = iota
	traceClear // the first flush of the traced step: clear the histogram
	traceWrite // the first flush after it: write the histogram out
)

// next is what the flush of step id, of rows rows, does when the traced
// step is one of want rows: the traceStep-th such step of one row, the
// traceStepRows-th of more.
func (t *tracer) next(id, rows, want int) int {
	if t.done > 0 {
		return traceNone
	}
	if rows == want && id != t.lastID && !t.started {
		t.lastID = id
		t.steps++
		if t.steps == traceStep || (rows > 1 && t.steps == traceStepRows) {
			t.started = true
			return traceClear
		}
		return traceNone
	}
	if !t.started || id == t.lastID {
		return traceNone
	}
	t.done = 1
	return traceWrite
}

// traceFlush runs before each flush's ops: it clears the histogram before
// the first flush of the traced step and writes it out before the first
// flush of a later step.
func (c *Ctx) traceFlush(id, rows int) error {
	if c == nil { // a device without a context (tests)
		return nil
	}
	t := c.trace
	if t == nil {
		return nil
	}
	switch t.next(id, rows, traceRows) {
	case traceClear:
		return c.Memset(t.buf.Ptr, 0, t.buf.Size)
	case traceWrite:
	default:
		return nil
	}
	hist := make([]uint32, t.buf.Size/4)
	if err := CopyOut(c, hist, t.buf.Ptr); err != nil {
		return err
	}
	f, err := os.Create(traceFile)
	if err != nil {
		return err
	}
	w := bufio.NewWriter(f)
	fmt.Fprintf(w, "# site file:line kernel event bucket(%d ns) count\n# buckets %d\n", traceBucketNanos, traceBuckets)
	for s, site := range traceSites {
		for b := range traceBuckets {
			if n := hist[s*traceBuckets+b]; n > 0 {
				fmt.Fprintf(w, "%d %s:%d %s %s %d %d\n", s, site.file, site.line, site.kernel, site.event, b, n)
			}
		}
	}
	if err := w.Flush(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
