//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mmfp4/mmfp4/backend"
)

// serveLayerW is one MoE layer's weights at GLM-4.7-Flash's shapes for the
// serving benchmarks (the routed experts are common to all layers).
type serveLayerW struct {
	inNorm, postNorm          backend.Weight
	qa, qaNorm, qb, kva, kvaN backend.Weight
	uk, uv, o                 backend.Weight
	router, bias              backend.Weight
	shared                    backend.Expert
}

// serveGLM is GLM-4.7-Flash's geometry.
var serveGLM = struct {
	hidden, qa, rank, rope, heads, nope, vdim, inter, experts int
	mla                                                       backend.MLAShape
	route                                                     backend.RouterConfig
}{
	hidden: 2048, qa: 768, rank: 512, rope: 64, heads: 20, nope: 192, vdim: 256, inter: 1536, experts: 64,
	mla:   backend.MLAShape{Heads: 20, NopeDim: 192, RopeDim: 64, VDim: 256, Rank: 512},
	route: backend.RouterConfig{TopK: 4, Groups: 1, TopKGroups: 1, NormTopKProb: true, RoutedScaling: 1.8, NumExperts: 64},
}

func newServeLayerW(tb testing.TB, b backend.Backend, r *rand.Rand) *serveLayerW {
	s := serveGLM
	q := func(n, k int) backend.Weight {
		return mustWeight(tb, b, backend.HostWeight{Name: "w", N: n, K: k, Quant: synthMatrix(r, n, k, 128)})
	}
	vec := func(k int, scale float64) backend.Weight {
		return mustWeight(tb, b, backend.HostWeight{Name: "v", N: 1, K: k, Dense: randVec(r, k, scale)})
	}
	qk := s.nope + s.rope
	l := &serveLayerW{
		inNorm: vec(s.hidden, 1), postNorm: vec(s.hidden, 1),
		qa: q(s.qa, s.hidden), qaNorm: vec(s.qa, 1), qb: q(s.heads*qk, s.qa),
		kva: q(s.rank+s.rope, s.hidden), kvaN: vec(s.rank, 1),
		uk: q(s.heads*s.nope, s.rank), uv: q(s.heads*s.vdim, s.rank), o: q(s.hidden, s.heads*s.vdim),
		router: mustWeight(tb, b, backend.HostWeight{Name: "router", N: s.experts, K: s.hidden, Dense: randVec(r, s.experts*s.hidden, 0.02)}),
		bias:   vec(s.experts, 0.05),
	}
	l.shared = backend.Expert{Gate: q(s.inter, s.hidden), Up: q(s.inter, s.hidden), Down: q(s.hidden, s.inter)}
	return l
}

// queueServeLayer queues one decoder layer on x as the model does
// (glm4moelite's layer, attention and moe, call for call).
// mark is called after the layer's first norm.
func queueServeLayer(b backend.Backend, l *serveLayerW, experts []backend.Expert, i int, x backend.Tensor, mark func()) {
	s := serveGLM
	sh := s.mla
	T, dn, dr, rk := x.Rows(), sh.NopeDim, sh.RopeDim, sh.Rank
	qk := dn + dr
	h := backend.NewOutput(b, T, s.hidden)
	b.RMSNorm(h, x, l.inNorm, 1e-5)
	mark()

	q := backend.NewOutput(b, T, sh.Heads*qk)
	kv := backend.NewOutput(b, T, rk+dr)
	latent := backend.NewOutput(b, T, rk)
	qa := backend.NewOutput(b, T, s.qa)
	b.MatMul(qa, h, l.qa)
	b.MatMul(kv, h, l.kva)
	qn := backend.NewOutput(b, T, s.qa)
	b.RMSNorm(qn, qa, l.qaNorm, 1e-6)
	b.MatMul(q, qn, l.qb)
	b.RMSNorm(latent, b.Cols(kv, 0, rk), l.kvaN, 1e-6)
	kpe := b.Cols(kv, rk, rk+dr)
	b.RoPE(q, sh.Heads, qk, dn, dr, 1e6, true)
	b.RoPE(kpe, 1, dr, 0, dr, 1e6, true)
	b.CacheWrite(i, latent, kpe)
	qlat := backend.NewOutput(b, T, sh.Heads*rk)
	b.AbsorbQuery(qlat, q, l.uk, sh)
	olat := backend.NewOutput(b, T, sh.Heads*rk)
	b.LatentAttention(olat, qlat, q, i, sh, float32(1/math.Sqrt(float64(qk))))
	v := backend.NewOutput(b, T, sh.Heads*sh.VDim)
	b.ExpandValues(v, olat, l.uv, sh)
	a := backend.NewOutput(b, T, s.hidden)
	b.MatMul(a, v, l.o)
	b.Add(x, x, a)

	b.RMSNorm(h, x, l.postNorm, 1e-5)
	logits := backend.NewOutput(b, T, s.experts)
	b.MatMul(logits, h, l.router)
	routing := b.Route(logits, l.bias, s.route)
	out := b.NewTensor(T, s.hidden)
	b.(backend.SharedMoE).MoEShared(out, h, routing, experts, []backend.Expert{l.shared})
	b.Add(x, x, out)
}

