//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"
	"math"
	"math/bits"
	"math/rand/v2"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
)

// A Go transcription of kernels/logprob.cu (logprob_rows) with its thread
// layout written out (1,024 threads, warps of 32 lanes in lockstep), so
// that the warp lists, their merge and the rescaled sums are checked
// against the plain definition on the CPU, before and besides the GPU
// tests. expf is float32(math.Exp), which CUDA's expf matches within 2 ulp.

const (
	simLPThreads = 1024
	simLPWarps   = simLPThreads / 32
	simNoID      = math.MaxInt32
)

func simBefore(va float32, ia int32, vb float32, ib int32) bool {
	return va > vb || (va == vb && ia < ib)
}

// simWarpList is one warp's registers lv, li (per lane) and tv, ti.
type simWarpList struct {
	lv     [32]float32
	li     [32]int32
	tv     float32
	ti     int32
	offers int // insertions, for the test's log
}

func newSimWarpList() *simWarpList {
	w := &simWarpList{tv: float32(math.Inf(-1)), ti: simNoID}
	for l := range 32 {
		w.lv[l], w.li[l] = float32(math.Inf(-1)), simNoID
	}
	return w
}

// offer is lp_offer: v, i are the 32 lanes' candidates; bound, if not nil,
// is the block's bound, which a full list raises to its k-th.
func (w *simWarpList) offer(v [32]float32, i [32]int32, k int, bound *float32) {
	thr := float32(math.Inf(-1))
	if bound != nil {
		thr = *bound
	}
	var want uint32
	for l := range 32 {
		if v[l] >= thr && simBefore(v[l], i[l], w.tv, w.ti) {
			want |= 1 << l
		}
	}
	if want == 0 {
		return
	}
	defer func() {
		if bound != nil && w.ti != simNoID {
			*bound = max(*bound, w.tv)
		}
	}()
	for want != 0 {
		L := bits.TrailingZeros32(want)
		want &= want - 1
		nv, ni := v[L], i[L]
		if !simBefore(nv, ni, w.tv, w.ti) {
			continue
		}
		pos := 0
		for l := range 32 {
			if l < k && simBefore(w.lv[l], w.li[l], nv, ni) {
				pos++
			}
		}
		uv, ui := w.lv, w.li // shfl_up by 1: lane l reads lane l-1
		for l := 31; l >= 0; l-- {
			switch {
			case l > pos:
				w.lv[l], w.li[l] = uv[l-1], ui[l-1]
			case l == pos:
				w.lv[l], w.li[l] = nv, ni
			}
		}
		w.tv, w.ti = w.lv[k-1], w.li[k-1]
		w.offers++
	}
}

