//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/mmfp4/mmfp4/format"
)

// BenchmarkRouterMoE: one token through a GLM-4.7-Flash MoE block (router
// of 64 x 2048 fp32, 64 experts of 1536 x 2048, top 4, one shared expert),
// device time per block:
//   - router+quant+two: the router launch (moe_router_fast), the
//     quantization of the MoE's input, then the two MoE launches;
//   - routerquant+two: the same with the quantization in the router
//     launch (three launches, the single-token path);
//   - router+two: the router and the MoE, the input quantized beforehand;
//   - two: the MoE alone on a given routing (two launches);
//   - -old: moe_gate_up and moe_down_q (each down block quantizing its
//     slot's h, a block per slot, the sum by the last) instead of
//     moe_gate_up_q and moe_down_hq;
//   - -fastrouter: moe_router_fast instead of moe_router_cluster
//     (routerNoCluster);
//   - addnorm+router+two: the residual add and norm before the router
//     (rmsnorm_quant8, writing the MoE's input and its int8 form), the
//     router and the MoE; routernorm+two: the add and norm in the router's
//     launch (moe_router_cluster_norm).
//
// Each call takes the next of 6 layers (its own shared expert and router,
// the 64 routed experts common) and the next of 16 inputs (routing sets),
// so that the shared expert and the routed ones come from memory, not L2,
// as in a decode step. GB/s counts the weights read (5 experts, and the
// router's 512 KB where it runs).
func BenchmarkRouterMoE(b *testing.B) {
	d := benchDevice(b)
	r := rand.New(rand.NewPCG(9, 10))
	const K, I, E, topK, layers, sets = 2048, 1536, 64, 4, 6, 16
	type layer struct {
		tab      *ExpertTable
		scr      *MoEScratch
		W, bias  Buffer
		counters Buffer
		ids, wts Buffer // sets x topK, the router's output
		logits   Buffer
		givenIDs Buffer // sets x topK random ids
		givenWts Buffer
	}
	var (
		ls     []*layer
		xs     []Buffer
		xq     []*QActs
		y      Buffer
		ebytes float64
		// The residual add and norm before the router: d = xs[s] + cv,
		// h its norm (gain), nq h's int8 form.
		cv, dv, hv, gain Buffer
		nq               *QActs
	)
	err := d.Do(func(c *Ctx) error {
		if _, err := measureCopy(c); err != nil {
			return err
		}
		upMats := func() (ExpertMats, error) {
			var q [3]*QMatrix
			for i, m := range []*format.Matrix{synthMatrix(r, I, K, 128), synthMatrix(r, I, K, 128), synthMatrix(r, K, I, 128)} {
				var err error
				if q[i], err = c.UploadMatrix(m); err != nil {
					return ExpertMats{}, err
				}
			}
			return ExpertMats{q[0], q[1], q[2]}, nil
		}
		var routed []ExpertMats
		for e := 0; e < E; e++ {
			m, err := upMats()
			if err != nil {
				return err
			}
			routed = append(routed, m)
		}
		ebytes = float64(topK+1) * float64(routed[0].Gate.Bytes()+routed[0].Up.Bytes()+routed[0].Down.Bytes())
		for l := 0; l < layers; l++ {
			sh, err := upMats()
			if err != nil {
				return err
			}
			L := &layer{}
			if L.tab, err = c.NewExpertTable(routed, []ExpertMats{sh}); err != nil {
				return err
			}
			if L.scr, err = c.NewMoEScratch(L.tab, topK); err != nil {
				return err
			}
			var e1, e2, e3, e4, e5, e6 error
			L.W, e1 = upload(c, randVec(r, E*K, 0.02))
			L.bias, e2 = upload(c, randVec(r, E, 0.05))
			L.counters, e3 = c.Alloc(4 * 64)
			L.ids, e4 = c.Alloc(4 * sets * topK)
			L.wts, e5 = c.Alloc(4 * sets * topK)
			L.logits, e6 = c.Alloc(4 * sets * E)
			if err := errors.Join(e1, e2, e3, e4, e5, e6, c.Memset(L.counters.Ptr, 0, L.counters.Size)); err != nil {
				return err
			}
			ids := make([]int32, sets*topK)
			for s := 0; s < sets; s++ {
				for k, e := range r.Perm(E)[:topK] {
					ids[s*topK+k] = int32(e)
				}
			}
			var e7, e8 error
			L.givenIDs, e7 = c.Alloc(4 * len(ids))
			L.givenWts, e8 = upload(c, randVec(r, sets*topK, 0.5))
			if err := errors.Join(e7, e8, CopyIn(c, L.givenIDs.Ptr, ids)); err != nil {
				return err
			}
			ls = append(ls, L)
		}
		for s := 0; s < sets; s++ {
			xb, err := upload(c, randVec(r, K, 1))
			if err != nil {
				return err
			}
			a, err := c.NewQActs(1, K, 128)
			if err != nil {
				return err
			}
			if err := c.RMSNormQuant(xb.Ptr, K, 0, 0, 0, 0, 1, K, 128, a); err != nil {
				return err
			}
			xs, xq = append(xs, xb), append(xq, a)
		}
		var e1, e2, e3, e4, e5, e6 error
		y, e1 = c.Alloc(4 * K)
		cv, e2 = upload(c, randVec(r, K, 0.5))
		dv, e3 = c.Alloc(4 * K)
		hv, e4 = c.Alloc(4 * K)
		gain, e5 = upload(c, randVec(r, K, 1))
		nq, e6 = c.NewQActs(1, K, 128)
		return errors.Join(e1, e2, e3, e4, e5, e6)
	})
	if err != nil {
		b.Fatal(err)
	}
	i := 0
	// quant: 0 the MoE's input quantized beforehand (not timed), 1 by a
	// launch of its own after the router, 2 by the router launch.
	routerTwo := func(quant int) func(c *Ctx, L *layer, s int) error {
		return func(c *Ctx, L *layer, s int) error {
			ids, wts := L.ids.At(4*topK*s), L.wts.At(4*topK*s)
			var q *QActs
			if quant == 2 {
				q = xq[s]
			}
			if err := c.RouterRoute(L.W.Ptr, E, K, xs[s].Ptr, K, 1, L.logits.At(4*E*s), E, L.bias.Ptr, topK, true, 1.8, ids, wts, L.counters.Ptr, q); err != nil {
				return err
			}
			if quant == 1 {
				if err := c.RMSNormQuant(xs[s].Ptr, K, 0, 0, 0, 0, 1, K, 128, xq[s]); err != nil {
					return err
				}
			}
			return c.MoE(y.Ptr, false, L.tab, ids, wts, topK, xq[s], L.scr)
		}
	}
	normRouterTwo := func(fused bool) func(c *Ctx, L *layer, s int) error {
		return func(c *Ctx, L *layer, s int) error {
			ids, wts := L.ids.At(4*topK*s), L.wts.At(4*topK*s)
			if fused {
				in := FusedIn{Mode: fuseAddNorm, D: dv.Ptr, A: xs[s].Ptr, C: cv.Ptr, Gain: gain.Ptr, Eps: 1e-5, Out: hv.Ptr, Q: nq, Layout8: true}
				if err := c.RouterClusterNorm(L.W.Ptr, K, L.logits.At(4*E*s), L.bias.Ptr, topK, true, 1.8, ids, wts, nil, in); err != nil {
					return err
				}
			} else {
				if err := c.RMSNormQuant8(0, 0, dv.Ptr, K, xs[s].Ptr, K, cv.Ptr, K, gain.Ptr, 1e-5, hv.Ptr, K, 1, K, 128, nq); err != nil {
					return err
				}
				if err := c.RouterRoute(L.W.Ptr, E, K, hv.Ptr, K, 1, L.logits.At(4*E*s), E, L.bias.Ptr, topK, true, 1.8, ids, wts, L.counters.Ptr, nil); err != nil {
					return err
				}
			}
			return c.MoE(y.Ptr, false, L.tab, ids, wts, topK, nq, L.scr)
		}
	}
	two := func(c *Ctx, L *layer, s int) error {
		return c.MoE(y.Ptr, false, L.tab, L.givenIDs.At(4*topK*s), L.givenWts.At(4*topK*s), topK, xq[s], L.scr)
	}
	variants := []struct {
		name   string
		router bool
		// oldDown: moe_gate_up and moe_down_q (else moe_gate_up_q and
		// moe_down_hq).
		oldDown bool
		// fastRouter: moe_router_fast for 64 experts instead of the
		// cluster router.
		fastRouter bool
		call       func(c *Ctx, L *layer, s int) error
	}{
		{"router+quant+two-old", true, true, false, routerTwo(1)},
		{"router+quant+two", true, false, false, routerTwo(1)},
		{"routerquant+two", true, false, false, routerTwo(2)},
		{"router+two", true, false, false, routerTwo(0)},
		{"two-old", false, true, false, two},
		{"two", false, false, false, two},
		{"router+two-fastrouter", true, false, true, routerTwo(0)},
		{"addnorm+router+two", true, false, false, normRouterTwo(false)},
		{"routernorm+two", true, false, false, normRouterTwo(true)},
	}
	// Two rounds, so that A/B pairs alternate in one process.
	for _, v := range append(variants, variants...) {
		bytes := ebytes
		if v.router {
			bytes += 4 * E * K
		}
		b.Run(v.name, func(b *testing.B) {
			moeDownOld, routerNoCluster = v.oldDown, v.fastRouter
			defer func() { moeDownOld, routerNoCluster = false, false }()
			var ms float32
			err := d.Do(func(c *Ctx) error {
				call := func() error {
					i++
					return v.call(c, ls[i%layers], i%sets)
				}
				for w := 0; w < 2*layers*sets; w++ { // warm-up (module load, occupancy)
					if err := call(); err != nil {
						return err
					}
				}
				var err error
				ms, err = timeDevice(c, b.N, 3, call)
				return err
			})
			if err != nil {
				b.Fatal(fmt.Errorf("%s: %w", v.name, err))
			}
			sec := float64(ms) / 1e3 / float64(b.N)
			b.ReportMetric(sec*1e6, "us/block")
			b.ReportMetric(bytes/sec/1e9, "GB/s")
			b.ReportMetric(bytes/sec/copyBandwidth, "copy-frac")
		})
	}
}
