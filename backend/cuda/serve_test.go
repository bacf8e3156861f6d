//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"bytes"
	"errors"
	"fmt"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/backend/cpu"
	"github.com/mmfp4/mmfp4/format"
)

// compareMerged is compareOp, and checks that the serving merge of the
// given kind joined launches in the backend's run of op (missing: what it
// failed to do otherwise).
func compareMerged(t *testing.T, g *Backend, c *cpu.Backend, name string, bound float64, op func(b backend.Backend) []float32, kind int, missing string) {
	t.Helper()
	before := g.serveMerges[kind]
	compareOp(t, g, c, name, bound, op)
	if g.serveMerges[kind] == before {
		t.Errorf("%s: %s", name, missing)
	}
}

// withServeFuse runs f with serve.go's launch merges on or off.
func withServeFuse(on bool, f func()) {
	defer func(v bool) { serveFuseOff = v }(serveFuseOff)
	serveFuseOff = !on
	f()
}

// The q_a norm, q_b's product and the latent's norm of a serving step
// (2-64 rows, GLM-4.7-Flash's shapes; q_b a GEMV to 8 rows, then a
// streaming product): with the two norms in one launch,
// the norms' outputs, q_b's output and a product of the latent's int8
// form match the CPU backend, and equal the separate launches' bit for
// bit.
func TestBackendServeNormPairMatchesCPU(t *testing.T) {
	r := testRand(t)
	g, c := testBackends(t, Options{})
	const qa, kv, rank, qb = 768, 576, 512, 5120
	gainA := backend.HostWeight{Name: "qa_norm", N: 1, K: qa, Dense: randVec(r, qa, 1)}
	gainKV := backend.HostWeight{Name: "kv_norm", N: 1, K: rank, Dense: randVec(r, rank, 1)}
	wqb := quantHost(t, r, "q_b", qb, qa, 128)
	wuk := quantHost(t, r, "probe", 256, rank, 128)
	for _, T := range []int{4, 8, 9, 32, 64} {
		xa, xkv := randVec(r, T*qa, 1), randVec(r, T*kv, 1)
		op := func(b backend.Backend) []float32 {
			// Weights first: an upload runs the queued ops.
			ga, gkv, wb, wp := mustWeight(t, b, gainA), mustWeight(t, b, gainKV), mustWeight(t, b, wqb), mustWeight(t, b, wuk)
			b.SetBatch(simpleBatch(T, 0), nil)
			ta, tkv, lat := b.NewTensor(T, qa), b.NewTensor(T, kv), b.NewTensor(T, rank)
			q, probe := b.NewTensor(T, qb), b.NewTensor(T, 256)
			b.Upload(ta, xa)
			b.Upload(tkv, xkv)
			b.RMSNorm(ta, ta, ga, 1e-6)
			b.MatMul(q, ta, wb)
			b.RMSNorm(lat, b.Cols(tkv, 0, rank), gkv, 1e-6)
			b.MatMul(probe, lat, wp)
			out := append(b.Download(ta), b.Download(lat)...)
			return append(append(out, b.Download(q)...), b.Download(probe)...)
		}
		name := fmt.Sprintf("norm pair T=%d", T)
		compareMerged(t, g, c, name, 1e-5, op, serveNorms, "the two norms did not share a launch")
		var separate []float32
		withServeFuse(false, func() { separate = op(g) })
		mustSameBits(t, name, op(g), separate)
	}
}

// mustSameBits fails t at the first value of got whose bits differ from
// want's (sameBits).
func mustSameBits(t *testing.T, name string, got, want []float32) {
	t.Helper()
	if i := sameBits(got, want); i >= 0 {
		if i >= min(len(got), len(want)) {
			t.Fatalf("%s: %d values, want %d", name, len(got), len(want))
		}
		t.Fatalf("%s: value %d is %v merged, %v in separate launches", name, i, got[i], want[i])
	}
}

