package cpu

import (
	"math"

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
	for t := 0; t < xm.rows; t++ {
		in, out := xm.row(t), d.row(t)
		var ss float64
		for _, v := range in {
			ss += float64(v) * float64(v)
		}
		inv := float32(1 / math.Sqrt(ss/float64(len(in))+float64(eps)))
		for i, v := range in {
			out[i] = g[i] * (v * inv)
		}
	}
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
	cos := make([]float32, half)
	sin := make([]float32, half)
	for t := 0; t < m.rows; t++ {
		pos := float64(b.batch.Positions[t])
		for i := 0; i < half; i++ {
			// The angle is computed in float64: float32 holds pos * inv_freq
			// only to about 1e-2 rad near position 200,000.
			angle := pos * math.Pow(theta, -float64(2*i)/float64(dim))
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
	}
}

// Add computes dst = a + b elementwise.
func (b *Backend) Add(dst, a, c backend.Tensor) {
	d, am, cm := asMat(dst), asMat(a), asMat(c)
	if b.badShape("add", [2]int{am.rows, am.cols}, [2]int{d.rows, d.cols}) ||
		b.badShape("add", [2]int{cm.rows, cm.cols}, [2]int{d.rows, d.cols}) {
		return
	}
	for t := 0; t < d.rows; t++ {
		dr, ar, cr := d.row(t), am.row(t), cm.row(t)
		for i := range dr {
			dr[i] = ar[i] + cr[i]
		}
	}
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
	for t := 0; t < d.rows; t++ {
		dr, gr, ur := d.row(t), gm.row(t), um.row(t)
		for i := range dr {
			dr[i] = silu(gr[i]) * ur[i]
		}
	}
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
