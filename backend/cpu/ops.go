package cpu

import (
	"math"
	"sync"

	"github.com/mmfp4/mmfp4/backend"
)

// RMSNorm normalises each row by its root mean square, then applies gain.
func (b *Backend) RMSNorm(dst, x backend.Tensor, gain backend.Weight, eps float32) {
	d, xm := asMat(dst), asMat(x)
	g, ok := b.vector("rmsnorm gain", gain)
	if !ok || b.badShape("rmsnorm", [2]int{d.rows, d.cols}, [2]int{xm.rows, len(g)}) ||
		b.badShape("rmsnorm in", [2]int{xm.rows, xm.cols}, [2]int{d.rows, d.cols}) {
		return
	}
	b.count(4 * int64(len(g)))
	b.rows(xm.rows, xm.cols, func(t int) {
		in, out := xm.row(t), d.row(t)
		var ss float64
		if b.isa != isaGo {
			ss = float64(b.dotF32(in, in))
		} else {
			for _, v := range in {
				ss += float64(v) * float64(v)
			}
		}
		inv := float32(1 / math.Sqrt(ss/float64(len(in))+float64(eps)))
		for i, v := range in {
			out[i] = g[i] * (v * inv)
		}
	})
}

// rows calls fn for each row in [0, n); a batch of many rows of cols values
// is split over the threads.
func (b *Backend) rows(n, cols int, fn func(t int)) {
	if n*cols < 1<<16 {
		for t := 0; t < n; t++ {
			fn(t)
		}
		return
	}
	b.parallel(n, func(lo, hi int) {
		for t := lo; t < hi; t++ {
			fn(t)
		}
	})
}

// RoPE rotates the rotary dims of each head in place, row t by the batch
// position Positions[t].
func (b *Backend) RoPE(x backend.Tensor, heads, headStride, offset, dim int, theta float64, interleaved bool) {
	m := asMat(x)
	if b.batch == nil || m.rows != b.batch.Rows() {
		b.fail("rope: %d rows, batch of %d", m.rows, b.batchRows())
		return
	}
	if offset < 0 || dim%2 != 0 || (heads-1)*headStride+offset+dim > m.cols {
		b.fail("rope: %d heads of stride %d, dims [%d,%d) in %d columns", heads, headStride, offset, offset+dim, m.cols)
		return
	}
	half := dim / 2
	freq := ropeFrequencies(theta, dim)
	b.rows(m.rows, 32*heads*half, func(t int) {
		var buf [2 * 128]float32
		var cos, sin []float32
		if half <= 128 {
			cos, sin = buf[:half], buf[128:128+half]
		} else {
			cos, sin = make([]float32, half), make([]float32, half)
		}
		pos := float64(b.batch.Positions[t])
		for i := 0; i < half; i++ {
			// The angle is computed in float64: float32 holds pos * inv_freq
			// only to about 1e-2 rad near position 200,000.
			angle := pos * freq[i]
			cos[i] = float32(math.Cos(angle))
			sin[i] = float32(math.Sin(angle))
		}
		row := m.row(t)
		for h := 0; h < heads; h++ {
			v := row[h*headStride+offset : h*headStride+offset+dim]
			for i := 0; i < half; i++ {
				a, c := 2*i, 2*i+1
				if !interleaved {
					a, c = i, i+half
				}
				x0, x1 := v[a], v[c]
				v[a] = x0*cos[i] - x1*sin[i]
				v[c] = x1*cos[i] + x0*sin[i]
			}
		}
	})
}

// ropeCache holds the frequencies of each (theta, dim) seen.
var ropeCache sync.Map

// ropeFrequencies returns theta^(-2i/dim) for i < dim/2, in float64.
func ropeFrequencies(theta float64, dim int) []float64 {
	type key struct {
		theta float64
		dim   int
	}
	if f, ok := ropeCache.Load(key{theta, dim}); ok {
		return f.([]float64)
	}
	f := make([]float64, dim/2)
	for i := range f {
		f[i] = math.Pow(theta, -float64(2*i)/float64(dim))
	}
	ropeCache.Store(key{theta, dim}, f)
	return f
}

// Add computes dst = a + b elementwise.
func (b *Backend) Add(dst, a, c backend.Tensor) {
	d, am, cm := asMat(dst), asMat(a), asMat(c)
	if b.badShape("add", [2]int{am.rows, am.cols}, [2]int{d.rows, d.cols}) ||
		b.badShape("add", [2]int{cm.rows, cm.cols}, [2]int{d.rows, d.cols}) {
		return
	}
	b.rows(d.rows, d.cols, func(t int) {
		dr, ar, cr := d.row(t), am.row(t), cm.row(t)
		for i := range dr {
			dr[i] = ar[i] + cr[i]
		}
	})
}

func silu(x float32) float32 {
	return x / (1 + float32(math.Exp(float64(-x))))
}

// SwiGLU computes dst = silu(gate) * up elementwise.
func (b *Backend) SwiGLU(dst, gate, up backend.Tensor) {
	d, gm, um := asMat(dst), asMat(gate), asMat(up)
	if b.badShape("swiglu", [2]int{gm.rows, gm.cols}, [2]int{d.rows, d.cols}) ||
		b.badShape("swiglu", [2]int{um.rows, um.cols}, [2]int{d.rows, d.cols}) {
		return
	}
	b.rows(d.rows, d.cols, func(t int) {
		b.siluMulF32(d.row(t), gm.row(t), um.row(t))
	})
}

// SelectOutputs gathers the batch's output rows of x into dst.
func (b *Backend) SelectOutputs(dst, x backend.Tensor) {
	d, xm := asMat(dst), asMat(x)
	if b.batch == nil || xm.rows != b.batch.Rows() {
		b.fail("select outputs: %d rows, batch of %d", xm.rows, b.batchRows())
		return
	}
	if b.badShape("select outputs", [2]int{d.rows, d.cols}, [2]int{len(b.batch.Outputs), xm.cols}) {
		return
	}
	for i, r := range b.batch.Outputs {
		copy(d.row(i), xm.row(int(r)))
	}
}

func (b *Backend) batchRows() int {
	if b.batch == nil {
		return 0
	}
	return b.batch.Rows()
}