// The value expansion of 9-64 rows with the int8 form of its output
// written by the same launch (mmsq_*), then o_proj's product of that form,
// against the CPU backend; and bit for bit against the separate launches.
func TestBackendServeValuesQuantMatchesCPU(t *testing.T) {
	r := testRand(t)
	g, c := testBackends(t, Options{})
	s := backend.MLAShape{Heads: 20, NopeDim: 128, RopeDim: 64, VDim: 256, Rank: 512}
	wuv := quantHost(t, r, "wuv", s.Heads*s.VDim, s.Rank, 128)
	wo := quantHost(t, r, "o_proj", 2048, s.Heads*s.VDim, 128)
	for _, T := range []int{9, 33, 64} {
		x := randVec(r, T*s.Heads*s.Rank, 1)
		op := func(b backend.Backend) []float32 {
			uv, ow := mustWeight(t, b, wuv), mustWeight(t, b, wo) // an upload runs the queued ops
			b.SetBatch(simpleBatch(T, 0), nil)
			ol, om, o := b.NewTensor(T, s.Heads*s.Rank), b.NewTensor(T, s.Heads*s.VDim), b.NewTensor(T, 2048)
			b.Upload(ol, x)
			b.ExpandValues(om, ol, uv, s)
			b.MatMul(o, om, ow)
			return append(b.Download(om), b.Download(o)...)
		}
		name := fmt.Sprintf("values+quantize T=%d", T)
		compareMerged(t, g, c, name, 1e-5, op, serveValues, "the value expansion did not write the int8 form")
		var separate []float32
		withServeFuse(false, func() { separate = op(g) })
		mustSameBits(t, name, op(g), separate)
	}
}

// MatMulStreamHeadsQuant writes what MatMulStreamHeads writes, bit for
// bit, and the int8 form (codes, scales, 32-column sums) that
// RMSNormQuant without a gain makes of it, on fresh random rows.
func TestMatMulStreamHeadsQuant(t *testing.T) {
	d := testDevice(t)
	r := testRand(t)
	const heads, rows, K = 20, 256, 512
	m, err := format.Quantize(randVec(r, heads*rows*K, 0.05), heads*rows, K, format.QuantOptions{GroupSize: 128})
	if err != nil {
		t.Fatal(err)
	}
	N := heads * rows
	for _, T := range []int{9, 17, 40, 64} {
		x := randVec(r, T*heads*K, 1)
		err := d.Do(func(c *Ctx) error {
			qm, err := c.UploadMatrix(m)
			if err != nil {
				return err
			}
			xb, err := upload(c, x)
			if err != nil {
				return err
			}
			a, e1 := c.NewQActs(T, heads*K, 128)
			want, e2 := c.NewQActs(T, N, 128)
			got, e3 := c.NewQActs(T, N, 128)
			y1, e4 := c.Alloc(4 * T * N)
			y2, e5 := c.Alloc(4 * T * N)
			if err := errors.Join(e1, e2, e3, e4, e5); err != nil {
				return err
			}
			for _, b := range []Buffer{y1, y2, got.buf} {
				if err := poison(c, b.Ptr, b.Size); err != nil {
					return err
				}
			}
			p := PlanStream(rows, K, heads, T, d.Info().SMs, d.Info().SharedOptin)
			if err := errors.Join(c.RMSNormQuant(xb.Ptr, heads*K, 0, 0, 0, 0, T, heads*K, 128, a),
				c.MatMulStreamHeads(y1.Ptr, N, qm, a, heads, p, 0, 0),
				c.RMSNormQuant(y1.Ptr, N, 0, 0, 0, 0, T, N, 128, want),
				c.MatMulStreamHeadsQuant(y2.Ptr, N, qm, a, heads, p, got)); err != nil {
				return err
			}
			v1, v2 := make([]float32, T*N), make([]float32, T*N)
			q1, q2 := make([]int8, T*N), make([]int8, T*N)
			s1, s2 := make([]float32, T*N/128), make([]float32, T*N/128)
			u1, u2 := make([]int32, T*N/32), make([]int32, T*N/32)
			if err := errors.Join(CopyOut(c, v1, y1.Ptr), CopyOut(c, v2, y2.Ptr), CopyOut(c, q1, want.Q), CopyOut(c, q2, got.Q),
				CopyOut(c, s1, want.Scales), CopyOut(c, s2, got.Scales), CopyOut(c, u1, want.Sums), CopyOut(c, u2, got.Sums)); err != nil {
				return err
			}
			name := fmt.Sprintf("T=%d plan %+v", T, p)
			mustSameBits(t, name+" output", v2, v1)
			mustSameBits(t, name+" scales", s2, s1)
			for i := range q1 {
				if q1[i] != q2[i] {
					return fmt.Errorf("%s: code %d is %d, want %d", name, i, q2[i], q1[i])
				}
			}
			for i := range u1 {
				if u1[i] != u2[i] {
					return fmt.Errorf("%s: sum %d is %d, want %d", name, i, u2[i], u1[i])
				}
			}
			t.Logf("%s: output, codes, scales and sums identical", name)
			return errors.Join(c.FreeMatrix(qm), c.Free(xb), c.FreeQActs(a), c.FreeQActs(want), c.FreeQActs(got), c.Free(y1), c.Free(y2))
		})
		if err != nil {
			t.Fatal(err)
		}
	}
}

