// Package cpu is the portable backend: plain Go, multi-threaded over output
// rows. It is the reference every faster kernel is tested against.
package cpu

import (
	"fmt"
	"runtime"
	"sync/atomic"

	"github.com/mmfp4/mmfp4/backend"
)

// Options configure the CPU backend.
type Options struct {
	// Threads is the number of worker goroutines; 0 means GOMAXPROCS.
	Threads int
	// FloatActivations runs MMFP4 matrix products on float32 activations
	// instead of the default int8 per-group activations (DESIGN.md section 2);
	// it is kept for accuracy comparison.
	FloatActivations bool
	// OnRoute, if set, is called by Route with the chosen expert ids of
	// every token (TopK per token, token-major); for statistics such as
	// expert usage. It must not keep the slice.
	OnRoute func(experts []int)
	// Kernel picks the SIMD kernels: "" (the best this CPU has, or the
	// MMFP4_CPU_KERNEL environment variable), or one of Kernels().
	Kernel string
}

// Backend implements backend.Backend on the host.
type Backend struct {
	threads   int
	floatActs bool
	isa       isa         // kernel family in use
	workers   *workerPool // goroutines shared by backends of this thread count

	arena arena
	err   error // first failure since the last Sync

	// The step's batch and cache pool (SetBatch), with each row's sequence
	// and cache slot.
	batch  *backend.Batch
	pool   *pool
	rowSeq []int32
	slots  []int32

	onRoute func([]int)
	read    atomic.Int64 // bytes of weights and cache the ops have read
}

var _ backend.Backend = (*Backend)(nil)

// New returns a CPU backend.
func New(o Options) *Backend {
	t := o.Threads
	if t <= 0 {
		t = runtime.GOMAXPROCS(0)
	}
	return &Backend{threads: t, floatActs: o.FloatActivations, onRoute: o.OnRoute,
		isa: pickISA(o.Kernel), workers: sharedWorkers(t)}
}

// BytesRead is the number of bytes of weights and latent cache that the ops
// have read since the backend was made: every matrix product counts its
// whole weight (packed size for MMFP4), an embedding lookup its rows,
// RMSNorm its gain, Route its bias, AbsorbQuery the W_UK rows, and
// LatentAttention the cached positions it attends over. Activations are
// not counted. Decode's bytes per token is the difference over a step.
func (b *Backend) BytesRead() int64 { return b.read.Load() }

// count adds n bytes to BytesRead: one atomic add per op.
func (b *Backend) count(n int64) { b.read.Add(n) }

// Name identifies the backend and its threading.
func (b *Backend) Name() string {
	mode := "int8 activations"
	if b.floatActs {
		mode = "float32 activations"
	}
	return fmt.Sprintf("cpu (%d threads, %s, %s kernels)", b.threads, mode, b.isa)
}

// parallel splits [0, n) into one contiguous chunk per thread, run on the
// worker pool.
func (b *Backend) parallel(n int, fn func(lo, hi int)) {
	b.workers.run(n, (n+b.threads-1)/b.threads, fn)
}

// fail records the first error of the step; Sync returns it.
func (b *Backend) fail(format string, args ...any) {
	if b.err == nil {
		b.err = fmt.Errorf("cpu backend: "+format, args...)
	}
}

// Sync returns and clears the first recorded error. The CPU backend runs
// every op to completion before returning, so there is nothing to wait for.
func (b *Backend) Sync() error {
	err := b.err
	b.err = nil
	return err
}

// SetBatch starts a step: the arena is reused from its start, and each
// row's sequence and cache slot are worked out once.
func (b *Backend) SetBatch(batch *backend.Batch, p backend.CachePool) {
	b.arena.reset()
	b.batch = batch
	b.pool = nil
	if p != nil {
		b.pool = asPool(p)
	}
	T := batch.Rows()
	b.rowSeq = resize(b.rowSeq, T)
	b.slots = resize(b.slots, T)
	for i := range batch.Seqs {
		s := &batch.Seqs[i]
		for t := s.Start; t < s.Start+s.Len; t++ {
			b.rowSeq[t] = int32(i)
			if b.pool != nil {
				b.slots[t] = int32(s.Slot(int(batch.Positions[t]), b.pool.blockSize))
			}
		}
	}
}

func resize[T any](s []T, n int) []T {
	if cap(s) < n {
		return make([]T, n)
	}
	return s[:n]
}

// arena hands out float32 slices that are reused from step to step, so a
// steady stream of steps allocates nothing. When a step needs more than the
// arena holds, a new chunk is added; reset merges the chunks into one.
type arena struct {
	chunks [][]float32
	cur    int // chunk being filled
	off    int // first free value of chunks[cur]
}

const minArenaChunk = 1 << 16

