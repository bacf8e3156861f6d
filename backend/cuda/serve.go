//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"
	"slices"

	"github.com/mmfp4/mmfp4/backend"
)

// Fewer launches and memsets in the steps of a few rows (serving batches
// of 2-64 sequences), where each small op's fixed cost is most of its
// time:
//   - the MoE's output tensor (NewTensor, cleared for MoE to add into)
//     is written whole by the streaming MoE's combine instead of added to,
//     so that it needs no clearing; at 2-63 rows the open clearing range
//     otherwise reached from one layer's MoE output to the next layer's
//     and swept every tensor of the layer between (megabytes a memset);
//   - the q_a norm and the latent's norm share a launch (as chain.go's
//     single-row pair), q_b's product (streaming, or a GEMV at 2-8 rows)
//     queued between them;
//   - the value expansion writes the int8 form of its output for o_proj
//     (mmsq_* kernels) instead of a quantization launch after it;
//   - the MoE's combine (the weighted sum of each token's slots), the
//     residual add of its output and the next layer's input norm share a
//     launch (combine_add_rmsnorm_quant8);
//   - the RoPEs and the cache write run in the absorbed query's launch
//     (absorb_query_tc_rope_rows), as in the single-row chain;
//   - the residual add and post-attention norm run in the cluster
//     router's launch (moe_router_cluster_norm_rows);
//   - and, in attention.go, a decode step of 2-44 rows of short contexts
//     takes decode_mma in blocks of 8 heads with one split, and a step of
//     more than 64 rows mixing decode rows with prompts the flash kernel.
//
// Tests turn them off (serveFuseOff) to compare with the separate launches.
var serveFuseOff bool

// Shorter chains of dependent loads in the steps of 2-64 rows:
//   - the dense products of 9-64 rows load all of a block's weights before
//     their wait for the kernel before (mmsp_*, mmsqp_*: streamPreload);
//   - the 8 K splits of a row block of o_proj and of the q_a/kv_a pair add
//     their sums in a cluster, through distributed shared memory, instead
//     of global partial sums and a counter (mmsc_*: streamCluster);
//   - decode steps of 2-22 rows of short contexts take attention.go's
//     one-split 8-head blocks (as 23-44 rows did);
//   - the router with its residual add and norm takes two rows a cluster
//     (moe_router_cluster_norm_rows2: routerRows).
//
// Each gives the same values as before, bit for bit; tests turn each off
// (streamPreload, streamCluster, routerRows, decodeSplitsFixed) to compare.

// freshZero is the tensor (p, n bytes) the last NewTensor cleared, in
// clearing range z, whose n was prevN before the tensor joined it; queued
// and flush place it among the ops (no op queued since).
type freshZero struct {
	p             uint64
	n, prevN      int
	z             *zeroRange
	queued, flush int
}

func (b *Backend) noteFresh(p uint64, n int, z *zeroRange, prevN int) {
	b.fresh = &freshZero{p: p, n: n, z: z, prevN: prevN, queued: len(b.pending), flush: b.flushes}
}

// takeFresh reports whether d is the tensor the last NewTensor cleared
// with no op queued since, and if so takes it out of its clearing (it was
// the range's last tensor): the caller's op must then write every value
// of d instead of adding to it, and no op the caller queues before it may
// read d.
func (b *Backend) takeFresh(d *tensor) bool {
	f := b.fresh
	b.fresh = nil
	if serveFuseOff || f == nil || f.flush != b.flushes || f.queued != len(b.pending) || b.zero != f.z ||
		f.p != d.ptr || f.n != 4*d.rows*d.cols || d.ld != d.cols {
		return false
	}
	f.z.n = f.prevN
	b.zero = nil
	b.serveMerges[serveWrites]++
	return true
}

// normRows is one RMSNorm of rows rows in rmsnorm_quant8's layout, with a
// gain and an int8 form: out = gain * norm(x).
type normRows struct {
	x, out, gain uint64
	ldx, ldo     int
	eps          float32
	q            *QActs
}

