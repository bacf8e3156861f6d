//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"

	"github.com/mmfp4/mmfp4/backend"
)

// GEMMTile picks the token tile of the tensor-core GEMM (gemm.cu).
type GEMMTile int

const (
	// GEMMTileAuto: 64 tokens a block from gemmWideTokens tokens on, else 16.
	GEMMTileAuto GEMMTile = iota
	// GEMMTile16: blocks of 128 rows x 16 tokens (4 warps).
	GEMMTile16
	// GEMMTile64: blocks of 128 rows x 64 tokens, 8 warps of 16 rows x 64
	// tokens (each widened code feeds 8 mma).
	GEMMTile64
)

// gemmRows and gemmBK are GEMM_ROWS and GEMM_BK in gemm.cu: the weight rows
// of a block and the columns of a pipeline stage (K must be a multiple).
const (
	gemmRows = 128
	gemmBK   = 128
	// gemmStages, gemmAStride: GEMM_STAGES, GEMM_ASTRIDE.
	gemmStages  = 4
	gemmAStride = 80
)

// gemmWideTokens is where the 64-token tile takes over from the 16-token
// one in a product; moeWideTokens the same for the average expert segment
// of MoEBatched (measured on an H200 with the earlier 64-token tile of two
// m-tiles a warp: the 16-token tile leads up to 128 tokens a product and
// ties at 256; in the MoE it leads at 10 tokens an expert and trails from
// about 40. The present 64-token tile: MoE 364 against 314 us at 256
// tokens, 625 against 906 at 1024).
const (
	gemmWideTokens = 256
	moeWideTokens  = 32
)

func (t GEMMTile) tokens() int {
	switch t {
	case GEMMTile64:
		return 64
	}
	return 16
}

// suffix names the kernel variant: the tile, and "_g128" for the one
// specialised to groups of 128 (its stage loops unroll).
func (t GEMMTile) suffix(G int) string {
	s := "t16"
	switch t {
	case GEMMTile64:
		s = "t64"
	}
	if G == 128 {
		s += "_g128"
	}
	return s
}

// gemmT64Kind picks GEMMTile64's kernels for groups of 128: "e" (a block
// asks for its first stages before it reads its weight scales, and a MoE
// block reads its tile's words in one round trip: measured on an H200,
// the batched MoE 2-5% faster at 512 tokens, 0-3% at 1024, the same
// bits); tests set "" (the scales first, as before) to compare the two.
var gemmT64Kind = "e"

// kindSuffix is suffix with gemmT64Kind's kernels for GEMMTile64 at G = 128.
func (t GEMMTile) kindSuffix(G int) string {
	if t == GEMMTile64 && G == 128 {
		return "t64" + gemmT64Kind + "_g128"
	}
	return t.suffix(G)
}

func (t GEMMTile) threads() int {
	switch t {
	case GEMMTile64:
		return 256
	}
	return 128
}

// shared is the tile's dynamic shared memory for gk scale groups a row:
// the cp.async stages (codes, activations, activation scales), the E4M3
// table (256 floats), then the block's weight scales.
func (t GEMMTile) shared(gk int) int {
	return gemmStages*(gemmRows*gemmAStride+t.tokens()*(gemmBK+16)) + 1024 + gemmRows*gk
}

func pickTile(t GEMMTile, tokens int) GEMMTile {
	if t != GEMMTileAuto {
		return t
	}
	if tokens >= gemmWideTokens {
		return GEMMTile64
	}
	return GEMMTile16
}

// GEMMFits reports whether the tensor-core GEMM takes a matrix of K
// columns in groups of G.
func GEMMFits(K, G int) bool {
	return K > 0 && K%gemmBK == 0 && (G == 32 || G == 64 || G == 128) && K/G <= 1024
}