// The streaming MoE adds into a destination that holds values, and
// writes one that NewTensor cleared for it (its combine then queued on its
// own, with nothing after it to merge with): both against the CPU backend.
func TestBackendServeMoEDestination(t *testing.T) {
	const K, I, E, topK = 1024, 512, 16, 4
	r := testRand(t)
	cfg := backend.RouterConfig{TopK: topK, Groups: 1, TopKGroups: 1, NormTopKProb: true, RoutedScaling: 1.8, NumExperts: E}
	router := denseHost(r, "router", E, K)
	bias := backend.HostWeight{Name: "bias", N: 1, K: E, Dense: randVec(r, E, 0.1)}
	g, c := testBackends(t, Options{})
	hosts := expertHosts(t, r, E, I, K, 128)
	// Each backend's weights once (an upload runs the queued ops).
	type weights struct {
		experts []backend.Expert
		rw, bw  backend.Weight
	}
	ws := map[backend.Backend]*weights{}
	for _, b := range []backend.Backend{g, c} {
		w := &weights{rw: mustWeight(t, b, router), bw: mustWeight(t, b, bias)}
		for _, h := range hosts {
			w.experts = append(w.experts, backend.Expert{Gate: mustWeight(t, b, h[0]), Up: mustWeight(t, b, h[1]), Down: mustWeight(t, b, h[2])})
		}
		ws[b] = w
	}
	for _, T := range []int{9, 32} {
		x, y0 := randVec(r, T*K, 1), randVec(r, T*K, 1)
		for _, held := range []bool{false, true} {
			op := func(b backend.Backend) []float32 {
				w := ws[b]
				b.SetBatch(simpleBatch(T, 0), nil)
				xt := b.NewTensor(T, K)
				b.Upload(xt, x)
				logits := b.NewTensor(T, E)
				b.MatMul(logits, xt, w.rw)
				rt := b.Route(logits, w.bw, cfg)
				out := b.NewTensor(T, K)
				if held {
					b.Upload(out, y0)
				}
				b.MoE(out, xt, rt, w.experts)
				return b.Download(out)
			}
			op(g) // the expert table's upload
			name := fmt.Sprintf("moe into a destination T=%d holding values %v", T, held)
			before := g.serveMerges[serveWrites]
			compareOp(t, g, c, name, 2e-3, op)
			if wrote := g.serveMerges[serveWrites] > before; wrote == held {
				t.Errorf("%s: destination written instead of added to: %v", name, wrote)
			}
		}
	}
}

