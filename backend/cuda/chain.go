//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"
	"math/bits"
	"slices"

	"github.com/mmfp4/mmfp4/backend"
)

// Fewer dependent launches in a batch-1 decode layer: at one token a
// layer's device time is mostly a chain of small launches, each waiting
// for the one before. Four pairs of ops that do not depend on each other
// share a launch, each block computing what the separate launch computes,
// bit for bit:
//   - two products of one quantized row (q_a and kv_a): GEMVPair;
//   - the value expansion and the int8 form of its output, for the product
//     that reads it (o_proj): GEMVHeadsQuant, each block owning whole
//     quantization groups of the output;
//   - two single-row norms with no dependency between them (the q_a norm
//     and the latent's norm, with q_b's product queued between them, which
//     reads neither the second norm's input nor output): RMSNormQuant8Pair;
//   - the RoPEs and cache write before the absorbed query, and the absorbed
//     query (absorb_query_tc_rope);
//   - the residual add and single-row norm before the router, and the
//     router (moe_router_cluster_norm: every block of the cluster
//     normalises the row);
//   - q_b's product with the q_a norm (and the latent's norm beside), and
//     the absorbed query with the RoPEs and cache write
//     (norm_qb_absorb_192: a cluster of 4 blocks a head shares the head's
//     q_b values through distributed shared memory).
// Options.SeparateChain turns them off.

// GEMVPair computes y1 = W1 x and y2 = W2 x for one token's quantized row a
// in one launch (gemv_split_t1's values, bit for bit).
func (c *Ctx) GEMVPair(y1 uint64, w1 *QMatrix, y2 uint64, w2 *QMatrix, a *QActs) error {
	if a.T != 1 || a.K != w1.K || a.K != w2.K || a.G != w1.G || a.G != w2.G {
		return fmt.Errorf("cuda: gemv pair: activations %dx%d G=%d, weights [%d,%d] G=%d and [%d,%d] G=%d", a.T, a.K, a.G, w1.N, w1.K, w1.G, w2.N, w2.K, w2.G)
	}
	k, err := c.Kernel("gemv", "gemv_split_pair")
	if err != nil {
		return err
	}
	nb := (w1.N+gemvRowsPerBlock-1)/gemvRowsPerBlock + (w2.N+gemvRowsPerBlock-1)/gemvRowsPerBlock
	return c.Launch(k, D1(nb), D1(128), 0, w1.Codes, w1.Scales, w1.RowScale, w1.N, y1, w2.Codes, w2.Scales, w2.RowScale, w2.N, y2,
		w1.K, bits.TrailingZeros(uint(w1.G/32)), a.Q, a.Scales, a.Sums)
}

// headsQuantMaxK bounds the columns of gemv_heads_quant's rows (16 chunks
// of 32: a half-warp a row).
const headsQuantMaxK = 512

// headsQuantOK reports whether GEMVHeadsQuant takes heads products of rows
// x k weights in groups of G whose output is quantized in groups of qg.
func headsQuantOK(heads, rows, k, G, qg int) bool {
	return k <= headsQuantMaxK && k%G == 0 && rows%gemvRowsPerWarp == 0 && (qg == 32 || qg == 64 || qg == 128) && (heads*rows)%qg == 0
}

// GEMVHeadsQuant is GEMVHeads with the int8 form of y (one row of
// heads*rows values in groups of q.G) written by the same launch, as
// RMSNormQuant without a gain would write it.
func (c *Ctx) GEMVHeadsQuant(y uint64, w *QMatrix, a *QActs, heads, rows int, q *QActs) error {
	k := w.K
	switch {
	case a.T != 1 || a.K != heads*k || a.G != w.G || w.N != heads*rows:
		return fmt.Errorf("cuda: gemv heads quant: activations %dx%d G=%d for %d heads of [%d,%d] G=%d", a.T, a.K, a.G, heads, rows, k, w.G)
	case q.T != 1 || q.K != w.N || !headsQuantOK(heads, rows, k, w.G, q.G):
		return fmt.Errorf("cuda: gemv heads quant: output form %dx%d G=%d for %d heads of %d rows of %d columns", q.T, q.K, q.G, heads, rows, k)
	}
	kern, err := c.Kernel("gemv", "gemv_heads_quant")
	if err != nil {
		return err
	}
	return c.Launch(kern, D1(w.N/q.G), D1(4*q.G), 0, w.Codes, w.Scales, w.RowScale, k, bits.TrailingZeros(uint(w.G/32)),
		a.Q, a.Scales, y, rows, q.G, q.Q, q.Scales, q.Sums)
}

// norm8 is one single-row RMSNorm of rmsnorm_quant8 without a residual
// add: out = gain * norm(x), and its int8 form q.
type norm8 struct {
	x, out uint64
	gain   uint64
	eps    float32
	q      *QActs
}

