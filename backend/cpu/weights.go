package cpu

import (
	"encoding/binary"
	"fmt"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/format"
	"github.com/mmfp4/mmfp4/safetensors"
)

// dense is a float32 weight matrix.
type dense struct {
	n, k int
	w    []float32
}

func (d *dense) Rows() int { return d.n }
func (d *dense) Cols() int { return d.k }

// quant is an MMFP4 weight matrix, used in place (its codes may alias the
// memory-mapped file).
type quant struct {
	m      *format.Matrix
	groups int // K / G
}

func (q *quant) Rows() int { return q.m.N }
func (q *quant) Cols() int { return q.m.K }

// bf16 is a bfloat16 weight matrix used in place (it may alias the memory
// map); rows are widened to float32 when read.
type bf16 struct {
	n, k int
	data []byte // 2*n*k bytes, little-endian
}

func (w *bf16) Rows() int { return w.n }
func (w *bf16) Cols() int { return w.k }

// row widens row n into buf[:k]; the conversion is exact.
func (w *bf16) row(n int, buf []float32) []float32 {
	buf = buf[:w.k]
	src := w.data[2*n*w.k : 2*(n+1)*w.k]
	for i := range buf {
		buf[i] = safetensors.BF16ToFloat32(binary.LittleEndian.Uint16(src[2*i:]))
	}
	return buf
}

// weightBytes is the memory a full pass over w reads: what the byte counter
// (BytesRead) adds for a matrix product.
func weightBytes(w backend.Weight) int64 {
	switch w := w.(type) {
	case *dense:
		return 4 * int64(len(w.w))
	case *quant:
		return int64(len(w.m.Codes) + len(w.m.Scales) + 4*len(w.m.RowScale))
	case *bf16:
		return int64(len(w.data))
	default:
		panic(fmt.Sprintf("cpu backend: weight of type %T from another backend", w))
	}
}

// rowBytes is the memory read for one row of w.
func rowBytes(w backend.Weight) int64 {
	return weightBytes(w) / int64(w.Rows())
}

// e4m3Table decodes every FP8 E4M3 scale byte.
var e4m3Table = func() (t [256]float32) {
	for i := range t {
		t[i] = format.E4M3Decode(uint8(i))
	}
	return
}()

// pairTable maps a packed byte to its two doubled E2M1 values (low nibble
// first), so the int8 kernel does one lookup per two weights.
var pairTable = func() (t [256][2]int32) {
	for i := range t {
		t[i] = [2]int32{int32(format.E2M1Doubled[i&15]), int32(format.E2M1Doubled[i>>4])}
	}
	return
}()

// NewWeight wraps host weight data. Dense and bf16 data are used as given;
// MMFP4 data is validated and kept packed.
func (b *Backend) NewWeight(w backend.HostWeight) (backend.Weight, error) {
	set := 0
	for _, given := range []bool{w.Dense != nil, w.Quant != nil, w.BF16 != nil} {
		if given {
			set++
		}
	}
	if set != 1 {
		return nil, fmt.Errorf("%s: exactly one of dense, bf16 or MMFP4 data must be given", w.Name)
	}
	switch {
	case w.BF16 != nil:
		if w.N <= 0 || w.K <= 0 || len(w.BF16) != 2*w.N*w.K {
			return nil, fmt.Errorf("%s: %d bf16 bytes, want %dx%dx2", w.Name, len(w.BF16), w.N, w.K)
		}
		return &bf16{n: w.N, k: w.K, data: w.BF16}, nil
	case w.Quant != nil:
		if err := w.Quant.Validate(); err != nil {
			return nil, fmt.Errorf("%s: %w", w.Name, err)
		}
		if w.Quant.N != w.N || w.Quant.K != w.K {
			return nil, fmt.Errorf("%s: MMFP4 matrix is %dx%d, want %dx%d", w.Name, w.Quant.N, w.Quant.K, w.N, w.K)
		}
		return &quant{m: w.Quant, groups: w.Quant.K / w.Quant.GroupSize}, nil
	default:
		if len(w.Dense) != w.N*w.K {
			return nil, fmt.Errorf("%s: %d values, want %dx%d", w.Name, len(w.Dense), w.N, w.K)
		}
		return &dense{n: w.N, k: w.K, w: w.Dense}, nil
	}
}