// GEMM computes y[t*ldy + n] = sum_k W[n,k] x[t,k] for the a.T quantized
// rows of a on the tensor cores (the integer MMFP4 product of GEMV).
func (c *Ctx) GEMM(y uint64, ldy int, w *QMatrix, a *QActs, tile GEMMTile) error {
	switch {
	case a.K != w.K || a.G != w.G:
		return fmt.Errorf("cuda: gemm: activations K=%d G=%d, weights [%d,%d] G=%d", a.K, a.G, w.N, w.K, w.G)
	case !GEMMFits(w.K, w.G):
		return fmt.Errorf("cuda: gemm: K=%d G=%d: K must be a multiple of %d, G 32, 64 or 128", w.K, w.G, gemmBK)
	case a.T < 1:
		return fmt.Errorf("cuda: gemm: %d tokens", a.T)
	case ldy < w.N && a.T > 1:
		return fmt.Errorf("cuda: gemm: output stride %d below N=%d", ldy, w.N)
	}
	return c.gemm(y, ldy, w.Codes, w.Scales, w.RowScale, w.N, w.K, w.G, a, 1, tile)
}

// gemm launches the dense GEMM kernel over heads products of n rows and k
// columns (see GEMMHeads; heads = 1: one product).
func (c *Ctx) gemm(y uint64, ldy int, codes, scales, rowScale uint64, n, k, G int, a *QActs, heads int, tile GEMMTile) error {
	tile = pickTile(tile, a.T)
	shared := tile.shared(k / G)
	kern, err := c.kernelShared("gemm", "gemm_"+tile.kindSuffix(G), shared)
	if err != nil {
		return err
	}
	grid := Dim{uint32((n + gemmRows - 1) / gemmRows), uint32((a.T + tile.tokens() - 1) / tile.tokens()), uint32(heads)}
	return c.Launch(kern, grid, D1(tile.threads()), shared, codes, scales, rowScale, n, k, G, a.Q, a.K, a.Scales, a.K/G, a.T, y, ldy)
}

// GEMMPair computes y1 = W1 x and y2 = W2 x (as GEMM) for the same
// quantized rows a in one launch: products whose blocks alone fill less
// than a wave of the device (q_a and kv_a of a prefill) run side by side.
func (c *Ctx) GEMMPair(y1 uint64, ldy1 int, w1 *QMatrix, y2 uint64, ldy2 int, w2 *QMatrix, a *QActs, tile GEMMTile) error {
	switch {
	case a.K != w1.K || a.G != w1.G || a.K != w2.K || a.G != w2.G:
		return fmt.Errorf("cuda: gemm pair: activations K=%d G=%d, weights [%d,%d] G=%d and [%d,%d] G=%d", a.K, a.G, w1.N, w1.K, w1.G, w2.N, w2.K, w2.G)
	case !GEMMFits(a.K, a.G):
		return fmt.Errorf("cuda: gemm pair: K=%d G=%d: K must be a multiple of %d, G 32, 64 or 128", a.K, a.G, gemmBK)
	case a.T < 1:
		return fmt.Errorf("cuda: gemm pair: %d tokens", a.T)
	case a.T > 1 && (ldy1 < w1.N || ldy2 < w2.N):
		return fmt.Errorf("cuda: gemm pair: output strides %d, %d below N=%d, %d", ldy1, ldy2, w1.N, w2.N)
	}
	tile = pickTile(tile, a.T)
	shared := tile.shared(a.K / a.G)
	kern, err := c.kernelShared("gemm", "gemm_pair_"+tile.kindSuffix(a.G), shared)
	if err != nil {
		return err
	}
	rows := max(w1.N, w2.N)
	grid := Dim{uint32((rows + gemmRows - 1) / gemmRows), uint32((a.T + tile.tokens() - 1) / tile.tokens()), 2}
	return c.Launch(kern, grid, D1(tile.threads()), shared, w1.Codes, w1.Scales, w1.RowScale, w1.N, y1, ldy1,
		w2.Codes, w2.Scales, w2.RowScale, w2.N, y2, ldy2, a.K, a.G, a.Q, a.K, a.Scales, a.K/a.G, a.T)
}

// gemmOp is a GEMM just queued, which the next product of the same rows
// may join (gemmPair).
type gemmOp struct {
	idx, flush int
	a          *QActs
	w          *QMatrix
	out        tensor
}

