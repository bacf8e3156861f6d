//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"errors"
	"fmt"
	"math/bits"

	"github.com/mmfp4/mmfp4/format"
)

// QMatrix is an MMFP4 matrix W[N,K] in device memory, in the file's layout
// (docs/format.md section 5): codes [N][K/2], scales [N][K/G], row scales [N].
type QMatrix struct {
	N, K, G                 int
	Codes, Scales, RowScale uint64
	buf                     Buffer // one allocation holding all three
	// TileMajor: the codes are in the expert kernels' tile-major order
	// (code_row in prelude.cuh), which NewExpertTable gives its matrices;
	// the products of other matrices read row-major codes.
	TileMajor bool
}

// UploadMatrix copies an MMFP4 matrix to the device as one allocation.
func (c *Ctx) UploadMatrix(m *format.Matrix) (*QMatrix, error) {
	if err := m.Validate(); err != nil {
		return nil, err
	}
	if m.K%32 != 0 {
		return nil, fmt.Errorf("cuda: MMFP4 matrix [%d,%d]: K must be a multiple of 32", m.N, m.K)
	}
	codes, scales := len(m.Codes), len(m.Scales)
	scalesOff := align(codes, 256)
	rowOff := align(scalesOff+scales, 256)
	buf, err := c.Alloc(rowOff + 4*m.N)
	if err != nil {
		return nil, err
	}
	q := &QMatrix{N: m.N, K: m.K, G: m.GroupSize, Codes: buf.Ptr, Scales: buf.At(scalesOff), RowScale: buf.At(rowOff), buf: buf}
	if err := errors.Join(CopyIn(c, q.Codes, m.Codes), CopyIn(c, q.Scales, m.Scales), CopyIn(c, q.RowScale, m.RowScale)); err != nil {
		c.Free(buf)
		return nil, err
	}
	return q, nil
}

// FreeMatrix returns q's memory to the pool.
func (c *Ctx) FreeMatrix(q *QMatrix) error { return c.Free(q.buf) }

// Bytes is the size of the matrix's codes and scales, what a product reads.
func (q *QMatrix) Bytes() int { return q.N*q.K/2 + q.N*q.K/q.G + 4*q.N }

func align(n, a int) int { return (n + a - 1) / a * a }

// QActs holds T rows of K activations quantized to int8 per group of G
// (docs/format.md section 9): Q [T][K] int8 in column order, Scales [T][K/G]
// float32, and Sums [T][K/32] int32, the sum of each 32 values (the GEMV
// kernels' offset decode needs it).
type QActs struct {
	T, K, G         int
	Q, Scales, Sums uint64
	buf             Buffer
}

// NewQActs allocates room for T quantized rows of K activations.
func (c *Ctx) NewQActs(T, K, G int) (*QActs, error) {
	if !format.ValidGroupSize(G) || K%G != 0 || T <= 0 {
		return nil, fmt.Errorf("cuda: quantized activations %dx%d with group %d", T, K, G)
	}
	qOff := 0
	sOff := align(T*K, 256)
	sumOff := align(sOff+4*T*K/G, 256)
	buf, err := c.Alloc(sumOff + 4*T*K/32)
	if err != nil {
		return nil, err
	}
	return &QActs{T: T, K: K, G: G, Q: buf.At(qOff), Scales: buf.At(sOff), Sums: buf.At(sumOff), buf: buf}, nil
}

// FreeQActs returns a's memory to the pool.
func (c *Ctx) FreeQActs(a *QActs) error { return c.Free(a.buf) }

