// Package sample picks the next token from logits: greedy, temperature,
// top-k, top-p, min-p, with a seed.
//
// Filters are applied in the same order as llama.cpp and Hugging Face
// transformers: temperature scaling, then top-k, then top-p (nucleus), then
// min-p. The surviving tokens are renormalised and one is drawn with a
// math/rand/v2 PCG generator seeded from Options.Seed: one uniform number
// u in [0, 1) per token, mapped through the cumulative distribution of the
// survivors taken in token id order. That order does not depend on how the
// survivors were found, so a sampler elsewhere (a GPU's) given the same u
// picks the same token; Uniform and SampleWith let a caller draw u here and
// choose the token there.
package sample

import (
	"errors"
	"fmt"
	"math"
	"math/bits"
	"math/rand/v2"
	"slices"
)

// Options configures a Sampler. The zero value is greedy decoding.
type Options struct {
	Temperature float32 // 0 = greedy (argmax; ties -> lowest id)
	TopK        int     // 0 = off
	TopP        float32 // 0 or 1 = off
	MinP        float32 // 0 = off; keep tokens with p >= MinP * p_max
	Seed        uint64  // same seed + same logits sequence => same tokens
}

// Validate reports whether the options are usable. The error names the
// offending field.
func (o Options) Validate() error {
	t := float64(o.Temperature)
	switch {
	case math.IsNaN(t):
		return errors.New("sample: Temperature is NaN")
	case t < 0:
		return fmt.Errorf("sample: Temperature must be >= 0, got %g", t)
	case math.IsInf(t, 1):
		return errors.New("sample: Temperature must be finite, got +Inf")
	}
	if o.TopK < 0 {
		return fmt.Errorf("sample: TopK must be >= 0, got %d", o.TopK)
	}
	if p := float64(o.TopP); math.IsNaN(p) || p < 0 || p > 1 {
		return fmt.Errorf("sample: TopP must be in [0, 1], got %g", p)
	}
	if p := float64(o.MinP); math.IsNaN(p) || p < 0 || p > 1 {
		return fmt.Errorf("sample: MinP must be in [0, 1], got %g", p)
	}
	return nil
}

// Sampler draws token ids from logits according to its Options. It keeps
// scratch buffers and a random generator between calls, so it is not safe
// for concurrent use; use one Sampler per sequence.
type Sampler struct {
	opt Options
	rng *rand.Rand

	idx  []int32   // candidate token ids (a permutation of 0..n-1)
	w    []float64 // unnormalised probabilities, indexed by token id
	mark []uint64  // a bit per token id, for putting candidates in id order
}

// seedMix decorrelates the second PCG word from the first.
const seedMix = 0x9e3779b97f4a7c15

// New returns a Sampler for o, or the error from o.Validate.
func New(o Options) (*Sampler, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	return &Sampler{
		opt: o,
		rng: rand.New(rand.NewPCG(o.Seed, o.Seed^seedMix)),
	}, nil
}

// Options returns the options the Sampler was created with.
func (s *Sampler) Options() Options { return s.opt }

// Sample returns the id of the next token. It fails if logits is empty or
// contains NaN or an infinity. With Temperature == 0 it returns the argmax
// (lowest id among ties) without allocating and without consuming randomness.
func (s *Sampler) Sample(logits []float32) (int, error) {
	best, err := scan(logits)
	if err != nil {
		return 0, err
	}
	if !s.NeedsUniform(len(logits)) {
		return best, nil
	}
	return s.draw(s.filter(logits, best), s.rng.Float64(), len(logits)), nil
}

// NeedsUniform reports whether choosing from n logits takes a random
// number: not for greedy decoding, nor for a single token.
func (s *Sampler) NeedsUniform(n int) bool { return s.opt.Temperature != 0 && n > 1 }

// Uniform advances the generator and returns the number in [0, 1) that the
// next Sample would have drawn, for SampleWith (or a device sampler) to use
// in its place. Call it only where NeedsUniform is true, so that the stream
// stays the one Sample would have used.
func (s *Sampler) Uniform() float64 { return s.rng.Float64() }

// SampleWith is Sample with the random number u in [0, 1) given (from
// Uniform) instead of drawn; u is unused where NeedsUniform is false.
func (s *Sampler) SampleWith(logits []float32, u float64) (int, error) {
	best, err := scan(logits)
	if err != nil {
		return 0, err
	}
	if !s.NeedsUniform(len(logits)) {
		return best, nil
	}
	return s.draw(s.filter(logits, best), u, len(logits)), nil
}