// gemmPairMaxBlocks: a product joins the one queued before it when each
// alone has fewer 64-token blocks than this (the H200's 132
// multiprocessors).
const gemmPairMaxBlocks = 132

// gemmPair queues d = x w^T (the rows of a) in the launch of the GEMM
// queued just before it, when that one read the same rows and neither
// fills a wave alone, and reports whether it did.
func (b *Backend) gemmPair(d *tensor, a *QActs, w *weight) bool {
	g := b.lastGEMM
	b.lastGEMM = nil
	blocks := func(n int) int { return (n + gemmRows - 1) / gemmRows * ((a.T + 63) / 64) }
	if !b.chained() || g == nil || g.flush != b.flushes || g.idx != len(b.pending)-1 || g.a != a ||
		g.w.K != w.q.K || g.w.G != w.q.G || overlaps(d, &g.out) ||
		blocks(g.w.N) >= gemmPairMaxBlocks || blocks(w.q.N) >= gemmPairMaxBlocks {
		return false
	}
	w1, w2, o1, o2 := g.w, w.q, g.out, *d
	name := "matmul pair"
	if b.prof != nil {
		name = fmt.Sprintf("matmul pair mmfp4 %dx%d+%dx%d", w1.N, w1.K, w2.N, w2.K)
	}
	b.pending[g.idx] = queuedOp{name, func(c *Ctx) error {
		return c.GEMMPair(o1.ptr, o1.ld, w1, o2.ptr, o2.ld, w2, a, GEMMTileAuto)
	}}
	b.gemmPairs++
	return true
}

// noteGEMM remembers a GEMM just queued (gemmPair).
func (b *Backend) noteGEMM(d *tensor, a *QActs, w *weight) {
	b.lastGEMM = nil
	if b.err == nil && len(b.pending) > 0 {
		b.lastGEMM = &gemmOp{idx: len(b.pending) - 1, flush: b.flushes, a: a, w: w.q, out: *d}
	}
}

// GEMMHeads computes, for each head h < heads and each of the a.T rows,
// y[t*ldy + h*rows + n] = W[h*rows+n] . x_h[t], where x_h is columns
// [h*k, (h+1)*k) of the quantized row (a.K = heads*k, whole groups per
// head) and W [heads*rows, k]: every head's product in one launch.
func (c *Ctx) GEMMHeads(y uint64, ldy int, w *QMatrix, a *QActs, heads, rows int, tile GEMMTile) error {
	k := w.K
	switch {
	case a.K != heads*k || a.G != w.G || k%w.G != 0 || !GEMMFits(k, w.G):
		return fmt.Errorf("cuda: gemm heads: activations %dx%d G=%d for %d heads of [%d,%d] G=%d", a.T, a.K, a.G, heads, rows, k, w.G)
	case w.N != heads*rows || ldy < w.N:
		return fmt.Errorf("cuda: gemm heads: %d rows for %d heads of %d, output stride %d", w.N, heads, rows, ldy)
	}
	return c.gemm(y, ldy, w.Codes, w.Scales, w.RowScale, rows, k, w.G, a, heads, tile)
}

// GEMMHeadsQuant is GEMMHeads that also writes the int8 form of y's rows
// into q in groups of 128 (what quant_rows computes from y, bit for bit):
// rows a multiple of 128, so that each group lies in one head and one
// block of the kernel.
func (c *Ctx) GEMMHeadsQuant(y uint64, ldy int, w *QMatrix, a *QActs, heads, rows int, tile GEMMTile, q *QActs) error {
	k := w.K
	switch {
	case a.K != heads*k || a.G != w.G || k%w.G != 0 || !GEMMFits(k, w.G):
		return fmt.Errorf("cuda: gemm heads quant: activations %dx%d G=%d for %d heads of [%d,%d] G=%d", a.T, a.K, a.G, heads, rows, k, w.G)
	case w.N != heads*rows || ldy < w.N || rows%gemmRows != 0:
		return fmt.Errorf("cuda: gemm heads quant: %d rows for %d heads of %d (a multiple of %d), output stride %d", w.N, heads, rows, gemmRows, ldy)
	case q.T != a.T || q.K != w.N || q.G != gemmRows:
		return fmt.Errorf("cuda: gemm heads quant: int8 form %dx%d G=%d, want %dx%d G=%d", q.T, q.K, q.G, a.T, w.N, gemmRows)
	}
	tile = pickTile(tile, a.T)
	shared := tile.shared(k / w.G)
	kern, err := c.kernelShared("gemm", "gemm_heads_q_"+tile.kindSuffix(w.G), shared)
	if err != nil {
		return err
	}
	grid := Dim{uint32(rows / gemmRows), uint32((a.T + tile.tokens() - 1) / tile.tokens()), uint32(heads)}
	return c.Launch(kern, grid, D1(tile.threads()), shared, w.Codes, w.Scales, w.RowScale, rows, k, w.G,
		a.Q, a.K, a.Scales, a.K/w.G, a.T, y, ldy, q.Q, q.Scales, q.Sums, q.K)
}