// RMSNormQuant8Pair runs two single-row norms (RMSNormQuant8 of one row
// each, with a gain and an int8 form) in one launch.
func (c *Ctx) RMSNormQuant8Pair(n1, n2 norm8) error {
	for _, n := range []norm8{n1, n2} {
		if n.q == nil || n.q.T != 1 || n.gain == 0 || !rowNorm8(n.q.K, n.q.G, []uint64{n.x, n.gain, n.out}, nil) {
			return fmt.Errorf("cuda: rmsnorm_quant8 pair: want a gain and activations of one row")
		}
	}
	k, err := c.Kernel("quant", "rmsnorm_quant8_pair")
	if err != nil {
		return err
	}
	return c.Launch(k, D1(2), D1(max(n1.q.K, n2.q.K)/8), 0,
		n1.x, n1.gain, n1.eps, n1.out, n1.q.Q, n1.q.Scales, n1.q.Sums, n1.q.K, n1.q.G,
		n2.x, n2.gain, n2.eps, n2.out, n2.q.Q, n2.q.Scales, n2.q.Sums, n2.q.K, n2.q.G)
}

// The backend's side: the ops are queued as usual and remembered; the
// next op, when it can share the launch, replaces the queued one.

// gemvOp is a single-token product queued as b.pending[idx]: y = w a.
type gemvOp struct {
	idx, flush int
	a          *QActs
	w          *QMatrix
	out        []tensor // its outputs (two once paired)
}

// valuesOp is a single-token value expansion queued as b.pending[idx].
type valuesOp struct {
	idx, flush  int
	out         tensor
	w           *QMatrix
	a           *QActs
	heads, rows int
	merge       *mergeIn // the attention's splits merged in the launch
}

// norm8Op is a single-row RMSNorm queued as b.pending[idx].
type norm8Op struct {
	idx, flush int
	n          norm8
	x, out     tensor
	paired     bool
}

// chained reports whether the batch-1 launch merges are on.
func (b *Backend) chained() bool { return !b.opts.SeparateChain }

// pairProduct queues d = w a for one token in the launch of the product
// queued just before it, when that one read the same quantized row, and
// reports whether it did.
func (b *Backend) pairProduct(d *tensor, a *QActs, w *weight) bool {
	g := b.lastGEMV
	if !b.chained() || g == nil || g.flush != b.flushes || g.idx != len(b.pending)-1 || len(g.out) != 1 || g.a != a ||
		d.rows != 1 || a.T != 1 || g.w.K != w.q.K || g.w.G != w.q.G || overlaps(d, &g.out[0]) {
		return false
	}
	w1, w2, y1, y2 := g.w, w.q, g.out[0].ptr, d.ptr
	b.pending[g.idx] = queuedOp{b.pairName(w1, w2), func(c *Ctx) error { return c.GEMVPair(y1, w1, y2, w2, a) }}
	g.out = append(g.out, *d)
	b.chainMerges[chainPair]++
	return true
}

func (b *Backend) pairName(w1, w2 *QMatrix) string {
	if b.prof == nil {
		return "matmul pair"
	}
	return fmt.Sprintf("matmul pair mmfp4 %dx%d+%dx%d", w1.N, w1.K, w2.N, w2.K)
}

// noteGEMV remembers a single-token product just queued (pairProduct).
func (b *Backend) noteGEMV(d *tensor, a *QActs, w *weight) {
	b.lastGEMV = nil
	if b.err == nil && len(b.pending) > 0 && d.rows == 1 && a.T == 1 {
		b.lastGEMV = &gemvOp{idx: len(b.pending) - 1, flush: b.flushes, a: a, w: w.q, out: []tensor{*d}}
	}
}

// valuesQuant makes the int8 form of x, in groups of w's G, in the launch
// of the value expansion queued just before, which wrote x, and reports
// whether it did (the form is then remembered for x's products).
func (b *Backend) valuesQuant(x *tensor, w *weight) bool {
	v := b.lastValues
	if !b.chained() || v == nil || v.flush != b.flushes || v.idx != len(b.pending)-1 || v.out != *x || w.q == nil ||
		!headsQuantOK(v.heads, v.rows, v.w.K, v.w.G, w.q.G) {
		return false
	}
	q := b.quantizeInto(x, w.q.G)
	if v.flush != b.flushes || v.idx != len(b.pending)-1 {
		return false // the arena grew, which flushed the queued ops
	}
	y, wv, a, heads, rows := x.ptr, v.w, v.a, v.heads, v.rows
	if m := v.merge; m != nil {
		b.pending[v.idx] = queuedOp{"attention merge+expand values+quantize", func(c *Ctx) error {
			return c.DecodeCombineValues(y, wv, heads, rows, q, q.G, m.parts, m.olat, &m.oa)
		}}
	} else {
		b.pending[v.idx] = queuedOp{"expand values+quantize", func(c *Ctx) error { return c.GEMVHeadsQuant(y, wv, a, heads, rows, q) }}
	}
	b.rememberQuant(quantEntry{*x, q})
	b.lastValues = nil
	b.chainMerges[chainValues]++
	return true
}

