//go:build linux || darwin || freebsd || netbsd

package cuda

import "fmt"

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

// streamMaxKS bounds the split of K: the last block of a row block reads
// KS partial sums of each output.
const streamMaxKS = 8

// PlanStream picks D and KS for heads products of N x K over T rows on a
// device of sms multiprocessors with sharedMax bytes of shared memory a
// block. Measured on an H200 at 8-64 rows: splitting K pays where the
// matrix makes few row blocks (o_proj's 16: 12.5 against 27.0 us at 32
// rows; q_a's 6: 9.4 against 12.4) and not from about 32 (q_b's 40: 10.4
// split 4 ways against 7.3), so KS is 1 from streamSplitRowBlocks row
// blocks on and otherwise about one block a multiprocessor, at most
// streamMaxKS; then the largest D that leaves enough D-group chunks of K
// to split over, and a split fine enough for the staged rows to fit.
func PlanStream(N, K, heads, T, sms, sharedMax int) StreamPlan {
	rowBlocks := heads * ((N + 127) / 128)
	want := min(streamMaxKS, max(1, (sms+rowBlocks-1)/rowBlocks))
	if rowBlocks >= streamSplitRowBlocks {
		want = 1
	}
	GK := K / 128
	p := StreamPlan{D: 1, KS: min(want, GK)}
	for _, d := range []int{4, 2} {
		if GK%d == 0 && GK/d >= want {
			p = StreamPlan{D: d, KS: want}
			break
		}
	}
	wt := streamTiles(T)
	for p.KS < GK/p.D && streamShared(wt, K, p) > sharedMax {
		p.KS++
	}
	return p
}

// streamSplitRowBlocks: from this many row blocks on, K is not split.
const streamSplitRowBlocks = 32

// streamTiles is the number of 8-row n-tiles of T rows, rounded up to the
// kernels' 1, 2, 4 or 8.
func streamTiles(T int) int {
	wt := 1
	for 8*wt < T {
		wt *= 2
	}
	return wt
}

// streamShared is the dynamic shared memory of a block: 8*wt staged rows
// of the block's largest chunk range.
func streamShared(wt, K int, p StreamPlan) int {
	nc := K / (128 * p.D)
	ng := (nc + p.KS - 1) / p.KS * p.D
	return 8 * wt * (128*ng + 16 + 4*(ng+1))
}

// MatMulStream computes y[t*ldy + n] = W[n] . x[t] for the a.T <= 64
// quantized rows of a (the integer MMFP4 product of GEMV and GEMM). A
// split plan (KS > 1) needs partial (4*KS*a.T*N bytes) and counters (one
// zeroed u32 per row block, left zeroed).
func (c *Ctx) MatMulStream(y uint64, ldy int, w *QMatrix, a *QActs, p StreamPlan, partial, counters uint64) error {
	return c.matMulStream(y, ldy, w, a, 1, p, partial, counters)
}

// MatMulStreamHeads is MatMulStream over heads products (GEMMHeads'
// layout): for each head h and row t, y[t*ldy + h*rows + n] =
// W[h*rows+n] . x_h[t], x_h columns [h*w.K, (h+1)*w.K) of the row (a.K =
// heads*w.K), W [heads*rows, w.K]. Plans, partial sums and counters as
// MatMulStream's, for all heads together (4*KS*a.T*w.N bytes).
func (c *Ctx) MatMulStreamHeads(y uint64, ldy int, w *QMatrix, a *QActs, heads int, p StreamPlan, partial, counters uint64) error {
	return c.matMulStream(y, ldy, w, a, heads, p, partial, counters)
}

func (c *Ctx) matMulStream(y uint64, ldy int, w *QMatrix, a *QActs, heads int, p StreamPlan, partial, counters uint64) error {
	if err := c.checkStream(ldy, w, a, heads, p, partial, counters); err != nil {
		return err
	}
	k, shared, p, err := c.streamKernel(w.K, a.T, p)
	if err != nil {
		return err
	}
	rows := w.N / heads
	rb := (rows + 127) / 128
	return c.Launch(k, Dim{uint32(rb), uint32(p.KS), uint32(heads)}, D1(256), shared,
		w.Codes, w.Scales, w.RowScale, rows, w.K, a.Q, a.Scales, a.T, y, ldy, p.KS, partial, counters,
		rb, uint64(0), uint64(0), uint64(0), 0, uint64(0), 0, uint64(0))
}