// gemmHeadsQuant queues the value expansion's products of a (GEMMHeads
// into om) with om's int8 form in groups of 128, which o_proj's product
// finds remembered, in one launch when it applies, and reports whether it
// did.
func (b *Backend) gemmHeadsQuant(om *tensor, a *QActs, w *weight, heads int) bool {
	if prefillFuseOff || w.q.N%heads != 0 || om.cols != w.q.N || om.rows != a.T || (w.q.N/heads)%gemmRows != 0 {
		return false
	}
	rows, wq := w.q.N/heads, w.q
	q := b.quantizeInto(om, gemmRows)
	b.do(b.opName("expand values+quantize", w), func(c *Ctx) error {
		return c.GEMMHeadsQuant(om.ptr, om.ld, wq, a, heads, rows, GEMMTileAuto, q)
	})
	b.rememberQuant(quantEntry{*om, q})
	b.prefillMerges[prefillValues]++
	return true
}

// pairNormGEMM queues norm n (of x into out, several rows) in the launch
// of the norm of the same rows queued before it when only a GEMM lies
// between them that neither writes x nor touches out (a prefill's q_a
// norm, q_b's product, the latent's norm: the GEMM reads only its int8
// rows and weights), and reports whether it did.
func (b *Backend) pairNormGEMM(n normRows, x, out *tensor) bool {
	p, g := b.lastNormRows, b.lastGEMM
	if prefillFuseOff || !b.chained() || p == nil || p.flush != b.flushes || p.paired || p.n.q.T != n.q.T ||
		g == nil || g.flush != b.flushes || g.idx != p.idx+1 || g.idx != len(b.pending)-1 ||
		overlaps(x, &g.out) || overlaps(out, &g.out) || overlaps(x, &p.out) || overlaps(out, &p.x) || overlaps(out, &p.out) {
		return false
	}
	n1 := p.n
	b.pending[p.idx] = queuedOp{"rmsnorm pair", func(c *Ctx) error { return c.RMSNormQuant8PairRows(n1, n) }}
	p.paired = true
	b.prefillMerges[prefillNorms]++
	return true
}

// MoEBatch is the device work space of MoEBatched for T tokens: the pairs'
// rows in expert order, the tiles, each pair's SiLU product (and its int8
// form) and down product. All of it is step memory (the backend's arena).
type MoEBatch struct {
	T, Slots, MaxTiles int
	Pos, List          uint64 // int32 [T*Slots]
	TileE, TileS       uint64 // int32 [MaxTiles]
	TileN, NTiles      uint64 // int32 [MaxTiles], [1]
	H, Part            uint64 // float32 [T*Slots][I], [T*Slots][K]
	HQ                 *QActs // T*Slots rows of I
	Tile               GEMMTile
	// Split (with the 64-token tile): the segments' last tiles of at most
	// moeShortTokens tokens go through the 16-token kernels, in two more
	// launches.
	Split bool
}

// moeShortTokens: MoEBatch.Split's short tiles. moeSplitTokens: the
// average segment from which MoEBatched splits them off. A few tokens over
// a 64-token tile still make a pass over the expert's weights in a 64-token
// block; in 16-token blocks that pass costs less, but the two launches
// more. Measured on an H200 (BenchmarkMoEBatched, 64 experts, uniform
// random routing): 1024 tokens (segments of 64 on average) 510 against 523
// us, 512 tokens (32) 341 against 334.
const (
	moeShortTokens = 16
	moeSplitTokens = 64
)