// noteValues remembers a single-token value expansion just queued.
func (b *Backend) noteValues(out *tensor, w *QMatrix, a *QActs, heads, rows int) {
	b.lastValues = nil
	if b.err == nil && len(b.pending) > 0 {
		b.lastValues = &valuesOp{idx: len(b.pending) - 1, flush: b.flushes, out: *out, w: w, a: a, heads: heads, rows: rows}
	}
}

// pairNorm queues the single-row norm n (of x into out) in the launch of
// the single-row norm queued before it, when only a single-token product
// that neither writes x or out nor reads out lies between them, and reports
// whether it did. The fused-product and fused-latent paths take norms
// into other launches; with them on, norms are not paired.
func (b *Backend) pairNorm(n norm8, x, out *tensor) bool {
	p := b.lastNorm8
	if !b.chained() || b.opts.FusedGEMV || b.opts.FusedLatent || p == nil || p.flush != b.flushes || p.paired {
		return false
	}
	switch len(b.pending) - 1 {
	case p.idx:
	case p.idx + 1:
		// The one op between: a product of one token, which reads only its
		// quantized row (never x or out: those are float tensors).
		g := b.lastGEMV
		if g == nil || g.flush != b.flushes || g.idx != p.idx+1 || overlapsAny(x, g.out) || overlapsAny(out, g.out) {
			return false
		}
	default:
		return false
	}
	// This norm must not read what the first writes, nor write what it
	// reads or writes.
	if overlaps(x, &p.out) || overlaps(out, &p.x) || overlaps(out, &p.out) {
		return false
	}
	n1 := p.n
	b.pending[p.idx] = queuedOp{"rmsnorm pair", func(c *Ctx) error { return c.RMSNormQuant8Pair(n1, n) }}
	p.paired = true
	b.chainMerges[chainNorms]++
	return true
}

// noteNorm8 remembers a single-row norm just queued (pairNorm).
func (b *Backend) noteNorm8(n norm8, x, out *tensor) {
	b.lastNorm8 = nil
	if b.err == nil && len(b.pending) > 0 {
		b.lastNorm8 = &norm8Op{idx: len(b.pending) - 1, flush: b.flushes, n: n, x: *x, out: *out}
	}
}

// Kinds of chainMerges.
const (
	chainPair = iota
	chainValues
	chainNorms
	chainRope
	chainRouterNorm
	chainNormGEMV
	chainAddNormGEMV
	chainNormAbsorb
)

// ropeCacheOp is a rope2_cache_write launch queued as b.pending[idx]
// (CacheWrite): RoPEs r1 (the queries') and r2 (the key's, in kpe) and the
// cache write of lat and kpe.
type ropeCacheOp struct {
	idx, flush   int
	r1, r2       ropeOp
	kpe, lat     tensor
	layer, slots uint64
	dtype        int
	rank, rope   int
}

// noteRopeCache remembers a rope2_cache_write launch just queued.
func (b *Backend) noteRopeCache(r1, r2 *ropeOp, kpe, lat *tensor, layer, slots uint64, dtype, rank, rope int) {
	b.lastRopeCache = nil
	if b.err == nil && len(b.pending) > 0 {
		b.lastRopeCache = &ropeCacheOp{idx: len(b.pending) - 1, flush: b.flushes, r1: *r1, r2: *r2, kpe: *kpe, lat: *lat,
			layer: layer, slots: slots, dtype: dtype, rank: rank, rope: rope}
	}
}

// absorbRope queues the tensor-core absorbed query of qm into ql with the
// RoPE and cache write queued just before it in one launch
// (absorb_query_tc_rope), and reports whether it did (the conditions:
// ropeCacheBefore). One row (the kernel takes up to rank/128 rows, a block
// of the extra head slice each; only one is tested).
func (b *Backend) absorbRope(ql, qm *tensor, w *QMatrix, s backend.MLAShape, grid Dim, shared int) bool {
	if !b.chained() || ql.rows != 1 {
		return false
	}
	rc := b.ropeCacheBefore(ql, qm, s, grid)
	if rc == nil {
		return false
	}
	if b.normAbsorb(rc, ql, qm, w, s) {
		return true
	}
	grid.Z++
	b.queueAbsorbRope(rc, ql, qm, w, s, fmt.Sprintf("absorb_query_tc_rope_%d", s.NopeDim), grid, shared)
	b.chainMerges[chainRope]++
	return true
}

