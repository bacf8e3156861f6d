package engine

import "math"

// expSum returns sum_i e^(v_i - m) in float64 for logits v whose largest
// value is m, the sum of a log-softmax. The exponential of each term is a
// polynomial of the fraction of its power of two (degree 7: relative error
// under 1e-8, far below the float32 the logprobs are reported in) instead
// of math.Exp, which was most of a decode step's host time when every
// sequence of a batch asks for logprobs over a vocabulary of 150k entries.
// Terms under e^-80 are dropped: the largest term is 1, so they change the
// float64 sum by less than 1e-34 relative.
func expSum(v []float32, m float32) float64 {
	const (
		log2e = 1.4426950408889634
		ln2   = 0.6931471805599453
		// Taylor coefficients of 2^f = e^(f ln 2), |f| <= 1/2.
		c1    = ln2
		c2    = ln2 * ln2 / 2
		c3    = ln2 * ln2 * ln2 / 6
		c4    = ln2 * ln2 * ln2 * ln2 / 24
		c5    = ln2 * ln2 * ln2 * ln2 * ln2 / 120
		c6    = ln2 * ln2 * ln2 * ln2 * ln2 * ln2 / 720
		c7    = ln2 * ln2 * ln2 * ln2 * ln2 * ln2 * ln2 / 5040
		round = 0x1.8p52
	)
	mx := float64(m)
	var sum float64
	for _, x := range v {
		d := float64(x) - mx
		if !(d >= -80) {
			continue
		}
		// Adding 1.5 * 2^52 rounds t to an integer n, which then sits in
		// the low bits of the sum's mantissa.
		t := d * log2e
		r := t + round
		n := r - round
		f := t - n
		p := 1 + f*(c1+f*(c2+f*(c3+f*(c4+f*(c5+f*(c6+f*c7))))))
		sum += math.Float64frombits(math.Float64bits(p) + math.Float64bits(r)<<52)
	}
	return sum
}