// weightRow returns row n of w as float32, decoding MMFP4 and bf16 into buf.
func weightRow(w backend.Weight, n int, buf []float32) []float32 {
	switch w := w.(type) {
	case *dense:
		return w.w[n*w.k : (n+1)*w.k]
	case *quant:
		w.m.DequantizeRow(n, buf[:w.m.K])
		return buf[:w.m.K]
	case *bf16:
		return w.row(n, buf)
	default:
		panic(fmt.Sprintf("cpu backend: weight of type %T from another backend", w))
	}
}

// weightRows is a view of rows [from, from+n) of w, sharing its memory.
func weightRows(w backend.Weight, from, n int) backend.Weight {
	switch w := w.(type) {
	case *dense:
		return &dense{n: n, k: w.k, w: w.w[from*w.k : (from+n)*w.k]}
	case *quant:
		m := *w.m
		m.N = n
		m.Codes = m.Codes[from*m.K/2 : (from+n)*m.K/2]
		m.Scales = m.Scales[from*w.groups : (from+n)*w.groups]
		m.RowScale = m.RowScale[from : from+n]
		return &quant{m: &m, groups: w.groups}
	case *bf16:
		return &bf16{n: n, k: w.k, data: w.data[2*from*w.k : 2*(from+n)*w.k]}
	default:
		panic(fmt.Sprintf("cpu backend: weight of type %T from another backend", w))
	}
}

// vector returns a 1 x K weight's values.
func (b *Backend) vector(what string, w backend.Weight) ([]float32, bool) {
	d, ok := w.(*dense)
	if !ok || d.n != 1 {
		b.fail("%s: want a dense vector, got %T %dx%d", what, w, w.Rows(), w.Cols())
		return nil, false
	}
	return d.w, true
}

// Embed copies the rows of the embedding table named by the batch's tokens.
func (b *Backend) Embed(dst backend.Tensor, table backend.Weight) {
	d := asMat(dst)
	if b.batch == nil || b.badShape("embed", [2]int{d.rows, d.cols}, [2]int{b.batch.Rows(), table.Cols()}) {
		return
	}
	for t, id := range b.batch.Tokens {
		if id < 0 || int(id) >= table.Rows() {
			b.fail("token id %d at row %d is outside the vocabulary [0, %d)", id, t, table.Rows())
			return
		}
		row := d.row(t)
		copy(row, weightRow(table, int(id), row))
	}
	b.count(int64(len(b.batch.Tokens)) * rowBytes(table))
}

func dot(a, b []float32) float32 {
	b = b[:len(a)]
	var s0, s1, s2, s3 float32
	i := 0
	for ; i+4 <= len(a); i += 4 {
		s0 += a[i] * b[i]
		s1 += a[i+1] * b[i+1]
		s2 += a[i+2] * b[i+2]
		s3 += a[i+3] * b[i+3]
	}
	for ; i < len(a); i++ {
		s0 += a[i] * b[i]
	}
	return (s0 + s1) + (s2 + s3)
}

func axpy(dst []float32, a float32, x []float32) {
	x = x[:len(dst)]
	for i := range dst {
		dst[i] += a * x[i]
	}
}

