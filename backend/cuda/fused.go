//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"
	"math/bits"
	"slices"

	"github.com/mmfp4/mmfp4/backend"
)

// Single-token products that prepare their own input (kernels/fused.cu):
// at batch 1 a decode step is bound by the number of dependent launches (a
// few microseconds of device time each, however small), so the activation
// quantization, the RMSNorm before it and the residual add before that run
// inside the product's blocks instead of as launches of their own, and two
// products of one input (q_a and kv_a) share one launch. The values are
// those of the separate launches, bit for bit.

// Prologue modes of gemv_fused.
const (
	fuseQuant   = 0 // quantize x
	fuseNorm    = 1 // RMSNorm(x) * gain, then quantize
	fuseAddNorm = 2 // d = a + c, then fuseNorm of d
)

// fusedMaxK bounds the input row gemv_fused stages in shared memory (K
// bytes, K/32 scales and, for a norm, K floats: 41 KB at 8192, under the
// default 48 KB limit).
const fusedMaxK = 8192

// fusedMaxRows bounds the rows of a fused launch: every block redoes the
// input preparation and, for a norm, counts itself in one word, which the
// lm_head's ten thousand blocks would make a cost of its own.
const fusedMaxRows = 16384

// fusedQuantMaxK bounds the input a product quantizes itself when no norm
// comes with it: measured on an H200, o_proj's 5120 columns took longer
// in the prologue of every block (15.7 us) than one quantization launch
// and the plain product (4.8 + 9.0 us).
const fusedQuantMaxK = 2048

// FusedIn is the input preparation of GEMVFused.
type FusedIn struct {
	Mode int
	// X is the input row (fuseQuant, fuseNorm); D = A + C for fuseAddNorm.
	X, D, A, C uint64
	Gain       uint64
	Eps        float32
	// Out receives the norm's float output, and Q its int8 form (norm
	// modes; written by the last block).
	Out uint64
	Q   *QActs
	// Layout8 sums the squares in rmsnorm_quant8's order (else
	// rmsnorm_quant's): the order the separate norm would have used.
	Layout8 bool
	// Counter is a zeroed device word (norm modes), zero again after.
	Counter uint64
}

// FusedOut is one product of GEMVFused: y = W x for one token.
type FusedOut struct {
	W *QMatrix
	Y uint64
}

// GEMVFused runs in.Mode's preparation of one row of K values and the
// products with o1 and (o2.W != nil) o2 in one launch. headRows > 0: o1's
// rows [h*headRows, (h+1)*headRows) take columns [h*K, (h+1)*K) of the row
// (o2 unused).
func (c *Ctx) GEMVFused(in FusedIn, K int, o1, o2 FusedOut, headRows int) error {
	w1 := o1.W
	if err := fusedOK(K, w1); err != nil {
		return err
	}
	n2 := 0
	w2 := &QMatrix{}
	if o2.W != nil {
		if headRows > 0 {
			return fmt.Errorf("cuda: gemv_fused: two products per head")
		}
		if err := fusedOK(K, o2.W); err != nil {
			return err
		}
		if o2.W.G != w1.G {
			return fmt.Errorf("cuda: gemv_fused: group sizes %d and %d", w1.G, o2.W.G)
		}
		w2, n2 = o2.W, o2.W.N
	}
	if headRows > 0 && (headRows%gemvRowsPerBlock != 0 || w1.N%headRows != 0) {
		return fmt.Errorf("cuda: gemv_fused: %d rows per head of %d", headRows, w1.N)
	}
	var q, s, sums uint64
	if in.Mode != fuseQuant {
		if in.Q == nil || in.Q.T != 1 || in.Q.K != K || in.Q.G != w1.G || in.Gain == 0 || in.Counter == 0 {
			return fmt.Errorf("cuda: gemv_fused: a norm needs a gain, a counter and activations 1x%d/%d", K, w1.G)
		}
		if in.Layout8 && (K%256 != 0 || K/8 > 4*32*32) {
			return fmt.Errorf("cuda: gemv_fused: the 8-value layout needs K a multiple of 256, not %d", K)
		}
		q, s, sums = in.Q.Q, in.Q.Scales, in.Q.Sums
	}
	k, err := c.Kernel("fused", "gemv_fused")
	if err != nil {
		return err
	}
	shared := K + K/8
	if in.Mode != fuseQuant {
		shared += 4 * K
	}
	l8 := 0
	if in.Layout8 {
		l8 = 1
	}
	nb := (w1.N+gemvRowsPerBlock-1)/gemvRowsPerBlock + (n2+gemvRowsPerBlock-1)/gemvRowsPerBlock
	return c.Launch(k, D1(nb), D1(128), shared,
		w1.Codes, w1.Scales, w1.RowScale, w1.N, o1.Y, w2.Codes, w2.Scales, w2.RowScale, n2, o2.Y,
		K, bits.TrailingZeros(uint(w1.G/32)), headRows, in.Mode, l8, in.X, in.D, in.A, in.C, in.Gain,
		in.Eps, in.Out, q, s, sums, in.Counter)
}