// RMSNormQuant normalises a.T rows of x (row stride ldx floats) by their root
// mean square and gain (gain 0: no normalisation), writes the float result to
// out (row stride ldo; out 0: not written) and quantizes it into a (nil: not
// quantized). eps is added to the mean square.
func (c *Ctx) RMSNormQuant(x uint64, ldx int, gain uint64, eps float32, out uint64, ldo int, rows, K, G int, a *QActs) error {
	var q, s, sums uint64
	if a != nil {
		if a.T != rows || a.K != K || a.G != G {
			return fmt.Errorf("cuda: rmsnorm_quant: activations %dx%d/%d, want %dx%d/%d", a.T, a.K, a.G, rows, K, G)
		}
		q, s, sums = a.Q, a.Scales, a.Sums
	}
	if !format.ValidGroupSize(G) || K%G != 0 {
		return fmt.Errorf("cuda: rmsnorm_quant: K=%d, group %d", K, G)
	}
	if gain == 0 && out == 0 && a != nil && x%16 == 0 && ldx%4 == 0 && rows*(K/G) < 1<<30 {
		return c.quantRows(x, ldx, rows, K, G, a)
	}
	k, err := c.Kernel("quant", "rmsnorm_quant")
	if err != nil {
		return err
	}
	// Without a norm, blocks of eight groups (QUANT_THREADS/32) each; a
	// norm stays one block per row, since it may write over its input.
	groupBlocks := 1
	if gain == 0 {
		groupBlocks = (K/G + 7) / 8
	}
	return c.Launch(k, Dim{uint32(rows), uint32(groupBlocks), 1}, D1(256), 0, x, ldx, gain, eps, out, ldo, q, s, sums, K, G)
}

// quantRows is RMSNormQuant without a norm or a float output (quant_rows):
// up to eight groups a warp, fewer where that would leave fewer than two
// blocks of eight warps a multiprocessor.
func (c *Ctx) quantRows(x uint64, ldx int, rows, K, G int, a *QActs) error {
	k, err := c.Kernel("quant", "quant_rows")
	if err != nil {
		return err
	}
	const warps, maxGroups = 8, 8
	groups := rows * (K / G)
	if groups == 0 {
		return nil
	}
	gpw := groups / (2 * max(c.Info().SMs, 1) * warps)
	gpw = max(1, min(maxGroups, gpw))
	per := warps * gpw
	return c.Launch(k, D1((groups+per-1)/per), D1(warps*32), 0, x, ldx, a.Q, a.Scales, a.Sums, rows, K, G, gpw)
}

// rowNorm8 reports whether rmsnorm_quant8 takes rows of K values in groups
// of G at these addresses and strides (floats): K/8 threads a multiple of
// 32 up to 1024, whole groups per warp, 16-byte alignment.
func rowNorm8(K, G int, ptrs []uint64, lds []int) bool {
	if K%256 != 0 || K/8 > 1024 || (G != 32 && G != 64 && G != 128) {
		return false
	}
	for _, p := range ptrs {
		if p%16 != 0 {
			return false
		}
	}
	for _, ld := range lds {
		if ld%4 != 0 {
			return false
		}
	}
	return true
}

// RMSNormQuant8 is RMSNormQuant (with a gain and quantized output) or
// AddRMSNormQuant (a != 0) on rows held in registers; see rowNorm8.
func (c *Ctx) RMSNormQuant8(x uint64, ldx int, d uint64, ldd int, a uint64, lda int, cc uint64, ldc int, gain uint64, eps float32, out uint64, ldo int, rows, K, G int, q *QActs) error {
	if q == nil || q.T != rows || q.K != K || q.G != G || gain == 0 {
		return fmt.Errorf("cuda: rmsnorm_quant8: want a gain and activations %dx%d/%d", rows, K, G)
	}
	k, err := c.Kernel("quant", "rmsnorm_quant8")
	if err != nil {
		return err
	}
	return c.Launch(k, D1(rows), D1(K/8), 0, x, ldx, d, ldd, a, lda, cc, ldc, gain, eps, out, ldo, q.Q, q.Scales, q.Sums, K, G)
}