// scan checks that logits is non-empty and finite and returns the argmax,
// preferring the lowest id among ties.
func scan(logits []float32) (int, error) {
	if len(logits) == 0 {
		return 0, errors.New("sample: empty logits")
	}
	best := 0
	bestV := float32(math.Inf(-1))
	// Blocks of 8 first (a vocabulary's worth of logits every decode
	// step): one test of the block's finiteness, as a tree sum of v-v (0
	// for finite v, NaN for NaN or ±Inf, and NaN in any sum), and one
	// look at its values only when one beats the best so far. A block that
	// fails, and the tail, go value by value below.
	i := 0
	for ; i+8 <= len(logits); i += 8 {
		b := logits[i : i+8 : i+8]
		if ((b[0]-b[0])+(b[1]-b[1]))+((b[2]-b[2])+(b[3]-b[3]))+(((b[4]-b[4])+(b[5]-b[5]))+((b[6]-b[6])+(b[7]-b[7]))) != 0 {
			break
		}
		if b[0] > bestV || b[1] > bestV || b[2] > bestV || b[3] > bestV || b[4] > bestV || b[5] > bestV || b[6] > bestV || b[7] > bestV {
			for j, v := range b {
				if v > bestV {
					best, bestV = i+j, v
				}
			}
		}
	}
	for ; i < len(logits); i++ {
		v := logits[i]
		// v-v is 0 for finite v and NaN for NaN or ±Inf.
		if v-v != 0 {
			return 0, fmt.Errorf("sample: logits[%d] is %g", i, v)
		}
		if v > bestV {
			best, bestV = i, v
		}
	}
	return best, nil
}

// filter applies temperature, top-k, top-p and min-p and returns the
// surviving candidate ids. Their unnormalised probabilities, relative to the
// most likely token (which has weight exactly 1), are in s.w.
// best is the argmax of logits; Temperature must be > 0.
func (s *Sampler) filter(logits []float32, best int) []int32 {
	n := len(logits)
	if cap(s.idx) < n {
		s.idx = make([]int32, n)
		s.w = make([]float64, n)
	}
	idx := s.idx[:n]
	w := s.w[:n]

	o := s.opt
	var cand []int32

	// Top-k: partial selection, never a full sort of the vocabulary.
	if o.TopK > 0 && o.TopK < n {
		cand = idx[:o.TopK]
		if o.TopK <= n/heapRatio {
			topKHeap(cand, logits)
		} else {
			fillIota(idx)
			selectTop(idx, o.TopK, logits)
		}
	} else {
		cand = idx
		fillIota(idx)
	}

	// Temperature: p_i ∝ exp((l_i - l_max) / T). Ordering by logit is
	// unaffected by T > 0, so all comparisons use the raw logits.
	invT := 1 / float64(o.Temperature)
	lmax := float64(logits[best])
	topP := o.TopP > 0 && o.TopP < 1
	minP := float64(o.MinP)

	// Min-p keeps p_i >= MinP * p_max, i.e. w_i >= MinP with w_i = p_i/p_max,
	// a ratio that renormalisation leaves unchanged. Without top-p it
	// therefore commutes with top-k, and a cheap test in logit space (with
	// slack for rounding) can drop most tokens before any exp is taken.
	if minP > 0 && !topP {
		floor := math.Log(minP) - 1e-6
		k := 0
		for _, id := range cand {
			if (float64(logits[id])-lmax)*invT >= floor {
				cand[k] = id
				k++
			}
		}
		cand = cand[:k] // the argmax always passes
	}

	var z float64
	for _, id := range cand {
		v := math.Exp((float64(logits[id]) - lmax) * invT)
		w[id] = v
		z += v
	}

	// Top-p: smallest set of most probable tokens whose cumulative
	// probability reaches TopP; at least one token.
	if topP {
		cand = nucleus(cand, logits, w, float64(o.TopP)*z)
	}

	// Min-p, exactly, on what is left.
	if minP > 0 {
		k := 0
		for _, id := range cand {
			if w[id] >= minP {
				cand[k] = id
				k++
			}
		}
		cand = cand[:k] // the argmax has weight 1, so k >= 1
	}
	return cand
}

// heapRatio: top-k uses a bounded heap when k <= n/heapRatio, and
// quickselect otherwise.
const heapRatio = 16

func fillIota(idx []int32) {
	for i := range idx {
		idx[i] = int32(i)
	}
}

// draw picks one of cand (ids below n) with probability proportional to
// s.w, by inverse transform of u in [0, 1) over cand in id order.
func (s *Sampler) draw(cand []int32, u float64, n int) int {
	cand = s.inIDOrder(cand, n)
	w := s.w
	var z float64
	for _, id := range cand {
		z += w[id]
	}
	u *= z
	var cum float64
	last := cand[0]
	for _, id := range cand {
		if w[id] == 0 {
			continue
		}
		cum += w[id]
		last = id
		if u < cum {
			return int(id)
		}
	}
	return int(last) // only reachable through rounding
}

// inIDOrder returns cand (ids below n) in increasing order: as it is when
// sorted already (no top-k or top-p), sorted in place when short, else
// rebuilt from a bitmap of the ids (sorting most of a large vocabulary
// would cost several times the rest of the sampling).
func (s *Sampler) inIDOrder(cand []int32, n int) []int32 {
	if slices.IsSorted(cand) {
		return cand
	}
	if len(cand) <= 4096 {
		slices.Sort(cand)
		return cand
	}
	words := (n + 63) / 64
	if cap(s.mark) < words {
		s.mark = make([]uint64, words)
	}
	mark := s.mark[:words]
	clear(mark)
	for _, id := range cand {
		mark[id>>6] |= 1 << (id & 63)
	}
	out := cand[:0]
	for i, m := range mark {
		for m != 0 {
			out = append(out, int32(i*64+bits.TrailingZeros64(m)))
			m &= m - 1
		}
	}
	return out
}
