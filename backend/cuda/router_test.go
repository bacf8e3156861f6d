//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"errors"
	"fmt"
	"math"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/backend/cpu"
)

// The router launch's kernels (moe_router_cluster for 64 experts,
// moe_router_fast, moe_router_route) give the same logits, experts and
// weights bit for bit, and agree with a
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
		// kernel: 0 the default (moe_router_cluster for E = 64), 1
		// moe_router_fast, 2 moe_router_route.
		run := func(kernel int) result {
			res := result{make([]float32, T*E), make([]float32, T*topK), make([]int32, T*topK)}
			routerNoCluster, routerSlow = kernel == 1, kernel == 2
			defer func() { routerNoCluster, routerSlow = false, false }()
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
					if err := c.RouterRoute(wb.Ptr, E, K, xb.Ptr, K, T, lP, E, bb.Ptr, topK, true, 1.8, iP, wP, cP, nil); err != nil {
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
		def, fast, slow := run(0), run(1), run(2)
		for i := range def.logits {
			if def.logits[i] != fast.logits[i] {
				t.Fatalf("E=%d K=%d: logit %d: %v default, %v fast", E, K, i, def.logits[i], fast.logits[i])
			}
		}
		for i := range def.ids {
			if def.ids[i] != fast.ids[i] || def.wts[i] != fast.wts[i] {
				t.Fatalf("E=%d K=%d: choice %d: %d %v default, %d %v fast", E, K, i, def.ids[i], def.wts[i], fast.ids[i], fast.wts[i])
			}
		}
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

// The router launch writing its input's int8 form (q) writes what
// RMSNormQuant without a gain writes, bit for bit, and the same logits,
// experts and weights as without q; group sizes 128, 32 and 64, one to
// three rows.
func TestRouterQuantMatchesRMSNormQuant(t *testing.T) {
	d := testDevice(t)
	r := testRand(t)
	for _, sh := range []struct{ E, K, T, topK, G int }{{64, 2048, 1, 4, 128}, {64, 2048, 2, 4, 32}, {16, 512, 3, 4, 64}} {
		E, K, T, topK, G := sh.E, sh.K, sh.T, sh.topK, sh.G
		W, x, bias := randVec(r, E*K, 0.02), randVec(r, T*K, 1), randVec(r, E, 0.05)
		x[5] = 0 // a zero and a whole zero group
		for k := K - G; k < K; k++ {
			x[k] = 0
		}
		err := d.Do(func(c *Ctx) error {
			wb, err1 := upload(c, W)
			xb, err2 := upload(c, x)
			bb, err3 := upload(c, bias)
			out, err4 := c.Alloc(4 * (T*E + 2*T*topK + T))
			q1, err5 := c.NewQActs(T, K, G)
			q2, err6 := c.NewQActs(T, K, G)
			if err := errors.Join(err1, err2, err3, err4, err5, err6, c.Memset(out.At(4*(T*E+2*T*topK)), 0, 4*T)); err != nil {
				return err
			}
			lP, iP, wP, cP := out.Ptr, out.At(4*T*E), out.At(4*(T*E+T*topK)), out.At(4*(T*E+2*T*topK))
			type res struct {
				logits, wts, scales []float32
				ids, sums           []int32
				q                   []int8
			}
			get := func(q *QActs) (res, error) {
				v := res{make([]float32, T*E), make([]float32, T*topK), make([]float32, T*K/G), make([]int32, T*topK), make([]int32, T*K/32), make([]int8, T*K)}
				err := errors.Join(CopyOut(c, v.logits, lP), CopyOut(c, v.ids, iP), CopyOut(c, v.wts, wP))
				if q != nil {
					err = errors.Join(err, CopyOut(c, v.q, q.Q), CopyOut(c, v.scales, q.Scales), CopyOut(c, v.sums, q.Sums))
				}
				return v, err
			}
			if err := errors.Join(poison(c, out.Ptr, 4*(T*E+2*T*topK)), poison(c, q1.Q, T*K), poison(c, q1.Scales, 4*T*K/G), poison(c, q1.Sums, 4*T*K/32)); err != nil {
				return err
			}
			if err := c.RouterRoute(wb.Ptr, E, K, xb.Ptr, K, T, lP, E, bb.Ptr, topK, true, 1.8, iP, wP, cP, q1); err != nil {
				return err
			}
			got, err := get(q1)
			if err != nil {
				return err
			}
			if err := errors.Join(poison(c, out.Ptr, 4*(T*E+2*T*topK)), c.RouterRoute(wb.Ptr, E, K, xb.Ptr, K, T, lP, E, bb.Ptr, topK, true, 1.8, iP, wP, cP, nil),
				c.RMSNormQuant(xb.Ptr, K, 0, 0, 0, 0, T, K, G, q2)); err != nil {
				return err
			}
			want, err := get(q2)
			if err != nil {
				return err
			}
			for i := range want.logits {
				if math.Float32bits(got.logits[i]) != math.Float32bits(want.logits[i]) {
					return fmt.Errorf("%+v: logit %d: %v, want %v", sh, i, got.logits[i], want.logits[i])
				}
			}
			for i := range want.ids {
				if got.ids[i] != want.ids[i] || math.Float32bits(got.wts[i]) != math.Float32bits(want.wts[i]) {
					return fmt.Errorf("%+v: choice %d: %d %v, want %d %v", sh, i, got.ids[i], got.wts[i], want.ids[i], want.wts[i])
				}
			}
			nonzero := 0
			for i := range want.q {
				if got.q[i] != want.q[i] {
					return fmt.Errorf("%+v: code %d: %d, want %d", sh, i, got.q[i], want.q[i])
				}
				if want.q[i] != 0 {
					nonzero++
				}
			}
			if nonzero < T*K/2 {
				return fmt.Errorf("%+v: only %d of %d codes nonzero", sh, nonzero, T*K)
			}
			for i := range want.scales {
				if math.Float32bits(got.scales[i]) != math.Float32bits(want.scales[i]) {
					return fmt.Errorf("%+v: scale %d: %v, want %v", sh, i, got.scales[i], want.scales[i])
				}
			}
			for i := range want.sums {
				if got.sums[i] != want.sums[i] {
					return fmt.Errorf("%+v: sum %d: %d, want %d", sh, i, got.sums[i], want.sums[i])
				}
			}
			return errors.Join(c.Free(wb), c.Free(xb), c.Free(bb), c.Free(out), c.FreeQActs(q1), c.FreeQActs(q2))
		})
		if err != nil {
			t.Fatal(err)
		}
	}
}