// serveDecodeStep is a decode step of one row for each of len(ctx)
// sequences, sequence i at position ctx[i]-1 over blocks 2i and 2i+1 of
// 64 positions.
func serveDecodeStep(ctx []int) *backend.Batch {
	st := &backend.Batch{}
	for i, n := range ctx {
		st.Seqs = append(st.Seqs, backend.Seq{Start: i, Len: 1, Blocks: []int32{int32(2 * i), int32(2*i + 1)}})
		st.Tokens = append(st.Tokens, 0)
		st.Positions = append(st.Positions, int32(n-1))
		st.Outputs = append(st.Outputs, int32(i))
	}
	return st
}

// serveLayerOps queues a decode step's layers on g (programmatic launch,
// no graphs, no pieces) after a warm-up step of the same shape, runs the
// step's preamble and returns the ops of each layer but the first and the
// last (taken out of the queue): from the launch that holds the layer's
// input norm (with the MoE combine and residual add of the layer before,
// where the backend merges them) to the layer's MoE.
func serveLayerOps(tb testing.TB, g *Backend, ws []*serveLayerW, experts []backend.Expert, pool backend.CachePool, step *backend.Batch) [][]queuedOp {
	T := step.Rows()
	r := rand.New(rand.NewPCG(5, uint64(T)))
	xv := randVec(r, T*serveGLM.hidden, 1)
	flushed := false
	queue := func() (pre []queuedOp, layers [][]queuedOp) {
		g.SetBatch(step, pool)
		x := g.NewTensor(T, serveGLM.hidden)
		g.Upload(x, xv)
		n0, f0 := len(g.pending), g.flushes
		var starts []int
		for i, l := range ws {
			queueServeLayer(g, l, experts, i, x, func() { starts = append(starts, len(g.pending)-1) })
		}
		flushed = g.flushes != f0
		if flushed {
			return nil, nil // (the warm-up step: its ops ran as the arena grew)
		}
		for i := 1; i+1 < len(starts); i++ {
			layers = append(layers, slices.Clone(g.pending[starts[i]:starts[i+1]]))
		}
		return slices.Clone(g.pending[:n0]), layers
	}
	queue()
	if err := g.Sync(); err != nil {
		tb.Fatal(err)
	}
	pre, layers := queue()
	if flushed || len(layers) == 0 {
		tb.Fatal("the second step's layers were flushed while queued")
	}
	g.pending = g.pending[:0]
	if err := g.dev.Do(func(c *Ctx) error {
		for _, op := range pre {
			if err := op.fn(c); err != nil {
				return err
			}
		}
		return c.Sync()
	}); err != nil {
		tb.Fatal(err)
	}
	for i := 1; i < len(layers); i++ {
		if len(layers[i]) != len(layers[0]) {
			tb.Fatalf("layer %d has %d ops, layer 1 %d", i+1, len(layers[i]), len(layers[0]))
		}
		for j := range layers[i] {
			if layers[i][j].op != layers[0][j].op {
				tb.Fatalf("layer %d op %d is %q, layer 1's %q", i+1, j, layers[i][j].op, layers[0][j].op)
			}
		}
	}
	return layers
}

