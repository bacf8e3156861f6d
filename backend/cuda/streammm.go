//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"
	"os"
	"strconv"
)

// The streaming dense MMFP4 product of few token rows (mms_* in
// stream.cu): warps stream 16 weight rows each straight into registers and
// apply them to all rows (up to 64) on the tensor cores, K split over the
// blocks of a row block (KS) when the matrix alone would not fill the
// device; the last block of a row block adds the KS partial sums in order.

// StreamMaxTokens is the most token rows MatMulStream takes.
const StreamMaxTokens = 64

// streamCounters is the size (u32) of the counters a backend keeps for
// MatMulStream: one per row block of 128 rows of a split product.
const streamCounters = 1024

// StreamPlan is a launch shape of MatMulStream: D groups of 128 columns in
// flight per warp (1, 2 or 4) and KS blocks over K for each row block.
type StreamPlan struct{ D, KS int }

// StreamFits reports whether MatMulStream takes w: groups of 128, at least
// 16 rows and a multiple of 16.
func StreamFits(w *QMatrix) bool {
	return w.G == 128 && w.K%128 == 0 && w.N >= 16 && w.N%16 == 0
}

// PlanStream picks D and KS for an N x K product on a device of sms
// multiprocessors: about two blocks a multiprocessor in all, with the
// largest D that leaves enough D-group chunks of K to split over.
func PlanStream(N, K, sms int) StreamPlan {
	rowBlocks := (N + 127) / 128
	want := max(1, (2*sms+rowBlocks-1)/rowBlocks)
	if rowBlocks > streamCounters {
		want = 1
	}
	GK := K / 128
	for _, d := range []int{4, 2} {
		if GK%d == 0 && GK/d >= want {
			return StreamPlan{D: d, KS: want}
		}
	}
	return StreamPlan{D: 1, KS: min(want, GK)}
}

// streamShared is the dynamic shared memory of a block: 8*wt staged rows
// of the block's largest chunk range.
func streamShared(wt, K int, p StreamPlan) int {
	nc := K / (128 * p.D)
	ng := (nc + p.KS - 1) / p.KS * p.D
	return 8 * wt * (128*ng + 16 + 4*(ng+1))
}

// streamKernel returns stream.name allowed n bytes of shared memory.
func (c *Ctx) streamKernel(name string, n int) (*Kernel, error) {
	k, err := c.Kernel("stream", name)
	if err != nil {
		return nil, err
	}
	if k.maxShared < n {
		if err := c.SetMaxShared(k, n); err != nil {
			return nil, err
		}
		k.maxShared = n
	}
	return k, nil
}

// MatMulStream computes y[t*ldy + n] = W[n] . x[t] for the a.T <= 64
// quantized rows of a (the integer MMFP4 product of GEMV and GEMM). A
// split plan (KS > 1) needs partial (4*KS*a.T*N bytes) and counters (one
// zeroed u32 per row block, left zeroed).
func (c *Ctx) MatMulStream(y uint64, ldy int, w *QMatrix, a *QActs, p StreamPlan, partial, counters uint64) error {
	GK := w.K / 128
	switch {
	case a.K != w.K || a.G != w.G:
		return fmt.Errorf("cuda: stream product: activations K=%d G=%d, weights [%d,%d] G=%d", a.K, a.G, w.N, w.K, w.G)
	case !StreamFits(w):
		return fmt.Errorf("cuda: stream product: weights [%d,%d] G=%d do not suit it", w.N, w.K, w.G)
	case a.T < 1 || a.T > StreamMaxTokens:
		return fmt.Errorf("cuda: stream product: %d token rows, want 1 to %d", a.T, StreamMaxTokens)
	case ldy < w.N && a.T > 1:
		return fmt.Errorf("cuda: stream product: output stride %d below N=%d", ldy, w.N)
	case p.D != 1 && p.D != 2 && p.D != 4 || GK%p.D != 0 || p.KS < 1 || p.KS > GK/p.D:
		return fmt.Errorf("cuda: stream product: plan D=%d KS=%d for K=%d", p.D, p.KS, w.K)
	case p.KS > 1 && (partial == 0 || counters == 0 || (w.N+127)/128 > streamCounters):
		return fmt.Errorf("cuda: stream product: split over K without partial sums or counters for %d rows", w.N)
	}
	wt := 1
	for 8*wt < a.T {
		wt *= 2
	}
	shared := streamShared(wt, w.K, p)
	k, err := c.streamKernel(fmt.Sprintf("mms_t%d_d%d", wt, p.D), shared)
	if err != nil {
		return err
	}
	return c.Launch(k, Dim{uint32((w.N + 127) / 128), uint32(p.KS), 1}, D1(256), shared,
		w.Codes, w.Scales, w.RowScale, w.N, w.K, a.Q, a.Scales, a.T, y, ldy, p.KS, partial, counters)
}

// streamMaxTokens is the largest batch whose MMFP4 products MatMul runs
// through MatMulStream (0: never; MMFP4_CUDA_STREAM_MM sets it, for
// comparisons in one binary).
var streamMaxTokens = 0

func init() {
	if v, err := strconv.Atoi(os.Getenv("MMFP4_CUDA_STREAM_MM")); err == nil && v >= 0 {
		streamMaxTokens = min(v, StreamMaxTokens)
	}
}

// streamProduct queues MatMulStream for d = x W^T when it applies (2 to
// streamMaxTokens rows, a suitable matrix) and reports whether it did.
func (b *Backend) streamProduct(d *tensor, a *QActs, w *weight) bool {
	if d.rows < 2 || d.rows > streamMaxTokens || !StreamFits(w.q) {
		return false
	}
	p := PlanStream(w.q.N, w.q.K, b.dev.Info().SMs)
	var partial uint64
	if p.KS > 1 {
		if !b.streamCountersReady() {
			return false
		}
		partial = b.alloc(4 * p.KS * d.rows * w.q.N)
	}
	q, counters := w.q, b.streamCounters.Ptr
	b.do(b.opName("matmul", w), func(c *Ctx) error { return c.MatMulStream(d.ptr, d.ld, q, a, p, partial, counters) })
	return true
}

// streamCountersReady makes the backend's zeroed MatMulStream counters
// on first use (waiting for the queued ops, which the caller need not
// care about: nothing is fused across a product).
func (b *Backend) streamCountersReady() bool {
	if b.streamCounters.Size > 0 {
		return true
	}
	b.now("stream counters", func(c *Ctx) error {
		buf, err := c.Alloc(4 * streamCounters)
		if err != nil {
			return err
		}
		b.streamCounters = buf
		return c.Memset(buf.Ptr, 0, buf.Size)
	})
	return b.err == nil
}
