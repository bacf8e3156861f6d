//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/backend/cpu"
	"github.com/mmfp4/mmfp4/format"
)

// The router against cpu.SelectExperts: the logits against a float64
// product, then the choice made from the GPU's own logits, so that a near
// tie cannot make the two sides differ.
// freeExperts returns the experts' matrices to the pool.
func freeExperts(c *Ctx, ms []ExpertMats) {
	for _, m := range ms {
		c.FreeMatrix(m.Gate)
		c.FreeMatrix(m.Up)
		c.FreeMatrix(m.Down)
	}
}

func TestRoute(t *testing.T) {
	d := testDevice(t)
	r := testRand(t)
	const E, K, T = 64, 2048, 7
	for _, cfg := range []RouteConfig{
		{TopK: 4, Groups: 1, TopKGroups: 1, Norm: true, Scaling: 1.8},
		{TopK: 6, Groups: 8, TopKGroups: 3, Norm: false, Scaling: 2.5},
	} {
		W, x, bias := randVec(r, E*K, 0.02), randVec(r, T*K, 1), randVec(r, E, 0.05)
		ids := make([]int32, T*cfg.TopK)
		wts := make([]float32, T*cfg.TopK)
		logits := make([]float32, T*E)
		err := d.Do(func(c *Ctx) error {
			wb, err1 := upload(c, W)
			xb, err2 := upload(c, x)
			bb, err3 := upload(c, bias)
			out, err4 := c.Alloc(4 * (2*T*cfg.TopK + T*E))
			if err := errors.Join(err1, err2, err3, err4); err != nil {
				return err
			}
			idsP, wtsP, logP := out.Ptr, out.At(4*T*cfg.TopK), out.At(8*T*cfg.TopK)
			if err := c.Route(wb.Ptr, bb.Ptr, xb.Ptr, K, T, E, K, cfg, idsP, wtsP, logP); err != nil {
				return err
			}
			if err := errors.Join(CopyOut(c, ids, idsP), CopyOut(c, wts, wtsP), CopyOut(c, logits, logP)); err != nil {
				return err
			}
			return errors.Join(c.Free(wb), c.Free(xb), c.Free(bb), c.Free(out))
		})
		if err != nil {
			t.Fatal(err)
		}
		want := make([]float32, T*E)
		for tk := 0; tk < T; tk++ {
			for e := 0; e < E; e++ {
				var acc float64
				for k := 0; k < K; k++ {
					acc += float64(W[e*K+k]) * float64(x[tk*K+k])
				}
				want[tk*E+e] = float32(acc)
			}
		}
		if e := relErr(want, logits); !(e <= 1e-6) {
			t.Errorf("%+v: logits relative error %.3g", cfg, e)
		}
		bcfg := backend.RouterConfig{TopK: cfg.TopK, Groups: cfg.Groups, TopKGroups: cfg.TopKGroups, NormTopKProb: cfg.Norm, RoutedScaling: cfg.Scaling, NumExperts: E}
		for tk := 0; tk < T; tk++ {
			wantIDs := make([]int, cfg.TopK)
			wantW := make([]float32, cfg.TopK)
			cpu.SelectExperts(logits[tk*E:(tk+1)*E], bias, bcfg, wantIDs, wantW)
			for k := range wantIDs {
				if int(ids[tk*cfg.TopK+k]) != wantIDs[k] || math.Abs(float64(wts[tk*cfg.TopK+k]-wantW[k])) > 1e-6*math.Abs(float64(wantW[k])) {
					t.Fatalf("%+v token %d: ids %v weights %v, want %v %v", cfg, tk, ids[tk*cfg.TopK:(tk+1)*cfg.TopK], wts[tk*cfg.TopK:(tk+1)*cfg.TopK], wantIDs, wantW)
				}
			}
		}
	}
}