func fusedOK(K int, w *QMatrix) error {
	if w.K != K || K > fusedMaxK || K%w.G != 0 || (w.G != 32 && w.G != 64 && w.G != 128) {
		return fmt.Errorf("cuda: gemv_fused: input of %d columns for [%d,%d] G=%d (at most %d)", K, w.N, w.K, w.G, fusedMaxK)
	}
	return nil
}

// The backend's side: a product of one token replaces the norm queued just
// before it (normOp), or takes the quantization of its input into its
// launch; a second product of the same input right after joins the first's
// launch (lastFused).

// normOp is a single-row RMSNorm (with its residual add, when fused) queued
// as b.pending[idx], whose launch a product may take over.
type normOp struct {
	idx, flush int
	in         FusedIn
	out        tensor   // the norm's output, the products' input
	touched    []tensor // every row the norm reads or writes
}

// fusedOp is a fused product queued as b.pending[idx].
type fusedOp struct {
	idx, flush int
	in         FusedIn
	x          tensor   // the input row
	touched    []tensor // every row the prologue reads or writes
	o1         FusedOut
	y1         tensor
	K          int
	two        bool
}

// overlaps reports whether tensors a and b share memory.
func overlaps(a, b *tensor) bool {
	al, ah := a.span()
	bl, bh := b.span()
	return al < bh && bl < ah
}

// overlapsAny reports whether a shares memory with any of ts.
func overlapsAny(a *tensor, ts []tensor) bool {
	for i := range ts {
		if overlaps(a, &ts[i]) {
			return true
		}
	}
	return false
}

// fusedProduct queues d = x W^T for one row with the input preparation in
// the product's launch, and reports whether it did.
func (b *Backend) fusedProduct(d, xm *tensor, w *weight) bool {
	if !b.opts.FusedGEMV || xm.rows != 1 || d.rows != 1 || w.q == nil || xm.cols > fusedMaxK || xm.ptr%16 != 0 || w.n > fusedMaxRows {
		return false
	}
	if overlaps(d, xm) {
		return false
	}
	// A second product of the input just used joins that launch.
	if lf := b.lastFused; lf != nil && lf.flush == b.flushes && lf.idx == len(b.pending)-1 && !lf.two && lf.o1.W.N+w.n <= fusedMaxRows &&
		lf.x == *xm && lf.o1.W.G == w.q.G && !overlaps(d, &lf.y1) && !overlapsAny(d, lf.touched) {
		in, o1, o2, K := lf.in, lf.o1, FusedOut{w.q, d.ptr}, lf.K
		b.pending[lf.idx] = queuedOp{lf.name(b, true), func(c *Ctx) error { return c.GEMVFused(in, K, o1, o2, 0) }}
		lf.two = true
		b.fusedPairs++
		return true
	}
	// The norm queued last made this input: its launch becomes this one.
	if no := b.lastNorm; no != nil && no.flush == b.flushes && no.idx == len(b.pending)-1 && no.out == *xm && no.in.Q.G == w.q.G &&
		!overlapsAny(d, no.touched) {
		in, o1, K := no.in, FusedOut{w.q, d.ptr}, xm.cols
		f := &fusedOp{idx: no.idx, flush: b.flushes, in: in, x: *xm, touched: no.touched, o1: o1, y1: *d, K: K}
		b.pending[no.idx] = queuedOp{f.name(b, false), func(c *Ctx) error { return c.GEMVFused(in, K, o1, FusedOut{}, 0) }}
		b.lastNorm = nil
		b.lastFused = f
		b.fusedLaunches[in.Mode]++
		return true
	}
	// An input with no int8 form yet: quantized in the product's blocks
	// (nothing else sees that form).
	if xm.cols > fusedQuantMaxK {
		return false
	}
	for _, e := range b.quantized {
		if e.src == *xm && e.a.G == w.q.G {
			return false
		}
	}
	in, o1, K := FusedIn{Mode: fuseQuant, X: xm.ptr}, FusedOut{w.q, d.ptr}, xm.cols
	b.do("matmul quant", func(c *Ctx) error { return c.GEMVFused(in, K, o1, FusedOut{}, 0) })
	if b.err == nil {
		b.lastFused = &fusedOp{idx: len(b.pending) - 1, flush: b.flushes, in: in, x: *xm, touched: []tensor{*xm}, o1: o1, y1: *d, K: K}
	}
	b.fusedLaunches[fuseQuant]++
	return true
}

// name is the profile's name of the fused launch.
func (f *fusedOp) name(b *Backend, two bool) string {
	if b.prof == nil {
		return "matmul fused"
	}
	pre := [...]string{fuseQuant: "quant", fuseNorm: "rmsnorm", fuseAddNorm: "add+rmsnorm"}[f.in.Mode]
	n := f.o1.W.N
	if two {
		return fmt.Sprintf("%s+matmul x2 mmfp4 %dx%d+", pre, n, f.K)
	}
	return fmt.Sprintf("%s+matmul mmfp4 %dx%d", pre, n, f.K)
}

