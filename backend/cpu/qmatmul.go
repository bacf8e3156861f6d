package cpu

import (
	"github.com/mmfp4/mmfp4/format"
)

// qacts is a batch of activations quantized for the integer kernels
// (docs/format.md section 9): int8 per (token, group of G columns) with one
// float scale, each group stored even columns first, then odd ones, to match
// the two nibbles of the packed weight bytes.
type qacts struct {
	rows, k, g, groups int
	q                  []int8    // [rows][k]
	s                  []float32 // [rows][groups]: amax/127
	sum                []int32   // [rows][groups]: sum of the group's int8 values

	qp   *[]int8 // pooled backing of q, s, sum (pooledQActs)
	sp   *[]float32
	sump *[]int32
}

func newQActs(rows, k, g int) *qacts {
	groups := k / g
	return &qacts{rows: rows, k: k, g: g, groups: groups,
		q: make([]int8, rows*k), s: make([]float32, rows*groups), sum: make([]int32, rows*groups)}
}

// pooledQActs is newQActs on pooled buffers (not zeroed: every row must be
// written); release gives them back.
func pooledQActs(rows, k, g int) *qacts {
	groups := k / g
	a := &qacts{rows: rows, k: k, g: g, groups: groups,
		qp: int8Bufs.get(rows * k), sp: floatBufs.get(rows * groups), sump: int32Bufs.get(rows * groups)}
	a.q, a.s, a.sum = *a.qp, *a.sp, *a.sump
	return a
}

// release returns a pooledQActs's buffers; a must not be used after.
func (a *qacts) release() {
	if a.qp != nil {
		int8Bufs.put(a.qp)
		floatBufs.put(a.sp)
		int32Bufs.put(a.sump)
		a.qp, a.sp, a.sump, a.q, a.s, a.sum = nil, nil, nil, nil, nil, nil
	}
}

// row returns token t's values, scales and sums.
func (a *qacts) row(t int) ([]int8, []float32, []int32) {
	return a.q[t*a.k : (t+1)*a.k], a.s[t*a.groups : (t+1)*a.groups], a.sum[t*a.groups : (t+1)*a.groups]
}

// gather returns the rows of a listed in rows, in that order, in pooled
// buffers.
func (a *qacts) gather(rows []int) *qacts {
	g := pooledQActs(len(rows), a.k, a.g)
	for i, t := range rows {
		q, s, sum := a.row(t)
		gq, gs, gsum := g.row(i)
		copy(gq, q)
		copy(gs, s)
		copy(gsum, sum)
	}
	return g
}

// quantizeActivations quantizes every row of x, split over rows, into
// pooled buffers (release them when done).
func (b *Backend) quantizeActivations(x *mat, group int) *qacts {
	a := pooledQActs(x.rows, x.cols, group)
	b.workers.run(x.rows, max(1, 32768/max(x.cols, 1)), func(lo, hi int) {
		for t := lo; t < hi; t++ {
			q, s, sum := a.row(t)
			b.quantizeRow(x.row(t), group, q, s, sum)
		}
	})
	return a
}

// quantizeRow quantizes one row with the backend's kernel.
func (b *Backend) quantizeRow(row []float32, group int, q []int8, scales []float32, sums []int32) {
	if group == 128 && len(scales) > 0 && quantRow128(b.isa, row, q, scales, sums) {
		return
	}
	quantizeRowGo(row, group, q, scales, sums)
}

// quantizeRowGo is the reference quantizer for one row: per group, scale =
// amax/127 and q = x/scale rounded half away from zero, clamped to
// [-127, 127]; a group of zeros gets scale 0.
func quantizeRowGo(row []float32, group int, q []int8, scales []float32, sums []int32) {
	half := group / 2
	for g := range scales {
		seg := row[g*group : (g+1)*group]
		out := q[g*group : (g+1)*group]
		var amax float32
		for _, v := range seg {
			if v < 0 {
				v = -v
			}
			amax = max(amax, v)
		}
		if amax == 0 {
			clear(out)
			scales[g], sums[g] = 0, 0
			continue
		}
		scale := amax / 127
		scales[g] = scale
		var sum int32
		for i, v := range seg {
			r := v / scale
			if r >= 0 {
				r += 0.5
			} else {
				r -= 0.5
			}
			qi := max(-127, min(127, int32(r)))
			out[i/2+(i%2)*half] = int8(qi)
			sum += qi
		}
		sums[g] = sum
	}
}

// matMulQuantInt8 is the integer kernel: within a group, the doubled E2M1
// codes times int8 activations sum exactly in int32, and the group's float
// scale row_scale * e4m3(s) * x_scale / 2 is applied once.
func (b *Backend) matMulQuantInt8(d, xm *mat, w *quant) {
	a := b.quantizeActivations(xm, w.m.GroupSize)
	b.matMulQuantActs(d, a, w.m)
	a.release()
}

// matMulQuantActs is matMulQuantInt8 on activations already quantized with
// m's group size.
func (b *Backend) matMulQuantActs(d *mat, a *qacts, m *format.Matrix) {
	if b.gemmInt8(d, a, m) {
		return
	}
	b.workers.run(m.N, b.gemvGrain(m), func(lo, hi int) {
		for t := 0; t < a.rows; t++ {
			b.gemvRows(m, lo, hi, a, t, d.data[t*d.stride+lo:t*d.stride+hi])
		}
	})
}

// gemvGrain is the number of rows of m per decode work item: about a
// quarter of the matrix per thread, from 32 KB to gemvMaxChunk of codes.
// Long runs of rows stream faster (an expert matrix: 20 GB/s in 32 KB
// items, 27-31 in 256 KB ones), and four items a thread still balance the
// threads on a busy machine.
func (b *Backend) gemvGrain(m *format.Matrix) int {
	rowBytes := max(m.K/2, 1)
	chunk := min(gemvMaxChunk, max(32768, m.N*rowBytes/(4*b.threads)))
	return max(4, chunk/rowBytes)
}

// gemvMaxChunk caps a decode work item (512 KB and 2 MB measured alike).
const gemvMaxChunk = 512 << 10

// gemvRows computes out[i] = (W x_t)[lo+i] for rows [lo, hi) of m and token
// t of a.
func (b *Backend) gemvRows(m *format.Matrix, lo, hi int, a *qacts, t int, out []float32) {
	if hi <= lo {
		return
	}
	if m.GroupSize == 128 && gemv128(b.isa, m, lo, hi, a, t, out) {
		return
	}
	gemvRowsGo(m, lo, hi, a, t, out)
}

// gemvRowsGo is the reference for gemvRows: exact int32 dot products per
// group (dotGroupsGo), then sum_g dot_g * (row_scale/2 * e4m3(s_g)) * x_scale_g.
func gemvRowsGo(m *format.Matrix, lo, hi int, a *qacts, t int, out []float32) {
	G, K := m.GroupSize, m.K
	groups := K / G
	xq, xs, _ := a.row(t)
	dots := make([]int32, groups)
	for n := lo; n < hi; n++ {
		dotGroupsGo(m.Codes[n*K/2:(n+1)*K/2], xq, G, dots)
		rs := m.RowScale[n] * 0.5
		var acc float32
		for g, s := range m.Scales[n*groups : (n+1)*groups] {
			acc += float32(dots[g]) * (rs * e4m3Table[s]) * xs[g]
		}
		out[n-lo] = acc
	}
}