// A streaming MoE into a cleared tensor, the residual add of its output
// and the next norm (a serving step's layer boundary) in one launch: the
// residual, the MoE's output, the norm's output and a product of its int8
// form match the CPU backend, and equal the separate launches' bit for bit.
func TestBackendServeCombineNormMatchesCPU(t *testing.T) {
	const K, I, E, topK = 2048, 512, 16, 4
	r := testRand(t)
	cfg := backend.RouterConfig{TopK: topK, Groups: 1, TopKGroups: 1, NormTopKProb: true, RoutedScaling: 1.8, NumExperts: E}
	router := denseHost(r, "router", E, K)
	bias := backend.HostWeight{Name: "bias", N: 1, K: E, Dense: randVec(r, E, 0.1)}
	gain := backend.HostWeight{Name: "norm", N: 1, K: K, Dense: randVec(r, K, 1)}
	probe := quantHost(t, r, "probe", 256, K, 128)
	g, c := testBackends(t, Options{})
	hosts := expertHosts(t, r, E+1, I, K, 128)
	// Each backend's weights once, before any step: an upload (and the
	// first use of an expert table, which uploads it) runs the queued ops.
	type weights struct {
		experts        []backend.Expert
		gw, rw, bw, pw backend.Weight
	}
	ws := map[backend.Backend]*weights{}
	for _, b := range []backend.Backend{g, c} {
		w := &weights{gw: mustWeight(t, b, gain), rw: mustWeight(t, b, router), bw: mustWeight(t, b, bias), pw: mustWeight(t, b, probe)}
		for _, h := range hosts {
			w.experts = append(w.experts, backend.Expert{Gate: mustWeight(t, b, h[0]), Up: mustWeight(t, b, h[1]), Down: mustWeight(t, b, h[2])})
		}
		ws[b] = w
	}
	for _, T := range []int{2, 9, 32, 64} {
		x, res := randVec(r, T*K, 1), randVec(r, T*K, 1)
		op := func(b backend.Backend) []float32 {
			w := ws[b]
			experts, gw, rw, bw, pw := w.experts, w.gw, w.rw, w.bw, w.pw
			b.SetBatch(simpleBatch(T, 0), nil)
			xt, rt := b.NewTensor(T, K), b.NewTensor(T, K)
			b.Upload(xt, x)
			b.Upload(rt, res)
			h := b.NewTensor(T, K)
			b.RMSNorm(h, xt, gw, 1e-6) // the MoE's input and its int8 form
			logits := b.NewTensor(T, E)
			b.MatMul(logits, h, rw)
			routing := b.Route(logits, bw, cfg)
			out := b.NewTensor(T, K)
			if sm, ok := b.(backend.SharedMoE); ok {
				sm.MoEShared(out, h, routing, experts[:E], experts[E:])
			} else {
				b.MoE(out, h, routing, experts[:E])
				b.Add(out, out, backend.RunExpert(b, h, experts[E]))
			}
			b.Add(rt, rt, out)
			// As the model: the norm's output is not cleared (a memset
			// queued between the add and the norm would part them).
			h2, p := backend.NewOutput(b, T, K), backend.NewOutput(b, T, 256)
			b.RMSNorm(h2, rt, gw, 1e-6)
			b.MatMul(p, h2, pw)
			v := append(b.Download(rt), b.Download(out)...)
			return append(append(v, b.Download(h2)...), b.Download(p)...)
		}
		name := fmt.Sprintf("moe combine+add+norm T=%d", T)
		op(g) // the expert table's upload
		// As TestBackendMoEStreamMatchesCPU's bound (one int8 step of the
		// SwiGLU product).
		compareMerged(t, g, c, name, 2e-3, op, serveCombine, "the combine, add and norm did not share a launch")
		var separate []float32
		withServeFuse(false, func() { separate = op(g) })
		mustSameBits(t, name, op(g), separate)
	}
}