// ropeCacheBefore returns the RoPE and cache write queued just before an
// absorbed query of qm into ql (one token tile: grid.Y == 1 and at most
// absorbTCM rows) when one launch can take the three, or nil: the RoPE
// rotates qm's columns after each head's first NopeDim (which the absorbed
// query reads), its rows are ql's, and nothing either writes overlaps what
// the other reads or writes.
func (b *Backend) ropeCacheBefore(ql, qm *tensor, s backend.MLAShape, grid Dim) *ropeCacheOp {
	rc := b.lastRopeCache
	if rc == nil || rc.flush != b.flushes || rc.idx != len(b.pending)-1 || grid.Y != 1 || ql.rows > absorbTCM {
		return nil
	}
	r1 := rc.r1
	if r1.m != *qm || rc.lat.rows != ql.rows || r1.headStride != s.NopeDim+s.RopeDim || r1.offset < s.NopeDim ||
		r1.offset+r1.dim > r1.headStride || rc.rank != s.Rank || rc.rope != s.RopeDim || overlapsAny(ql, []tensor{*qm, rc.kpe, rc.lat}) {
		return nil
	}
	return rc
}

// queueAbsorbRope replaces rc's queued launch with kernel name (an
// absorbed query whose grid's extra head slices run rc's RoPEs and cache
// write).
func (b *Backend) queueAbsorbRope(rc *ropeCacheOp, ql, qm *tensor, w *QMatrix, s backend.MLAShape, name string, grid Dim, shared int) {
	r1, r2, T := rc.r1, rc.r2, ql.rows
	b.pending[rc.idx] = queuedOp{"absorb query+rope+cache write", func(c *Ctx) error {
		k, err := c.kernelShared("absorb", name, shared)
		if err != nil {
			return err
		}
		return c.Launch(k, grid, D1(256), shared,
			ql.ptr, ql.ld, qm.ptr, qm.ld, w.Codes, w.Scales, w.RowScale, w.G, s.Rank, s.RopeDim, T, s.Heads,
			r1.m.ptr, r1.heads, r1.headStride, r1.offset, rc.kpe.ptr, rc.kpe.ld, r2.heads, r2.headStride, r2.offset, r2.dim, r2.il, r2.table,
			rc.layer, rc.dtype, rc.slots, rc.lat.ptr, rc.lat.ld)
	}}
	b.lastRopeCache = nil
}

// routerNormFits reports whether RouterClusterNorm takes a norm of K
// values in int8 groups of G before a router of E experts choosing topk:
// the cluster router's 64 experts, rmsnorm_quant8's layout (K a multiple
// of 256) and at most 2048 values.
func routerNormFits(E, K, G, topk int) bool {
	return E == routerClusterE && K%256 == 0 && K <= 2048 && (G == 32 || G == 64 || G == 128) && topk <= 32
}

// RouterClusterNorm is the single-row residual add and norm in
// (fuseAddNorm in rmsnorm_quant8's layout: what RMSNormQuant8 writes, bit
// for bit) and the
// router of its output (RouterRoute with moe_router_cluster: the logits,
// ids and weights, and with q the output's int8 form in q's groups) in one
// launch. The norm's output row is the router's input.
func (c *Ctx) RouterClusterNorm(W uint64, K int, logits, bias uint64, topk int, norm bool, scaling float32, ids, wts uint64, q *QActs, in FusedIn) error {
	nq := in.Q
	if nq == nil || nq.T != 1 || nq.K != K || in.Gain == 0 || in.Mode != fuseAddNorm || !routerNormFits(routerClusterE, K, nq.G, topk) {
		return fmt.Errorf("cuda: router with its norm: %d values, want a residual add and one row of a multiple of 256 up to 2048 with a gain", K)
	}
	var xq, xs, xsum uint64
	G := 32
	if q != nil {
		if q.T != 1 || q.K != K || (q.G != 32 && q.G != 64 && q.G != 128) {
			return fmt.Errorf("cuda: router with its norm: activations %dx%d/%d for one row of %d", q.T, q.K, q.G, K)
		}
		xq, xs, xsum, G = q.Q, q.Scales, q.Sums, q.G
	}
	n := 0
	if norm {
		n = 1
	}
	k, err := c.Kernel("moe", "moe_router_cluster_norm")
	if err != nil {
		return err
	}
	return c.Launch(k, Dim{routerClusterE / 8, 1, 1}, D1(256), 4*K, W, K, logits, bias, topk, n, scaling, ids, wts, xq, xs, xsum, G,
		in.D, in.A, in.C, in.Gain, in.Eps, in.Out, nq.Q, nq.Scales, nq.Sums, nq.G)
}

