//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
)

// quantForm reads back the int8 form (codes, scales, sums) the backend
// remembers for x in groups of G, or nil.
func quantForm(t *testing.T, g *Backend, x backend.Tensor, G int) []byte {
	t.Helper()
	for _, e := range g.quantized {
		if e.src == *asTensor(x) && e.a.G == G {
			a := e.a
			q, s, sums := make([]byte, a.T*a.K), make([]byte, 4*a.T*a.K/a.G), make([]byte, 4*a.T*a.K/32)
			g.now("read int8 form", func(c *Ctx) error {
				if err := CopyOut(c, q, a.Q); err != nil {
					return err
				}
				if err := CopyOut(c, s, a.Scales); err != nil {
					return err
				}
				return CopyOut(c, sums, a.Sums)
			})
			return append(append(q, s...), sums...)
		}
	}
	return nil
}

// The shared launches of a single-token decode layer (chain.go) compute
// what the separate launches compute, bit for bit: q_a and kv_a of one
// input, the q_a norm and the latent's norm around q_b, the RoPEs and
// cache write with the absorbed query (also the cache's bytes, bf16, f32,
// fp8 and fp4; the separate launches write it apart from the RoPEs), and
// all of those in one launch where the q_a norm has an output of its own
// (norm_qb_absorb_192, in a step after the first), the value expansion
// with the int8 form of its output in o_proj's groups (also those int8
// forms' bytes), at GLM-4.7-Flash's attention shapes with groups of 128
// and of 32 and 64, and at a shape whose norms are not paired
// (rmsnorm_quant8 does not take 352 or 96 columns), nor where q_b
// quantizes its input again (groups of 32, the norms' of 128).
func TestChainLaunchesMatchSeparate(t *testing.T) {
	for _, c := range []struct {
		hidden, qRank, heads, nope, rank, vdim int
		G, uvG, oG                             int
		dtype                                  backend.CacheDType
		merges                                 [8]int // pairs, values, norms, absorbed queries with the RoPE, routers with their norm, norms with their product, adds and norms with their products, norms and q_b with the absorbed query (and the RoPE: not counted as the fourth)
		inPlace                                bool   // the q_a norm written over its input (no norm with its product)
	}{
		{2048, 768, 20, 192, 512, 256, 128, 128, 128, backend.CacheBF16, [8]int{1, 1, 1, 0, 0, 1, 1, 1}, false},
		{2048, 768, 20, 192, 512, 256, 128, 128, 128, backend.CacheBF16, [8]int{1, 1, 1, 1, 0, 0, 1, 0}, true},
		{2048, 768, 20, 128, 512, 256, 32, 64, 32, backend.CacheF32, [8]int{1, 1, 0, 1, 0, 0, 0, 0}, false}, // q_b quantizes the q_a norm again: no pair of norms
		{2048, 768, 20, 192, 512, 256, 128, 32, 64, backend.CacheBF16, [8]int{1, 1, 1, 0, 0, 1, 1, 1}, false},
		{2048, 768, 20, 192, 512, 256, 128, 128, 128, backend.CacheF32, [8]int{1, 1, 1, 0, 0, 1, 1, 1}, false},
		{1056, 352, 3, 128, 96, 32, 32, 32, 32, backend.CacheBF16, [8]int{1, 1, 0, 0, 0, 0, 0, 0}, false}, // rank 96: no tensor-core absorbed query
		{2048, 768, 20, 192, 512, 256, 128, 128, 128, backend.CacheFP8, [8]int{1, 1, 1, 0, 0, 1, 1, 1}, false},
		{2048, 768, 20, 192, 512, 256, 128, 128, 128, backend.CacheFP4, [8]int{1, 1, 1, 0, 0, 1, 1, 1}, false},
		{2048, 768, 20, 192, 512, 256, 128, 128, 128, backend.CacheFP8, [8]int{1, 1, 1, 1, 0, 0, 1, 0}, true},
		{2048, 768, 20, 192, 512, 256, 128, 128, 128, backend.CacheFP4, [8]int{1, 1, 1, 1, 0, 0, 1, 0}, true},
		{2048, 768, 20, 128, 512, 256, 32, 64, 32, backend.CacheFP8, [8]int{1, 1, 0, 1, 0, 0, 0, 0}, false},
		{2048, 768, 20, 128, 512, 256, 32, 64, 32, backend.CacheFP4, [8]int{1, 1, 0, 1, 0, 0, 0, 0}, false},
		{1056, 352, 3, 128, 96, 32, 32, 32, 32, backend.CacheFP8, [8]int{1, 1, 0, 0, 0, 0, 0, 0}, false},
		{1056, 352, 3, 128, 96, 32, 32, 32, 32, backend.CacheFP4, [8]int{1, 1, 0, 0, 0, 0, 0, 0}, false},
	} {
		t.Run(fmt.Sprintf("hidden%d_nope%d_G%d_uv%d_o%d_inplace%v_%v", c.hidden, c.nope, c.G, c.uvG, c.oG, c.inPlace, c.dtype), func(t *testing.T) {
			const pos = 37
			run := func(o Options) (map[string][]float32, map[string][]byte, *Backend) {
				// The separate launches: the RoPEs and cache write apart too.
				defer func(v bool) { ropeCacheOff = v }(ropeCacheOff)
				ropeCacheOff = o.SeparateChain
				g, _ := testBackends(t, o)
				r := rand.New(rand.NewPCG(41, uint64(c.hidden+c.G+c.uvG+c.oG)))
				qh := func(name string, n, k, G int) backend.Weight { return mustWeight(t, g, quantHost(t, r, name, n, k, G)) }
				vec := func(name string, k int) backend.Weight {
					return mustWeight(t, g, backend.HostWeight{Name: name, N: 1, K: k, Dense: randVec(r, k, 1)})
				}
				qa, kva, qb := qh("q_a", c.qRank, c.hidden, c.G), qh("kv_a", c.rank+64, c.hidden, c.G), qh("q_b", c.heads*(c.nope+64), c.qRank, c.G)
				uv, ow := qh("uv", c.heads*c.vdim, c.rank, c.uvG), qh("o", c.hidden, c.heads*c.vdim, c.oG)
				uk := qh("uk", c.heads*c.nope, c.rank, c.G)
				qaNorm, kvNorm := vec("qa_norm", c.qRank), vec("kv_norm", c.rank)
				pool, err := g.NewCachePool(1, 4, 16, c.rank, 64, c.dtype)
				if err != nil {
					t.Fatal(err)
				}
				tensor := func(cols int, scale float64) backend.Tensor {
					x := g.NewTensor(1, cols)
					g.Upload(x, randVec(r, cols, scale))
					return x
				}
				// A step before, so that the RoPE table's buffer exists and
				// this step's table is uploaded between the layer's launches,
				// as in a model's steps after the first.
				g.SetBatch(simpleBatch(1, pos-1), pool)
				g.RoPE(g.NewTensor(1, 64), 1, 64, 0, 64, 1e6, true)
				if err := g.Sync(); err != nil {
					t.Fatal(err)
				}
				g.SetBatch(simpleBatch(1, pos), pool)
				x, f, olat := tensor(c.hidden, 1), tensor(c.hidden, 1), tensor(c.heads*c.rank, 0.3)
				inNorm := vec("input_norm", c.hidden)
				h := g.NewTensor(1, c.hidden)
				qaOut, kv, q := g.NewTensor(1, c.qRank), g.NewTensor(1, c.rank+64), g.NewTensor(1, c.heads*(c.nope+64))
				latent, v, out := g.NewTensor(1, c.rank), g.NewTensor(1, c.heads*c.vdim), g.NewTensor(1, c.hidden)
				qlat := g.NewTensor(1, c.heads*c.rank)
				sh := backend.MLAShape{Heads: c.heads, NopeDim: c.nope, RopeDim: 64, Rank: c.rank, VDim: c.vdim}
				// The decode layer's order (glm4moelite.Model.attention,
				// after the residual add and input norm).
				g.Add(x, x, f)
				g.RMSNorm(h, x, inNorm, 1e-6)
				g.MatMul(qaOut, h, qa)
				g.MatMul(kv, h, kva)
				qaN := g.NewTensor(1, c.qRank)
				if c.inPlace {
					qaN = qaOut
				}
				g.RMSNorm(qaN, qaOut, qaNorm, 1e-6)
				g.MatMul(q, qaN, qb)
				g.RMSNorm(latent, g.Cols(kv, 0, c.rank), kvNorm, 1e-6)
				kpe := g.Cols(kv, c.rank, c.rank+64)
				g.RoPE(q, c.heads, c.nope+64, c.nope, 64, 1e6, true)
				g.RoPE(kpe, 1, 64, 0, 64, 1e6, true)
				g.CacheWrite(0, latent, kpe)
				g.AbsorbQuery(qlat, q, uk, sh)
				g.ExpandValues(v, olat, uv, sh)
				g.MatMul(out, v, ow)
				got := map[string][]float32{}
				for name, x := range map[string]backend.Tensor{"x": x, "h": h, "qa": qaOut, "qa norm": qaN, "kv": kv, "q": q, "latent": latent, "qlat": qlat, "v": v, "out": out} {
					got[name] = g.Download(x)
				}
				forms := map[string][]byte{
					"qa norm": quantForm(t, g, qaN, groupFor(c.qRank)), "h": quantForm(t, g, h, groupFor(c.hidden)), "latent": quantForm(t, g, latent, groupFor(c.rank)), "v": quantForm(t, g, v, c.oG),
					"cache": poolLayer(t, g, pool, 0),
				}
				if err := g.Sync(); err != nil {
					t.Fatal(err)
				}
				return got, forms, g
			}
			want, wantForms, gs := run(Options{SeparateChain: true})
			got, gotForms, g := run(Options{})
			if g.chainMerges != c.merges {
				t.Errorf("merged launches %v (pairs, values, norms, absorbed queries with the RoPE, routers with their norm, norms with their product, adds and norms with their products, norms and q_b with the absorbed query), want %v", g.chainMerges, c.merges)
			}
			if g.ropeCaches != 1 || gs.ropeCaches != 0 {
				t.Errorf("RoPEs in the cache write: %d shared, %d separate; want 1, 0", g.ropeCaches, gs.ropeCaches)
			}
			checkRecords(t, "cache", wantForms["cache"], slotBytesOf(c.dtype, c.rank, 64), 1)
			sameOutputs(t, "shared", got, want, gotForms, wantForms)
		})
	}
}