// RMSNormQuant8PairRows runs two norms of the same rows (RMSNormQuant8
// each, without a residual add) in one launch.
func (c *Ctx) RMSNormQuant8PairRows(n1, n2 normRows) error {
	for _, n := range []normRows{n1, n2} {
		if n.q == nil || n.q.T != n1.q.T || n.q.T < 1 || n.gain == 0 || !rowNorm8(n.q.K, n.q.G, []uint64{n.x, n.gain, n.out}, []int{n.ldx, n.ldo}) {
			return fmt.Errorf("cuda: rmsnorm_quant8 pair over rows: want a gain and activations of the same rows")
		}
	}
	k, err := c.Kernel("quant", "rmsnorm_quant8_pair_rows")
	if err != nil {
		return err
	}
	return c.Launch(k, Dim{2, uint32(n1.q.T), 1}, D1(max(n1.q.K, n2.q.K)/8), 0,
		n1.x, n1.ldx, n1.gain, n1.eps, n1.out, n1.ldo, n1.q.Q, n1.q.Scales, n1.q.Sums, n1.q.K, n1.q.G,
		n2.x, n2.ldx, n2.gain, n2.eps, n2.out, n2.ldo, n2.q.Q, n2.q.Scales, n2.q.Sums, n2.q.K, n2.q.G)
}

// normRowsOp is a norm of several rows queued as b.pending[idx].
type normRowsOp struct {
	idx, flush int
	n          normRows
	x, out     tensor
	paired     bool
}

// noteNormRows remembers a norm of several rows just queued (pairNormRows).
func (b *Backend) noteNormRows(n normRows, x, out *tensor) {
	b.lastNormRows = nil
	if b.err == nil && len(b.pending) > 0 && !serveFuseOff {
		b.lastNormRows = &normRowsOp{idx: len(b.pending) - 1, flush: b.flushes, n: n, x: *x, out: *out}
	}
}