// routerNormCall returns the router launch ld's product and the choice
// would make, with the single-row residual add and norm queued just before
// it (which made its input) in the same launch, and removes that norm's op from the
// queue; ok is false, and nothing changes, where they cannot share it.
func (b *Backend) routerNormCall(ld *denseOp, lm *tensor, bias *weight, cfg backend.RouterConfig, norm int, r *routing) (call func(c *Ctx, q *QActs) error, ok bool) {
	no := b.lastNorm
	E, K := cfg.NumExperts, ld.w.k
	if !b.chained() || b.opts.FusedRouter || no == nil || no.flush != b.flushes || no.idx != ld.idx-1 || no.out != ld.x || no.in.Mode != fuseAddNorm || !no.in.Layout8 ||
		lm.rows != 1 || ld.x.rows != 1 || !RouterFastFits(E, K, ld.x.ptr, ld.x.ld, cfg.TopK) || !routerNormFits(E, K, no.in.Q.G, cfg.TopK) ||
		routerNoCluster || overlapsAny(lm, no.touched) || lm.ptr%4 != 0 {
		return nil, false
	}
	in := no.in
	b.pending = slices.Delete(b.pending, no.idx, no.idx+1)
	b.lastNorm = nil
	b.chainMerges[chainRouterNorm]++
	return func(c *Ctx, q *QActs) error {
		return c.RouterClusterNorm(ld.w.dense, K, lm.ptr, bias.dense, cfg.TopK, norm == 1, cfg.RoutedScaling, r.ids, r.wts, q, in)
	}, true
}

// normGEMVFits reports whether NormGEMV takes a norm of K values in int8
// groups of G before a product of rows of K columns in groups of G: K a
// multiple of 256 of at most 1024 (a block's 128 threads of 8 values, one
// chunk of 32 columns a lane).
func normGEMVFits(K, G int) bool {
	return K%256 == 0 && K <= 1024 && (G == 32 || G == 64 || G == 128)
}

// NormGEMV is the single-row norm n (RMSNormQuant8 of one row, with a
// gain and its int8 form) and y = w norm(x) (GEMVRows of one token, from
// n's int8 form) in one launch, with the independent single-row norm n2
// in an extra block when n2.q is not nil (norm_gemv_t1: every output the
// separate launches' bits). n.out must not overlap n.x.
func (c *Ctx) NormGEMV(y uint64, w *QMatrix, n, n2 norm8) error {
	q := n.q
	if q == nil || q.T != 1 || n.gain == 0 || q.K != w.K || q.G != w.G || !normGEMVFits(q.K, q.G) {
		return fmt.Errorf("cuda: norm and product: want a gain and one row of a multiple of 256 up to 1024 in the product's groups")
	}
	var gain2, x2, out2, q2, s2, sum2 uint64
	K2, G2 := 0, 0
	if m := n2.q; m != nil {
		if m.T != 1 || n2.gain == 0 || !normGEMVFits(m.K, m.G) {
			return fmt.Errorf("cuda: norm and product: second norm of %d values in groups of %d", m.K, m.G)
		}
		x2, gain2, out2, q2, s2, sum2, K2, G2 = n2.x, n2.gain, n2.out, m.Q, m.Scales, m.Sums, m.K, m.G
	}
	k, err := c.Kernel("quant", "norm_gemv_t1")
	if err != nil {
		return err
	}
	nb := (w.N + gemvRowsPerBlock - 1) / gemvRowsPerBlock
	if n2.q != nil {
		nb++
	}
	return c.Launch(k, D1(nb), D1(128), 0, w.Codes, w.Scales, w.RowScale, w.N, y, w.K, bits.TrailingZeros(uint(w.G/32)),
		n.x, n.gain, n.eps, n.out, q.Q, q.Scales, q.Sums, x2, gain2, n2.eps, out2, q2, s2, sum2, K2, G2)
}

// normMaxRows bounds the rows of a product that takes its input's norm
// into its launch (q_b's 5120 measured).
const normMaxRows = 8192

// normGEMV is NormGEMV queued as b.pending[idx].
type normGEMVOp struct {
	idx, flush int
	y          uint64
	w          *QMatrix
	n          norm8
	touched    []tensor // what it reads or writes: x, out, y
	paired     bool
	n2         norm8    // the norm in its extra block (paired)
	beside     []tensor // what that norm reads or writes: x, out
}

// normProducts lets a single-token product take the single-row norm
// queued just before it, which made its input, into its launch
// (NormGEMV). This and the other merge switches below are variables so
// that tests can compare a merged launch with the separate ones.
var normProducts = true

// normProduct queues d = w a in the launch of the single-row norm queued
// just before it, whose int8 form a is, and reports whether it did.
func (b *Backend) normProduct(d *tensor, a *QActs, w *weight) bool {
	p := b.lastNorm8
	if !normProducts || !b.chained() || b.opts.FusedGEMV || b.opts.FusedLatent || p == nil || p.flush != b.flushes ||
		p.idx != len(b.pending)-1 || p.paired || p.n.q != a || d.rows != 1 || w.q.K != a.K || w.q.G != a.G || w.q.N > normMaxRows ||
		!normGEMVFits(a.K, a.G) || overlaps(&p.x, &p.out) || overlaps(d, &p.x) || overlaps(d, &p.out) {
		return false
	}
	op := &normGEMVOp{idx: p.idx, flush: b.flushes, y: d.ptr, w: w.q, n: p.n, touched: []tensor{p.x, p.out, *d}}
	b.pending[p.idx] = queuedOp{"rmsnorm+matmul", func(c *Ctx) error { return c.NormGEMV(op.y, op.w, op.n, norm8{}) }}
	b.lastNorm8, b.lastNorm, b.lastGEMV = nil, nil, nil
	b.lastNormGEMV = op
	b.chainMerges[chainNormGEMV]++
	return true
}