// AddRMSNormQuant is d = a + c (rows of K floats) followed by
// RMSNormQuant of d, in one launch (one block per row).
func (c *Ctx) AddRMSNormQuant(d uint64, ldd int, a uint64, lda int, cc uint64, ldc int, gain uint64, eps float32, out uint64, ldo int, rows, K, G int, q *QActs) error {
	if q == nil || q.T != rows || q.K != K || q.G != G || gain == 0 {
		return fmt.Errorf("cuda: add_rmsnorm_quant: want a gain and activations %dx%d/%d", rows, K, G)
	}
	if !format.ValidGroupSize(G) || K%G != 0 {
		return fmt.Errorf("cuda: add_rmsnorm_quant: K=%d, group %d", K, G)
	}
	k, err := c.Kernel("quant", "add_rmsnorm_quant")
	if err != nil {
		return err
	}
	return c.Launch(k, D1(rows), D1(256), 0, d, ldd, a, lda, cc, ldc, gain, eps, out, ldo, q.Q, q.Scales, q.Sums, K, G)
}

// GEMVVariant picks the GEMV kernel.
type GEMVVariant int

const (
	// GEMVAuto: the split dp4a kernel for one token, the tensor-core
	// kernel for 3..8 tokens at G = 128, else the offset dp4a kernel.
	GEMVAuto GEMVVariant = iota
	// GEMVOffset: dp4a on the +128 offset codes, one dp4a per four weights
	// and token.
	GEMVOffset
	// GEMVSplit: dp4a with positive and negative codes apart (two dp4a per
	// four weights, fewer integer operations); one token only.
	GEMVSplit
	// GEMVMMA: int8 mma.sync on the offset codes, 16 rows x 8 tokens per
	// instruction; G = 128 only.
	GEMVMMA
)

const gemvRowsPerBlock = 4 * 4 // WARPS * R in gemv.cu

var gemvKernels = [...]string{1: "gemv_t1", "gemv_t2", "gemv_t3", "gemv_t4", "gemv_t5", "gemv_t6", "gemv_t7", "gemv_t8"}

// GEMVRows is GEMV over all a.T rows of a, eight rows a launch.
func (c *Ctx) GEMVRows(y uint64, ldy int, w *QMatrix, a *QActs) error {
	for t := 0; t < a.T; t += 8 {
		if err := c.GEMV(y+4*uint64(t*ldy), ldy, w, actRows(a, t, min(8, a.T-t)), GEMVAuto); err != nil {
			return err
		}
	}
	return nil
}

// GEMV computes y[t*ldy + n] = sum_k W[n,k] x[t,k] for the a.T (1..8)
// quantized rows of a, with the integer MMFP4 product.
func (c *Ctx) GEMV(y uint64, ldy int, w *QMatrix, a *QActs, v GEMVVariant) error {
	if a.K != w.K || a.G != w.G {
		return fmt.Errorf("cuda: gemv: activations K=%d G=%d, weights [%d,%d] G=%d", a.K, a.G, w.N, w.K, w.G)
	}
	if a.T < 1 || a.T > 8 {
		return fmt.Errorf("cuda: gemv: %d tokens, want 1..8", a.T)
	}
	if ldy < w.N && a.T > 1 {
		return fmt.Errorf("cuda: gemv: output stride %d below N=%d", ldy, w.N)
	}
	if v == GEMVAuto {
		// Measured on an H200 (docs/perf.md): split 95% of the copy
		// bandwidth at one token; at two the offset dp4a kernel and the
		// tensor-core kernel tie (67%, 65%); from three on dp4a falls off
		// (51% at four) and the tensor cores hold about 61-65%.
		switch {
		case a.T == 1:
			v = GEMVSplit
		case a.T >= 3 && w.G == 128:
			v = GEMVMMA
		default:
			v = GEMVOffset
		}
	}
	switch v {
	case GEMVMMA:
		if w.G != 128 {
			return fmt.Errorf("cuda: gemv: the tensor-core kernel needs group size 128, not %d", w.G)
		}
		k, err := c.Kernel("gemv", "gemv_mma")
		if err != nil {
			return err
		}
		return c.Launch(k, D1((w.N+15)/16), D1(128), 0, w.Codes, w.Scales, w.RowScale, w.N, w.K, a.Q, a.Scales, a.Sums, y, ldy, a.T)
	case GEMVSplit:
		if a.T != 1 {
			return fmt.Errorf("cuda: gemv: the split kernel takes one token, not %d", a.T)
		}
	}
	name := gemvKernels[a.T]
	rows := gemvRowsPerBlock
	if v == GEMVSplit {
		name = "gemv_split_t1"
		if C := w.K / 32; C > 64 && C <= 32*gemvRegsC && !gemvNoRegs {
			name, rows = "gemv_split_t1_regs", gemvRegsRowsPerBlock
		}
	}
	k, err := c.Kernel("gemv", name)
	if err != nil {
		return err
	}
	gshift := bits.TrailingZeros(uint(w.G / 32))
	grid := (w.N + rows - 1) / rows
	return c.Launch(k, D1(grid), D1(128), 0, w.Codes, w.Scales, w.RowScale, w.N, w.K, gshift, a.Q, a.Scales, a.Sums, y, ldy)
}