// Decode steps of the MMFP4 fixture give the same logits with the shared
// launches as without (and without the RoPEs and cache write in one
// launch), bit for bit, over f32, fp8 and fp4 caches (its q_a/kv_a pairs,
// value expansions and RoPEs with the cache write; its 128-column norms are
// not paired, and its 32 nope columns take the CUDA-core absorbed query,
// which has no RoPE form).
func TestChainDecodeMatchesSeparate(t *testing.T) {
	dir := quantizedFixture(t)
	ref := loadGolden(t)
	const steps = 24
	for _, dt := range []backend.CacheDType{backend.CacheF32, backend.CacheFP8, backend.CacheFP4} {
		t.Run(dt.String(), func(t *testing.T) {
			decode := func(o Options) ([]float32, *Backend) {
				defer func(v bool) { ropeCacheOff = v }(ropeCacheOff)
				ropeCacheOff = o.SeparateChain
				g, _ := testBackends(t, o)
				return greedyLogits(t, loadOn(t, dir, g), ref.prompt, steps, dt), g
			}
			want, gs := decode(Options{SeparateChain: true})
			got, g := decode(Options{})
			t.Logf("merged launches (pairs, values, norms, absorbed queries with the RoPE): %v, RoPEs in the cache write: %d", g.chainMerges, g.ropeCaches)
			if g.chainMerges[chainPair] == 0 || g.chainMerges[chainValues] == 0 || g.ropeCaches == 0 || gs.ropeCaches != 0 {
				t.Errorf("merged launches %v, RoPEs in the cache write %d (separate %d): want pairs, values and RoPEs", g.chainMerges, g.ropeCaches, gs.ropeCaches)
			}
			for i := range want {
				if got[i] != want[i] {
					t.Fatalf("logit %d (step %d): %v shared, %v separate", i, i/(len(want)/(steps+1)), got[i], want[i])
				}
			}
		})
	}
}

