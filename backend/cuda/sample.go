//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"unsafe"

	"github.com/mmfp4/mmfp4/backend"
)

// sampleThreads is the block size of sample_rows (SAMPLE_THREADS in
// kernels/sample.cu).
const sampleThreads = 1024

// sampleRecordWords is the size of one row's settings in 32-bit words
// (struct SampleParams in kernels/sample.cu).
const sampleRecordWords = 6

// logprobThreads and logprobRecordWords are LP_THREADS and LP_RECORD in
// kernels/logprob.cu.
const (
	logprobThreads     = 1024
	logprobRecordWords = 2 + 2*backend.MaxTopLogprobs
)

var _ backend.LogprobSampler = (*Backend)(nil)

// SampleRows chooses each row's token on the device with the sample_rows
// kernel (one block per row) and copies back only the ids: what
// sample.Sampler.SampleWith chooses from the same logits with the same
// settings and random number, -1 for a row with a NaN or an infinity.
func (b *Backend) SampleRows(logits backend.Tensor, params []backend.SampleParams) []int32 {
	ids, _ := b.sampleRows(logits, params, false)
	return ids
}

// SampleRowsLogprobs is SampleRows, and for the rows whose params ask for
// them, the logprob_rows kernel (one block per row, after the sampler)
// computes the log-probabilities; ids and log-probabilities come back in
// one copy.
func (b *Backend) SampleRowsLogprobs(logits backend.Tensor, params []backend.SampleParams) ([]int32, []backend.RowLogprobs) {
	return b.sampleRows(logits, params, true)
}

func (b *Backend) sampleRows(logits backend.Tensor, params []backend.SampleParams, withLogprobs bool) ([]int32, []backend.RowLogprobs) {
	out := make([]int32, len(params))
	l, words, ok := b.sampleShape(logits, params, withLogprobs)
	if !ok || words == 0 {
		return out, nil
	}
	res := make([]int32, words)
	ids := b.alloc(4 * words)
	b.sampleQueue(l, params, withLogprobs, ids)
	if b.err != nil {
		return out, nil
	}
	b.now("sample ids", func(c *Ctx) error { return CopyOut(c, res, ids) })
	got, lps, err := b.sampleResults(params, withLogprobs, res)
	if err != nil {
		b.fail("%v", err)
		return out, nil
	}
	return got, lps
}

// sampleShape checks the rows against their settings and returns the
// int32 words of the step's results: the ids, then with log-probabilities
// one record a row.
func (b *Backend) sampleShape(logits backend.Tensor, params []backend.SampleParams, withLogprobs bool) (*tensor, int, bool) {
	l := asTensor(logits)
	switch {
	case len(params) != l.rows:
		b.fail("sample: %d settings for %d rows", len(params), l.rows)
		return l, 0, false
	case l.rows == 0:
		return l, 0, true
	case l.cols == 0:
		b.fail("sample: rows of no logits")
		return l, 0, false
	}
	if withLogprobs && wantsLogprobs(params) {
		return l, l.rows * (1 + logprobRecordWords), true
	}
	return l, l.rows, true
}

// sampleQueue queues the choice of each row's token into ids, and the
// log-probability records after them where asked: one upload (settings,
// then each row's number of top tokens or -1) and one or two launches.
func (b *Backend) sampleQueue(l *tensor, params []backend.SampleParams, withLogprobs bool, ids uint64) {
	rows := l.rows
	rec := sampleRecords(params)
	want := withLogprobs && wantsLogprobs(params)
	if want {
		for _, p := range params {
			k := int32(-1)
			if p.Logprobs {
				k = int32(min(max(p.TopLogprobs, 0), backend.MaxTopLogprobs))
			}
			rec = append(rec, uint32(k))
		}
	}
	pp := b.alloc(4 * len(rec))
	b.do("sample settings", func(c *Ctx) error { return CopyIn(c, pp, rec) })
	b.launch("sample", "sample", "sample_rows", D1(rows), D1(sampleThreads), l.ptr, l.ld, l.cols, pp, ids)
	if want {
		b.launch("logprobs", "logprob", "logprob_rows", D1(rows), D1(logprobThreads), l.ptr, l.ld, l.cols,
			pp+uint64(4*sampleRecordWords*rows), ids, ids+uint64(4*rows))
	}
	b.sampledRows += rows
}