// checkStream checks a MatMulStream launch's shapes and plan.
func (c *Ctx) checkStream(ldy int, w *QMatrix, a *QActs, heads int, p StreamPlan, partial, counters uint64) error {
	GK := w.K / 128
	rows := w.N / max(heads, 1)
	switch {
	case heads < 1 || w.N%heads != 0 || a.K != heads*w.K || a.G != w.G:
		return fmt.Errorf("cuda: stream product: activations K=%d G=%d, %d heads of weights [%d,%d] G=%d", a.K, a.G, heads, w.N, w.K, w.G)
	case !StreamFits(&QMatrix{N: rows, K: w.K, G: w.G}):
		return fmt.Errorf("cuda: stream product: weights [%d,%d] G=%d (%d heads) do not suit it", w.N, w.K, w.G, heads)
	case a.T < 1 || a.T > StreamMaxTokens:
		return fmt.Errorf("cuda: stream product: %d token rows, want 1 to %d", a.T, StreamMaxTokens)
	case ldy < w.N && a.T > 1:
		return fmt.Errorf("cuda: stream product: output stride %d below N=%d", ldy, w.N)
	case p.D != 1 && p.D != 2 && p.D != 4 || GK%p.D != 0 || p.KS < 1 || p.KS > GK/p.D:
		return fmt.Errorf("cuda: stream product: plan D=%d KS=%d for K=%d", p.D, p.KS, w.K)
	case p.KS > 1 && (partial == 0 || counters == 0 || heads*((rows+127)/128) > streamCounters):
		return fmt.Errorf("cuda: stream product: split over K without partial sums or counters for %d rows", w.N)
	}
	return nil
}

// streamKernel is the kernel of plan p for T rows of K columns, its
// shared memory and the plan as launched.
func (c *Ctx) streamKernel(K, T int, p StreamPlan) (*Kernel, int, StreamPlan, error) {
	wt := streamTiles(T)
	if wt >= 2 && p.D == 4 {
		p.D = 2 // the same chunks of K, two groups at a time (stream.cu has no D = 4 past 8 rows)
	}
	shared := streamShared(wt, K, p)
	name := streamName("mms", K, wt, p)
	if streamClusterFits(wt, p) && c.info.CC >= 90 {
		name += "c"
		shared = max(shared, 4*128*8*wt)
	}
	if shared > c.info.SharedOptin {
		return nil, 0, p, fmt.Errorf("cuda: stream product: %d rows of K=%d split %d ways need %d bytes of shared memory, at most %d", T, K, p.KS, shared, c.info.SharedOptin)
	}
	k, err := c.kernelShared("stream", fmt.Sprintf("%s_t%d_d%d", name, wt, p.D), shared)
	return k, shared, p, err
}

// streamCluster takes the mmsc_* and mmspc_* kernels (the K splits of a
// row block in a cluster, their sums added through distributed shared
// memory) for plans of streamClusterKS splits, D = 2, 9-64 rows, on
// devices with clusters.
var streamCluster = true

// streamClusterKS is the cluster size of the mmsc_* kernels (grid y).
const streamClusterKS = 8

func streamClusterFits(wt int, p StreamPlan) bool {
	return streamCluster && p.KS == streamClusterKS && p.D == 2 && wt >= 2
}

// streamPreloadGroups is MMSP_GROUPS in stream.cu: the most groups of 128
// columns a block of the mmsp_* and mmsqp_* kernels loads before its wait.
const streamPreloadGroups = 6

// streamPreload takes the mmsp_* and mmsqp_* kernels (every weight of a
// block loaded before the wait) where a block's groups fit.
var streamPreload = true

// streamName is the kernel family of a product of K columns with plan p
// (as launched) over wt n-tiles of rows: base, or its preloading form ("p"
// appended) for 9-32 rows (wt 2 and 4; at 64 rows it was slower) and D = 2
// (with D = 1 the six batches spill).
func streamName(base string, K, wt int, p StreamPlan) string {
	nc := K / (128 * p.D)
	if streamPreload && p.D == 2 && (wt == 2 || wt == 4) && (nc+p.KS-1)/p.KS*p.D <= streamPreloadGroups {
		return base + "p"
	}
	return base
}