// The three-launch MoE of one token against the CPU backend's MoE plus its
// shared expert computed with MatMul and SwiGLU.
func TestMoE(t *testing.T) {
	d := testDevice(t)
	r := testRand(t)
	const K, I, E, topK = 512, 384, 16, 4
	ref := cpu.New(cpu.Options{Threads: 2})
	quant := func(n, k int) *format.Matrix {
		m, err := format.Quantize(randVec(r, n*k, 0.05), n, k, format.QuantOptions{GroupSize: 128})
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	type mats struct{ gate, up, down *format.Matrix }
	host := make([]mats, E+1) // the last is the shared expert
	refExperts := make([]backend.Expert, E+1)
	for e := range host {
		host[e] = mats{quant(I, K), quant(I, K), quant(K, I)}
		var ws [3]backend.Weight
		for i, m := range []*format.Matrix{host[e].gate, host[e].up, host[e].down} {
			w, err := ref.NewWeight(backend.HostWeight{Name: fmt.Sprintf("expert %d", e), N: m.N, K: m.K, Quant: m})
			if err != nil {
				t.Fatal(err)
			}
			ws[i] = w
		}
		refExperts[e] = backend.Expert{Gate: ws[0], Up: ws[1], Down: ws[2]}
	}
	for tok := 0; tok < 3; tok++ {
		x := randVec(r, K, 1)
		// Routing from random logits through the CPU router.
		lt := ref.NewTensor(1, E)
		ref.Upload(lt, randVec(r, E, 2))
		bw, _ := ref.NewWeight(backend.HostWeight{Name: "bias", N: 1, K: E, Dense: make([]float32, E)})
		routing := ref.Route(lt, bw, backend.RouterConfig{TopK: topK, Groups: 1, TopKGroups: 1, NormTopKProb: true, RoutedScaling: 1.8, NumExperts: E})
		chosen, weights := routing.(interface{ Choice(int) ([]int, []float32) }).Choice(0)

		xt, want := ref.NewTensor(1, K), ref.NewTensor(1, K)
		ref.Upload(xt, x)
		ref.MoE(want, xt, routing, refExperts[:E])
		g, u, o := ref.NewTensor(1, I), ref.NewTensor(1, I), ref.NewTensor(1, K)
		sh := refExperts[E]
		ref.MatMul(g, xt, sh.Gate)
		ref.MatMul(u, xt, sh.Up)
		ref.SwiGLU(g, g, u)
		ref.MatMul(o, g, sh.Down)
		ref.Add(want, want, o)
		wantV := ref.Download(want)

		ids := make([]int32, topK)
		for i, e := range chosen {
			ids[i] = int32(e)
		}
		got := make([]float32, K)
		err := d.Do(func(c *Ctx) error {
			var dev []ExpertMats
			for _, h := range host {
				gq, err1 := c.UploadMatrix(h.gate)
				uq, err2 := c.UploadMatrix(h.up)
				dq, err3 := c.UploadMatrix(h.down)
				if err := errors.Join(err1, err2, err3); err != nil {
					return err
				}
				dev = append(dev, ExpertMats{gq, uq, dq})
			}
			tab, err := c.NewExpertTable(dev[:E], dev[E:])
			if err != nil {
				return err
			}
			scr, err := c.NewMoEScratch(tab, topK)
			if err != nil {
				return err
			}
			xa, err := c.NewQActs(1, K, 128)
			if err != nil {
				return err
			}
			xb, err1 := upload(c, x)
			wb, err2 := upload(c, weights)
			ib, err3 := c.Alloc(4 * topK)
			yb, err4 := c.Alloc(4 * K)
			if err := errors.Join(err1, err2, err3, err4, CopyIn(c, ib.Ptr, ids), poison(c, yb.Ptr, yb.Size)); err != nil {
				return err
			}
			if err := c.RMSNormQuant(xb.Ptr, K, 0, 0, 0, 0, 1, K, 128, xa); err != nil {
				return err
			}
			if err := c.MoE(yb.Ptr, false, tab, ib.Ptr, wb.Ptr, topK, xa, scr); err != nil {
				return err
			}
			if err := CopyOut(c, got, yb.Ptr); err != nil {
				return err
			}
			// Again, adding to y: the down kernel's counters must have been
			// reset, and the sum doubles exactly.
			if err := c.MoE(yb.Ptr, true, tab, ib.Ptr, wb.Ptr, topK, xa, scr); err != nil {
				return err
			}
			twice := make([]float32, K)
			if err := CopyOut(c, twice, yb.Ptr); err != nil {
				return err
			}
			for i := range got {
				if twice[i] != 2*got[i] {
					return fmt.Errorf("accumulating call: y[%d] = %g, want %g", i, twice[i], 2*got[i])
				}
			}
			freeExperts(c, dev)
			return errors.Join(c.FreeExpertTable(tab), c.FreeMoEScratch(scr), c.FreeQActs(xa), c.Free(xb), c.Free(wb), c.Free(ib), c.Free(yb))
		})
		if err != nil {
			t.Fatal(err)
		}
		// Same int8 products, float sums in another order: measured
		// 1.4e-7 to 2.6e-7 on an H200. (A last-bit difference in the SiLU's
		// exponential could move one int8 rounding of the down projection's
		// input, about 1e-4; not seen.)
		e := relErr(wantV, got)
		t.Logf("token %d experts %v: relative error %.3g against the CPU backend", tok, chosen, e)
		if !(e <= 2e-6) {
			t.Errorf("token %d: relative error %.3g", tok, e)
		}
	}
}

// moe_gate_up_q and moe_down_hq (h quantized once a group by the gate/up
// blocks, every slot of 4 rows in one down block) against moe_gate_up and
// moe_down_q (each down block quantizing its slot's h, the sum by the last
// block of a row block): the same bits, on random experts at
// GLM-4.7-Flash's shape with group sizes 128 and 32, and at a small shape
// with 3 groups a row, 6 routed and 2 shared slots, both writing and
// adding to y; the group counters are zero again after each call.
func TestMoEMatchesOldKernels(t *testing.T) {
	d := testDevice(t)
	r := testRand(t)
	for _, tc := range []struct{ K, I, G, E, topK, shared int }{
		{2048, 1536, 128, 8, 4, 1},
		{2048, 1536, 32, 6, 4, 1},
		{512, 384, 128, 10, 6, 2},
	} {
		err := d.Do(func(c *Ctx) error {
			var all []ExpertMats
			for e := 0; e < tc.E+tc.shared; e++ {
				var q [3]*QMatrix
				for i, m := range []*format.Matrix{synthMatrix(r, tc.I, tc.K, tc.G), synthMatrix(r, tc.I, tc.K, tc.G), synthMatrix(r, tc.K, tc.I, tc.G)} {
					var err error
					if q[i], err = c.UploadMatrix(m); err != nil {
						return err
					}
				}
				all = append(all, ExpertMats{q[0], q[1], q[2]})
			}
			tab, err := c.NewExpertTable(all[:tc.E], all[tc.E:])
			if err != nil {
				return err
			}
			scr, err := c.NewMoEScratch(tab, tc.topK)
			if err != nil {
				return err
			}
			xa, err := c.NewQActs(1, tc.K, tc.G)
			if err != nil {
				return err
			}
			ids := make([]int32, tc.topK)
			for k, e := range r.Perm(tc.E)[:tc.topK] {
				ids[k] = int32(e)
			}
			y0 := randVec(r, tc.K, 1)
			xb, err1 := upload(c, randVec(r, tc.K, 1))
			wb, err2 := upload(c, randVec(r, tc.topK, 0.5))
			ib, err3 := c.Alloc(4 * tc.topK)
			yb, err4 := c.Alloc(4 * tc.K)
			if err := errors.Join(err1, err2, err3, err4, CopyIn(c, ib.Ptr, ids)); err != nil {
				return err
			}
			if err := c.RMSNormQuant(xb.Ptr, tc.K, 0, 0, 0, 0, 1, tc.K, tc.G, xa); err != nil {
				return err
			}
			// kernels: "old" moe_gate_up and moe_down_q, "q" moe_gate_up_q,
			// else moe_gate_up_c (where I is a multiple of 128); each then
			// moe_down_hq. The scratch's h and its int8 form are cleared
			// first.
			run := func(kernels string, acc bool) ([]float32, error) {
				moeDownOld, moeGateUpQ = kernels == "old", kernels == "q"
				defer func() { moeDownOld, moeGateUpQ = false, false }()
				if err := errors.Join(CopyIn(c, yb.Ptr, y0), c.Memset(scr.H.Ptr, 0x7f, scr.H.Size),
					c.Memset(scr.HQ.Q, 0x55, (tc.topK+tc.shared)*tc.I), c.Memset(scr.HQ.Scales, 0x7f, 4*(tc.topK+tc.shared)*tc.I/tc.G)); err != nil {
					return nil, err
				}
				if err := c.MoE(yb.Ptr, acc, tab, ib.Ptr, wb.Ptr, tc.topK, xa, scr); err != nil {
					return nil, err
				}
				got := make([]float32, tc.K)
				return got, CopyOut(c, got, yb.Ptr)
			}
			for _, acc := range []bool{false, true} {
				want, err := run("old", acc)
				if err != nil {
					return err
				}
				// h and its int8 form after each kernel pair, against
				// moe_gate_up_q's.
				slots := tc.topK + tc.shared
				hOf := func() []byte {
					return append(append(readBytes(t, c, scr.H.Ptr, 4*slots*tc.I), readBytes(t, c, scr.HQ.Q, slots*tc.I)...),
						readBytes(t, c, scr.HQ.Scales, 4*slots*tc.I/tc.G)...)
				}
				var hq []byte
				for _, k := range []string{"q", ""} {
					got, err := run(k, acc)
					if err != nil {
						return err
					}
					zeros := 0
					for i := range got {
						if math.Float32bits(got[i]) != math.Float32bits(want[i]) {
							return fmt.Errorf("%+v accumulate=%v kernels %q: y[%d] = %g, old kernels %g", tc, acc, k, i, got[i], want[i])
						}
						if want[i] == 0 {
							zeros++
						}
					}
					if zeros > tc.K/100 {
						return fmt.Errorf("%+v: %d of %d outputs are zero", tc, zeros, tc.K)
					}
					hk := hOf()
					if k == "q" {
						hq = hk
					} else if !bytes.Equal(hk, hq) {
						return fmt.Errorf("%+v accumulate=%v kernels %q: h or its int8 form differs from moe_gate_up_q's at byte %d", tc, acc, k, firstDiff(hk, hq))
					}
				}
				groups := make([]uint32, scr.Groups.Size/4)
				if err := CopyOut(c, groups, scr.Groups.Ptr); err != nil {
					return err
				}
				for i, v := range groups {
					if v != 0 {
						return fmt.Errorf("%+v: group counter %d is %d after the call", tc, i, v)
					}
				}
			}
			freeExperts(c, all)
			return errors.Join(c.FreeExpertTable(tab), c.FreeMoEScratch(scr), c.FreeQActs(xa), c.Free(xb), c.Free(wb), c.Free(ib), c.Free(yb))
		})
		if err != nil {
			t.Fatal(err)
		}
	}
}

// The hardware E4M3 conversion of the single-token MoE kernels' scales
// against format.E4M3Decode, for every byte in both places of a pair: the
// same float bits (NaN for NaN).
func TestMoEScaleConvert(t *testing.T) {
	d := testDevice(t)
	got := make([]float32, 512)
	cc := 0
	err := d.Do(func(c *Ctx) error {
		if cc = c.info.CC; cc < 89 {
			return nil
		}
		return runOutKernel(c, "moe", "moe_scale_convert", D1(1), D1(256), got)
	})
	if err != nil {
		t.Fatal(err)
	}
	if cc < 89 {
		t.Skipf("SKIPPED: compute capability %d has no E4M3 conversion (the kernels decode scales in integer operations there)", cc)
	}
	for b := 0; b < 256; b++ {
		want := format.E4M3Decode(uint8(b))
		for i, v := range got[2*b : 2*b+2] {
			if math.Float32bits(v) != math.Float32bits(want) && !(v != v && want != want) {
				t.Errorf("byte %#02x in place %d: %g, want %g", b, i, v, want)
			}
		}
	}
}