// timeLayerOps replays, as one graph with programmatic launch, the ops
// keep picks of each layer, and returns the device time per layer in us.
func timeLayerOps(c *Ctx, layers [][]queuedOp, keep func(j int) bool) (float64, error) {
	g, release, err := capturedPDL(c, func() error {
		for _, ops := range layers {
			for j, op := range ops {
				if !keep(j) {
					continue
				}
				if err := op.fn(c); err != nil {
					return err
				}
			}
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	defer release()
	us, err := timeReplay(c, g.exec, 5)
	return us / float64(len(layers)), err
}

// serveBenchRows reads MMFP4_BENCH_ROWS (comma-separated row counts), or
// gives def.
func serveBenchRows(def ...int) []int {
	v := os.Getenv("MMFP4_BENCH_ROWS")
	if v == "" {
		return def
	}
	var rows []int
	for _, f := range strings.Split(v, ",") {
		if n, err := strconv.Atoi(strings.TrimSpace(f)); err == nil && n > 0 {
			rows = append(rows, n)
		}
	}
	return rows
}

// BenchmarkServeLayer: a serving decode step's layers at GLM-4.7-Flash's
// shapes (queued through the backend as the model queues them, with every
// merge the backend makes), replayed from a graph with programmatic
// dependent launch over 17 layers' weights (about 270 MB besides the
// routed experts, more than L2), contexts of 17-80 positions: device time
// per layer for the whole layer, for each op alone, for each prefix of the
// layer's ops and for the layer without each op.
func BenchmarkServeLayer(b *testing.B) {
	d := benchDevice(b)
	if d.Info().CC < 90 {
		b.Skip("programmatic dependent launch needs compute capability 9.0")
	}
	t0 := time.Now()
	// The modules compile side by side while the weights are made.
	if err := d.Do(func(c *Ctx) error { return c.Precompile() }); err != nil {
		b.Fatal(err)
	}
	r := rand.New(rand.NewPCG(9, 17))
	const nl = 17
	g := NewOnDevice(d, Options{NoGraphs: true, NoPieces: true})
	defer g.Close()
	s := serveGLM
	var experts []backend.Expert
	for range s.experts {
		q := func(n, k int) backend.Weight {
			return mustWeight(b, g, backend.HostWeight{Name: "e", N: n, K: k, Quant: synthMatrix(r, n, k, 128)})
		}
		experts = append(experts, backend.Expert{Gate: q(s.inter, s.hidden), Up: q(s.inter, s.hidden), Down: q(s.hidden, s.inter)})
	}
	var ws []*serveLayerW
	for range nl {
		ws = append(ws, newServeLayerW(b, g, r))
	}
	fmt.Printf("serve layer: weights made and uploaded in %v\n", time.Since(t0).Round(time.Millisecond))
	for ti, T := range serveBenchRows(32, 64) {
		pool, err := g.NewCachePool(nl, 2*T, 64, s.rank, s.rope, backend.CacheBF16)
		if err != nil {
			b.Fatal(err)
		}
		ctx := make([]int, T)
		for i := range ctx {
			ctx[i] = 17 + (i*37)%64
		}
		layers := serveLayerOps(b, g, ws, experts, pool, serveDecodeStep(ctx))
		fmt.Printf("serve layer T=%d: queued and warmed up at %v\n", T, time.Since(t0).Round(time.Millisecond))
		ops := layers[0]
		var names []string
		for _, op := range ops {
			names = append(names, op.op)
		}
		err = d.Do(func(c *Ctx) error {
			defer func(v, w bool) { streamPreload, streamCluster = v, w }(streamPreload, streamCluster)
			streamPreload, streamCluster = false, false
			all, err := timeLayerOps(c, layers, func(int) bool { return true })
			if err != nil {
				return err
			}
			var noPDL float64
			if err := withPDL(c, false, func() error {
				var err error
				noPDL, err = timeLayerOps(c, layers, func(int) bool { return true })
				return err
			}); err != nil {
				return err
			}
			fmt.Printf("serve layer T=%d: %d ops a layer %q: %.2f us a layer (programmatic launch off: %.2f)\n", T, len(ops), names, all, noPDL)
			defer func(v int) { routerRows = v }(routerRows)
			for round := 0; round < 2; round++ {
				for _, v := range []struct {
					pre, cl bool
					rr      int
				}{{false, false, 1}, {true, false, 1}, {false, true, 1}, {true, true, 1}, {true, true, 2}} {
					streamPreload, streamCluster, routerRows = v.pre, v.cl, v.rr
					us, err := timeLayerOps(c, layers, func(int) bool { return true })
					if err != nil {
						return err
					}
					fmt.Printf("serve layer T=%d: round %d: products' weights before the wait %v, K splits in a cluster %v, router rows a cluster %d: %.2f us a layer\n", T, round, v.pre, v.cl, v.rr, us)
				}
			}
			streamPreload, streamCluster, routerRows = false, false, 1
			if ti > 0 {
				return nil // the ops one by one at the first row count only
			}
			prev := 0.0
			for j := range ops {
				alone, err := timeLayerOps(c, layers, func(k int) bool { return k == j })
				if err != nil {
					return err
				}
				prefix, err := timeLayerOps(c, layers, func(k int) bool { return k <= j })
				if err != nil {
					return err
				}
				without, err := timeLayerOps(c, layers, func(k int) bool { return k != j })
				if err != nil {
					return err
				}
				streamPreload, streamCluster, routerRows = true, true, 2
				aloneNew, err := timeLayerOps(c, layers, func(k int) bool { return k == j })
				streamPreload, streamCluster, routerRows = false, false, 1
				if err != nil {
					return err
				}
				fmt.Printf("serve layer T=%d op %2d %-28s alone %6.2f (new forms %6.2f)  prefix %6.2f (+%5.2f)  layer without it %6.2f (-%5.2f) us\n",
					T, j, ops[j].op, alone, aloneNew, prefix, prefix-prev, without, all-without)
				prev = prefix
			}
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
		if err := g.Sync(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkServeAttentionFew times one layer's attention of decode steps
// of 4-20 rows of short contexts: blocks of 8 heads with one split (the
// default, rowsOneSplit) against all heads a block over splits of the
// positions merged at a barrier (the default before).
func BenchmarkServeAttentionFew(b *testing.B) {
	d := benchDevice(b)
	for _, T := range serveBenchRows(4, 8, 16, 20) {
		for _, n := range []int{48, 80, 128} {
			if n == 128 && T%8 != 0 {
				continue
			}
			for _, one := range []bool{false, true} {
				b.Run(fmt.Sprintf("rows%d_ctx%d/onesplit_%v", T, n, one), func(b *testing.B) {
					serveAttnBench(b, d, servePromptStep(slices.Repeat([]int{n - 1}, T), 0, 0), func(g *Backend) {
						if !one {
							g.decodeMerge = mergeInKernel
						}
					})
				})
			}
		}
	}
}

// The products of a serving step with every weight of a block loaded
// before the wait (mmsp_*, mmsqp_*, 9-32 rows: o_proj, q_b, the q_a/kv_a
// pair, the value expansion with its int8 form and o_proj after it), with
// the K splits of o_proj and the pair added in a cluster (mmsc_*), and
// with both (mmspc_*), match the CPU backend and equal the mms_*/mmsq_*
// kernels' bit for bit, at 9-64 rows.
func TestBackendStreamPreloadMatchesCPU(t *testing.T) {
	r := testRand(t)
	g, c := testBackends(t, Options{})
	defer func(v, w bool) { streamPreload, streamCluster = v, w }(streamPreload, streamCluster)
	s := serveGLM
	sh := s.mla
	hosts := map[string]backend.HostWeight{}
	for name, nk := range map[string][2]int{"q_a": {s.qa, s.hidden}, "kv_a": {s.rank + s.rope, s.hidden}, "q_b": {s.heads * (s.nope + s.rope), s.qa},
		"uv": {s.heads * s.vdim, s.rank}, "o": {s.hidden, s.heads * s.vdim}} {
		hosts[name] = quantHost(t, r, name, nk[0], nk[1], 128)
	}
	type ws struct{ qa, kva, qb, uv, o backend.Weight }
	weights := map[backend.Backend]*ws{}
	for _, b := range []backend.Backend{g, c} {
		weights[b] = &ws{mustWeight(t, b, hosts["q_a"]), mustWeight(t, b, hosts["kv_a"]), mustWeight(t, b, hosts["q_b"]), mustWeight(t, b, hosts["uv"]), mustWeight(t, b, hosts["o"])}
	}
	sms, optin := g.dev.Info().SMs, g.dev.Info().SharedOptin
	streamPreload = true
	for _, T := range []int{9, 17, 32, 64} {
		// The plans these shapes take at T rows load at most MMSP_GROUPS
		// groups a block.
		for _, nk := range [][3]int{{s.qa + s.rank + s.rope + 64, s.hidden, 1}, {s.heads * (s.nope + s.rope), s.qa, 1}, {s.hidden, s.heads * s.vdim, 1}, {s.vdim, s.rank, s.heads}} {
			p := PlanStream(nk[0], nk[1], nk[2], T, sms, optin)
			if wt := streamTiles(T); wt >= 2 && p.D == 4 {
				p.D = 2
			}
			if pre := streamName("mms", nk[1], streamTiles(T), p) == "mmsp"; pre != (T <= 32) {
				t.Fatalf("%dx%d at %d rows (plan %+v): preloading kernel %v", nk[0], nk[1], T, p, pre)
			}
			streamCluster = true
			if cl := streamClusterFits(streamTiles(T), p); cl != (nk[0] == s.hidden || nk[1] == s.hidden) {
				t.Fatalf("%dx%d at %d rows (plan %+v): cluster %v", nk[0], nk[1], T, p, cl)
			}
		}
		xh, xq := randVec(r, T*s.hidden, 1), randVec(r, T*s.qa, 1)
		xl := randVec(r, T*sh.Heads*sh.Rank, 1)
		op := func(b backend.Backend) []float32 {
			w := weights[b]
			b.SetBatch(simpleBatch(T, 0), nil)
			h, qn, ol := b.NewTensor(T, s.hidden), b.NewTensor(T, s.qa), b.NewTensor(T, sh.Heads*sh.Rank)
			qa, kv, q := b.NewTensor(T, s.qa), b.NewTensor(T, s.rank+s.rope), b.NewTensor(T, s.heads*(s.nope+s.rope))
			v, o := b.NewTensor(T, sh.Heads*sh.VDim), b.NewTensor(T, s.hidden)
			b.Upload(h, xh)
			b.Upload(qn, xq)
			b.Upload(ol, xl)
			b.MatMul(qa, h, w.qa)
			b.MatMul(kv, h, w.kva)
			b.MatMul(q, qn, w.qb)
			b.ExpandValues(v, ol, w.uv, sh)
			b.MatMul(o, v, w.o)
			var out []float32
			for _, x := range []backend.Tensor{qa, kv, q, v, o} {
				out = append(out, b.Download(x)...)
			}
			return out
		}
		streamPreload, streamCluster = false, false
		want := op(g)
		for _, v := range [][2]bool{{true, false}, {false, true}, {true, true}} {
			streamPreload, streamCluster = v[0], v[1]
			name := fmt.Sprintf("products T=%d, weights before the wait %v, K splits in a cluster %v", T, v[0], v[1])
			pairs := g.streamPairs
			compareOp(t, g, c, name, 1e-5, op)
			if g.streamPairs == pairs {
				t.Errorf("%s: q_a and kv_a did not share a launch", name)
			}
			mustSameBits(t, name, op(g), want)
			t.Logf("%s: as the CPU, and bit for bit mms_*/mmsq_*", name)
		}
	}
}