// fusedHeads queues ExpandValues' one-token products with the quantization
// of each head's block of olat in the launch, and reports whether it did.
func (b *Backend) fusedHeads(om, ol *tensor, w *weight, heads, rank, vdim int) bool {
	if !b.opts.FusedGEMV || ol.rows != 1 || w.q == nil || rank > fusedMaxK || w.n > fusedMaxRows || vdim%gemvRowsPerBlock != 0 || ol.ptr%16 != 0 || overlaps(om, ol) {
		return false
	}
	for _, e := range b.quantized {
		if e.src == *ol && e.a.G == w.q.G {
			return false
		}
	}
	in, o1 := FusedIn{Mode: fuseQuant, X: ol.ptr}, FusedOut{w.q, om.ptr}
	b.do("expand values quant", func(c *Ctx) error { return c.GEMVFused(in, rank, o1, FusedOut{}, vdim) })
	b.fusedLaunches[fuseQuant]++
	return true
}

// fusedCounter makes sure the zeroed words the norm modes and
// add_norm_gemv_pair count blocks in exist (allocating them waits for the
// queued ops).
func (b *Backend) fusedCounter() {
	if b.counter.Ptr != 0 || !(b.opts.FusedGEMV || b.opts.FusedRouter || b.opts.FusedLatent || (b.chained() && addNormProducts)) {
		return
	}
	b.now("fused counter", func(c *Ctx) error {
		buf, err := c.Alloc(256)
		if err != nil {
			return err
		}
		b.counter = buf
		return c.Memset(buf.Ptr, 0, buf.Size)
	})
}

// routerNormMaxK bounds the row moe_router_route_norm stages (2K floats of
// shared memory, under the default 48 KB).
const routerNormMaxK = 4096

// routerNorm replaces the router's product ld and the single-row RMSNorm
// queued just before it, which made its input, with one launch of
// moe_router_route_norm that also picks the experts (Route), and reports
// whether it did. The norm's outputs are written as before.
func (b *Backend) routerNorm(ld *denseOp, lm *tensor, bias *weight, cfg backend.RouterConfig, norm int, r *routing) bool {
	no := b.lastNorm
	K := ld.w.k
	if !b.opts.FusedRouter || no == nil || no.flush != b.flushes || no.idx != ld.idx-1 || no.out != ld.x ||
		lm.rows != 1 || K > routerNormMaxK || (no.in.Layout8 && (K%256 != 0 || K/8 > 32*256)) || overlapsAny(lm, no.touched) {
		return false
	}
	in, E, q := no.in, cfg.NumExperts, no.in.Q
	l8 := 0
	if in.Layout8 {
		l8 = 1
	}
	b.pending = slices.Delete(b.pending, no.idx, no.idx+1)
	b.pending[no.idx] = queuedOp{"add+rmsnorm+router+route", func(c *Ctx) error {
		k, err := c.Kernel("moe", "moe_router_route_norm")
		if err != nil {
			return err
		}
		return c.Launch(k, D1((E+7)/8), D1(256), 8*K, ld.w.dense, E, K, lm.ptr, bias.dense, cfg.TopK, norm, cfg.RoutedScaling,
			r.ids, r.wts, b.routeCounters, in.Mode, l8, in.X, in.D, in.A, in.C, in.Gain, in.Eps, in.Out, q.Q, q.Scales, q.Sums, q.G)
	}}
	b.lastNorm, b.lastDense = nil, nil
	b.fusedRouters++
	return true
}

// latentNorm replaces the single-row RMSNorm of the latent queued just
// before the two RoPEs r1, r2 (the queries', the key's) and them with one
// launch of rope2_norm_cache_write, which also writes the cache, and
// reports whether it did. The latent's int8 form is not made (no product
// reads it; a later one quantizes it again).
func (b *Backend) latentNorm(r1, r2 *ropeOp, lm, km *tensor, layer int) bool {
	no, p := b.lastNorm, b.pool
	if !b.opts.FusedLatent || no == nil || no.flush != b.flushes || no.idx != r1.idx-1 || no.out != *lm || no.in.Mode != fuseNorm ||
		lm.rows != 1 || overlapsAny(lm, []tensor{r1.m, r2.m}) || (no.in.Layout8 && lm.cols/8 > 32*256) {
		return false
	}
	in := no.in
	l8 := 0
	if in.Layout8 {
		l8 = 1
	}
	b.pending = b.pending[:no.idx]
	b.ropes = [2]*ropeOp{}
	b.lastNorm = nil
	b.wrote(lm) // its int8 form is not made here
	q := r1.m
	b.launch("rmsnorm+rope+cache write", "ops", "rope2_norm_cache_write", D1(1), D1(256),
		q.ptr, q.ld, r1.heads, r1.headStride, r1.offset, km.ptr, km.ld, r2.heads, r2.headStride, r2.offset, r2.dim, r2.il, r2.table,
		p.layer(layer), p.kernelDType(), b.meta.slots, in.X, in.Gain, in.Eps, l8, lm.ptr, p.rank, p.ropeDim)
	b.fusedLatent++
	return true
}