// chainBufs adds to pdlBufs what the latent's half of the chain needs: the
// latent row and its int8 form, its norm's gain, one layer of a cache (bf16
// unless dtype, the kernels' code, says otherwise; room for 8 bf16 slots)
// with the row's slot, and a RoPE table.
type chainBufs struct {
	*pdlBufs
	lat, latGain, cache, slots, table uint64
	dtype                             int
	qan                               uint64 // the q_a norm's output
	counter                           uint64 // add_norm_gemv_pair's ticket word
	latq                              *QActs
}

const chainSlot = 5

func newChainBufs(c *Ctx, r *rand.Rand, s pdlShape) (*chainBufs, error) {
	pb, err := newPDLBufs(c, r, s)
	if err != nil {
		return nil, err
	}
	b := &chainBufs{pdlBufs: pb}
	tb := &testBufs{c: c}
	up := tb.up
	b.lat, b.latGain, b.table = up(make([]float32, s.rank)), up(randVec(r, s.rank, 1)), up(randVec(r, s.rope, 1))
	b.qan = up(make([]float32, s.qRank))
	counter, err := c.Alloc(256)
	tb.errs = append(tb.errs, err, c.Memset(counter.Ptr, 0, counter.Size))
	b.counter = counter.Ptr
	cache, err := c.Alloc(2 * (s.rank + s.rope) * 8)
	tb.errs = append(tb.errs, err, c.Memset(cache.Ptr, 0, cache.Size))
	b.cache = cache.Ptr
	slots, err := c.Alloc(4)
	tb.errs = append(tb.errs, err, CopyIn(c, slots.Ptr, []int32{chainSlot}))
	b.slots = slots.Ptr
	b.latq, err = c.NewQActs(1, s.rank, s.G)
	tb.errs = append(tb.errs, err)
	return b, errors.Join(tb.errs...)
}