// MatMul computes dst = x W^T, split over output rows.
func (b *Backend) MatMul(dst, x backend.Tensor, w backend.Weight) {
	d, xm := asMat(dst), asMat(x)
	if b.badShape("matmul out", [2]int{d.rows, d.cols}, [2]int{xm.rows, w.Rows()}) ||
		b.badShape("matmul in", [2]int{xm.rows, xm.cols}, [2]int{xm.rows, w.Cols()}) {
		return
	}
	b.count(weightBytes(w))
	switch w := w.(type) {
	case *dense:
		b.parallel(w.n, func(lo, hi int) {
			for n := lo; n < hi; n++ {
				wr := w.w[n*w.k : (n+1)*w.k]
				for t := 0; t < xm.rows; t++ {
					d.data[t*d.stride+n] = b.dotF32(wr, xm.row(t))
				}
			}
		})
	case *quant:
		if b.floatActs {
			b.matMulQuantFloat(d, xm, w)
		} else {
			b.matMulQuantInt8(d, xm, w)
		}
	case *bf16:
		// Only a tied lm_head on a bf16 embedding comes here.
		b.parallel(w.n, func(lo, hi int) {
			buf := make([]float32, w.k)
			for n := lo; n < hi; n++ {
				w.row(n, buf)
				for t := 0; t < xm.rows; t++ {
					d.data[t*d.stride+n] = b.dotF32(buf, xm.row(t))
				}
			}
		})
	default:
		panic(fmt.Sprintf("cpu backend: weight of type %T from another backend", w))
	}
}

func (b *Backend) matMulQuantFloat(d, xm *mat, w *quant) {
	b.parallel(w.m.N, func(lo, hi int) {
		buf := make([]float32, w.m.K)
		for n := lo; n < hi; n++ {
			w.m.DequantizeRow(n, buf)
			for t := 0; t < xm.rows; t++ {
				d.data[t*d.stride+n] = b.dotF32(buf, xm.row(t))
			}
		}
	})
}

// dotGroupsGo is the reference for dotGroups: for each group g, the exact
// int32 sum over the group of 2*e2m1(code) * x, with x de-interleaved as
// quantizeActivations stores it.
func dotGroupsGo(codes []byte, x []int8, G int, out []int32) {
	half := G / 2
	for g := range out {
		out[g] = dotCodes(codes[g*half:(g+1)*half], x[g*G:(g+1)*G])
	}
}

// dotCodes is one group of dotGroupsGo: codes holds G/2 bytes, x the G
// activations, even columns first. Unrolled by four bytes.
func dotCodes(codes []byte, x []int8) int32 {
	half := len(codes)
	ev, od := x[:half:half], x[half:2*half:2*half]
	var s0, s1 int32
	i := 0
	for ; i+4 <= half; i += 4 {
		c := codes[i : i+4 : i+4]
		e, o := ev[i:i+4:i+4], od[i:i+4:i+4]
		p0, p1, p2, p3 := &pairTable[c[0]], &pairTable[c[1]], &pairTable[c[2]], &pairTable[c[3]]
		s0 += p0[0]*int32(e[0]) + p0[1]*int32(o[0]) + p1[0]*int32(e[1]) + p1[1]*int32(o[1])
		s1 += p2[0]*int32(e[2]) + p2[1]*int32(o[2]) + p3[0]*int32(e[3]) + p3[1]*int32(o[3])
	}
	for ; i < half; i++ {
		p := &pairTable[codes[i]]
		s0 += p[0]*int32(ev[i]) + p[1]*int32(od[i])
	}
	return s0 + s1
}

// axpyCodesGo is the reference for axpyCodes: for each group g of G weights
// (G/2 code bytes), acc[g*G+k] += coef[g] * 2*e2m1(low nibble of byte k) and
// acc[g*G+G/2+k] += coef[g] * 2*e2m1(high nibble): even columns first, then
// odd ones, the order the packed bytes give without shuffling.
func axpyCodesGo(acc []float32, codes []byte, coef []float32, G int) {
	half := G / 2
	for g, a := range coef {
		ev, od := acc[g*G:g*G+half], acc[g*G+half:(g+1)*G]
		for k, c := range codes[g*half : (g+1)*half] {
			p := &pairTable[c]
			ev[k] += a * float32(p[0])
			od[k] += a * float32(p[1])
		}
	}
}
