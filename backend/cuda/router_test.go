//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"errors"
	"math"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/backend/cpu"
)

// The router launch's two kernels (moe_router_fast, moe_router_route) give
// the same logits, experts and weights bit for bit, and agree with a
// float64 product and cpu.SelectExperts, for a few rows at once.
func TestRouterRouteFastMatchesSlow(t *testing.T) {
	d := testDevice(t)
	r := testRand(t)
	for _, sh := range []struct{ E, K, T, topK int }{{64, 2048, 3, 4}, {16, 512, 2, 4}, {128, 1056, 2, 8}} {
		E, K, T, topK := sh.E, sh.K, sh.T, sh.topK
		W, x, bias := randVec(r, E*K, 0.02), randVec(r, T*K, 1), randVec(r, E, 0.05)
		type result struct {
			logits, wts []float32
			ids         []int32
		}
		run := func(slow bool) result {
			res := result{make([]float32, T*E), make([]float32, T*topK), make([]int32, T*topK)}
			routerSlow = slow
			defer func() { routerSlow = false }()
			err := d.Do(func(c *Ctx) error {
				wb, err1 := upload(c, W)
				xb, err2 := upload(c, x)
				bb, err3 := upload(c, bias)
				out, err4 := c.Alloc(4 * (T*E + 2*T*topK + T))
				if err := errors.Join(err1, err2, err3, err4, poison(c, out.Ptr, 4*(T*E+2*T*topK))); err != nil {
					return err
				}
				lP, iP, wP, cP := out.Ptr, out.At(4*T*E), out.At(4*(T*E+T*topK)), out.At(4*(T*E+2*T*topK))
				if err := c.Memset(cP, 0, 4*T); err != nil {
					return err
				}
				for rep := 0; rep < 2; rep++ { // the counters must be reset by the first call
					if err := c.RouterRoute(wb.Ptr, E, K, xb.Ptr, K, T, lP, E, bb.Ptr, topK, true, 1.8, iP, wP, cP); err != nil {
						return err
					}
				}
				if err := errors.Join(CopyOut(c, res.logits, lP), CopyOut(c, res.ids, iP), CopyOut(c, res.wts, wP)); err != nil {
					return err
				}
				return errors.Join(c.Free(wb), c.Free(xb), c.Free(bb), c.Free(out))
			})
			if err != nil {
				t.Fatal(err)
			}
			return res
		}
		fast, slow := run(false), run(true)
		for i := range fast.logits {
			if fast.logits[i] != slow.logits[i] {
				t.Fatalf("E=%d K=%d: logit %d: %v fast, %v slow", E, K, i, fast.logits[i], slow.logits[i])
			}
		}
		for i := range fast.ids {
			if fast.ids[i] != slow.ids[i] || fast.wts[i] != slow.wts[i] {
				t.Fatalf("E=%d K=%d: choice %d: %d %v fast, %d %v slow", E, K, i, fast.ids[i], fast.wts[i], slow.ids[i], slow.wts[i])
			}
		}
		cfg := backend.RouterConfig{TopK: topK, Groups: 1, TopKGroups: 1, NormTopKProb: true, RoutedScaling: 1.8, NumExperts: E}
		for tk := 0; tk < T; tk++ {
			want := make([]float32, E)
			for e := range want {
				var acc float64
				for k := 0; k < K; k++ {
					acc += float64(W[e*K+k]) * float64(x[tk*K+k])
				}
				want[e] = float32(acc)
			}
			if e := relErr(want, fast.logits[tk*E:(tk+1)*E]); !(e <= 1e-6) {
				t.Fatalf("E=%d K=%d token %d: logits relative error %.3g", E, K, tk, e)
			}
			ids, wts := make([]int, topK), make([]float32, topK)
			cpu.SelectExperts(fast.logits[tk*E:(tk+1)*E], bias, cfg, ids, wts)
			for k := range ids {
				got, gw := fast.ids[tk*topK+k], fast.wts[tk*topK+k]
				if int(got) != ids[k] || math.Abs(float64(gw-wts[k])) > 1e-6*math.Abs(float64(wts[k])) {
					t.Fatalf("E=%d K=%d token %d: ids %v weights %v, want %v %v", E, K, tk, fast.ids[tk*topK:(tk+1)*topK], fast.wts[tk*topK:(tk+1)*topK], ids, wts)
				}
			}
		}
		t.Logf("E=%d K=%d T=%d: fast and slow router agree bit for bit", E, K, T)
	}
}
