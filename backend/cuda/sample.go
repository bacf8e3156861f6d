//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"math"

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
	l := asTensor(logits)
	out := make([]int32, len(params))
	if len(params) != l.rows {
		b.fail("sample: %d settings for %d rows", len(params), l.rows)
		return out, nil
	}
	if l.rows == 0 {
		return out, nil
	}
	if l.cols == 0 {
		b.fail("sample: rows of no logits")
		return out, nil
	}
	rows := l.rows
	// One upload (settings, then each row's number of top tokens or -1)
	// and one download (ids, then the log-probability records).
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
	res := make([]int32, rows)
	if want {
		res = make([]int32, rows+rows*logprobRecordWords)
	}
	pp := b.alloc(4 * len(rec))
	ids := b.alloc(4 * len(res))
	b.do("sample settings", func(c *Ctx) error { return CopyIn(c, pp, rec) })
	b.launch("sample", "sample", "sample_rows", D1(rows), D1(sampleThreads), l.ptr, l.ld, l.cols, pp, ids)
	if want {
		b.launch("logprobs", "logprob", "logprob_rows", D1(rows), D1(logprobThreads), l.ptr, l.ld, l.cols,
			pp+uint64(4*sampleRecordWords*rows), ids, ids+uint64(4*rows))
	}
	if b.err != nil {
		return out, nil
	}
	b.now("sample ids", func(c *Ctx) error { return CopyOut(c, res, ids) })
	copy(out, res)
	b.sampledRows += rows
	if !want {
		return out, nil
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
			b.fail("logprobs: row %d: the sampler chose %d and the log-probability kernel reports %d", i, out[i], n)
			return out, nil
		}
		lp := &lps[i]
		lp.Chosen = math.Float32frombits(uint32(r[1]))
		for j := range n {
			lp.Top = append(lp.Top, backend.TokenLogprob{ID: int(r[2+2*j]), Logprob: math.Float32frombits(uint32(r[3+2*j]))})
		}
		b.logprobRows++
	}
	return out, lps
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