// normBeside queues the single-row norm n (of x into out) as the extra
// block of the norm and product launch queued just before it, when
// neither reads what the other writes, and reports whether it did.
func (b *Backend) normBeside(n norm8, x, out *tensor) bool {
	p := b.lastNormGEMV
	if p == nil || p.flush != b.flushes || p.idx != len(b.pending)-1 || p.paired || !normGEMVFits(n.q.K, n.q.G) ||
		overlapsAny(x, p.touched[1:]) || overlapsAny(out, p.touched) {
		return false
	}
	p.paired, p.n2, p.beside = true, n, []tensor{*x, *out}
	b.pending[p.idx] = queuedOp{"rmsnorm+matmul+rmsnorm", func(c *Ctx) error { return c.NormGEMV(p.y, p.w, p.n, n) }}
	b.chainMerges[chainNorms]++
	return true
}

// addNormWord is the offset in b.counter of add_norm_gemv_pair's ticket
// word (the fused kernels count in the first).
const addNormWord = 64

// AddNormGEMVPair is the residual add and single-row norm in (fuseAddNorm
// in rmsnorm_quant8's layout, K 1024 or 2048) and the single-token
// products o1 and, when o2.W is set, o2 of its output, in one launch
// (add_norm_gemv_pair: every output the separate launches' bits).
// counter is a zeroed device word, zero again after.
func (c *Ctx) AddNormGEMVPair(in FusedIn, o1, o2 FusedOut, counter uint64) error {
	q := in.Q
	switch {
	case in.Mode != fuseAddNorm || !in.Layout8 || q == nil || q.T != 1 || in.Gain == 0 || counter == 0 || !addNormGEMVFits(q.K, q.G):
		return fmt.Errorf("cuda: add, norm and products: want a residual add and one row of 1024 or 2048 values with a gain")
	case o1.W.K != q.K || o1.W.G != q.G || (o2.W != nil && (o2.W.K != q.K || o2.W.G != q.G)):
		return fmt.Errorf("cuda: add, norm and products: weights of %d columns in groups of %d, want %d in %d", o1.W.K, o1.W.G, q.K, q.G)
	}
	k, err := c.Kernel("quant", "add_norm_gemv_pair")
	if err != nil {
		return err
	}
	nb := (o1.W.N + addNormRowsPerBlock - 1) / addNormRowsPerBlock
	var c2, s2, r2, y2 uint64
	n2 := 0
	if w := o2.W; w != nil {
		nb += (w.N + addNormRowsPerBlock - 1) / addNormRowsPerBlock
		c2, s2, r2, n2, y2 = w.Codes, w.Scales, w.RowScale, w.N, o2.Y
	}
	return c.Launch(k, D1(nb), D1(256), 0, c.aheadArgs(o1.W.Codes, o1.W.Scales, o1.W.RowScale, o1.W.N, o1.Y, c2, s2, r2, n2, y2,
		q.K, bits.TrailingZeros(uint(q.G/32)), in.D, in.A, in.C, in.Gain, in.Eps, in.Out, q.Q, q.Scales, q.Sums, counter)...)
}

// addNormRowsPerBlock is the rows a block of add_norm_gemv_pair takes (8
// warps of 4 rows in quant.cu).
const addNormRowsPerBlock = 32

// addNormGEMVFits reports whether AddNormGEMVPair takes a norm of K values
// in int8 groups of G.
func addNormGEMVFits(K, G int) bool {
	return (K == 1024 || K == 2048) && (G == 32 || G == 64 || G == 128)
}

// addNormMaxRows bounds the rows of a product that takes the add and norm
// into its launch: every block normalises the row again, which pays for
// q_a and kv_a (768 and 576 rows) and is not measured for more (a dense
// MLP's 10240).
const addNormMaxRows = 2048

// addNormGEMVOp is AddNormGEMVPair queued as b.pending[idx].
type addNormGEMVOp struct {
	idx, flush int
	in         FusedIn
	o1         FusedOut
	ahead      *l2Ahead // what it asks L2 for (l2ahead.go)
	touched    []tensor // the norm's rows and the first product's output
	two        bool
}

// addNormProducts lets the single-token products of a residual add and
// norm's output take that launch.
var addNormProducts = true