// The RoPEs, cache write and absorbed query of a serving step (2-64 decode
// rows of sequences with cached prefixes, GLM-4.7-Flash's shapes) in one
// launch (absorb_query_tc_rope_rows), over bf16, fp8 and fp4 caches: the
// rotated q and k_pe, the absorbed query and an attention over the written
// cache match the CPU backend, and equal the separate launches' (the RoPEs
// and the cache write apart too) bit for bit, as do the cache's bytes.
func TestBackendServeAbsorbRopeMatchesCPU(t *testing.T) {
	r := testRand(t)
	g, c := testBackends(t, Options{})
	s := backend.MLAShape{Heads: 20, NopeDim: 192, RopeDim: 64, VDim: 256, Rank: 512}
	qk, kvw := s.NopeDim+s.RopeDim, s.Rank+s.RopeDim
	hw := quantHost(t, r, "wuk", s.Heads*s.NopeDim, s.Rank, 32)
	defer func() { decodeSplitsFixed = 0 }()
	for _, dt := range []backend.CacheDType{backend.CacheBF16, backend.CacheFP8, backend.CacheFP4} {
		for _, T := range []int{2, 5, 9, 32, 64} {
			prefixes := make([]int, T)
			for i := range prefixes {
				prefixes[i] = r.IntN(100)
			}
			_, step, blocks := flashBatches(servePromptStep(prefixes, 0, 0), 16)
			q, kv, lat := randVec(r, T*s.Heads*qk, 1), randVec(r, T*kvw, 1), randVec(r, T*s.Rank, 1)
			var pool backend.CachePool // the last run's
			op := func(b backend.Backend) []float32 {
				wk := mustWeight(t, b, hw)
				var err error
				pool, err = b.NewCachePool(1, blocks, 16, s.Rank, s.RopeDim, dt)
				if err != nil {
					t.Fatal(err)
				}
				b.SetBatch(step, pool)
				qt, kvt, lt := b.NewTensor(T, s.Heads*qk), b.NewTensor(T, kvw), b.NewTensor(T, s.Rank)
				b.Upload(qt, q)
				b.Upload(kvt, kv)
				b.Upload(lt, lat)
				kpe := b.Cols(kvt, s.Rank, kvw)
				b.RoPE(qt, s.Heads, qk, s.NopeDim, s.RopeDim, 10000, false)
				b.RoPE(kpe, 1, s.RopeDim, 0, s.RopeDim, 10000, false)
				b.CacheWrite(0, lt, kpe)
				ql := backend.NewOutput(b, T, s.Heads*s.Rank)
				b.AbsorbQuery(ql, qt, wk, s)
				ol := backend.NewOutput(b, T, s.Heads*s.Rank)
				b.LatentAttention(ol, ql, qt, 0, s, 0.07)
				out := append(b.Download(qt), b.Download(kvt)...)
				return append(append(out, b.Download(ql)...), b.Download(ol)...)
			}
			name := fmt.Sprintf("absorb+rope+cache write T=%d, %v cache", T, dt)
			bound := 1e-5
			if dt == backend.CacheBF16 {
				bound = decodeBF16Bound() // the attention's form
			}
			compareMerged(t, g, c, name, bound, op, serveRope, "the RoPEs and cache write did not share the absorbed query's launch")
			// One split for the attention both ways (serveFuseOff
			// also changes the split of 23-44 rows, and so its sums), so that
			// its output shows the cache's bits too.
			decodeSplitsFixed = 1
			var separate []float32
			withServeFuse(false, func() {
				defer func(v bool) { ropeCacheOff = v }(ropeCacheOff)
				ropeCacheOff = true
				separate = op(g)
			})
			sepRec := poolLayer(t, g, pool, 0)
			merged := op(g)
			rec := poolLayer(t, g, pool, 0)
			decodeSplitsFixed = 0
			mustSameBits(t, name, merged, separate)
			if j := firstDiff(sepRec, rec); j >= 0 {
				t.Errorf("%s: cache byte %d of %d differs from the separate launches", name, j, len(rec))
			}
			checkRecords(t, name+": cache", sepRec, slotBytesOf(dt, s.Rank, s.RopeDim), T)
		}
	}
}