// gemvRegsC is GEMV_REGS_C in gemv.cu: gemv_split_t1_regs takes rows of
// up to 32*gemvRegsC chunks (32 columns each), all requested before its
// wait; gemvNoRegs keeps such rows on gemv_split_t1 (comparisons).
const gemvRegsC = 5

var gemvNoRegs bool

// gemvRegsRowsPerBlock is the rows a block of gemv_split_t1_regs takes
// (WARPS * R in gemv.cu).
const gemvRegsRowsPerBlock = 4 * 2

// gemvRowsPerWarp is R in gemv.cu: the rows one warp of the dp4a kernels
// takes.
const gemvRowsPerWarp = 4

// GEMVHeads computes, for one token, y[h*rows+n] = W[h*rows+n] . x_h for
// heads heads: W [heads*rows, k] holds each head's rows in turn and x_h is
// columns [h*k, (h+1)*k) of the quantized row a (a.K = heads*k, whole
// groups per head). One launch of the split dp4a kernel.
func (c *Ctx) GEMVHeads(y uint64, w *QMatrix, a *QActs, heads, rows int) error {
	k := w.K
	switch {
	case a.T != 1 || a.K != heads*k || a.G != w.G || k%w.G != 0:
		return fmt.Errorf("cuda: gemv heads: activations %dx%d G=%d for %d heads of [%d,%d] G=%d", a.T, a.K, a.G, heads, rows, k, w.G)
	case w.N != heads*rows || rows%gemvRowsPerWarp != 0:
		return fmt.Errorf("cuda: gemv heads: %d rows for %d heads of %d", w.N, heads, rows)
	}
	kern, err := c.Kernel("gemv", "gemv_split_heads")
	if err != nil {
		return err
	}
	gshift := bits.TrailingZeros(uint(w.G / 32))
	grid := (w.N + gemvRowsPerBlock - 1) / gemvRowsPerBlock
	return c.Launch(kern, D1(grid), D1(128), 0, w.Codes, w.Scales, w.RowScale, w.N, k, gshift, a.Q, a.Scales, a.Sums, y, rows)
}

// ExpertMats are one expert's matrices on the device: gate and up [I,K],
// down [K,I].
type ExpertMats struct{ Gate, Up, Down *QMatrix }

// ExpertTable holds the device addresses of a MoE layer's experts, the
// routed ones then the shared ones, for the MoE kernels to look up by id.
type ExpertTable struct {
	Routed, Shared int
	I, K, G        int
	buf            Buffer
}