// MatMulStreamPair computes MatMulStream of two matrices of the same K
// for the same rows in one launch (y1 = x W1^T, y2 = x W2^T), each output
// the same as its own MatMulStream with plan p. A split plan needs
// partial sums for each (4*KS*a.T*N bytes) and one counter per row block
// of both.
func (c *Ctx) MatMulStreamPair(y1 uint64, ldy1 int, w1 *QMatrix, y2 uint64, ldy2 int, w2 *QMatrix, a *QActs, p StreamPlan, partial1, partial2, counters uint64) error {
	switch {
	case w1.K != w2.K || w1.G != w2.G:
		return fmt.Errorf("cuda: stream pair: weights [%d,%d] G=%d and [%d,%d] G=%d", w1.N, w1.K, w1.G, w2.N, w2.K, w2.G)
	case !StreamFits(w2):
		return fmt.Errorf("cuda: stream pair: weights [%d,%d] G=%d do not suit it", w2.N, w2.K, w2.G)
	case ldy2 < w2.N && a.T > 1:
		return fmt.Errorf("cuda: stream pair: output stride %d below N=%d", ldy2, w2.N)
	case p.KS > 1 && (partial2 == 0 || (w1.N+127)/128+(w2.N+127)/128 > streamCounters):
		return fmt.Errorf("cuda: stream pair: split over K without partial sums or counters for %d+%d rows", w1.N, w2.N)
	}
	if err := c.checkStream(ldy1, w1, a, 1, p, partial1, counters); err != nil {
		return err
	}
	k, shared, p, err := c.streamKernel(w1.K, a.T, p)
	if err != nil {
		return err
	}
	rb1, rb2 := (w1.N+127)/128, (w2.N+127)/128
	return c.Launch(k, Dim{uint32(rb1 + rb2), uint32(p.KS), 1}, D1(256), shared,
		w1.Codes, w1.Scales, w1.RowScale, w1.N, w1.K, a.Q, a.Scales, a.T, y1, ldy1, p.KS, partial1, counters,
		rb1, w2.Codes, w2.Scales, w2.RowScale, w2.N, y2, ldy2, partial2)
}

// streamMinTokens and streamMaxTokens bound the batches whose MMFP4
// products MatMul (and ExpandValues) run through MatMulStream. Measured on
// an H200 (device time, 8 / 32 / 64 rows): o_proj 8.5 / 12.5 / 17.0 us
// against the GEMV's 8.3 / 32.9 / 65.5 and the GEMM's 37.8 / 38.3 / 38.5;
// q_a 5.4 / 9.4 / 13.5 against 4.7 / 18.7 / 37.3 and 16.9 / 17.3 / 17.3;
// the lm_head 66.9 / 102 / 185 against 62.5 / 254 / 526 and 97 / 167 /
// 317. At 8 rows the one GEMV launch is as fast, so it keeps them.
var (
	streamMinTokens = 9
	streamMaxTokens = StreamMaxTokens
)

// streamProduct queues MatMulStream for d = x W^T when it applies
// (streamMinTokens to streamMaxTokens rows, a suitable matrix) and reports
// whether it did.
func (b *Backend) streamProduct(d *tensor, a *QActs, w *weight) bool {
	if d.rows < streamMinTokens || d.rows > streamMaxTokens || !StreamFits(w.q) {
		return false
	}
	info := b.dev.Info()
	p := PlanStream(w.q.N, w.q.K, 1, d.rows, info.SMs, info.SharedOptin)
	if !streamPlanOK(w.q.N, w.q.K, 1, d.rows, p, info.SharedOptin) {
		return false
	}
	var partial uint64
	if p.KS > 1 {
		if !b.streamCountersReady() {
			return false
		}
		partial = b.alloc(4 * p.KS * d.rows * w.q.N)
	}
	if b.streamPaired(d, a, w) {
		return true
	}
	q, counters := w.q, b.streamCounters.Ptr
	b.do(b.opName("matmul", w), func(c *Ctx) error { return c.MatMulStream(d.ptr, d.ld, q, a, p, partial, counters) })
	if b.err == nil {
		b.lastStream = &streamOp{idx: len(b.pending) - 1, flush: b.flushes, a: a, d: *d, w: w}
	}
	return true
}