// sampleResults reads the ids and the log-probability records of
// sampleQueue.
func (b *Backend) sampleResults(params []backend.SampleParams, withLogprobs bool, res []int32) ([]int32, []backend.RowLogprobs, error) {
	rows := len(params)
	out := slices.Clone(res[:rows])
	if !withLogprobs || !wantsLogprobs(params) {
		return out, nil, nil
	}
	lps := make([]backend.RowLogprobs, rows)
	for i, p := range params {
		if !p.Logprobs || out[i] < 0 {
			continue
		}
		r := res[rows+i*logprobRecordWords:][:logprobRecordWords]
		n := int(r[0])
		if n < 0 || n > backend.MaxTopLogprobs {
			// The sampler found the row finite and the logprob kernel
			// did not: they read the same memory, so this is a fault.
			return out, nil, fmt.Errorf("logprobs: row %d: the sampler chose %d and the log-probability kernel reports %d", i, out[i], n)
		}
		lp := &lps[i]
		lp.Chosen = math.Float32frombits(uint32(r[1]))
		for j := range n {
			lp.Top = append(lp.Top, backend.TokenLogprob{ID: int(r[2+2*j]), Logprob: math.Float32frombits(uint32(r[3+2*j]))})
		}
		b.logprobRows++
	}
	return out, lps, nil
}

// wantsLogprobs: some row asks for log-probabilities.
func wantsLogprobs(params []backend.SampleParams) bool {
	for _, p := range params {
		if p.Logprobs {
			return true
		}
	}
	return false
}

// sampleRecords lays the settings out as the kernel reads them.
func sampleRecords(params []backend.SampleParams) []uint32 {
	rec := make([]uint32, sampleRecordWords*len(params))
	for i, p := range params {
		r := rec[sampleRecordWords*i:]
		r[0] = math.Float32bits(p.Temperature)
		r[1] = uint32(int32(min(max(p.TopK, 0), math.MaxInt32)))
		r[2] = math.Float32bits(p.TopP)
		r[3] = math.Float32bits(p.MinP)
		u := math.Float64bits(p.U)
		r[4], r[5] = uint32(u), uint32(u>>32)
	}
	return rec
}

var _ backend.AsyncSampler = (*Backend)(nil)

// asyncIDs holds the ids of steps sampled by SampleRowsAsync: on the
// device, where the next step's embedding reads them (Batch.Prev), and in
// two page-locked host slots that the copies back fill in turn, each with
// an event that marks its copy done, so that one step's ids can be waited
// for while the next step runs.
type asyncIDs struct {
	dev   Buffer // int32 ids of the latest step
	old   []Buffer
	host  [2]unsafe.Pointer // page-locked, hostN int32 each
	hostN int
	ev    [2]*Event
	turn  int // the slot of the next call
	last  int // the slot of the last call
	rows  int // of the last call
}