// NewExpertTable checks that the experts share their shapes and group size,
// puts their codes in tile-major order (once a matrix: the MoE kernels
// read only that) and uploads their addresses.
func (c *Ctx) NewExpertTable(routed, shared []ExpertMats) (*ExpertTable, error) {
	all := append(append([]ExpertMats{}, routed...), shared...)
	if len(routed) == 0 {
		return nil, fmt.Errorf("cuda: expert table without routed experts")
	}
	t := &ExpertTable{Routed: len(routed), Shared: len(shared), I: all[0].Gate.N, K: all[0].Gate.K, G: all[0].Gate.G}
	// Tile-major codes: rows in 16s and columns in 128s, for gate and up
	// [I,K] and down [K,I] alike.
	if t.I%128 != 0 || t.K%128 != 0 {
		return nil, fmt.Errorf("cuda: expert table of [%d,%d] matrices: tile-major codes need both sizes in 128s", t.I, t.K)
	}
	ptrs := make([]uint64, 0, 9*len(all))
	for i, e := range all {
		for _, m := range []struct {
			name string
			q    *QMatrix
			n, k int
		}{{"gate", e.Gate, t.I, t.K}, {"up", e.Up, t.I, t.K}, {"down", e.Down, t.K, t.I}} {
			if m.q.N != m.n || m.q.K != m.k || m.q.G != t.G {
				return nil, fmt.Errorf("cuda: expert %d %s is [%d,%d] G=%d, want [%d,%d] G=%d", i, m.name, m.q.N, m.q.K, m.q.G, m.n, m.k, t.G)
			}
			ptrs = append(ptrs, m.q.Codes, m.q.Scales, m.q.RowScale)
		}
	}
	if err := c.tileMajor(all, t.I*t.K/2); err != nil {
		return nil, err
	}
	buf, err := c.Alloc(8 * len(ptrs))
	if err != nil {
		return nil, err
	}
	t.buf = buf
	return t, CopyIn(c, buf.Ptr, ptrs)
}

// tileMajor puts the codes of the experts' matrices (n bytes each) in
// tile-major order in place, through one scratch copy, leaving those that
// already are.
func (c *Ctx) tileMajor(experts []ExpertMats, n int) error {
	k, err := c.Kernel("ops", "codes_tile_major")
	if err != nil {
		return err
	}
	tmp, err := c.Alloc(n)
	if err != nil {
		return err
	}
	defer c.Free(tmp)
	for _, e := range experts {
		for _, q := range []*QMatrix{e.Gate, e.Up, e.Down} {
			if q.TileMajor {
				continue
			}
			if err := c.CopyDevice(tmp.Ptr, q.Codes, n); err != nil {
				return err
			}
			if err := c.Launch(k, D1(min((n/16+255)/256, 4096)), D1(256), 0, tmp.Ptr, q.Codes, q.N, q.K); err != nil {
				return err
			}
			q.TileMajor = true
		}
	}
	return nil
}

// FreeExpertTable returns the table's memory (not the matrices') to the pool.
func (c *Ctx) FreeExpertTable(t *ExpertTable) error { return c.Free(t.buf) }

// RouteConfig is the noaux_tc expert choice (DESIGN.md section 3).
type RouteConfig struct {
	TopK, Groups, TopKGroups int
	Norm                     bool
	Scaling                  float32
}

// Route chooses experts for T rows of normalised activations x (rows ldx
// floats apart): gate holds the router's fp32 weights [E][K], bias its E
// score corrections. It writes T*TopK expert ids (int32) and weights, and,
// unless logits is 0, the T*E router logits.
func (c *Ctx) Route(gate, bias, x uint64, ldx, T, E, K int, cfg RouteConfig, ids, wts, logits uint64) error {
	switch {
	case E > 512 || cfg.TopK < 1 || cfg.TopK > E || K%4 != 0 || ldx%4 != 0:
		return fmt.Errorf("cuda: route: %d experts, top %d, K=%d, ldx=%d", E, cfg.TopK, K, ldx)
	case cfg.Groups > 1 && (cfg.Groups > 64 || E%cfg.Groups != 0 || cfg.TopKGroups < 1):
		return fmt.Errorf("cuda: route: %d experts in %d groups, top %d groups", E, cfg.Groups, cfg.TopKGroups)
	}
	k, err := c.Kernel("moe", "moe_route")
	if err != nil {
		return err
	}
	norm := 0
	if cfg.Norm {
		norm = 1
	}
	return c.Launch(k, D1(T), D1(256), 0, gate, bias, x, ldx, E, K, cfg.TopK, cfg.Groups, cfg.TopKGroups, norm, cfg.Scaling, ids, wts, logits)
}