// moeSplitOverride, when not 0, sets MoEBatch.Split for every batch (1: on,
// -1: off; tests).
var moeSplitOverride = 0

// moeTileOverride, when set, is MoEBatched's tile for every batch (tests
// cover each tile through it).
var moeTileOverride = GEMMTileAuto

// moeBatchTile picks the token tile for T tokens of slots pairs each over
// experts experts: the wide tile once a segment averages moeWideTokens.
func moeBatchTile(T, slots, experts int) GEMMTile {
	if moeTileOverride != GEMMTileAuto {
		return moeTileOverride
	}
	if T*slots >= moeWideTokens*experts {
		return GEMMTile64
	}
	return GEMMTile16
}

// moeMaxTiles bounds the tiles of P pairs over ne experts: each expert's
// rows make ceil(count/BT) tiles.
func moeMaxTiles(P, ne, bt int) int { return P/bt + min(ne, P) + 1 }

// MoEBatched computes, for the x.T quantized tokens of x,
// y[t] (+)= sum_k wts[t,k] expert_{ids[t,k]}(x[t]) + the shared experts(x[t])
// entirely on the device: moeb_group sorts the pairs by expert, then the
// gate/up GEMM with the SiLU product over each expert's rows, the int8
// quantization of those, the down GEMM, and a weighted sum into y (five
// launches, no host round trip). With y = 0 it leaves out the weighted
// sum (the partial products stay in s.Part for MoEStreamCombine).
func (c *Ctx) MoEBatched(y uint64, ldy int, accumulate bool, t *ExpertTable, ids, wts uint64, topk int, x *QActs, s *MoEBatch) error {
	slots := topk + t.Shared
	switch {
	case x.K != t.K || x.G != t.G:
		return fmt.Errorf("cuda: moe batched: activations %dx%d G=%d, want K=%d G=%d", x.T, x.K, x.G, t.K, t.G)
	case !GEMMFits(t.K, t.G) || !GEMMFits(t.I, t.G):
		return fmt.Errorf("cuda: moe batched: experts [%d,%d] G=%d do not suit the GEMM", t.I, t.K, t.G)
	case s.T != x.T || s.Slots != slots || s.HQ.T != x.T*slots || s.HQ.K != t.I || s.HQ.G != t.G:
		return fmt.Errorf("cuda: moe batched: work space for %d tokens of %d slots, want %d of %d", s.T, s.Slots, x.T, slots)
	case t.Routed+t.Shared > 1024:
		return fmt.Errorf("cuda: moe batched: %d experts, at most 1024", t.Routed+t.Shared)
	}
	tile := s.Tile
	group, err := c.Kernel("stream", "moeb_group")
	if err != nil {
		return err
	}
	guShared, downShared := tile.shared(t.K/t.G), tile.shared(t.I/t.G)
	gu, err := c.kernelShared("gemm", "moe_gemm_gate_up_"+tile.kindSuffix(t.G), guShared)
	if err != nil {
		return err
	}
	down, err := c.kernelShared("gemm", "moe_gemm_down_"+tile.kindSuffix(t.G), downShared)
	if err != nil {
		return err
	}
	comb, err := c.Kernel("stream", "moeb_combine")
	if err != nil {
		return err
	}
	if err := c.Launch(group, D1(1), D1(1024), 0, ids, x.T, topk, t.Shared, t.Routed, tile.tokens(),
		s.Pos, s.List, s.TileE, s.TileS, s.TileN, s.NTiles); err != nil {
		return err
	}
	// With the 64-token tile, a segment's short last tile (moeShortTokens
	// tokens or fewer) can go to the 16-token kernels in launches of their
	// own, each launch taking the tiles whose size lies in [nmin, nmax].
	split := tile == GEMMTile64 && s.Split
	var gu16, down16 *Kernel
	g16, d16 := GEMMTile16.shared(t.K/t.G), GEMMTile16.shared(t.I/t.G)
	nmin := 1
	if split {
		if gu16, err = c.kernelShared("gemm", "moe_gemm_gate_up_"+GEMMTile16.suffix(t.G), g16); err != nil {
			return err
		}
		if down16, err = c.kernelShared("gemm", "moe_gemm_down_"+GEMMTile16.suffix(t.G), d16); err != nil {
			return err
		}
		nmin = moeShortTokens + 1
	}
	const all = 1 << 30
	if err := c.Launch(gu, Dim{uint32((t.I + 63) / 64), uint32(s.MaxTiles), 1}, D1(tile.threads()), guShared,
		t.buf, s.TileE, s.TileS, s.TileN, s.NTiles, s.List, t.I, t.K, t.G, x.Q, x.Scales, s.H, nmin, all); err != nil {
		return err
	}
	if split {
		if err := c.Launch(gu16, Dim{uint32((t.I + 63) / 64), uint32(s.MaxTiles), 1}, D1(GEMMTile16.threads()), g16,
			t.buf, s.TileE, s.TileS, s.TileN, s.NTiles, s.List, t.I, t.K, t.G, x.Q, x.Scales, s.H, 1, moeShortTokens); err != nil {
			return err
		}
	}
	P := x.T * slots
	if err := c.RMSNormQuant(s.H, t.I, 0, 0, 0, 0, P, t.I, t.G, s.HQ); err != nil {
		return err
	}
	if err := c.Launch(down, Dim{uint32((t.K + gemmRows - 1) / gemmRows), uint32(s.MaxTiles), 1}, D1(tile.threads()), downShared,
		t.buf, s.TileE, s.TileS, s.TileN, s.NTiles, t.K, t.I, t.G, s.HQ.Q, s.HQ.Scales, s.Part, nmin, all); err != nil {
		return err
	}
	if split {
		if err := c.Launch(down16, Dim{uint32((t.K + gemmRows - 1) / gemmRows), uint32(s.MaxTiles), 1}, D1(GEMMTile16.threads()), d16,
			t.buf, s.TileE, s.TileS, s.TileN, s.NTiles, t.K, t.I, t.G, s.HQ.Q, s.HQ.Scales, s.Part, 1, moeShortTokens); err != nil {
			return err
		}
	}
	if y == 0 {
		return nil // the combine is queued on its own (moeBatched)
	}
	acc := 0
	if accumulate {
		acc = 1
	}
	return c.Launch(comb, Dim{uint32(x.T), uint32((t.K + 511) / 512), 1}, D1(128), 0, s.Part, s.Pos, wts, topk, slots, t.K, y, ldy, acc)
}