// simLogprobRow is logprob_rows for one row (want = k >= 0).
func simLogprobRow(row []float32, aligned bool, id, k int) (lp backend.RowLogprobs, bad bool, offers int) {
	n := len(row)
	negInf := float32(math.Inf(-1))
	var m [simLPThreads]float32
	var s [simLPThreads]float64
	for t := range m {
		m[t] = negInf
	}
	lists := make([]*simWarpList, simLPWarps)
	for w := range lists {
		lists[w] = newSimWarpList()
	}
	expf := func(x float32) float32 { return float32(math.Exp(float64(x))) }
	ok := func(x float32) bool { return x < float32(math.Inf(1)) }
	sum := func(t int, qm float32, terms func(m float32) float32, finite bool) {
		bad = bad || !finite
		if qm > m[t] {
			s[t] *= math.Exp(float64(m[t]) - float64(qm))
			m[t] = qm
		}
		if m[t] > negInf {
			s[t] += float64(terms(m[t]))
		}
	}
	bound := negInf
	nv := 0
	if aligned {
		nv = n / 4
	}
	const unroll = 4
	for base := 0; base < nv; base += unroll * simLPThreads {
		for w := range simLPWarps {
			for u := range unroll {
				var cand [4][32]float32
				var ids [4][32]int32
				for l := range 32 {
					t := 32*w + l
					q := base + u*simLPThreads + t
					x := [4]float32{negInf, negInf, negInf, negInf}
					if q < nv {
						copy(x[:], row[4*q:4*q+4])
					}
					qm := max(max(x[0], x[1]), max(x[2], x[3]))
					sum(t, qm, func(m float32) float32 {
						return (expf(x[0]-m) + expf(x[1]-m)) + (expf(x[2]-m) + expf(x[3]-m))
					}, ok(x[0]) && ok(x[1]) && ok(x[2]) && ok(x[3]))
					for c := range 4 {
						cand[c][l], ids[c][l] = x[c], simNoID
						if q < nv {
							ids[c][l] = int32(4*q + c)
						}
					}
				}
				if k > 0 {
					for c := range 4 {
						lists[w].offer(cand[c], ids[c], k, &bound)
					}
				}
			}
		}
	}
	for base := 4 * nv; base < n; base += simLPThreads {
		for w := range simLPWarps {
			var cand [32]float32
			var ids [32]int32
			for l := range 32 {
				t := 32*w + l
				i := base + t
				x, xi := negInf, int32(simNoID)
				if i < n {
					x, xi = row[i], int32(i)
				}
				sum(t, x, func(m float32) float32 { return expf(x - m) }, ok(x))
				cand[l], ids[l] = x, xi
			}
			if k > 0 {
				lists[w].offer(cand, ids, k, &bound)
			}
		}
	}
	if bad {
		return lp, true, 0
	}
	M := negInf
	for t := range m {
		M = max(M, m[t])
	}
	if M == negInf {
		return lp, true, 0
	}
	var S float64
	for t := range s {
		if m[t] > negInf {
			S += s[t] * math.Exp(float64(m[t])-float64(M))
		}
	}
	lse := float64(M) + math.Log(S)
	if k > 0 {
		var sv []float32
		var si []int32
		for w := range lists {
			offers += lists[w].offers
			sv = append(sv, lists[w].lv[:k]...)
			si = append(si, lists[w].li[:k]...)
		}
		merged := newSimWarpList()
		for base := 0; base < len(sv); base += 32 {
			var cand [32]float32
			var ids [32]int32
			for l := range 32 {
				cand[l], ids[l] = negInf, simNoID
				if base+l < len(sv) {
					cand[l], ids[l] = sv[base+l], si[base+l]
				}
			}
			merged.offer(cand, ids, k, nil)
		}
		for l := 0; l < k && merged.li[l] != simNoID; l++ {
			lp.Top = append(lp.Top, backend.TokenLogprob{ID: int(merged.li[l]), Logprob: float32(float64(merged.lv[l]) - lse)})
		}
	}
	lp.Chosen = float32(float64(row[id]) - lse)
	return lp, false, offers
}

// The transcription gives the plain definition's result on the GPU tests'
// rows (ties, signed zeros, -Inf entries, bad rows), aligned and not.
func TestLogprobRowsSimulated(t *testing.T) {
	r := rand.New(rand.NewPCG(57, 58))
	worst := 0.0
	for _, n := range []int{1, 7, 1001, 154880} {
		for _, kind := range logprobKernelRows {
			row := kind.make(r, n)
			for _, k := range []int{0, 1, 5, 20} {
				for _, aligned := range []bool{true, false} {
					if n == 154880 && !(k == 20 && aligned) {
						continue // the full vocabulary once a row: the other cases are covered at 1001
					}
					id := r.IntN(n)
					name := fmt.Sprintf("n=%d %s k=%d aligned=%v", n, kind.name, k, aligned)
					got, bad, offers := simLogprobRow(row, aligned, id, k)
					want, ok := hostRowLogprobs(row, id, k)
					if bad != !ok {
						t.Errorf("%s: bad %v, host bad %v", name, bad, !ok)
						continue
					}
					if bad {
						continue
					}
					d := logprobDiff(got, want)
					if !(d <= logprobTolerance) {
						t.Errorf("%s: %v %v, host %v %v", name, got.Chosen, got.Top, want.Chosen, want.Top)
					}
					worst = max(worst, d)
					if n == 154880 && k == 20 && aligned {
						t.Logf("%s: %d insertions into the warps' lists", name, offers)
					}
				}
			}
		}
	}
	t.Logf("largest difference from the float64 reference: %.2g", worst)
}