// RouterRoute launches the router's product and the expert choice in one
// kernel for T rows (x rows ldx floats apart, logits rows ldl): W [E][K]
// fp32, bias E floats; ids and wts get topk entries a row; counters (T
// words, zero between calls) count each row's blocks. moe_router_cluster
// for 64 experts and moe_router_fast for the others where they fit (E <=
// 128, K <= 2048, 16-byte aligned rows), else moe_router_route; all give
// the same bits. With q (T rows of K in
// groups of G, where RouterFastFits), the launch also writes x's int8 form
// into q, as RMSNormQuant without a gain would.
func (c *Ctx) RouterRoute(W uint64, E, K int, x uint64, ldx, T int, logits uint64, ldl int, bias uint64, topk int, norm bool, scaling float32, ids, wts, counters uint64, q *QActs) error {
	n := 0
	if norm {
		n = 1
	}
	if RouterFastFits(E, K, x, ldx, topk) {
		var xq, xs, xsum uint64
		G := 32
		if q != nil {
			if q.T != T || q.K != K || !format.ValidGroupSize(q.G) || K%q.G != 0 {
				return fmt.Errorf("cuda: router: activations %dx%d/%d for %d rows of %d", q.T, q.K, q.G, T, K)
			}
			xq, xs, xsum, G = q.Q, q.Scales, q.Sums, q.G
		}
		if E == routerClusterE && !routerNoCluster {
			k, err := c.Kernel("moe", "moe_router_cluster")
			if err != nil {
				return err
			}
			return c.Launch(k, Dim{routerClusterE / 8, uint32(T), 1}, D1(256), 4*K, W, K, x, ldx, logits, ldl, bias, topk, n, scaling, ids, wts,
				xq, xs, xsum, G)
		}
		k, err := c.Kernel("moe", "moe_router_fast")
		if err != nil {
			return err
		}
		return c.Launch(k, Dim{uint32((E + 3) / 4), uint32(T), 1}, D1(128), 4*K, W, E, K, x, ldx, logits, ldl, bias, topk, n, scaling, ids, wts, counters,
			xq, xs, xsum, G)
	}
	if q != nil {
		return fmt.Errorf("cuda: router: the int8 form of the input needs moe_router_fast (E=%d, K=%d)", E, K)
	}
	k, err := c.Kernel("moe", "moe_router_route")
	if err != nil {
		return err
	}
	return c.Launch(k, Dim{uint32((E + 7) / 8), uint32(T), 1}, D1(256), 0, W, E, K, x, ldx, logits, ldl, bias, topk, n, scaling, ids, wts, counters)
}

// RouterFastFits reports whether RouterRoute takes moe_router_fast for
// these experts, input and choice (and so can write the input's int8
// form): E <= 128, K <= 2048, 16-byte aligned rows.
func RouterFastFits(E, K int, x uint64, ldx, topk int) bool {
	return E <= 128 && K <= 2048 && K%4 == 0 && ldx%4 == 0 && x%16 == 0 && topk <= 32 && !routerSlow
}

// routerSlow makes RouterRoute use moe_router_route always (benchmarks).
var routerSlow bool

// routerClusterE is the number of experts of moe_router_cluster (one
// cluster of 8 blocks of 8 warps a row), which RouterRoute takes for them
// instead of moe_router_fast (the same bits) unless routerNoCluster
// (benchmarks and tests).
const routerClusterE = 64