// queueChain launches the attention half of one decode layer as the
// backend's batch-1 path does, with the launches of chain.go shared where
// merged has bit 1<<kind (chainPair, ...) set, else apart: the residual
// add and norm, q_a and kv_a, the q_a norm, q_b, the latent's norm, the
// RoPEs and cache write, the absorbed query, the quantization of the
// (stand-in) attention output, the value expansion, the quantization of v
// and o_proj. 12 launches all apart (14 over an fp8 or fp4 cache, whose
// RoPEs and cache write the backend launched apart before), 8 all shared.
func (b *chainBufs) queueChain(c *Ctx, l *pdlLayer, merged int) error {
	s := b.s
	const eps = 1e-5
	on := func(kind int) bool { return merged&(1<<kind) != 0 }
	qRows := s.heads * (s.nope + s.rope)
	kpe := b.kv + 4*uint64(s.rank)
	shared := absorbTCShared(s.nope)
	name := fmt.Sprintf("absorb_query_tc_%d", s.nope)
	if on(chainRope) {
		name = fmt.Sprintf("absorb_query_tc_rope_%d", s.nope)
	}
	absorb, err := c.kernelShared("absorb", name, shared)
	if err != nil {
		return err
	}
	grid := Dim{uint32(s.rank / absorbTCN), 1, uint32(s.heads)}
	absorbArgs := []any{b.qlat, s.heads * s.rank, b.q, qRows, l.uk.Codes, l.uk.Scales, l.uk.RowScale, s.G, s.rank, s.rope, 1}
	ropeArgs := []any{b.q, qRows, s.heads, s.nope + s.rope, s.nope, kpe, s.kvRows, 1, s.rope, 0, s.rope, 1, b.table}
	qaNorm := norm8{x: b.qa, out: b.qan, gain: l.g2, eps: eps, q: b.qaq}
	latNorm := norm8{x: b.kv, out: b.lat, gain: b.latGain, eps: eps, q: b.latq}
	norm := func(n norm8) error {
		return c.RMSNormQuant8(n.x, n.q.K, 0, 0, 0, 0, 0, 0, n.gain, n.eps, n.out, n.q.K, 1, n.q.K, s.G, n.q)
	}
	var errs []error
	if on(chainAddNormGEMV) {
		in := FusedIn{Mode: fuseAddNorm, D: b.d, A: b.d, C: b.c, Gain: l.g1, Eps: eps, Out: b.h, Q: b.hq, Layout8: true}
		errs = append(errs, c.AddNormGEMVPair(in, FusedOut{l.qa, b.qa}, FusedOut{l.kva, b.kv}, b.counter))
	} else {
		errs = append(errs, c.RMSNormQuant8(0, 0, b.d, s.hidden, b.d, s.hidden, b.c, s.hidden, l.g1, eps, b.h, s.hidden, 1, s.hidden, s.G, b.hq))
	}
	switch {
	case on(chainAddNormGEMV):
	case on(chainPair):
		errs = append(errs, c.GEMVPair(b.qa, l.qa, b.kv, l.kva, b.hq))
	default:
		errs = append(errs, c.GEMV(b.qa, s.qRank, l.qa, b.hq, GEMVSplit), c.GEMV(b.kv, s.kvRows, l.kva, b.hq, GEMVSplit))
	}
	switch {
	case on(chainNormAbsorb) && on(chainNorms):
		// All in the launch of the absorbed query, below.
	case on(chainNormAbsorb):
		errs = append(errs, norm(latNorm))
	case on(chainNormGEMV) && on(chainNorms):
		errs = append(errs, c.NormGEMV(b.q, l.qb, qaNorm, latNorm))
	case on(chainNormGEMV):
		errs = append(errs, c.NormGEMV(b.q, l.qb, qaNorm, norm8{}), norm(latNorm))
	case on(chainNorms):
		errs = append(errs, c.RMSNormQuant8Pair(qaNorm, latNorm), c.GEMV(b.q, qRows, l.qb, b.qaq, GEMVSplit))
	default:
		errs = append(errs, norm(qaNorm), c.GEMV(b.q, qRows, l.qb, b.qaq, GEMVSplit), norm(latNorm))
	}
	switch {
	case on(chainNormAbsorb):
		n2 := norm8{}
		if on(chainNorms) {
			n2 = latNorm
		}
		sh := backend.MLAShape{Heads: s.heads, NopeDim: s.nope, RopeDim: s.rope, Rank: s.rank, VDim: s.vDim}
		errs = append(errs, c.NormQAbsorb(b.q, l.qb, qaNorm, n2, b.qlat, l.uk, sh,
			qAbsorbRope{table: b.table, il: 1, kpe: kpe, layer: b.cache, dtype: b.dtype, slots: b.slots, lat: b.lat}))
	case on(chainRope):
		grid.Z++
		args := append(append(append(absorbArgs, s.heads), ropeArgs[:1]...), ropeArgs[2:]...)
		args = append(args, b.cache, b.dtype, b.slots, b.lat, s.rank)
		errs = append(errs, c.Launch(absorb, grid, D1(256), shared, args...))
	default:
		errs = append(errs, launchRopesCache(c, b.dtype, b.q, qRows, s.heads, s.nope+s.rope, s.nope, kpe, s.kvRows, s.rope, 1, b.table,
			b.cache, b.slots, b.lat, s.rank, s.rank),
			c.Launch(absorb, grid, D1(256), shared, absorbArgs...))
	}
	errs = append(errs, c.RMSNormQuant(b.qlat, s.heads*s.rank, 0, 0, 0, 0, 1, s.heads*s.rank, s.G, b.olq))
	if on(chainValues) {
		errs = append(errs, c.GEMVHeadsQuant(b.v, l.uv, b.olq, s.heads, s.vDim, b.vq))
	} else {
		errs = append(errs, c.GEMVHeads(b.v, l.uv, b.olq, s.heads, s.vDim),
			c.RMSNormQuant(b.v, s.heads*s.vDim, 0, 0, 0, 0, 1, s.heads*s.vDim, s.G, b.vq))
	}
	errs = append(errs, c.GEMV(b.c, s.hidden, l.o, b.vq, GEMVSplit))
	return errors.Join(errs...)
}

// chainAll sets every merge of queueChain.
const chainAll = 1<<chainPair | 1<<chainValues | 1<<chainNorms | 1<<chainRope

// outputs adds the latent, its int8 form and the cache to pdlBufs'.
func (b *chainBufs) outputs(c *Ctx) (map[string][]byte, error) {
	out, err := b.pdlBufs.outputs(c)
	if err != nil {
		return nil, err
	}
	s := b.s
	for name, v := range map[string]struct {
		p uint64
		n int
	}{"qan": {b.qan, 4 * s.qRank}, "lat": {b.lat, 4 * s.rank}, "latq.q": {b.latq.Q, s.rank}, "latq.s": {b.latq.Scales, 4 * s.rank / s.G}, "latq.sum": {b.latq.Sums, 4 * s.rank / 32},
		"cache": {b.cache, 2 * (s.rank + s.rope) * 8}} {
		buf := make([]byte, v.n)
		if err := CopyOut(c, buf, v.p); err != nil {
			return nil, err
		}
		out[name] = buf
	}
	return out, nil
}

