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

var _ backend.Sampler = (*Backend)(nil)

// SampleRows chooses each row's token on the device with the sample_rows
// kernel (one block per row) and copies back only the ids: what
// sample.Sampler.SampleWith chooses from the same logits with the same
// settings and random number, -1 for a row with a NaN or an infinity.
func (b *Backend) SampleRows(logits backend.Tensor, params []backend.SampleParams) []int32 {
	l := asTensor(logits)
	out := make([]int32, len(params))
	if len(params) != l.rows {
		b.fail("sample: %d settings for %d rows", len(params), l.rows)
		return out
	}
	if l.rows == 0 {
		return out
	}
	if l.cols == 0 {
		b.fail("sample: rows of no logits")
		return out
	}
	rec := sampleRecords(params)
	pp := b.alloc(4 * len(rec))
	ids := b.alloc(4 * len(out))
	b.do("sample settings", func(c *Ctx) error { return CopyIn(c, pp, rec) })
	b.launch("sample", "sample", "sample_rows", D1(l.rows), D1(sampleThreads), l.ptr, l.ld, l.cols, pp, ids)
	if b.err != nil {
		return out
	}
	b.now("sample ids", func(c *Ctx) error { return CopyOut(c, out, ids) })
	b.sampledRows += len(out)
	return out
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
