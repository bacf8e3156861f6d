//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/backend/cpu"
	"github.com/mmfp4/mmfp4/format"
)

// The one-launch MoE (router, gate/up, down and the weighted sum) against
// the CPU backend: the logits against a float64 product, the choice
// against cpu.SelectExperts on the GPU's own logits, the output against
// the CPU's MoE plus its shared expert; and against the two-launch MoE on
// the same routing, which must agree bit for bit. Each token is run
// three times: plain, accumulating (exactly twice the first), and plain
// again with the routing given instead of computed; odd tokens with fixed
// tickets instead of counted ones.
func TestMoEOne(t *testing.T) {
	d := testDevice(t)
	r := testRand(t)
	for _, sh := range []struct{ K, I, E, topK, G, tokens int }{
		{2048, 1536, 64, 4, 128, 3}, // GLM-4.7-Flash
		{512, 384, 16, 4, 64, 2},
		{128, 128, 8, 2, 32, 2}, // the fixture's shapes
	} {
		K, I, E, topK, G := sh.K, sh.I, sh.E, sh.topK, sh.G
		name := fmt.Sprintf("K=%d I=%d E=%d top%d G=%d", K, I, E, topK, G)
		ref := cpu.New(cpu.Options{Threads: 2})
		host := make([][3]*format.Matrix, E+1) // the last is the shared expert
		for e := range host {
			host[e] = [3]*format.Matrix{synthMatrix(r, I, K, G), synthMatrix(r, I, K, G), synthMatrix(r, K, I, G)}
		}
		refExpert := func(e int) backend.Expert {
			var ws [3]backend.Weight
			for i, m := range host[e] {
				w, err := ref.NewWeight(backend.HostWeight{Name: fmt.Sprintf("expert %d", e), N: m.N, K: m.K, Quant: m})
				if err != nil {
					t.Fatal(err)
				}
				ws[i] = w
			}
			return backend.Expert{Gate: ws[0], Up: ws[1], Down: ws[2]}
		}
		var (
			dev []ExpertMats
			tab *ExpertTable
			scr *MoEScratch
		)
		err := d.Do(func(c *Ctx) error {
			for _, h := range host {
				var q [3]*QMatrix
				for i, m := range h {
					var err error
					if q[i], err = c.UploadMatrix(m); err != nil {
						return err
					}
				}
				dev = append(dev, ExpertMats{q[0], q[1], q[2]})
			}
			var err error
			if tab, err = c.NewExpertTable(dev[:E], dev[E:]); err != nil {
				return err
			}
			if !MoEOneFits(tab, topK, true) {
				return fmt.Errorf("%s: moe_one does not take these shapes", name)
			}
			scr, err = c.NewMoEScratch(tab, topK)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		shared := refExpert(E)
		for tok := 0; tok < sh.tokens; tok++ {
			x, W, bias := randVec(r, K, 1), randVec(r, E*K, 0.02), randVec(r, E, 0.05)
			logits := make([]float32, E)
			ids := make([]int32, topK)
			wts := make([]float32, topK)
			var one, twice, given, two []float32
			moeOneStatic = tok%2 == 1
			err := d.Do(func(c *Ctx) error {
				xa, err := c.NewQActs(1, K, G)
				if err != nil {
					return err
				}
				xb, err1 := upload(c, x)
				wb, err2 := upload(c, W)
				bb, err3 := upload(c, bias)
				out, err4 := c.Alloc(4 * (E + 2*topK + 4*K))
				if err := errors.Join(err1, err2, err3, err4, poison(c, out.Ptr, out.Size)); err != nil {
					return err
				}
				lP, iP, wP := out.Ptr, out.At(4*E), out.At(4*(E+topK))
				yP, y2P := out.At(4*(E+2*topK)), out.At(4*(E+2*topK+K))
				if err := c.RMSNormQuant(xb.Ptr, K, 0, 0, 0, 0, 1, K, G, xa); err != nil {
					return err
				}
				rt := &MoERouter{W: wb.Ptr, X: xb.Ptr, Bias: bb.Ptr, Logits: lP, Norm: true, Scaling: 1.8}
				read := func(p uint64) ([]float32, error) {
					v := make([]float32, K)
					return v, CopyOut(c, v, p)
				}
				if err := c.MoEOne(yP, false, tab, rt, iP, wP, topK, xa, scr); err != nil {
					return err
				}
				if one, err = read(yP); err != nil {
					return err
				}
				if err := c.MoEOne(yP, true, tab, rt, iP, wP, topK, xa, scr); err != nil {
					return err
				}
				if twice, err = read(yP); err != nil {
					return err
				}
				if err := errors.Join(CopyOut(c, logits, lP), CopyOut(c, ids, iP), CopyOut(c, wts, wP)); err != nil {
					return err
				}
				// The routing given (no router), into a poisoned output.
				if err := errors.Join(poison(c, yP, 4*K), c.MoEOne(yP, false, tab, nil, iP, wP, topK, xa, scr)); err != nil {
					return err
				}
				if given, err = read(yP); err != nil {
					return err
				}
				// The two-launch kernels on the same routing.
				if err := errors.Join(poison(c, y2P, 4*K), c.MoE(y2P, false, tab, iP, wP, topK, xa, scr)); err != nil {
					return err
				}
				if two, err = read(y2P); err != nil {
					return err
				}
				return errors.Join(c.FreeQActs(xa), c.Free(xb), c.Free(wb), c.Free(bb), c.Free(out))
			})
			moeOneStatic = false
			if err != nil {
				t.Fatal(err)
			}
			want := make([]float32, E)
			for e := range want {
				var acc float64
				for k := 0; k < K; k++ {
					acc += float64(W[e*K+k]) * float64(x[k])
				}
				want[e] = float32(acc)
			}
			if e := relErr(want, logits); !(e <= 1e-6) {
				t.Fatalf("%s token %d: logits relative error %.3g", name, tok, e)
			}
			cfg := backend.RouterConfig{TopK: topK, Groups: 1, TopKGroups: 1, NormTopKProb: true, RoutedScaling: 1.8, NumExperts: E}
			wantIDs, wantW := make([]int, topK), make([]float32, topK)
			cpu.SelectExperts(logits, bias, cfg, wantIDs, wantW)
			for k := range wantIDs {
				if int(ids[k]) != wantIDs[k] || math.Abs(float64(wts[k]-wantW[k])) > 1e-6*math.Abs(float64(wantW[k])) {
					t.Fatalf("%s token %d: ids %v weights %v, want %v %v", name, tok, ids, wts, wantIDs, wantW)
				}
			}
			for i := range one {
				if twice[i] != 2*one[i] || given[i] != one[i] || two[i] != one[i] {
					t.Fatalf("%s token %d: y[%d] = %g; accumulated %g (want %g), routing given %g, two launches %g",
						name, tok, i, one[i], twice[i], 2*one[i], given[i], two[i])
				}
			}
			// The CPU: its router on the GPU's logits, its MoE over the
			// chosen experts (the others are never read), plus the shared
			// expert through MatMul and SwiGLU.
			refExperts := make([]backend.Expert, E)
			for _, e := range wantIDs {
				refExperts[e] = refExpert(e)
			}
			for e := range refExperts {
				if refExperts[e].Gate == nil {
					refExperts[e] = refExperts[wantIDs[0]]
				}
			}
			lt, xt, wantY := ref.NewTensor(1, E), ref.NewTensor(1, K), ref.NewTensor(1, K)
			ref.Upload(lt, logits)
			ref.Upload(xt, x)
			bw, err := ref.NewWeight(backend.HostWeight{Name: "bias", N: 1, K: E, Dense: bias})
			if err != nil {
				t.Fatal(err)
			}
			ref.MoE(wantY, xt, ref.Route(lt, bw, cfg), refExperts)
			g, u, o := ref.NewTensor(1, I), ref.NewTensor(1, I), ref.NewTensor(1, K)
			ref.MatMul(g, xt, shared.Gate)
			ref.MatMul(u, xt, shared.Up)
			ref.SwiGLU(g, g, u)
			ref.MatMul(o, g, shared.Down)
			ref.Add(wantY, wantY, o)
			// Same int8 products, float sums in another order (TestMoE:
			// 1.4e-7 to 2.6e-7 on an H200).
			e := relErr(ref.Download(wantY), one)
			t.Logf("%s token %d experts %v: relative error %.3g against the CPU backend", name, tok, wantIDs, e)
			if !(e <= 2e-6) {
				t.Errorf("%s token %d: relative error %.3g", name, tok, e)
			}
		}
		err = d.Do(func(c *Ctx) error {
			for _, m := range dev {
				c.FreeMatrix(m.Gate)
				c.FreeMatrix(m.Up)
				c.FreeMatrix(m.Down)
			}
			return errors.Join(c.FreeExpertTable(tab), c.FreeMoEScratch(scr))
		})
		if err != nil {
			t.Fatal(err)
		}
	}
}

// Through the backend at GLM-4.7-Flash's shapes: norm, router product,
// Route and MoEShared, once with moe_one taking the router launch in and
// once as the router launch and the two expert launches. The logits, the
// chosen experts and the output agree bit for bit.
func TestMoEOneMatchesSeparate(t *testing.T) {
	const K, I, E, topK = 2048, 1536, 64, 4
	run := func(o Options) (map[string][]float32, []int32, *Backend) {
		g, _ := testBackends(t, o)
		r := rand.New(rand.NewPCG(23, 5))
		gain := mustWeight(t, g, backend.HostWeight{Name: "norm", N: 1, K: K, Dense: randVec(r, K, 1)})
		router := mustWeight(t, g, backend.HostWeight{Name: "router", N: E, K: K, Dense: randVec(r, E*K, 0.02)})
		bias := mustWeight(t, g, backend.HostWeight{Name: "bias", N: 1, K: E, Dense: randVec(r, E, 0.05)})
		expert := func(e int) backend.Expert {
			var ws [3]backend.Weight
			for i, m := range []*format.Matrix{synthMatrix(r, I, K, 128), synthMatrix(r, I, K, 128), synthMatrix(r, K, I, 128)} {
				ws[i] = mustWeight(t, g, backend.HostWeight{Name: fmt.Sprintf("expert %d", e), N: m.N, K: m.K, Quant: m})
			}
			return backend.Expert{Gate: ws[0], Up: ws[1], Down: ws[2]}
		}
		experts := make([]backend.Expert, E)
		for e := range experts {
			experts[e] = expert(e)
		}
		shared := []backend.Expert{expert(E)}
		got := map[string][]float32{}
		var ids []int32
		for step := 0; step < 2; step++ { // the first step makes the expert table (a flush)
			g.SetBatch(simpleBatch(1, step), nil)
			g.routeCountersFor(1)
			x, h := g.NewTensor(1, K), g.NewTensor(1, K)
			g.Upload(x, randVec(r, K, 1))
			g.RMSNorm(h, x, gain, 1e-5)
			logits := g.NewTensor(1, E)
			g.MatMul(logits, h, router)
			rt := g.Route(logits, bias, backend.RouterConfig{TopK: topK, Groups: 1, TopKGroups: 1, NormTopKProb: true, RoutedScaling: 1.8, NumExperts: E}).(*routing)
			out := g.NewTensor(1, K)
			g.MoEShared(out, h, rt, experts, shared)
			got[fmt.Sprint("out", step)] = g.Download(out)
			got[fmt.Sprint("logits", step)] = g.Download(logits)
			ids = make([]int32, topK)
			wts := make([]float32, topK)
			g.now("read routing", func(c *Ctx) error { return errors.Join(CopyOut(c, ids, rt.ids), CopyOut(c, wts, rt.wts)) })
			got[fmt.Sprint("wts", step)] = wts
		}
		if err := g.Sync(); err != nil {
			t.Fatal(err)
		}
		return got, ids, g
	}
	want, wantIDs, _ := run(Options{})
	got, gotIDs, g := run(Options{MoEOne: true})
	t.Logf("moe_one launches (routing given, router in): %v; experts %v / %v", g.moeOne, gotIDs, wantIDs)
	if g.moeOne[1] == 0 {
		t.Errorf("moe_one launches %v: the router was never taken in", g.moeOne)
	}
	for i := range wantIDs {
		if gotIDs[i] != wantIDs[i] {
			t.Fatalf("expert %d: %d one launch, %d separate", i, gotIDs[i], wantIDs[i])
		}
	}
	for name, w := range want {
		for i := range w {
			if got[name][i] != w[i] || math.IsNaN(float64(w[i])) {
				t.Fatalf("%s[%d] = %v one launch, %v separate", name, i, got[name][i], w[i])
			}
		}
	}
}

// Decode steps of the MMFP4 fixture (expert groups: the routing comes from
// its own launch) give the same logits with moe_one as with the two
// expert launches, bit for bit.
func TestMoEOneDecodeMatchesSeparate(t *testing.T) {
	dir := quantizedFixture(t)
	ref := loadGolden(t)
	const steps = 24
	decode := func(o Options) ([]float32, *Backend) {
		g, _ := testBackends(t, o)
		return greedyLogits(t, loadOn(t, dir, g), ref.prompt, steps, backend.CacheF32), g
	}
	want, _ := decode(Options{})
	got, g := decode(Options{MoEOne: true})
	t.Logf("moe_one launches (routing given, router in): %v", g.moeOne)
	if g.moeOne[0] == 0 {
		t.Errorf("moe_one launches %v: none", g.moeOne)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("logit %d (step %d): %v one launch, %v separate", i, i/(len(want)/(steps+1)), got[i], want[i])
		}
	}
}

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