// addNormProduct queues d = w a in the launch of the residual add and
// single-row norm queued just before it (whose int8 form a is), or as the
// second product of such a launch, and reports whether it did.
func (b *Backend) addNormProduct(d *tensor, a *QActs, w *weight) bool {
	if !addNormProducts || !b.chained() || b.opts.FusedGEMV || b.opts.FusedLatent || b.counter.Ptr == 0 || d.rows != 1 ||
		w.q.K != a.K || w.q.G != a.G || w.q.N > addNormMaxRows {
		return false
	}
	counter := b.counter.Ptr + addNormWord
	if p := b.lastAddNorm; p != nil && p.flush == b.flushes && p.idx == len(b.pending)-1 && !p.two && p.in.Q == a && !overlapsAny(d, p.touched) {
		in, o1, o2, h := p.in, p.o1, FusedOut{w.q, d.ptr}, p.ahead
		b.fillAhead(&b.moeAhead, aheadMoE, p.idx, w.q)
		b.pending[p.idx] = queuedOp{"add+rmsnorm+matmul pair", func(c *Ctx) error {
			return withAhead(c, h, func() error { return c.AddNormGEMVPair(in, o1, o2, counter) })
		}}
		p.two = true
		b.chainMerges[chainPair]++
		return true
	}
	no := b.lastNorm
	if no == nil || no.flush != b.flushes || no.idx != len(b.pending)-1 || no.in.Mode != fuseAddNorm || !no.in.Layout8 || no.in.Q != a ||
		!addNormGEMVFits(a.K, a.G) || overlapsAny(d, no.touched) {
		return false
	}
	in, o1 := no.in, FusedOut{w.q, d.ptr}
	b.fillAhead(&b.moeAhead, aheadMoE, no.idx, w.q)
	h := b.newAhead(&b.normAhead)
	b.pending[no.idx] = queuedOp{"add+rmsnorm+matmul", func(c *Ctx) error {
		return withAhead(c, h, func() error { return c.AddNormGEMVPair(in, o1, FusedOut{}, counter) })
	}}
	b.queuedAhead(b.normAhead, no.idx)
	b.lastNorm, b.lastGEMV = nil, nil
	b.lastAddNorm = &addNormGEMVOp{idx: no.idx, flush: b.flushes, in: in, o1: o1, touched: append(slices.Clone(no.touched), *d), ahead: h}
	b.chainMerges[chainAddNormGEMV]++
	return true
}

// qAbsorbShared is norm_qb_absorb_192's dynamic shared memory (QA_SHARED
// in absorb.cu): one row tile of 16 split queries, the weight slab, the
// code table and the head's row scales.
func qAbsorbShared() int {
	const dn = 192
	return 2*16*(dn+8)*2 + dn*(absorbTCN+8)*2 + 4*256 + 4*dn
}

// soloShared is n bytes of dynamic shared memory, or half of what a block
// may have (all but 1 KB of a multiprocessor's) if n is less: with its
// static shared memory and the 1 KB each block is reserved, no two blocks
// of the launch then fit on one multiprocessor.
func (c *Ctx) soloShared(n int) int { return max(n, c.info.SharedOptin/2) }

// qAbsorbFits reports whether NormQAbsorb takes an attention of shape s
// whose q_b reads K columns in groups of G and whose W_UK is uk:
// GLM-4.7-Flash's dn 192, rope 64 and rank 512 (a cluster of 4 column
// slabs a head, 64 rows of q_b a block).
func qAbsorbFits(s backend.MLAShape, K, G int, uk *QMatrix) bool {
	return s.NopeDim == 192 && s.RopeDim == 64 && s.Rank == 4*absorbTCN && normGEMVFits(K, G) &&
		uk.N == s.Heads*s.NopeDim && uk.K == s.Rank && uk.G%32 == 0 && uk.G <= s.Rank
}

// qAbsorbRope is the RoPE of the key and the cache write that NormQAbsorb
// runs beside the absorbed query (rope2_cache_write's arguments for one
// row: the key one head of 64 rotated columns), and the queries' RoPE
// table and layout.
type qAbsorbRope struct {
	table      uint64 // cos then sin, one row
	il         int    // interleaved pairs
	kpe        uint64 // the key's 64 columns, rotated in place
	layer      uint64 // the cache layer, its dtype (kernelDType) and the row's slot
	dtype      int
	slots, lat uint64 // the latent the cache takes
}