var routerNoCluster bool

// MoEScratch is the work space of MoE for one token: each slot's SiLU
// product and its int8 form, each slot's down product, and the down
// kernel's per-row-block counters (zero between calls).
type MoEScratch struct {
	H, Partial, Counters Buffer
	HQ                   *QActs
	// Groups are moe_gate_up_q's counters, a word for each group of G rows
	// of each slot's h (zero between calls).
	Groups Buffer
}

// NewMoEScratch allocates MoE's work space for topk routed experts.
func (c *Ctx) NewMoEScratch(t *ExpertTable, topk int) (*MoEScratch, error) {
	slots := topk + t.Shared
	s := &MoEScratch{}
	var err1, err2, err3, err4, err5 error
	s.H, err1 = c.Alloc(4 * slots * t.I)
	s.Partial, err2 = c.Alloc(4 * slots * t.K)
	s.Counters, err3 = c.Alloc(4 * ((t.K + 15) / 16))
	s.HQ, err4 = c.NewQActs(slots, t.I, t.G)
	s.Groups, err5 = c.Alloc(4 * slots * t.I / t.G)
	if err := errors.Join(err1, err2, err3, err4, err5); err != nil {
		c.Free(s.H)
		c.Free(s.Partial)
		c.Free(s.Counters)
		c.Free(s.Groups)
		if s.HQ != nil {
			c.FreeQActs(s.HQ)
		}
		return nil, err
	}
	return s, errors.Join(c.Memset(s.Counters.Ptr, 0, s.Counters.Size), c.Memset(s.Groups.Ptr, 0, s.Groups.Size))
}

// FreeMoEScratch returns the work space to the pool.
func (c *Ctx) FreeMoEScratch(s *MoEScratch) error {
	return errors.Join(c.Free(s.H), c.Free(s.Partial), c.Free(s.Counters), c.Free(s.Groups), c.FreeQActs(s.HQ))
}