// The attention half of three decode layers at GLM-4.7-Flash's shapes with
// the launches of chain.go shared gives the bytes of the separate launches
// (every float row, int8 form and the cache: bf16, fp8 and fp4, the
// record at its slot only), replayed from a graph with programmatic
// dependent launch (where the device has it) and launched one by one
// without.
func TestChainLayerMatchesSeparate(t *testing.T) {
	d := testDevice(t)
	r := testRand(t)
	const layers = 3
	err := d.Do(func(c *Ctx) error {
		b, err := newChainBufs(c, r, glmShape)
		if err != nil {
			return err
		}
		ls, err := newPDLLayers(c, r, glmShape, layers)
		if err != nil {
			return err
		}
		seed := r.Uint64()
		run := func(merged int, graphed bool) (map[string][]byte, error) {
			if err := errors.Join(b.reset(c, rand.New(rand.NewPCG(seed, 3))), c.Memset(b.cache, 0, 2*(glmShape.rank+glmShape.rope)*8),
				poison(c, b.lat, 4*glmShape.rank), poison(c, b.v, 4*glmShape.heads*glmShape.vDim), poison(c, b.vq.Q, glmShape.heads*glmShape.vDim)); err != nil {
				return nil, err
			}
			chain := func() error {
				for _, l := range ls {
					if err := b.queueChain(c, l, merged); err != nil {
						return err
					}
				}
				return nil
			}
			if !graphed {
				if err := withPDL(c, false, chain); err != nil {
					return nil, err
				}
				return b.outputs(c)
			}
			var g *graph
			var release func()
			if err := withPDL(c, c.Info().CC >= 90, func() error {
				var err error
				g, release, err = capturedPDL(c, chain)
				return err
			}); err != nil {
				return nil, err
			}
			defer release()
			if err := errors.Join(b.reset(c, rand.New(rand.NewPCG(seed, 3))), c.Memset(b.cache, 0, 2*(glmShape.rank+glmShape.rope)*8)); err != nil {
				return nil, err
			}
			if err := check("cuGraphLaunch", drv.cuGraphLaunch(g.exec, c.stream)); err != nil {
				return nil, err
			}
			return b.outputs(c)
		}
		for _, dt := range []backend.CacheDType{backend.CacheBF16, backend.CacheFP8, backend.CacheFP4} {
			b.dtype = cacheDTypeCode(dt)
			want, err := run(0, false)
			if err != nil {
				return err
			}
			for _, graphed := range []bool{false, true} {
				for _, merged := range []int{chainAll, chainAll | 1<<chainNormGEMV, chainAll&^(1<<chainNorms) | 1<<chainNormGEMV, chainAll | 1<<chainAddNormGEMV,
					chainAll | 1<<chainNormGEMV | 1<<chainAddNormGEMV, chainAll&^(1<<chainNorms) | 1<<chainNormGEMV | 1<<chainAddNormGEMV,
					chainAll | 1<<chainNormAbsorb | 1<<chainAddNormGEMV, chainAll&^(1<<chainNorms) | 1<<chainNormAbsorb | 1<<chainAddNormGEMV} {
					got, err := run(merged, graphed)
					if err != nil {
						return err
					}
					for name, w := range want {
						if j := firstDiff(w, got[name]); j >= 0 {
							t.Errorf("%v cache: %s, shared launches %08b (graph %v): byte %d of %d differs from the separate launches", dt, name, merged, graphed, j, len(w))
						}
					}
				}
			}
			checkRecords(t, fmt.Sprintf("%v cache", dt), want["cache"], slotBytesOf(dt, glmShape.rank, glmShape.rope), 1)
		}
		return c.Sync()
	})
	if err != nil {
		t.Fatal(err)
	}
}

// BenchmarkChainLayer: the attention half of a decode layer at
// GLM-4.7-Flash's shapes (the attention itself left out) over 24 layers'
// weights in turn, as 12 separate launches, with chain.go's shared
// launches of sections (5) and (6) of docs/perf.md, and with those of
// sections (7) and (10) in turn, replayed from a graph with programmatic
// dependent launch: device time per layer.
func BenchmarkChainLayer(b *testing.B) {
	benchChainLayer(b, 2, []int{0, chainAll, chainAll | 1<<chainNormGEMV, chainAll&^(1<<chainNorms) | 1<<chainNormGEMV,
		chainAll | 1<<chainAddNormGEMV, chainAll | 1<<chainNormGEMV | 1<<chainAddNormGEMV, chainAll&^(1<<chainNorms) | 1<<chainNormGEMV | 1<<chainAddNormGEMV,
		chainAll | 1<<chainNormAbsorb | 1<<chainAddNormGEMV, chainAll&^(1<<chainNorms) | 1<<chainNormAbsorb | 1<<chainAddNormGEMV})
}

// BenchmarkChainLayerAbsorb: BenchmarkChainLayer's default merges with q_b
// and its norms in their own launch and in the absorbed query's
// (chainNormAbsorb, the latent's norm beside or apart), in turns.
func BenchmarkChainLayerAbsorb(b *testing.B) {
	benchChainLayer(b, 4, []int{chainAll | 1<<chainNormGEMV | 1<<chainAddNormGEMV, chainAll | 1<<chainNormAbsorb | 1<<chainAddNormGEMV,
		chainAll&^(1<<chainNorms) | 1<<chainNormAbsorb | 1<<chainAddNormGEMV})
}

func benchChainLayer(b *testing.B, rounds int, variants []int) {
	d := benchDevice(b)
	r := rand.New(rand.NewPCG(9, 11))
	const layers = 24
	err := d.Do(func(c *Ctx) error {
		bufs, err := newChainBufs(c, r, glmShape)
		if err != nil {
			return err
		}
		ls, err := newPDLLayers(c, r, glmShape, layers)
		if err != nil {
			return err
		}
		name := c.Info().Name
		for round := 0; round < rounds; round++ {
			for _, merged := range variants {
				err := withPDL(c, c.info.CC >= 90, func() error {
					g, release, err := capturedPDL(c, func() error {
						for _, l := range ls {
							if err := bufs.queueChain(c, l, merged); err != nil {
								return err
							}
						}
						return nil
					})
					if err != nil {
						return err
					}
					defer release()
					us, err := timeReplay(c, g.exec, 5)
					if err != nil {
						return err
					}
					fmt.Printf("%s: round %d: shared launches %08b (norm+q_b+absorb, add+norm+pair, norm+q_b, router, rope, norms, values, pair): %6.2f us a layer (PDL %v)\n", name, round, merged, us/layers, c.pdl)
					return nil
				})
				if err != nil {
					return err
				}
			}
		}
		return c.Sync()
	})
	if err != nil {
		b.Fatal(err)
	}
}