func (a *arena) alloc(n int) []float32 {
	for a.cur < len(a.chunks) {
		c := a.chunks[a.cur]
		if a.off+n <= len(c) {
			s := c[a.off : a.off+n : a.off+n]
			a.off += n
			clear(s)
			return s
		}
		a.cur++
		a.off = 0
	}
	size := max(n, minArenaChunk)
	if len(a.chunks) > 0 {
		size = max(size, 2*len(a.chunks[len(a.chunks)-1]))
	}
	a.chunks = append(a.chunks, make([]float32, size))
	a.cur, a.off = len(a.chunks)-1, n
	return a.chunks[a.cur][:n:n]
}

// Mark returns the arena's fill point; Release(mark) frees everything
// allocated after it. The model releases each layer's temporaries, so a
// long prefill step holds one layer's tensors, not every layer's.
func (b *Backend) Mark() int { return b.arena.cur<<32 | b.arena.off }

// Release frees the tensors allocated since mark (see Mark); they must not
// be used afterwards.
func (b *Backend) Release(mark int) { b.arena.cur, b.arena.off = mark>>32, mark&(1<<32-1) }

// reset makes the whole arena free again. Slices handed out before stay
// valid memory, but later allocations overwrite them.
func (a *arena) reset() {
	if len(a.chunks) > 1 {
		total := 0
		for _, c := range a.chunks {
			total += len(c)
		}
		a.chunks = [][]float32{make([]float32, total)}
	}
	a.cur, a.off = 0, 0
}

// mat is a row-major float32 matrix; row t starts at data[t*stride].
type mat struct {
	rows, cols, stride int
	data               []float32
}

func (m *mat) Rows() int { return m.rows }
func (m *mat) Cols() int { return m.cols }

func (m *mat) row(t int) []float32 {
	return m.data[t*m.stride : t*m.stride+m.cols]
}

// asMat unwraps a tensor of this backend; a foreign one is a programming
// error that no input can cause, so it panics.
func asMat(t backend.Tensor) *mat {
	m, ok := t.(*mat)
	if !ok {
		panic(fmt.Sprintf("cpu backend: tensor of type %T from another backend", t))
	}
	return m
}

// NewTensor returns a zeroed rows x cols tensor from the step's arena.
func (b *Backend) NewTensor(rows, cols int) backend.Tensor {
	if rows < 0 || cols < 0 {
		b.fail("tensor of %dx%d", rows, cols)
		rows, cols = 0, 0
	}
	return &mat{rows: rows, cols: cols, stride: cols, data: b.arena.alloc(rows * cols)}
}

// Upload copies src (rows*cols values, row-major) into dst.
func (b *Backend) Upload(dst backend.Tensor, src []float32) {
	d := asMat(dst)
	if len(src) != d.rows*d.cols {
		b.fail("upload of %d values into %dx%d tensor", len(src), d.rows, d.cols)
		return
	}
	for t := 0; t < d.rows; t++ {
		copy(d.row(t), src[t*d.cols:(t+1)*d.cols])
	}
}

// Download returns a row-major copy of src.
func (b *Backend) Download(src backend.Tensor) []float32 {
	s := asMat(src)
	out := make([]float32, 0, s.rows*s.cols)
	for t := 0; t < s.rows; t++ {
		out = append(out, s.row(t)...)
	}
	return out
}

// Cols returns a view of columns [from, to).
func (b *Backend) Cols(t backend.Tensor, from, to int) backend.Tensor {
	m := asMat(t)
	if from < 0 || to > m.cols || from > to {
		b.fail("column view [%d,%d) of %d columns", from, to, m.cols)
		from, to = 0, 0
	}
	end := 0
	if m.rows > 0 {
		end = (m.rows-1)*m.stride + to
	}
	return &mat{rows: m.rows, cols: to - from, stride: m.stride, data: m.data[from:end]}
}

// Rows returns a view of rows [from, to).
func (b *Backend) Rows(t backend.Tensor, from, to int) backend.Tensor {
	m := asMat(t)
	if from < 0 || to > m.rows || from > to {
		b.fail("row view [%d,%d) of %d rows", from, to, m.rows)
		from, to = 0, 0
	}
	if from == to {
		return &mat{cols: m.cols, stride: m.stride}
	}
	return &mat{rows: to - from, cols: m.cols, stride: m.stride, data: m.data[from*m.stride : (to-1)*m.stride+m.cols]}
}

// badShape records a shape mismatch; the op then does nothing.
func (b *Backend) badShape(op string, got, want [2]int) bool {
	if got != want {
		b.fail("%s: shape %v, want %v", op, got, want)
		return true
	}
	return false
}

// KernelName names the kernel family a default backend runs on this
// machine (see Kernels).
func KernelName() string { return pickISA("").String() }
