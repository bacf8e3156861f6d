package format

import (
	"fmt"
	"math"
	"runtime"
	"sync"
	"sync/atomic"
)

// QuantOptions selects how Quantize picks the block scales.
type QuantOptions struct {
	GroupSize int  // 32, 64 or 128
	Search    bool // try scales near the round-to-nearest one, keep the least squared error
}

// rowScaleDiv maps a row's largest magnitude onto the largest representable
// product of a block scale and an element: 448 * 6.
const rowScaleDiv = E4M3Max * 6

// Quantize converts w (n rows of k float32 values, row-major, PyTorch Linear
// layout) to MMFP4. Rows are quantized in parallel.
//
// With Search false this is the round-to-nearest (RTN) rule of the format
// specification, reproduced bit for bit by other implementations, so every
// step is float32 arithmetic in the documented order.
func Quantize(w []float32, n, k int, opt QuantOptions) (*Matrix, error) {
	g := opt.GroupSize
	switch {
	case n <= 0 || k <= 0:
		return nil, fmt.Errorf("quantize: shape [%d,%d] must be positive", n, k)
	case len(w) != n*k:
		return nil, fmt.Errorf("quantize: %d values for shape [%d,%d]", len(w), n, k)
	case !ValidGroupSize(g):
		return nil, fmt.Errorf("quantize: group size %d: must be 32, 64 or 128", g)
	case k%g != 0:
		return nil, fmt.Errorf("quantize: K=%d is not a multiple of the group size %d", k, g)
	}
	m := &Matrix{
		N: n, K: k, GroupSize: g,
		Codes:    make([]byte, n*k/2),
		Scales:   make([]byte, n*(k/g)),
		RowScale: make([]float32, n),
	}
	var nonFinite atomic.Bool
	parallelRows(n, func(r int) {
		rs, ok := quantizeRow(w[r*k:(r+1)*k], g, opt.Search,
			m.Codes[r*k/2:(r+1)*k/2], m.Scales[r*(k/g):(r+1)*(k/g)])
		m.RowScale[r] = rs
		if !ok {
			nonFinite.Store(true)
		}
	})
	if nonFinite.Load() {
		for i, v := range w {
			if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
				return nil, fmt.Errorf("quantize: non-finite value %v at [%d,%d]", v, i/k, i%k)
			}
		}
	}
	return m, nil
}

// parallelRows calls f for rows 0..n-1, split into contiguous blocks over
// GOMAXPROCS goroutines (every row costs the same, so static blocks balance).
func parallelRows(n int, f func(r int)) {
	p := min(runtime.GOMAXPROCS(0), n)
	var wg sync.WaitGroup
	for i := 0; i < p; i++ {
		lo, hi := i*n/p, (i+1)*n/p
		wg.Go(func() {
			for r := lo; r < hi; r++ {
				f(r)
			}
		})
	}
	wg.Wait()
}

// quantizeRow quantizes one row into codes and scales and returns its row
// scale, or ok == false if the row holds a NaN or an infinity.
func quantizeRow(row []float32, g int, search bool, codes, scales []byte) (rs float32, ok bool) {
	amax := absMaxBits(row)
	if amax >= 0x7F800000 { // the bits of +Inf; NaNs sort above it
		return 0, false
	}
	rs = math.Float32frombits(amax) / rowScaleDiv
	if rs == 0 {
		// An all-zero row. Also a row so tiny that amax/2688 underflows:
		// with 1 its scales round to 0 and it stays all zero, not NaN.
		rs = 1
	}
	t := rs * 6
	for j := range scales {
		grp := row[j*g : (j+1)*g]
		s := E4M3Encode(math.Float32frombits(absMaxBits(grp)) / t)
		if search {
			s = searchScale(grp, rs, s)
		}
		scales[j] = s
		encodeGroup(grp, rs*E4M3Decode(s), codes[j*g/2:(j+1)*g/2])
	}
	return rs, true
}

// searchScale tries the E4M3 codes s-2..s+2 (within the positive finite
// codes 0x01..0x7E) and returns the one whose reconstruction of grp has the
// least squared error. The RTN code s wins ties; among the others the
// smaller code does.
func searchScale(grp []float32, rs float32, s uint8) uint8 {
	best, bestErr := s, groupSSE(grp, rs*E4M3Decode(s))
	for c := int(s) - 2; c <= int(s)+2; c++ {
		if c == int(s) || c < 0x01 || c > 0x7E {
			continue
		}
		if e := groupSSE(grp, rs*E4M3Decode(uint8(c))); e < bestErr {
			best, bestErr = uint8(c), e
		}
	}
	return best
}

// encodeGroup writes the E2M1 codes of grp/d, two per byte, low nibble first.
func encodeGroup(grp []float32, d float32, out []byte) {
	if d == 0 {
		clear(out)
		return
	}
	for i := range out {
		out[i] = E2M1Encode(grp[2*i]/d) | E2M1Encode(grp[2*i+1]/d)<<4
	}
}

// groupSSE is the squared error of quantizing grp with step d, measured on
// the values Dequantize produces.
func groupSSE(grp []float32, d float32) float64 {
	var sum float64
	for _, w := range grp {
		var q float32
		if d != 0 {
			q = d * E2M1Decode(E2M1Encode(w/d))
		}
		e := float64(w) - float64(q)
		sum += float64(e * e) // the conversion forbids fusing into an FMA, so every platform agrees
	}
	return sum
}

// absMaxBits returns the bits of the largest |x|. Bit patterns of
// non-negative floats order like their values (with NaN above +Inf), so an
// integer max does it without float compares.
func absMaxBits(x []float32) uint32 {
	var m uint32
	for _, v := range x {
		m = max(m, math.Float32bits(v)&^(1<<31))
	}
	return m
}