// gemmMinTokens is the smallest MMFP4 product (in token rows) that MatMul
// runs on the tensor-core GEMM instead of the GEMV kernels.
var gemmMinTokens = 48

// moeBatchedMinTokens is the smallest batch whose MoE runs MoEBatched (the
// experts' token segments through the GEMM) instead of the fused
// single-token kernels once per token.
var moeBatchedMinTokens = 8

// batchable reports whether the layer's experts suit MoEBatched.
func (l *moeLayer) batchable() bool {
	t := l.table
	return GEMMFits(t.K, t.G) && GEMMFits(t.I, t.G) && t.Routed+t.Shared <= 1024
}

// moeBatched runs MoEBatched on the rows of xm, adding into d; its work
// space comes from the step's arena.
func (b *Backend) moeBatched(d, xm *tensor, rt *routing, l *moeLayer) {
	if b.moeStreamed(d, xm, rt, l) {
		return
	}
	t := l.table
	T, slots := d.rows, rt.topK+t.Shared
	P := T * slots
	a := b.quantize(xm, t.G)
	tile := moeBatchTile(T, slots, t.Routed+t.Shared)
	split := P >= moeSplitTokens*(t.Routed+t.Shared)
	if moeSplitOverride != 0 {
		split = moeSplitOverride > 0
	}
	s := &MoEBatch{T: T, Slots: slots, Tile: tile, Split: split, MaxTiles: moeMaxTiles(P, t.Routed+t.Shared, tile.tokens())}
	s.Pos, s.List = b.alloc(4*P), b.alloc(4*P)
	s.TileE, s.TileS, s.TileN, s.NTiles = b.alloc(4*s.MaxTiles), b.alloc(4*s.MaxTiles), b.alloc(4*s.MaxTiles), b.alloc(4)
	s.H, s.Part = b.alloc(4*P*t.I), b.alloc(4*P*t.K)
	s.HQ = b.quantizeInto(&tensor{rows: P, cols: t.I, ld: t.I}, t.G)
	// A d cleared for this op alone is written, not added to (serve.go),
	// and then its combine goes on its own, for the residual add and the
	// next norm to take into their launch (combineNormReleased).
	add := prefillFuseOff || !b.takeFresh(d)
	if !add && b.combineApart(d, slots) {
		b.do("moe batched", func(c *Ctx) error { return c.MoEBatched(0, 0, false, t, rt.ids, rt.wts, rt.topK, a, s) })
		b.do("moe combine", func(c *Ctx) error {
			return c.MoEStreamCombine(d.ptr, d.ld, false, s, rt.wts, rt.topK, slots, t.K)
		})
		b.noteCombine(d, s, rt.wts, rt.topK, slots)
		return
	}
	b.do("moe batched", func(c *Ctx) error {
		return c.MoEBatched(d.ptr, d.ld, add, t, rt.ids, rt.wts, rt.topK, a, s)
	})
}