// The residual add and norm of 2-64 rows in the cluster router's launch
// (moe_router_cluster_norm_rows): the residual, the norm, its int8 form,
// the logits and the chosen experts and weights match the CPU backend
// (the first three and the logits) and equal the separate launches' bit
// for bit (all of them); with one and two rows a cluster alike.
func TestBackendServeRouterNormMatchesCPU(t *testing.T) {
	r := testRand(t)
	g, c := testBackends(t, Options{})
	if g.dev.Info().CC < 90 {
		t.Skipf("the cluster router needs compute capability 9.0, the device has %d", g.dev.Info().CC)
	}
	const K, E, topK = 2048, 64, 4
	cfg := backend.RouterConfig{TopK: topK, Groups: 1, TopKGroups: 1, NormTopKProb: true, RoutedScaling: 1.8, NumExperts: E}
	router := backend.HostWeight{Name: "router", N: E, K: K, Dense: randVec(r, E*K, 0.02)}
	bias := backend.HostWeight{Name: "bias", N: 1, K: E, Dense: randVec(r, E, 0.05)}
	gain := backend.HostWeight{Name: "gain", N: 1, K: K, Dense: randVec(r, K, 1)}
	for _, T := range []int{2, 9, 32, 64} {
		xv, ov := randVec(r, T*K, 1), randVec(r, T*K, 0.5)
		var dev []byte // the GPU's ids, weights and int8 form of the norm
		op := func(b backend.Backend) []float32 {
			wr, wb, wg := mustWeight(t, b, router), mustWeight(t, b, bias), mustWeight(t, b, gain)
			b.SetBatch(simpleBatch(T, 0), nil)
			x, o := b.NewTensor(T, K), b.NewTensor(T, K)
			b.Upload(x, xv)
			b.Upload(o, ov)
			b.Add(x, x, o)
			hn := backend.NewOutput(b, T, K)
			b.RMSNorm(hn, x, wg, 1e-5)
			logits := backend.NewOutput(b, T, E)
			b.MatMul(logits, hn, wr)
			rt := b.Route(logits, wb, cfg)
			out := append(append(b.Download(x), b.Download(hn)...), b.Download(logits)...)
			if err := b.Sync(); err != nil {
				t.Fatal(err)
			}
			if gb, ok := b.(*Backend); ok {
				ro := rt.(*routing)
				var a *QActs
				for _, e := range gb.quantized {
					if e.src == *asTensor(hn) {
						a = e.a
					}
				}
				if a == nil {
					t.Fatalf("T=%d: no int8 form of the norm", T)
				}
				dev = nil
				err := gb.dev.Do(func(c *Ctx) error {
					for _, p := range []struct {
						ptr uint64
						n   int
					}{{ro.ids, 4 * T * topK}, {ro.wts, 4 * T * topK}, {a.Q, T * K}, {a.Scales, 4 * T * K / a.G}, {a.Sums, 4 * T * K / 32}} {
						buf := make([]byte, p.n)
						if err := CopyOut(c, buf, p.ptr); err != nil {
							return err
						}
						dev = append(dev, buf...)
					}
					return nil
				})
				if err != nil {
					t.Fatal(err)
				}
			}
			return out
		}
		name := fmt.Sprintf("add+norm+router T=%d", T)
		op(g) // a first step grows the arena, which runs the queued ops
		compareMerged(t, g, c, name, 1e-5, op, serveRouterNorm, "the add and norm did not share the router's launch")
		merged := op(g)
		mergedDev := dev
		var separate []float32
		withServeFuse(false, func() { separate = op(g) })
		mustSameBits(t, name, merged, separate)
		if !bytes.Equal(mergedDev, dev) {
			t.Fatalf("%s: the ids, weights or int8 form differ from the separate launches'", name)
		}
		// Two rows a cluster (moe_router_cluster_norm_rows2) and one: the
		// same bits.
		for _, R := range []int{1, 2} {
			if R == routerRows {
				continue
			}
			func() {
				defer func(v int) { routerRows = v }(routerRows)
				routerRows = R
				mustSameBits(t, fmt.Sprintf("%s, %d rows a cluster", name, R), op(g), merged)
			}()
			if !bytes.Equal(mergedDev, dev) {
				t.Fatalf("%s, %d rows a cluster: the ids, weights or int8 form differ from %d rows a cluster", name, R, routerRows)
			}
		}
	}
}