// streamOp is a MatMulStream queued (its place in the pending ops), which a
// second product of the same quantized rows may join (MatMulStreamPair).
type streamOp struct {
	idx, flush int
	a          *QActs
	d          tensor
	w          *weight
	paired     bool
}

// streamPaired turns the MatMulStream queued just before, of the same
// quantized rows and K, into one launch with d = x W^T and reports whether
// it did. On an H200 at 9 / 32 / 64 rows: 5.0 / 7.3 / 11.5 us against two
// launches' 9.3 / 13.8 / 22.1 (BenchmarkMatMulStreamPair).
func (b *Backend) streamPaired(d *tensor, a *QActs, w *weight) bool {
	ls := b.lastStream
	if ls == nil || ls.paired || ls.flush != b.flushes || ls.idx != len(b.pending)-1 || ls.a != a ||
		ls.w.q.K != w.q.K || ls.w.q.G != w.q.G || overlaps(d, &ls.d) || !StreamFits(w.q) {
		return false
	}
	info := b.dev.Info()
	rows := 128 * ((ls.w.q.N+127)/128 + (w.q.N+127)/128)
	p := PlanStream(rows, w.q.K, 1, d.rows, info.SMs, info.SharedOptin)
	if !streamPlanOK(rows, w.q.K, 1, d.rows, p, info.SharedOptin) || (p.KS > 1 && b.streamCounters.Size == 0) {
		return false // (making the counters here would run the queued ops)
	}
	var p1, p2 uint64
	if p.KS > 1 {
		p1, p2 = b.alloc(4*p.KS*d.rows*ls.w.q.N), b.alloc(4*p.KS*d.rows*w.q.N)
		if b.err != nil || ls.flush != b.flushes || ls.idx != len(b.pending)-1 {
			return false // the arena grew: the queued ops, the first product's among them, have gone
		}
	}
	q1, q2, d1, counters := ls.w.q, w.q, ls.d, b.streamCounters.Ptr
	name := "matmul pair"
	if b.prof != nil {
		name = fmt.Sprintf("matmul pair %dx%d+%dx%d", q1.N, q1.K, q2.N, q2.K)
	}
	b.pending[ls.idx] = queuedOp{name, func(c *Ctx) error {
		return c.MatMulStreamPair(d1.ptr, d1.ld, q1, d.ptr, d.ld, q2, a, p, p1, p2, counters)
	}}
	ls.paired = true
	b.streamPairs++
	return true
}

// streamPlanOK reports whether plan p of heads N x K products over T rows
// can launch: its staged rows fit, and a split has counters enough.
func streamPlanOK(N, K, heads, T int, p StreamPlan, sharedMax int) bool {
	return streamShared(streamTiles(T), K, p) <= sharedMax && (p.KS == 1 || heads*((N+127)/128) <= streamCounters)
}

// streamHeadsOn routes ExpandValues' per-head products of streamMinTokens
// to streamMaxTokens rows through MatMulStreamHeads. Off: at 32 rows on an
// H200 it took 11.1 us a layer, as GEMMHeads' one launch (11.3); and its
// test has not yet run on a GPU.
var streamHeadsOn = false

// streamHeads queues MatMulStreamHeads for ExpandValues' per-head
// products when it applies and reports whether it did.
func (b *Backend) streamHeads(om *tensor, a *QActs, w *weight, heads int) bool {
	if !streamHeadsOn || om.rows < streamMinTokens || om.rows > streamMaxTokens || w.q.N%heads != 0 || !StreamFits(&QMatrix{N: w.q.N / heads, K: w.q.K, G: w.q.G}) {
		return false
	}
	info := b.dev.Info()
	p := PlanStream(w.q.N/heads, w.q.K, heads, om.rows, info.SMs, info.SharedOptin)
	if !streamPlanOK(w.q.N/heads, w.q.K, heads, om.rows, p, info.SharedOptin) {
		return false
	}
	var partial uint64
	if p.KS > 1 {
		if !b.streamCountersReady() {
			return false
		}
		partial = b.alloc(4 * p.KS * om.rows * w.q.N)
	}
	q, counters := w.q, b.streamCounters.Ptr
	b.do(b.opName("expand values", w), func(c *Ctx) error {
		return c.MatMulStreamHeads(om.ptr, om.ld, q, a, heads, p, partial, counters)
	})
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
