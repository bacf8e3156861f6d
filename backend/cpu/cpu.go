// Package cpu is the portable backend: plain Go, multi-threaded over output
// rows. It is the reference every faster kernel is tested against.
package cpu

import (
	"fmt"
	"runtime"
	"sync"
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
}

// forceGo makes the kernels take their pure-Go reference path even where
// SIMD assembly is available; tests set it to cover both.
var forceGo bool

// Backend implements backend.Backend on the host.
type Backend struct {
	threads   int
	floatActs bool
	onRoute   func([]int)
	read      atomic.Int64 // bytes of weights and cache the ops have read
}

var _ backend.Backend = (*Backend)(nil)

// New returns a CPU backend.
func New(o Options) *Backend {
	t := o.Threads
	if t <= 0 {
		t = runtime.GOMAXPROCS(0)
	}
	return &Backend{threads: t, floatActs: o.FloatActivations, onRoute: o.OnRoute}
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
	return fmt.Sprintf("cpu (%d threads, %s)", b.threads, mode)
}

// parallel splits [0, n) into contiguous chunks run on the worker
// goroutines. Small n runs inline: spawning costs more than it saves.
func (b *Backend) parallel(n int, fn func(lo, hi int)) {
	workers := b.threads
	if workers > n {
		workers = n
	}
	if workers <= 1 {
		if n > 0 {
			fn(0, n)
		}
		return
	}
	var wg sync.WaitGroup
	chunk := (n + workers - 1) / workers
	for lo := 0; lo < n; lo += chunk {
		hi := min(lo+chunk, n)
		wg.Add(1)
		go func() {
			defer wg.Done()
			fn(lo, hi)
		}()
	}
	wg.Wait()
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

func asMat(t backend.Tensor) *mat {
	m, ok := t.(*mat)
	if !ok {
		panic(fmt.Sprintf("cpu backend: tensor of type %T from another backend", t))
	}
	return m
}

// NewTensor allocates a zeroed rows x cols tensor.
func (b *Backend) NewTensor(rows, cols int) backend.Tensor {
	return &mat{rows: rows, cols: cols, stride: cols, data: make([]float32, rows*cols)}
}

// Upload copies src (rows*cols values, row-major) into dst.
func (b *Backend) Upload(dst backend.Tensor, src []float32) {
	d := asMat(dst)
	if len(src) != d.rows*d.cols {
		panic(fmt.Sprintf("cpu backend: upload of %d values into %dx%d tensor", len(src), d.rows, d.cols))
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
		panic(fmt.Sprintf("cpu backend: column view [%d,%d) of %d columns", from, to, m.cols))
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
		panic(fmt.Sprintf("cpu backend: row view [%d,%d) of %d rows", from, to, m.rows))
	}
	if from == to {
		return &mat{cols: m.cols, stride: m.stride}
	}
	return &mat{rows: to - from, cols: m.cols, stride: m.stride, data: m.data[from*m.stride : (to-1)*m.stride+m.cols]}
}

func checkShape(op string, got, want [2]int) {
	if got != want {
		panic(fmt.Sprintf("cpu backend: %s: shape %v, want %v", op, got, want))
	}
}