// moe_router_cluster_norm writes what the residual add and norm
// (rmsnorm_quant8) and the cluster router after it write, bit for bit:
// the residual sum (also in place over either input), the norm's output and
// its int8 form, the logits, experts and weights, and the MoE's int8 form
// of the norm's output in groups of 32, 64 and 128 (or none), on fresh
// random rows.
func TestRouterClusterNormMatchesSeparate(t *testing.T) {
	d := testDevice(t)
	defer d.Close()
	r := testRand(t)
	const E, K, topK = 64, 2048, 4
	if d.Info().CC < 90 {
		t.Skipf("the cluster router needs compute capability 9.0, the device has %d", d.Info().CC)
	}
	err := d.Do(func(c *Ctx) error {
		W, e1 := upload(c, randVec(r, E*K, 0.02))
		bias, e2 := upload(c, randVec(r, E, 0.05))
		gain, e3 := upload(c, randVec(r, K, 1))
		counters, e4 := c.Alloc(4 * 64)
		if err := errors.Join(e1, e2, e3, e4, c.Memset(counters.Ptr, 0, counters.Size)); err != nil {
			return err
		}
		read := func(p uint64, n int) []byte { return readBytes(t, c, p, n) }
		form := func(a *QActs) []byte {
			if a == nil {
				return nil
			}
			return append(append(read(a.Q, K), read(a.Scales, 4*K/a.G)...), read(a.Sums, 4*K/32)...)
		}
		// Experts 3, 10 and 40 with the same router row (large, so that
		// they win) and bias: ties in the ranking.
		wt, bt := randVec(r, E*K, 0.02), randVec(r, E, 0.05)
		for _, e := range []int{3, 10, 40} {
			for k := range K {
				wt[e*K+k] = 5 * wt[7*K+k]
			}
			bt[e] = 0.125
		}
		Wt, e5 := upload(c, wt)
		biasT, e6 := upload(c, bt)
		if err := errors.Join(e5, e6); err != nil {
			return err
		}
		for trial, v := range []struct {
			nG, qG int
			alias  int // 0: d apart, 1: d is a, 2: d is c
			tie    bool
		}{{128, 32, 0, false}, {128, 0, 1, false}, {64, 128, 2, false}, {32, 64, 0, false}, {128, 128, 1, false}, {128, 0, 1, true}} {
			W, bias := W, bias
			if v.tie {
				W, bias = Wt, biasT
			}
			av, cv := randVec(r, K, 1), randVec(r, K, 0.5)
			// run queues the pair of launches (fused false) or the one, and
			// reads back every output.
			run := func(fused bool) map[string][]byte {
				ab, e1 := upload(c, av)
				cb, e2 := upload(c, cv)
				db, e3 := c.Alloc(4 * K)
				hb, e4 := c.Alloc(4 * K)
				lg, e5 := c.Alloc(4 * E)
				ids, e6 := c.Alloc(4 * topK)
				wts, e7 := c.Alloc(4 * topK)
				nq, e8 := c.NewQActs(1, K, v.nG)
				if err := errors.Join(e1, e2, e3, e4, e5, e6, e7, e8); err != nil {
					t.Fatal(err)
				}
				var q *QActs
				if v.qG != 0 {
					var err error
					if q, err = c.NewQActs(1, K, v.qG); err != nil {
						t.Fatal(err)
					}
				}
				dp := []uint64{db.Ptr, ab.Ptr, cb.Ptr}[v.alias]
				var err error
				if fused {
					in := FusedIn{Mode: fuseAddNorm, D: dp, A: ab.Ptr, C: cb.Ptr, Gain: gain.Ptr, Eps: 1e-5, Out: hb.Ptr, Q: nq, Layout8: true}
					err = c.RouterClusterNorm(W.Ptr, K, lg.Ptr, bias.Ptr, topK, true, 1.8, ids.Ptr, wts.Ptr, q, in)
				} else {
					err = c.RMSNormQuant8(0, 0, dp, K, ab.Ptr, K, cb.Ptr, K, gain.Ptr, 1e-5, hb.Ptr, K, 1, K, v.nG, nq)
					if err == nil {
						err = c.RouterRoute(W.Ptr, E, K, hb.Ptr, K, 1, lg.Ptr, E, bias.Ptr, topK, true, 1.8, ids.Ptr, wts.Ptr, counters.Ptr, q)
					}
				}
				if err == nil {
					err = c.Sync()
				}
				if err != nil {
					t.Fatal(err)
				}
				out := map[string][]byte{"sum": read(dp, 4*K), "norm": read(hb.Ptr, 4*K), "norm int8": form(nq), "moe int8": form(q),
					"logits": read(lg.Ptr, 4*E), "ids": read(ids.Ptr, 4*topK), "wts": read(wts.Ptr, 4*topK)}
				for _, b := range []Buffer{ab, cb, db, hb, lg, ids, wts} {
					if err := c.Free(b); err != nil {
						t.Fatal(err)
					}
				}
				return out
			}
			want, got := run(false), run(true)
			for name, w := range want {
				if !bytes.Equal(got[name], w) {
					t.Errorf("trial %d (%+v): %s differs at byte %d", trial, v, name, firstDiff(got[name], w))
				}
			}
			ids := want["ids"]
			t.Logf("trial %d (%+v): experts %v, all outputs bit for bit", trial, v, ids)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// The backend queues the residual add and norm before the router in the
// router's launch (with PDL, as a decode layer runs) and gets the separate
// launches' bits: the residual, the norm, the logits, the experts and a
// product of the norm's int8 form; at a width the launch does not take
// (1056), the two stay apart.
func TestChainRouterNormMatchesSeparate(t *testing.T) {
	for _, K := range []int{2048, 1056} {
		t.Run(fmt.Sprint(K), func(t *testing.T) {
			const E, topK = 64, 4
			if cc := testDevice(t).Info().CC; cc < 90 {
				t.Skipf("the cluster router needs compute capability 9.0, the device has %d", cc)
			}
			want, wantIDs, _ := runRouterStep(t, Options{SeparateChain: true}, 23, K, E, topK)
			got, gotIDs, g := runRouterStep(t, Options{}, 23, K, E, topK)
			if n, w := g.chainMerges[chainRouterNorm], map[bool]int{true: 1}[K%256 == 0]; n != w {
				t.Errorf("%d routers with their norm, want %d", n, w)
			}
			sameRouterStep(t, "shared", got, gotIDs, want, wantIDs)
		})
	}
}

// gemv_split_t1_regs (every chunk requested before the wait) gives
// gemv_split_t1's bits, at o_proj's shape and at widths with a short last
// round of chunks, groups of 32, 64 and 128, on fresh random weights and
// activations.
func TestGEMVRegsMatchesSplit(t *testing.T) {
	d := testDevice(t)
	r := testRand(t)
	defer func() { gemvNoRegs = false }()
	err := d.Do(func(c *Ctx) error {
		for _, sh := range []struct{ N, K, G int }{{2048, 5120, 128}, {37, 5120, 32}, {130, 2080, 32}, {64, 4096, 64}, {300, 3072, 128}} {
			w, err := c.UploadMatrix(synthMatrix(r, sh.N, sh.K, sh.G))
			if err != nil {
				return err
			}
			xb, err := upload(c, randVec(r, sh.K, 1))
			if err != nil {
				return err
			}
			a, err := c.NewQActs(1, sh.K, sh.G)
			if err != nil {
				return err
			}
			y, err := c.Alloc(4 * sh.N)
			if err != nil {
				return err
			}
			if err := c.RMSNormQuant(xb.Ptr, sh.K, 0, 0, 0, 0, 1, sh.K, sh.G, a); err != nil {
				return err
			}
			run := func(old bool) ([]float32, error) {
				gemvNoRegs = old
				if err := poison(c, y.Ptr, 4*sh.N); err != nil {
					return nil, err
				}
				if err := c.GEMV(y.Ptr, sh.N, w, a, GEMVSplit); err != nil {
					return nil, err
				}
				out := make([]float32, sh.N)
				return out, CopyOut(c, out, y.Ptr)
			}
			want, err := run(true)
			if err != nil {
				return err
			}
			got, err := run(false)
			if err != nil {
				return err
			}
			if i := sameBits(want, got); i >= 0 {
				t.Errorf("%dx%d G=%d: row %d: %v, gemv_split_t1 %v", sh.N, sh.K, sh.G, i, got[i], want[i])
			}
			if nonzero := nonzeroCount(got); nonzero < sh.N/2 {
				t.Errorf("%dx%d G=%d: %d of %d rows nonzero", sh.N, sh.K, sh.G, nonzero, sh.N)
			}
		}
		return c.Sync()
	})
	if err != nil {
		t.Fatal(err)
	}
}

// sameOutputs fails t unless got holds want's outputs bit for bit (each with
// at least half of its values nonzero, so that a kernel writing nothing
// cannot pass) and gotForms want's byte forms; how names the merged run
// in the messages.
func sameOutputs(t *testing.T, how string, got, want map[string][]float32, gotForms, wantForms map[string][]byte) {
	t.Helper()
	for name, w := range want {
		nonzero := 0
		for i := range w {
			if got[name][i] != w[i] {
				t.Fatalf("%s[%d] = %v %s, %v separate", name, i, got[name][i], how, w[i])
			}
			if w[i] != 0 {
				nonzero++
			}
		}
		if nonzero < len(w)/2 {
			t.Errorf("%s: %d of %d values nonzero", name, nonzero, len(w))
		}
	}
	for name, w := range wantForms {
		if w == nil || gotForms[name] == nil {
			t.Fatalf("%s: no bytes (separate %v, %s %v)", name, w != nil, how, gotForms[name] != nil)
		}
		if !bytes.Equal(gotForms[name], w) {
			t.Fatalf("%s: bytes differ at %d of %d", name, firstDiff(gotForms[name], w), len(w))
		}
	}
}

// againstSeparate runs run(false) (the separate launches) and run(true)
// (the merged launch), fails t where their named outputs differ (how
// prefixes the messages) and returns the separate launches' outputs.
func againstSeparate(t testing.TB, how string, run func(merged bool) (map[string][]byte, error)) (map[string][]byte, error) {
	t.Helper()
	want, err := run(false)
	if err != nil {
		return nil, err
	}
	got, err := run(true)
	if err != nil {
		return nil, err
	}
	for name, w := range want {
		if j := firstDiff(w, got[name]); j >= 0 {
			t.Errorf("%s%s: byte %d of %d differs from the separate launches", how, name, j, len(w))
		}
	}
	return want, nil
}

// readBytes copies n bytes at device address p (c's thread).
func readBytes(t testing.TB, c *Ctx, p uint64, n int) []byte {
	buf := make([]byte, n)
	if err := CopyOut(c, buf, p); err != nil {
		t.Fatal(err)
	}
	return buf
}

// qactsBytes is a's int8 form as bytes: codes, scales and sums of all rows.
func qactsBytes(t testing.TB, c *Ctx, a *QActs) []byte {
	n := a.T * a.K
	return append(append(readBytes(t, c, a.Q, n), readBytes(t, c, a.Scales, 4*n/a.G)...), readBytes(t, c, a.Sums, 4*n/32)...)
}

// add_norm_gemv_pair writes the separate launches' bits (the add and
// norm, then gemv_split_t1 of each matrix): the residual, the norm's
// output and int8 form, both products; and leaves its ticket word zero.
// Norms of 1024 and 2048 values (half the block's threads idle in the
// norm), groups of 32, 64 and 128, q_a and kv_a's rows and short matrices
// whose last block is partly empty.
func TestAddNormGEMVMatchesSeparate(t *testing.T) {
	d := testDevice(t)
	r := testRand(t)
	err := d.Do(func(c *Ctx) error {
		for _, sh := range []struct{ K, G, N1, N2 int }{{2048, 128, 768, 576}, {2048, 32, 37, 5}, {1024, 64, 300, 0}, {1024, 128, 96, 17}} {
			w1, err := c.UploadMatrix(synthMatrix(r, sh.N1, sh.K, sh.G))
			if err != nil {
				return err
			}
			var w2 *QMatrix
			if sh.N2 > 0 {
				if w2, err = c.UploadMatrix(synthMatrix(r, sh.N2, sh.K, sh.G)); err != nil {
					return err
				}
			}
			resid, moe, gain := randVec(r, sh.K, 1), randVec(r, sh.K, 0.5), randVec(r, sh.K, 1)
			bufs := make([]Buffer, 6) // residual, moe output, gain, norm output, y1, y2
			for i, n := range []int{sh.K, sh.K, sh.K, sh.K, max(sh.N1, 1), max(sh.N2, 1)} {
				if bufs[i], err = c.Alloc(4 * n); err != nil {
					return err
				}
			}
			q, err := c.NewQActs(1, sh.K, sh.G)
			if err != nil {
				return err
			}
			counter, err := c.Alloc(4)
			if err != nil {
				return err
			}
			if err := errors.Join(CopyIn(c, bufs[1].Ptr, moe), CopyIn(c, bufs[2].Ptr, gain), c.Memset(counter.Ptr, 0, 4)); err != nil {
				return err
			}
			run := func(fused bool) (map[string][]byte, error) {
				if err := errors.Join(CopyIn(c, bufs[0].Ptr, resid), poison(c, bufs[3].Ptr, 4*sh.K), poison(c, bufs[4].Ptr, 4*sh.N1),
					poison(c, bufs[5].Ptr, 4*max(sh.N2, 1)), poison(c, q.Q, sh.K)); err != nil {
					return nil, err
				}
				in := FusedIn{Mode: fuseAddNorm, D: bufs[0].Ptr, A: bufs[0].Ptr, C: bufs[1].Ptr, Gain: bufs[2].Ptr, Eps: 1e-5, Out: bufs[3].Ptr, Q: q, Layout8: true}
				if !fused {
					errs := []error{c.RMSNormQuant8(0, 0, in.D, sh.K, in.A, sh.K, in.C, sh.K, in.Gain, in.Eps, in.Out, sh.K, 1, sh.K, sh.G, q),
						c.GEMV(bufs[4].Ptr, sh.N1, w1, q, GEMVSplit)}
					if w2 != nil {
						errs = append(errs, c.GEMV(bufs[5].Ptr, sh.N2, w2, q, GEMVSplit))
					}
					if err := errors.Join(errs...); err != nil {
						return nil, err
					}
				} else {
					o2 := FusedOut{}
					if w2 != nil {
						o2 = FusedOut{w2, bufs[5].Ptr}
					}
					if err := c.AddNormGEMVPair(in, FusedOut{w1, bufs[4].Ptr}, o2, counter.Ptr); err != nil {
						return nil, err
					}
				}
				out := map[string][]byte{}
				for name, b := range map[string]struct {
					p uint64
					n int
				}{"residual": {bufs[0].Ptr, 4 * sh.K}, "norm": {bufs[3].Ptr, 4 * sh.K}, "y1": {bufs[4].Ptr, 4 * sh.N1}, "y2": {bufs[5].Ptr, 4 * sh.N2},
					"int8": {q.Q, sh.K}, "scales": {q.Scales, 4 * sh.K / sh.G}, "sums": {q.Sums, 4 * sh.K / 32}, "counter": {counter.Ptr, 4}} {
					out[name] = readBytes(t, c, b.p, b.n)
				}
				return out, nil
			}
			want, err := againstSeparate(t, fmt.Sprintf("K=%d G=%d N=%d+%d: ", sh.K, sh.G, sh.N1, sh.N2), run)
			if err != nil {
				return err
			}
			if nonzero := nonzeroCount(want["y1"]); nonzero < 2*sh.N1 {
				t.Errorf("K=%d: q_a's product has %d nonzero bytes of %d", sh.K, nonzero, 4*sh.N1)
			}
		}
		return c.Sync()
	})
	if err != nil {
		t.Fatal(err)
	}
}