// SampleRowsAsync is SampleRowsLogprobs whose copy back is left running:
// wait returns the ids (and the log-probabilities asked for) once the copy
// of this step's has arrived.
func (b *Backend) SampleRowsAsync(logits backend.Tensor, params []backend.SampleParams) func() ([]int32, []backend.RowLogprobs, error) {
	a := &b.async
	fail := func() func() ([]int32, []backend.RowLogprobs, error) {
		return func() ([]int32, []backend.RowLogprobs, error) { return nil, nil, b.Sync() }
	}
	l, words, ok := b.sampleShape(logits, params, true)
	if !ok {
		return fail()
	}
	if words == 0 {
		b.fail("sample: no rows")
		return fail()
	}
	if err := a.reserve(b, words); err != nil {
		b.fail("sample: %v", err)
		return fail()
	}
	b.sampleQueue(l, params, true, a.dev.Ptr)
	slot := a.turn
	a.turn ^= 1
	host, ev, src := a.host[slot], a.ev[slot], a.dev.Ptr
	b.flush()
	if b.err == nil {
		// Outside any graph: a copy into host memory with its event.
		b.handOver("sample ids", func(c *Ctx) error {
			if err := check("cuMemcpyDtoHAsync", drv.cuMemcpyDtoHAsync(host, src, uint64(4*words), c.stream)); err != nil {
				return c.annotate(err)
			}
			return c.RecordAt(ev)
		})
	}
	a.rows, a.last = l.rows, slot
	waited := false
	return func() ([]int32, []backend.RowLogprobs, error) {
		if waited {
			return nil, nil, errors.New("cuda backend: a step's ids waited for twice")
		}
		waited = true
		b.flush() // what is queued after this step runs while the host waits
		var err error
		if b.err == nil {
			err = b.dev.Do(func(c *Ctx) error {
				return c.annotate(check("cuEventSynchronize", drv.cuEventSynchronize(ev.h)))
			})
			b.settle()
		}
		if err := b.err; err != nil {
			b.err = nil
			return nil, nil, err
		}
		if err != nil {
			return nil, nil, fmt.Errorf("cuda backend: sample ids: %w", err)
		}
		return b.sampleResults(params, true, unsafe.Slice((*int32)(host), words))
	}
}

// reserve makes the buffers hold a step's words of results.
func (a *asyncIDs) reserve(b *Backend, words int) error {
	if 4*words <= a.dev.Size && words <= a.hostN {
		return nil
	}
	n := max(words, 1024)
	b.flush()
	return b.dev.Do(func(c *Ctx) error {
		if a.dev.Size > 0 {
			// A queued embedding may still read it: freed with the backend.
			a.old = append(a.old, a.dev)
		}
		buf, err := c.Alloc(4 * n)
		if err != nil {
			return err
		}
		a.dev = buf
		if err := c.Sync(); err != nil { // no copy into the old slots is running
			return err
		}
		for i := range a.host {
			if a.host[i] != nil {
				if err := check("cuMemFreeHost", drv.cuMemFreeHost(a.host[i])); err != nil {
					return err
				}
				a.host[i] = nil
			}
			if err := check("cuMemAllocHost", drv.cuMemAllocHost(&a.host[i], uint64(4*n))); err != nil {
				return err
			}
			if a.ev[i] == nil {
				ev, err := c.NewEvent()
				if err != nil {
					return err
				}
				a.ev[i] = ev
			}
		}
		a.hostN = n
		return nil
	})
}

// resolve returns batch's tokens with the rows from the step before
// filled in on the host, waiting for that step's ids.
func (a *asyncIDs) resolve(b *Backend, batch *backend.Batch) ([]int32, error) {
	if a.hostN == 0 {
		return nil, errors.New("tokens from a step before, but no step was sampled ahead")
	}
	b.flush()
	var ids []int32
	err := b.dev.Do(func(c *Ctx) error {
		return check("cuEventSynchronize", drv.cuEventSynchronize(a.ev[a.last].h))
	})
	if err != nil {
		return nil, err
	}
	ids = unsafe.Slice((*int32)(a.host[a.last]), a.rows)
	out := slices.Clone(batch.Tokens)
	for r := range out {
		if batch.FromPrev(r) {
			k := int(batch.Prev[r])
			if k >= a.rows {
				return nil, fmt.Errorf("row %d takes output %d of the step before, which had fewer", r, k)
			}
			out[r] = ids[k]
		}
	}
	return out, nil
}

// free releases the buffers; the caller has synchronised.
func (a *asyncIDs) free(c *Ctx) error {
	var errs []error
	for _, buf := range append(a.old, a.dev) {
		if buf.Size > 0 {
			errs = append(errs, c.Free(buf))
		}
	}
	for i := range a.host {
		if a.host[i] != nil {
			errs = append(errs, check("cuMemFreeHost", drv.cuMemFreeHost(a.host[i])))
		}
		if a.ev[i] != nil {
			errs = append(errs, c.DestroyEvent(a.ev[i]))
		}
	}
	*a = asyncIDs{}
	return errors.Join(errs...)
}