// pairNormRows queues norm n (of x into out, several rows) in the launch of
// the norm of the same rows queued before it, when at most one product
// (streaming, or a GEMV of 2-8 rows) lies between them that neither writes
// x or out nor reads anything but its int8 rows (the q_a norm, q_b's
// product, the latent's norm), and reports whether it did.
func (b *Backend) pairNormRows(n normRows, x, out *tensor) bool {
	p := b.lastNormRows
	if serveFuseOff || p == nil || p.flush != b.flushes || p.paired || p.n.q.T != n.q.T {
		return false
	}
	switch len(b.pending) - 1 {
	case p.idx:
	case p.idx + 1:
		// A streaming product or a GEMV of several rows (2-8 rows).
		s, g := b.lastStream, b.lastProduct
		stream := s != nil && s.flush == b.flushes && s.idx == p.idx+1 && !s.paired && !overlaps(x, &s.d) && !overlaps(out, &s.d)
		gemv := g != nil && g.flush == b.flushes && g.idx == p.idx+1 && !overlaps(x, &g.d) && !overlaps(out, &g.d)
		if !stream && !gemv {
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
	b.pending[p.idx] = queuedOp{"rmsnorm pair", func(c *Ctx) error { return c.RMSNormQuant8PairRows(n1, n) }}
	p.paired = true
	b.serveMerges[serveNorms]++
	return true
}

// rowsProductOp is a GEMV of several rows queued as b.pending[idx]
// (GEMVRows: it reads only its int8 rows and writes d).
type rowsProductOp struct {
	idx, flush int
	d          tensor
}

// noteRowsProduct remembers a GEMV just queued (pairNormRows).
func (b *Backend) noteRowsProduct(d *tensor) {
	b.lastProduct = nil
	if b.err == nil && len(b.pending) > 0 && d.rows > 1 {
		b.lastProduct = &rowsProductOp{idx: len(b.pending) - 1, flush: b.flushes, d: *d}
	}
}

// Kinds of serveMerges.
const (
	serveWrites = iota // destinations written instead of cleared (takeFresh)
	serveNorms
	serveValues
	serveCombine
	serveRope
	serveRouterNorm
	serveKinds
)

// MatMulStreamHeadsQuant is MatMulStreamHeads with K unsplit (p.KS = 1)
// that also writes the int8 form of y in groups of 128 (q: a.T rows of
// w.N, what RMSNormQuant without a gain writes), for 9-64 rows and heads
// of a multiple of 128 rows: each block's 128 rows are one group.
func (c *Ctx) MatMulStreamHeadsQuant(y uint64, ldy int, w *QMatrix, a *QActs, heads int, p StreamPlan, q *QActs) error {
	if err := c.checkStream(ldy, w, a, heads, p, 0, 0); err != nil {
		return err
	}
	rows := w.N / heads
	wt := streamTiles(a.T)
	if p.KS != 1 || rows%128 != 0 || wt < 2 || q == nil || q.T != a.T || q.K != w.N || q.G != 128 {
		return fmt.Errorf("cuda: stream heads with int8 output: plan KS=%d, %d heads of %d rows, %d token rows", p.KS, heads, rows, a.T)
	}
	if p.D == 4 {
		p.D = 2 // as streamKernel: no D = 4 past 8 rows
	}
	shared := streamShared(wt, w.K, p)
	k, err := c.kernelShared("stream", fmt.Sprintf("%s_t%d_d%d", streamName("mmsq", w.K, wt, p), wt, p.D), shared)
	if err != nil {
		return err
	}
	return c.Launch(k, Dim{uint32(rows / 128), 1, uint32(heads)}, D1(256), shared,
		w.Codes, w.Scales, w.RowScale, rows, w.K, a.Q, a.Scales, a.T, y, ldy, q.Q, q.Scales, q.Sums)
}

// streamHeadsQuant queues the value expansion's per-head products of om
// with the int8 form of om in groups of 128 (for o_proj's product, which
// finds it remembered) in one launch when it applies, and reports whether
// it did.
func (b *Backend) streamHeadsQuant(om *tensor, a *QActs, w *weight, heads int) bool {
	T := om.rows
	// The int8 form needs two 8-row tiles a block (mmsq_t2 and up): 9 rows
	// or more, whatever streamMinTokens is set to.
	if serveFuseOff || T < streamMinTokens || streamTiles(T) < 2 || T > streamMaxTokens || w.q.N%heads != 0 || om.cols != w.q.N {
		return false
	}
	rows := w.q.N / heads
	if rows%128 != 0 || !StreamFits(&QMatrix{N: rows, K: w.q.K, G: w.q.G}) {
		return false
	}
	info := b.dev.Info()
	p := PlanStream(rows, w.q.K, heads, T, info.SMs, info.SharedOptin)
	if p.KS != 1 || !streamPlanOK(rows, w.q.K, heads, T, p, info.SharedOptin) {
		return false
	}
	q := b.quantizeInto(om, 128)
	wq := w.q
	b.do(b.opName("expand values+quantize", w), func(c *Ctx) error {
		return c.MatMulStreamHeadsQuant(om.ptr, om.ld, wq, a, heads, p, q)
	})
	b.rememberQuant(quantEntry{*om, q})
	b.serveMerges[serveValues]++
	return true
}

// combineOp is a streaming MoE's combine queued on its own as
// b.pending[idx], writing d (not adding to it) from s.Part.
type combineOp struct {
	idx, flush  int
	releases    int // Backend.releases when queued: its work space must outlive it
	d           tensor
	s           *MoEBatch
	wts         uint64
	topk, slots int
}

// combineMaxK bounds the rows combine_add_rmsnorm_quant8 takes (K/8
// threads, at most 256); combineMaxSlots is its CAN_MAXS.
const (
	combineMaxK     = 2048
	combineMaxSlots = 8
)

// combineApart reports whether a streaming MoE writing d (cleared for it
// alone) queues its combine as an op of its own, for the add and norm
// after it to take in (combineNorm).
func (b *Backend) combineApart(d *tensor, slots int) bool {
	return !serveFuseOff && slots <= combineMaxSlots && d.cols%256 == 0 && d.cols <= combineMaxK
}

func (b *Backend) noteCombine(d *tensor, s *MoEBatch, wts uint64, topk, slots int) {
	b.lastCombine = nil
	if b.err == nil && len(b.pending) > 0 {
		b.lastCombine = &combineOp{idx: len(b.pending) - 1, flush: b.flushes, releases: b.releases, d: *d, s: s, wts: wts, topk: topk, slots: slots}
	}
}

// combineBefore returns the combine queued just before the add la (which
// is the last op queued) when that add is d = d + c in place with c the
// combine's output, else nil.
func (b *Backend) combineBefore(la *addOp) *combineOp {
	lc := b.lastCombine
	if lc == nil || lc.flush != b.flushes || lc.idx != la.idx-1 || la.c != lc.d || la.a != la.d || overlaps(&la.d, &lc.d) {
		return nil
	}
	return lc
}

// combineNorm replaces the combine and the add queued last (la, with
// la.comb) by one launch that also computes the norm of the sum into out
// with gain and its int8 form q, and reports whether it did. The
// combine's output is still written.
func (b *Backend) combineNorm(la *addOp, gain uint64, eps float32, out *tensor, q *QActs) bool {
	lc := la.comb
	// Not across a Release (a layer's end in a long step): the next
	// layer's tensors may take the MoE's work space.
	if lc == nil || lc.flush != b.flushes || lc.releases != b.releases || lc.idx != la.idx-1 || la.idx != len(b.pending)-1 || out.cols != la.d.cols ||
		overlaps(out, &la.d) || overlaps(out, &lc.d) {
		return false
	}
	x, m, s, wts, topk, slots := la.d, lc.d, lc.s, lc.wts, lc.topk, lc.slots
	o := *out
	b.pending[lc.idx] = queuedOp{"moe combine+add+rmsnorm", func(c *Ctx) error {
		return c.CombineAddRMSNormQuant8(x.ptr, x.ld, x.ptr, x.ld, s, wts, topk, slots, m.ptr, m.ld, gain, eps, o.ptr, o.ld, q)
	}}
	b.pending = b.pending[:la.idx]
	b.lastCombine = nil
	b.serveMerges[serveCombine]++
	return true
}

// CombineAddRMSNormQuant8 is MoEStreamCombine writing mo (when not 0),
// then d = a + that sum, then RMSNormQuant8 of d with gain into out and
// q, in one launch (combine_add_rmsnorm_quant8): the same values as the
// three launches. Rows of K = q.K values, a multiple of 256 up to 2048.
func (c *Ctx) CombineAddRMSNormQuant8(d uint64, ldd int, a uint64, lda int, s *MoEBatch, wts uint64, topk, slots int, mo uint64, ldm int, gain uint64, eps float32, out uint64, ldo int, q *QActs) error {
	if q == nil || q.T != s.T || q.K > combineMaxK || slots > combineMaxSlots || gain == 0 ||
		!rowNorm8(q.K, q.G, []uint64{d, a, gain, out, s.Part}, []int{ldd, lda, ldo}) || (mo != 0 && (mo%16 != 0 || ldm%4 != 0)) {
		return fmt.Errorf("cuda: combine, add and norm: %d rows of %d (group %d), %d slots", s.T, q.K, q.G, slots)
	}
	k, err := c.Kernel("quant", "combine_add_rmsnorm_quant8")
	if err != nil {
		return err
	}
	return c.Launch(k, D1(s.T), D1(q.K/8), 0, d, ldd, a, lda, s.Part, s.Pos, wts, topk, slots, mo, ldm,
		gain, eps, out, ldo, q.Q, q.Scales, q.Sums, q.K, q.G)
}

// absorbRopeRows queues the tensor-core absorbed query of qm into ql of
// 2-64 rows with the RoPEs and cache write queued just before it in one
// launch (absorb_query_tc_rope_rows: the rows' RoPEs and cache writes in
// extra head slices of the grid), and reports whether it did (the
// conditions: ropeCacheBefore).
func (b *Backend) absorbRopeRows(ql, qm *tensor, w *QMatrix, s backend.MLAShape, grid Dim, shared int) bool {
	if serveFuseOff || ql.rows < 2 {
		return false
	}
	rc := b.ropeCacheBefore(ql, qm, s, grid)
	if rc == nil {
		return false
	}
	grid.Z += uint32((ql.rows + int(grid.X) - 1) / int(grid.X))
	b.queueAbsorbRope(rc, ql, qm, w, s, fmt.Sprintf("absorb_query_tc_rope_rows_%d", s.NopeDim), grid, shared)
	b.serveMerges[serveRope]++
	return true
}

// addNormRowsOp is a residual add and norm of several rows queued as
// b.pending[idx] (rmsnorm_quant8's layout): d = a + c, out = gain *
// norm(d) with its int8 form q.
type addNormRowsOp struct {
	idx, flush   int
	d, a, c, out tensor
	gain         uint64
	eps          float32
	q            *QActs
}

// noteAddNormRows remembers the add and norm of several rows just queued
// (la, into out), for the router after it (routerNormRowsCall).
func (b *Backend) noteAddNormRows(la *addOp, out *tensor, gain uint64, eps float32, q *QActs, fast bool) {
	b.lastAddRows = nil
	if b.err == nil && fast && out.rows > 1 && !serveFuseOff {
		b.lastAddRows = &addNormRowsOp{idx: la.idx, flush: b.flushes, d: la.d, a: la.a, c: la.c, out: *out, gain: gain, eps: eps, q: q}
	}
}

// routerNormRowsCall returns the router launch of ld's product and the
// choice, with the residual add and norm of 2-64 rows queued just before
// it (which made its input) in the same launch
// (moe_router_cluster_norm_rows), and removes that op from the queue; ok
// is false, and nothing changes, where they cannot share it: the
// cluster router's 64 experts, the norm in rmsnorm_quant8's layout, rows
// the separate router would also give to moe_router_cluster.
func (b *Backend) routerNormRowsCall(ld *denseOp, lm *tensor, bias *weight, cfg backend.RouterConfig, norm int, r *routing) (call func(c *Ctx, q *QActs) error, ok bool) {
	no := b.lastAddRows
	E, K, T := cfg.NumExperts, ld.w.k, lm.rows
	if serveFuseOff || no == nil || no.flush != b.flushes || no.idx != ld.idx-1 || b.pending[no.idx].op != "add+rmsnorm" ||
		no.out != ld.x || T < 2 || T > StreamMaxTokens || T >= routerManyMinRows || ld.x.rows != T || no.q.T != T ||
		routerNoCluster || !RouterFastFits(E, K, ld.x.ptr, ld.x.ld, cfg.TopK) || !routerNormFits(E, K, no.q.G, cfg.TopK) ||
		overlapsAny(lm, []tensor{no.d, no.a, no.c, no.out}) || lm.ptr%4 != 0 || lm.ld%4 != 0 {
		return nil, false
	}
	in := *no
	b.pending = slices.Delete(b.pending, no.idx, no.idx+1)
	b.lastAddRows = nil
	b.serveMerges[serveRouterNorm]++
	return func(c *Ctx, q *QActs) error {
		if q != nil {
			return fmt.Errorf("cuda: router with the add and norm of %d rows: no int8 form of its input", T)
		}
		return c.RouterClusterNormRows(ld.w.dense, K, lm.ptr, lm.ld, bias.dense, cfg.TopK, norm == 1, cfg.RoutedScaling, r.ids, r.wts, &in)
	}, true
}

// RouterClusterNormRows is the residual add and norm n of n.q.T rows
// (RMSNormQuant8 with a residual add: what it writes, bit for bit) and the
// router of each row's norm (RouterRoute with moe_router_cluster: the
// logits, ids and weights) in one launch, a cluster of blocks a row.
func (c *Ctx) RouterClusterNormRows(W uint64, K int, logits uint64, ldl int, bias uint64, topk int, norm bool, scaling float32, ids, wts uint64, n *addNormRowsOp) error {
	q := n.q
	if q == nil || q.K != K || q.T < 1 || n.gain == 0 || !routerNormFits(routerClusterE, K, q.G, topk) ||
		!rowNorm8(K, q.G, []uint64{n.d.ptr, n.a.ptr, n.c.ptr, n.gain, n.out.ptr}, []int{n.d.ld, n.a.ld, n.c.ld, n.out.ld}) {
		return fmt.Errorf("cuda: router with the add and norm of rows: %d values, want rows of a multiple of 256 up to 2048 with a gain", K)
	}
	nm := 0
	if norm {
		nm = 1
	}
	if R := routerRows; R > 1 {
		k, err := c.kernelShared("moe", fmt.Sprintf("moe_router_cluster_norm_rows%d", R), 8*R*K)
		if err != nil {
			return err
		}
		return c.Launch(k, Dim{routerClusterE / 8, uint32((q.T + R - 1) / R), 1}, D1(256), 8*R*K, W, K, logits, ldl, bias, topk, nm, scaling, ids, wts,
			n.d.ptr, n.d.ld, n.a.ptr, n.a.ld, n.c.ptr, n.c.ld, n.gain, n.eps, n.out.ptr, n.out.ld, q.Q, q.Scales, q.Sums, q.G, q.T)
	}
	k, err := c.Kernel("moe", "moe_router_cluster_norm_rows")
	if err != nil {
		return err
	}
	return c.Launch(k, Dim{routerClusterE / 8, uint32(q.T), 1}, D1(256), 4*K, W, K, logits, ldl, bias, topk, nm, scaling, ids, wts,
		n.d.ptr, n.d.ld, n.a.ptr, n.a.ld, n.c.ptr, n.c.ld, n.gain, n.eps, n.out.ptr, n.out.ld, q.Q, q.Scales, q.Sums, q.G)
}

// routerRows is the token rows a cluster of RouterClusterNormRows takes
// (moe_router_cluster_norm_rows2: each block's weights serve two rows);
// 1: moe_router_cluster_norm_rows, a cluster a row.
var routerRows = 2