// NormQAbsorb is one token's q_b product with the q_a norm n and the
// latent's norm n2 (NormGEMV, n2 optional), the RoPE of q's rope columns,
// the absorbed query of q's nope columns into qlat (absorb_query_tc_192),
// and the key's RoPE and cache write r (rope2_cache_write) in one launch
// (norm_qb_absorb_192): every output the separate launches' bits.
func (c *Ctx) NormQAbsorb(q uint64, wqb *QMatrix, n, n2 norm8, qlat uint64, uk *QMatrix, s backend.MLAShape, r qAbsorbRope) error {
	nq := n.q
	switch {
	case nq == nil || nq.T != 1 || n.gain == 0 || nq.K != wqb.K || nq.G != wqb.G || !qAbsorbFits(s, nq.K, nq.G, uk):
		return fmt.Errorf("cuda: norm, q_b and absorbed query: want one row, dn 192, rope 64, rank 512 and a norm in q_b's groups")
	case wqb.N != s.Heads*(s.NopeDim+s.RopeDim):
		return fmt.Errorf("cuda: norm, q_b and absorbed query: q_b of %d rows for %d heads", wqb.N, s.Heads)
	case c.info.CC < 90:
		return fmt.Errorf("cuda: norm, q_b and absorbed query: clusters need compute capability 9.0")
	}
	var gain2, x2, out2, q2, s2, sum2 uint64
	kg2 := 0
	if m := n2.q; m != nil {
		if m.T != 1 || n2.gain == 0 || !normGEMVFits(m.K, m.G) {
			return fmt.Errorf("cuda: norm, q_b and absorbed query: second norm of %d values in groups of %d", m.K, m.G)
		}
		x2, gain2, out2, q2, s2, sum2, kg2 = n2.x, n2.gain, n2.out, m.Q, m.Scales, m.Sums, m.K|m.G<<16
	}
	// One block a multiprocessor: the launch waits for its slowest
	// block, and with two allowed on one multiprocessor the slowest were
	// about 1 us behind the median from the q_a norm on; one a
	// multiprocessor measured 0.8-1.5% faster decode on an H200
	// (docs/perf.md, 2026-11-29 (16)).
	shared := c.soloShared(qAbsorbShared())
	k, err := c.kernelShared("absorb", "norm_qb_absorb_192", shared)
	if err != nil {
		return err
	}
	return c.Launch(k, Dim{uint32(s.Rank / absorbTCN), 1, uint32(s.Heads + 1)}, D1(256), shared,
		wqb.Codes, wqb.Scales, wqb.RowScale, wqb.K|bits.TrailingZeros(uint(wqb.G/32))<<16,
		n.x, n.gain, n.eps, n.out, nq.Q, nq.Scales, nq.Sums, q, qlat, uk.Codes, uk.Scales, uk.RowScale, uk.G,
		r.table, r.il|r.dtype<<1, x2, gain2, n2.eps, out2, q2, s2, sum2, kg2, r.kpe, r.layer, r.slots, r.lat)
}

// normAbsorbs lets the absorbed query take q_b's product with its norm
// (and the latent's norm beside) into its launch, with the RoPEs and cache
// write (NormQAbsorb).
var normAbsorbs = true

// ropeTableOp names the upload of a step's RoPE table (RoPE), which
// normAbsorb lets lie between the launches it merges.
const ropeTableOp = "rope table"

// normAbsorb queues the norm and q_b launch queued before the RoPE and
// cache write rc (which wrote qm), rc (queued just before) and the
// absorbed query of qm into ql as one launch (NormQAbsorb) in rc's place,
// and reports whether it did. Between the two launches there may be only
// uploads of the RoPE table (the first layer of a step), which touch
// nothing the norm and q_b launch reads or writes.
func (b *Backend) normAbsorb(rc *ropeCacheOp, ql, qm *tensor, w *QMatrix, s backend.MLAShape) bool {
	p, r1, r2 := b.lastNormGEMV, rc.r1, rc.r2
	if !normAbsorbs || b.dev.Info().CC < 90 || p == nil || p.flush != b.flushes || p.idx >= rc.idx || ql.rows != 1 || qm.rows != 1 ||
		p.y != qm.ptr || p.w.N != s.Heads*(s.NopeDim+s.RopeDim) || !qAbsorbFits(s, p.w.K, p.w.G, w) || qAbsorbShared() > b.dev.Info().SharedOptin ||
		r1.heads != s.Heads || r1.offset != s.NopeDim || r1.dim != s.RopeDim || r2.heads != 1 || r2.offset != 0 || r2.dim != s.RopeDim ||
		overlapsAny(&rc.kpe, p.touched) || overlapsAny(&rc.lat, p.touched[1:]) || overlapsAny(ql, p.touched) || overlapsAny(ql, p.beside) {
		return false
	}
	wqb, n, n2, y, ylat := p.w, p.n, p.n2, qm.ptr, ql.ptr
	r := qAbsorbRope{table: r1.table, il: r1.il, kpe: rc.kpe.ptr, layer: rc.layer, dtype: rc.dtype, slots: rc.slots, lat: rc.lat.ptr}
	for _, op := range b.pending[p.idx+1 : rc.idx] {
		if op.op != ropeTableOp {
			return false
		}
	}
	b.fillAhead(&b.normAhead, aheadNorm, p.idx, wqb)
	b.fillAhead(&b.normAhead, aheadNorm, p.idx, w)
	b.pending[rc.idx] = queuedOp{"rmsnorm+matmul+absorb query+rope+cache write", func(c *Ctx) error {
		return c.NormQAbsorb(y, wqb, n, n2, ylat, w, s, r)
	}}
	b.pending = slices.Delete(b.pending, p.idx, p.idx+1)
	b.lastRopeCache, b.lastNormGEMV = nil, nil
	b.chainMerges[chainNormAbsorb]++
	return true
}