// combineNormReleased is combineNorm (serve.go) across the Release that
// ends a long step's layer, between the residual add and the next layer's
// norm: the MoE's work space is then free memory, so the launch takes it
// only when the norm's output and int8 form lie outside what the combine
// reads (the partial products, their rows, the routing weights, the
// residual), and it
// does not write the MoE's own output (released, read by no one). It
// reports whether it queued the launch.
func (b *Backend) combineNormReleased(la *addOp, gain uint64, eps float32, out *tensor, q *QActs) bool {
	lc := la.comb
	if prefillFuseOff || lc == nil || lc.flush != b.flushes || lc.releases == b.releases || lc.idx != la.idx-1 ||
		la.idx != len(b.pending)-1 || out.cols != la.d.cols || overlaps(out, &la.d) {
		return false
	}
	s, T := lc.s, la.d.rows
	P := uint64(s.T * lc.slots)
	xlo, xhi := la.d.span()
	reads := [][2]uint64{{s.Part, s.Part + 4*P*uint64(la.d.cols)}, {s.Pos, s.Pos + 4*P}, {lc.wts, lc.wts + 4*uint64(T*lc.topk)}, {xlo, xhi}}
	lo, hi := out.span()
	writes := [][2]uint64{{lo, hi}, {q.Q, q.Q + uint64(q.T*q.K)}, {q.Scales, q.Scales + 4*uint64(q.T*q.K/q.G)}, {q.Sums, q.Sums + 4*uint64(q.T*q.K/32)}}
	for _, w := range writes {
		for _, r := range reads {
			if w[0] < r[1] && r[0] < w[1] {
				return false
			}
		}
	}
	x, wts, topk, slots := la.d, lc.wts, lc.topk, lc.slots
	o := *out
	b.pending[lc.idx] = queuedOp{"moe combine+add+rmsnorm", func(c *Ctx) error {
		return c.CombineAddRMSNormQuant8(x.ptr, x.ld, x.ptr, x.ld, s, wts, topk, slots, 0, 0, gain, eps, o.ptr, o.ld, q)
	}}
	b.pending = b.pending[:la.idx]
	b.lastCombine = nil
	b.prefillMerges[prefillCombine]++
	return true
}

// absorbTokens is ABSORB_T in gemm.cu.
const absorbTokens = 8

// absorbManyMinTokens is the smallest batch that AbsorbQuery runs through
// absorb_query_many (its sums run in another order than absorb_query_q's,
// which smaller batches keep). Measured on an H200 at 32 rows: 25 us a
// layer against absorb_query_q's 49 (8-31 rows not measured).
var absorbManyMinTokens = 32