// MoE computes, for one token with quantized activations x,
// y (+)= sum_k wts[k] * expert_{ids[k]}(x) + sum of the shared experts(x),
// expert(x) = down(silu(gate x) * up x), in two launches: the gate and up
// products of all experts with the SiLU product, each group of h
// quantized by the last block that wrote into it (moe_gate_up_q), then the
// down products of every slot for a few rows in one block, summed there
// with their weights (moe_down_hq). Shapes beyond those kernels (K or I
// above 2048, more than 8 slots) take moe_gate_up and moe_down_q, each
// down block quantizing its slot's h (or, when the intermediate size
// exceeds moeMaxI, a quantization launch and moe_down). With accumulate,
// the sum is added to y.
func (c *Ctx) MoE(y uint64, accumulate bool, t *ExpertTable, ids, wts uint64, topk int, x *QActs, s *MoEScratch) error {
	slots := topk + t.Shared
	switch {
	case x.T != 1 || x.K != t.K || x.G != t.G:
		return fmt.Errorf("cuda: moe: activations %dx%d G=%d, want 1x%d G=%d", x.T, x.K, x.G, t.K, t.G)
	case s.HQ.T != slots || s.HQ.K != t.I:
		return fmt.Errorf("cuda: moe: scratch for %d slots of %d, want %d of %d", s.HQ.T, s.HQ.K, slots, t.I)
	}
	gshift := bits.TrailingZeros(uint(t.G / 32))
	acc := 0
	if accumulate {
		acc = 1
	}
	if slots <= moeSlotsMax && t.K <= moeRowsMaxK && t.I <= moeRowsMaxK && t.I%t.G == 0 && !moeDownOld {
		down, err := c.Kernel("moe", "moe_down_hq")
		if err != nil {
			return err
		}
		if !moeGateUpQ && t.I%128 == 0 && c.info.CC >= 90 {
			gc, err := c.Kernel("moe", "moe_gate_up_c")
			if err != nil {
				return err
			}
			if err := c.Launch(gc, Dim{uint32(t.I / 16), uint32(slots), 1}, D1(128), 0,
				t.buf, ids, topk, t.Routed, t.I, t.K, gshift, x.Q, x.Scales, s.H, s.HQ.Q, s.HQ.Scales); err != nil {
				return err
			}
		} else {
			gu, err := c.Kernel("moe", "moe_gate_up_q")
			if err != nil {
				return err
			}
			if err := c.Launch(gu, Dim{uint32((t.I + 15) / 16), uint32(slots), 1}, D1(128), 0,
				t.buf, ids, topk, t.Routed, t.I, t.K, gshift, x.Q, x.Scales, s.H, s.HQ.Q, s.HQ.Scales, s.Groups); err != nil {
				return err
			}
		}
		// The routing is an input of the gate/up launch just queued, so
		// the down launch reads it before its wait.
		return c.Launch(down, D1((t.K+3)/4), D1(32*slots), 0,
			c.aheadArgs(t.buf, ids, wts, topk, t.Routed, t.K, t.I, gshift, s.HQ.Q, s.HQ.Scales, y, acc)...)
	}
	gu, err := c.Kernel("moe", "moe_gate_up")
	if err != nil {
		return err
	}
	down, err := c.Kernel("moe", "moe_down")
	if err != nil {
		return err
	}
	if err := c.Launch(gu, Dim{uint32((t.I + 15) / 16), uint32(slots), 1}, D1(128), 0,
		t.buf, ids, topk, t.Routed, t.I, t.K, gshift, x.Q, x.Scales, x.Sums, s.H); err != nil {
		return err
	}
	if t.I <= moeMaxI {
		// The quantization of h inside the down kernel: two launches.
		dq, err := c.Kernel("moe", "moe_down_q")
		if err != nil {
			return err
		}
		return c.Launch(dq, Dim{uint32((t.K + 15) / 16), uint32(slots), 1}, D1(128), 0,
			t.buf, ids, wts, topk, slots, t.Routed, t.K, t.I, gshift, s.H, s.Partial, s.Counters, y, acc)
	}
	if err := c.RMSNormQuant(s.H.Ptr, t.I, 0, 0, 0, 0, slots, t.I, t.G, s.HQ); err != nil {
		return err
	}
	return c.Launch(down, Dim{uint32((t.K + 15) / 16), uint32(slots), 1}, D1(128), 0,
		t.buf, ids, wts, topk, slots, t.Routed, t.K, t.I, gshift, s.HQ.Q, s.HQ.Scales, s.HQ.Sums,
		s.Partial, s.Counters, y, acc)
}

// moeSlotsMax is DOWN_SLOTS_MAX in moe.cu (the warps of a moe_down_hq
// block), and moeRowsMaxK the longest rows of moe_gate_up_q and
// moe_down_hq (ROUTER_FAST_MAX_K: one round of loads a lane, the input in
// shared memory).
const (
	moeSlotsMax = 8
	moeRowsMaxK = 2048
)

// moeDownOld makes MoE use moe_gate_up and moe_down_q (benchmarks and
// tests).
var moeDownOld bool

// moeGateUpQ makes MoE's single-token path take moe_gate_up_q (each group
// of h quantized by the last of its blocks, through a counter) where it
// would take moe_gate_up_c (the group quantized inside a cluster; an
// intermediate size a multiple of 128, compute capability 9.0): tests and
// benchmarks.
var moeGateUpQ bool

// moeMaxI is MOE_MAX_I in moe.cu: the largest intermediate size whose
// quantization moe_down_q holds in shared memory.
const moeMaxI = 4096

// Spin keeps the GPU busy for about the given number of cycles (for timing).
func (c *Ctx) Spin(cycles int64) error {
	k, err := c.Kernel("util", "spin")
	if err != nil {
		return err
	}
	return c.Launch(k, D1(1), D1(1), 0, uint64(cycles))
}
