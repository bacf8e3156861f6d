package engine

import "math"

// logprobs returns the log-softmax of logits at id and the top k entries in
// rank order (higher logit first, the lower id first among equal logits).
// The logits are finite (CheckLogits ran first), so a plain comparison
// finds the maximum (math.Max's NaN and signed-zero cases cost a third of
// the function's time over a large vocabulary). The log-sum-exp is taken
// in float64 with expNeg, within about 1e-10 relative of math.Exp's sum,
// far below the float32 rounding of the results.
func logprobs(logits []float32, id, k int) (float32, []TokenLogprob) {
	top := topLogits(logits, k)
	var m float32
	if len(top) > 0 {
		m = logits[top[0].ID]
	} else {
		m = float32(math.Inf(-1))
		for _, v := range logits {
			if v > m {
				m = v
			}
		}
	}
	lse := float64(m) + math.Log(sumExp(logits, m))
	for j := range top {
		top[j].Logprob = float32(float64(logits[top[j].ID]) - lse)
	}
	return float32(float64(logits[id]) - lse), top
}

// topLogits returns the ids of the k largest logits in rank order, their
// log-probabilities unset; the first is the maximum.
func topLogits(logits []float32, k int) []TokenLogprob {
	if k <= 0 {
		return nil
	}
	top := make([]TokenLogprob, 0, k)
	var kth float32 // the k-th's logit, once there are k
	for i, v := range logits {
		if len(top) < k {
			top = append(top, TokenLogprob{ID: i})
		} else if v > kth {
			top[k-1].ID = i
		} else {
			continue
		}
		// Later ids go after earlier ones of the same logit.
		for j := len(top) - 1; j > 0 && logits[top[j].ID] > logits[top[j-1].ID]; j-- {
			top[j], top[j-1] = top[j-1], top[j]
		}
		kth = logits[top[len(top)-1].ID]
	}
	return top
}

// sumExp is the sum of exp(v - m) over logits in float64, in four
// independent partial sums.
func sumExp(logits []float32, m float32) float64 {
	mx := float64(m)
	var s0, s1, s2, s3 float64
	i := 0
	for ; i+4 <= len(logits); i += 4 {
		b := logits[i : i+4 : i+4]
		s0 += expNeg(float64(b[0]) - mx)
		s1 += expNeg(float64(b[1]) - mx)
		s2 += expNeg(float64(b[2]) - mx)
		s3 += expNeg(float64(b[3]) - mx)
	}
	for ; i < len(logits); i++ {
		s0 += expNeg(float64(logits[i]) - mx)
	}
	return (s0 + s1) + (s2 + s3)
}

// exp2Table[j] is 2^(j/32).
var exp2Table = func() (t [32]float64) {
	for j := range t {
		t[j] = math.Exp2(float64(j) / 32)
	}
	return t
}()

// expNeg is e^t for t <= 0 (0 below -693, where e^t is under 1e-301)
// within about 1e-10 relative: about six times faster than math.Exp,
// which a logprobs call paid 154,880 times a row. With y = 32 t / ln 2
// and n = trunc(y), e^t = 2^(n/32) e^f, f = (y - n) ln 2 / 32 in
// (-ln 2 / 32, 0]: 2^(n/32) from the exponent of n >> 5 and the table
// entry of n & 31, and e^f by its Taylor polynomial of degree 4 (the
// remainder |f|^5 / 120 is under 4e-11).
func expNeg(t float64) float64 {
	y := t * (32 / math.Ln2)
	if !(y > -32*1000) { // and -Inf
		return 0
	}
	n := int64(y)
	f := (y - float64(n)) * (math.Ln2 / 32)
	p := 1 + f*(1+f*(1.0/2+f*(1.0/6+f*(1.0/24))))
	scale := math.Float64frombits(uint64((n>>5)+1023) << 52)
	return exp2Table[n&31] * scale * p
}