// absorbMany queues absorb_query_many for AbsorbQuery when it applies
// (MMFP4 W_UK, enough tokens, the head's codes in shared memory) and
// reports whether it did.
func (b *Backend) absorbMany(ql, qm *tensor, w *weight, s backend.MLAShape) bool {
	if w.q == nil || ql.rows < absorbManyMinTokens || s.Rank > 512 || s.Rank%2 != 0 || s.Rank%w.q.G != 0 ||
		(s.NopeDim*s.Rank/2)%16 != 0 {
		return false
	}
	shared := s.NopeDim*s.Rank/2 + 4*absorbTokens*s.NopeDim*(s.Rank/w.q.G)
	if shared > b.dev.Info().SharedOptin {
		return false
	}
	q := w.q
	b.do("absorb query", func(c *Ctx) error {
		k, err := c.kernelShared("gemm", "absorb_query_many", shared)
		if err != nil {
			return err
		}
		return c.Launch(k, Dim{uint32((ql.rows + absorbTokens - 1) / absorbTokens), uint32(s.Heads), 1}, D1(256), shared,
			ql.ptr, ql.ld, qm.ptr, qm.ld, q.Codes, q.Scales, q.RowScale, q.G, s.Rank, s.NopeDim, s.RopeDim, ql.rows)
	})
	return true
}

// routerManyTokens is ROUTER_MANY_T in gemm.cu; routerManyMinRows the
// smallest batch whose router runs router_many instead of moe_router_fast
// (one block per token and four experts, each re-reading its experts'
// rows). Measured on an H200 (BenchmarkRouterMany, 64 experts of 2048,
// router_many as it is now): 24.0 against 71.0 us at 512 rows, 21.3
// against 37.1 at 256, 21.1 against 20.0 at 128 (the prompt steps of a
// serving batch, 400-500 rows, took moe_router_fast at 512).
const routerManyTokens = 16

var routerManyMinRows = 256

// routerManyExperts and routerManyCols are ROUTER_MANY_E and
// ROUTER_MANY_KC in gemm.cu: the experts of a block and the columns of a
// shared-memory chunk.
const (
	routerManyExperts = 16
	routerManyCols    = 256
)

// RouterManyFits reports whether RouterMany takes these experts and input.
func RouterManyFits(E, K int, x uint64, ldx, topk int) bool {
	return E >= 1 && E <= 128 && K >= 32 && K <= 2048 && K%32 == 0 && ldx%4 == 0 && x%16 == 0 && topk >= 1 && topk <= 32 && topk <= E
}

// RouterMany computes what RouterRoute computes without the int8 form of
// the input (the same logits, experts and weights, bit for bit) for the T
// rows of x, with each expert's weights read once per routerManyTokens
// rows and each row once per routerManyExperts experts (router_many), then
// each row's experts chosen by a warp (router_pick_rows).
func (c *Ctx) RouterMany(W uint64, E, K int, x uint64, ldx, T int, logits uint64, ldl int, bias uint64, topk int, norm bool, scaling float32, ids, wts uint64) error {
	if !RouterManyFits(E, K, x, ldx, topk) || T < 1 {
		return fmt.Errorf("cuda: router many: %d experts of %d columns, top %d, %d rows (stride %d)", E, K, topk, T, ldx)
	}
	n := 0
	if norm {
		n = 1
	}
	shared := 2 * (routerManyTokens + routerManyExperts) * routerManyCols * 4
	k, err := c.kernelShared("gemm", "router_many", shared)
	if err != nil {
		return err
	}
	pick, err := c.Kernel("gemm", "router_pick_rows")
	if err != nil {
		return err
	}
	grid := Dim{uint32((E + routerManyExperts - 1) / routerManyExperts), uint32((T + routerManyTokens - 1) / routerManyTokens), 1}
	if err := c.Launch(k, grid, D1(256), shared, W, E, K, x, ldx, T, logits, ldl); err != nil {
		return err
	}
	return c.Launch(pick, D1((T+7)/8), D1(256), 0, logits, ldl, E, T, bias, topk, n, scaling, ids, wts)
}
