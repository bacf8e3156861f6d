//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"
)

// moeStreamTile is MB_TT in stream.cu: the pairs of a tile.
const moeStreamTile = 8

// MoEStreamFits reports whether the streaming kernels take the table's
// experts: groups of 128, K a multiple of 256 and I of 512 (the gate/up
// kernel's two groups a batch, the down kernel's four), K a multiple of
// 16 (the down product's m-tiles), the staged activations within the
// default 48 KB of shared memory and at most 1024 experts (moeb_group).
func MoEStreamFits(t *ExpertTable) bool {
	return t.G == 128 && t.K%256 == 0 && t.I%512 == 0 && t.K%16 == 0 && moeStreamShared(max(t.K, t.I)) <= 48<<10 && t.Routed+t.Shared <= 1024
}

// moeStreamShared is the dynamic shared memory of a kernel whose
// activation rows have K columns: MB_TT rows of K+16 bytes, then MB_TT
// rows of K/128+1 scales.
func moeStreamShared(K int) int { return moeStreamTile*(K+16) + 4*moeStreamTile*(K/128+1) }

// MoEBatchedStream computes what MoEBatched does, for few tokens an
// expert: moeb_group sorts the pairs into tiles of at most eight, then
// the gate/up kernel (SiLU product and its int8 quantization fused), the
// down kernel and the weighted sum per token (four launches): the pair
// moeb_gate_up_s2f34, moeb_down_s2f34 (the scales through the hardware
// E4M3 conversion, the row scales read with the first weights; three and
// four blocks a multiprocessor) and moeb_combine_w (every load of a slot
// in flight at once). s must have room for the 8-pair tiles (MaxTiles >=
// moeMaxTiles(P, experts, 8));
// s.H is not used. rec (moeTileRec bytes a tile, s.MaxTiles of them; 0 for
// none) lets moeb_group_x leave each tile's expert entry, its token ids and
// a count of its finished gate/up blocks there: the products then find
// their weights and token rows in one round trip, and each down block
// waits for its own tile's gate/up blocks only instead of the whole
// gate/up grid. With rec, a batch of more than moeStreamMaxTokens tokens
// takes a wide-tile pair (moeStreamWideFor: tiles of 16 or 32 pairs)
// instead.
func (c *Ctx) MoEBatchedStream(y uint64, ldy int, accumulate bool, t *ExpertTable, ids, wts uint64, topk int, x *QActs, s *MoEBatch, rec uint64) error {
	if err := c.MoEStreamProducts(t, ids, topk, x, s, rec); err != nil {
		return err
	}
	return c.MoEStreamCombine(y, ldy, accumulate, s, wts, topk, topk+t.Shared, t.K)
}

// MoEStreamProducts is MoEBatchedStream up to the combine: the grouping,
// the gate/up and the down products, leaving each pair's row of the down
// products in s.Part (three launches).
func (c *Ctx) MoEStreamProducts(t *ExpertTable, ids uint64, topk int, x *QActs, s *MoEBatch, rec uint64) error {
	slots := topk + t.Shared
	P := x.T * slots
	switch {
	case x.K != t.K || x.G != t.G:
		return fmt.Errorf("cuda: moe stream: activations %dx%d G=%d, want K=%d G=%d", x.T, x.K, x.G, t.K, t.G)
	case !MoEStreamFits(t):
		return fmt.Errorf("cuda: moe stream: experts [%d,%d] G=%d do not suit it", t.I, t.K, t.G)
	case s.T != x.T || s.Slots != slots || s.HQ.T != P || s.HQ.K != t.I || s.HQ.G != t.G:
		return fmt.Errorf("cuda: moe stream: work space for %d tokens of %d slots, want %d of %d", s.T, s.Slots, x.T, slots)
	case s.MaxTiles < moeMaxTiles(P, t.Routed+t.Shared, moeStreamTile):
		return fmt.Errorf("cuda: moe stream: %d tiles, want %d", s.MaxTiles, moeMaxTiles(P, t.Routed+t.Shared, moeStreamTile))
	}
	if w := moeStreamWideFor(x.T); w.name != "" && rec != 0 && moeWideFits(t, w) {
		return c.moeStreamWide(t, ids, topk, x, s, rec, w)
	}
	kern, groupName := "s2f34", "moeb_group"
	if rec != 0 {
		groupName = "moeb_group_x"
	}
	group, err := c.Kernel("stream", groupName)
	if err != nil {
		return err
	}
	gu, err := c.Kernel("stream", "moeb_gate_up_"+kern)
	if err != nil {
		return err
	}
	down, err := c.Kernel("stream", "moeb_down_"+kern)
	if err != nil {
		return err
	}
	groupArgs := []any{ids, x.T, topk, t.Shared, t.Routed, moeStreamTile, s.Pos, s.List, s.TileE, s.TileS, s.TileN, s.NTiles}
	if rec != 0 {
		groupArgs = append(groupArgs, t.buf, rec)
	}
	if err := c.Launch(group, D1(1), D1(1024), 0, groupArgs...); err != nil {
		return err
	}
	if err := c.Launch(gu, Dim{uint32(t.I / 128), uint32(s.MaxTiles), 1}, D1(256), moeStreamShared(t.K),
		t.buf, s.TileE, s.TileS, s.TileN, s.NTiles, s.List, t.I, t.K, x.Q, x.Scales, s.HQ.Q, s.HQ.Scales, rec); err != nil {
		return err
	}
	return c.Launch(down, Dim{uint32((t.K + 127) / 128), uint32(s.MaxTiles), 1}, D1(256), moeStreamShared(t.I),
		t.buf, s.TileE, s.TileS, s.TileN, s.NTiles, t.K, t.I, s.HQ.Q, s.HQ.Scales, s.Part, rec)
}

// MoEStreamCombine is MoEBatchedStream's last launch: y[t] (+)= the sum
// of token t's slots' rows of s.Part (N columns), routed slots weighted by
// wts.
func (c *Ctx) MoEStreamCombine(y uint64, ldy int, accumulate bool, s *MoEBatch, wts uint64, topk, slots, N int) error {
	combName := "moeb_combine"
	if slots <= moeCombineMaxSlots {
		combName = "moeb_combine_w"
	}
	comb, err := c.Kernel("stream", combName)
	if err != nil {
		return err
	}
	acc := 0
	if accumulate {
		acc = 1
	}
	return c.Launch(comb, Dim{uint32(s.T), uint32((N + 511) / 512), 1}, D1(128), 0, s.Part, s.Pos, wts, topk, slots, N, y, ldy, acc)
}

// moeStreamMinTokens and moeStreamMaxTokens bound the batches whose MoE
// takes MoEBatchedStream with 8-pair tiles; moeWideSteps take the larger
// batches up to its last bound, and the tiled MoE (MoEBatched) those
// above. Measured on an H200 (full-size layer, device time) with the
// earlier kernels: 40-42 / 49-50 / 72-74 / 120-121 / 141 us at 2 / 4 / 8 /
// 32 / 64 tokens against the tiled MoEBatched's 72 / 78 / 122 / 187-192 /
// 222 and the single-token kernels' 23-24 us a token; then 59.5 / 99.1 /
// 117.2 at 8 / 32 / 64 against the tiled 90 / 142 / 164 (docs/perf.md,
// 2026-11-28 (6)); now 52.9 / 90.6 / 109.0 (2026-11-29 (8)), and 116.1 /
// 141.4 at 96 / 128 against the tiled 170.8 / 179.3 and the wide pairs'
// 131.8-148.5 / 141.8-163.2 (2026-11-29 (9)).
var (
	moeStreamMinTokens = 2
	moeStreamMaxTokens = 128
)

// moeWide is a pair of the wide-tile kernels (moeb_gate_up_<name>,
// moeb_down_<name>, stream.cu): tiles of up to 8*wt pairs.
type moeWide struct {
	name string
	wt   int
}

// moeWideSteps: batches of more than moeStreamMaxTokens tokens take the
// first pair whose bound they are within. Measured on an H200 (full-size
// layer, uniform random routing; docs/perf.md, 2026-11-29 (9)): w2u 164.8
// us at 192 tokens against w4u's 176.5 and the 8-pair pair's 189.9; w4u
// 193.3 / 229.7 / 299.8 / 410.3 us at 256 / 384 / 512 / 768 tokens against
// the tiled MoE's best 243.5 / 310.3 / 338.9 / 382.5.
var moeWideSteps = []struct {
	upTo int
	w    moeWide
}{{224, moeWide{"w2u", 2}}, {640, moeWide{"w4u", 4}}}

// moeWideOff gives every streamed batch the 8-pair pair (tests compare
// the wide pairs with it).
var moeWideOff bool

// moeWideForce, when set, is the wide pair every MoEBatchedStream takes
// (tests, benchmarks).
var moeWideForce moeWide

// moeStreamWideFor is the wide-tile pair a batch of T tokens takes (name
// "" for the 8-pair pair).
func moeStreamWideFor(T int) moeWide {
	if moeWideForce.name != "" || moeWideOff || T <= moeStreamMaxTokens {
		return moeWideForce
	}
	for _, s := range moeWideSteps {
		if T <= s.upTo {
			return s.w
		}
	}
	return moeWide{}
}

// moeWideFits reports whether the wide-tile pair w takes the table's
// experts: MoEStreamFits, and its staged rows within the shared memory a
// block may have on sm_90 (227 KB, less the kernels' 1 KB of their own).
func moeWideFits(t *ExpertTable, w moeWide) bool {
	return MoEStreamFits(t) && moeStreamSharedW(max(t.K, t.I), w.wt) <= 224<<10
}

// moeStreamSharedW is the dynamic shared memory of a wide-tile kernel
// whose rows have K columns: 8*wt rows of K+16 bytes, then 8*wt rows of
// K/128+1 scales.
func moeStreamSharedW(K, wt int) int { return 8 * wt * (K + 16 + 4*(K/128+1)) }

// moeCombineMaxSlots is MB_MAXS in stream.cu: the most slots a token
// moeb_combine_w takes.
const moeCombineMaxSlots = 8

// moeTileRec is the size of an MbTile (stream.cu): a BExpert (nine
// pointers), four 32-bit words and the tile's eight token ids.
const moeTileRec = 120

// moeStreams reports whether a batch of T tokens over t takes
// MoEBatchedStream.
func (b *Backend) moeStreams(T int, t *ExpertTable) bool {
	if w := moeStreamWideFor(T); w.name != "" && T >= moeStreamMinTokens {
		return moeWideFits(t, w)
	}
	return T >= moeStreamMinTokens && T <= moeStreamMaxTokens && MoEStreamFits(t)
}

// moeStreamed runs MoEBatchedStream for the batch when it applies (batch
// size, shapes) and reports whether it did; the work space comes from the
// step's arena.
func (b *Backend) moeStreamed(d, xm *tensor, rt *routing, l *moeLayer) bool {
	t := l.table
	T := d.rows
	if !b.moeStreams(T, t) {
		return false
	}
	// A d cleared for this op alone is written, not added to (serve.go);
	// the ops queued before this one's do not touch d.
	add := !b.takeFresh(d)
	slots := rt.topK + t.Shared
	P := T * slots
	a := b.quantize(xm, t.G)
	s := &MoEBatch{T: T, Slots: slots, MaxTiles: moeMaxTiles(P, t.Routed+t.Shared, moeStreamTile)}
	s.Pos, s.List = b.alloc(4*P), b.alloc(4*P)
	s.TileE, s.TileS, s.TileN, s.NTiles = b.alloc(4*s.MaxTiles), b.alloc(4*s.MaxTiles), b.alloc(4*s.MaxTiles), b.alloc(4)
	s.Part = b.alloc(4 * P * t.K)
	s.HQ = b.quantizeInto(&tensor{rows: P, cols: t.I, ld: t.I}, t.G)
	rec := b.alloc(moeTileRec * s.MaxTiles)
	if !add && b.combineApart(d, slots) {
		// The combine on its own, which the add and norm after may take
		// into their launch (serve.go).
		b.do("moe batched", func(c *Ctx) error { return c.MoEStreamProducts(t, rt.ids, rt.topK, a, s, rec) })
		b.do("moe combine", func(c *Ctx) error {
			return c.MoEStreamCombine(d.ptr, d.ld, false, s, rt.wts, rt.topK, slots, t.K)
		})
		b.noteCombine(d, s, rt.wts, rt.topK, slots)
		return true
	}
	b.do("moe batched", func(c *Ctx) error {
		return c.MoEBatchedStream(d.ptr, d.ld, add, t, rt.ids, rt.wts, rt.topK, a, s, rec)
	})
	return true
}

// moeStreamWide is MoEStreamProducts through the wide-tile pair w (tile
// records required), after its checks: a work space with the 8-pair
// tiles' count holds the fewer wide tiles.
func (c *Ctx) moeStreamWide(t *ExpertTable, ids uint64, topk int, x *QActs, s *MoEBatch, rec uint64, w moeWide) error {
	bt := 8 * w.wt
	tiles := moeMaxTiles(x.T*(topk+t.Shared), t.Routed+t.Shared, bt)
	group, err := c.Kernel("stream", "moeb_group_x")
	if err != nil {
		return err
	}
	shGU, shDn := moeStreamSharedW(t.K, w.wt), moeStreamSharedW(t.I, w.wt)
	gu, err := c.kernelShared("stream", "moeb_gate_up_"+w.name, shGU)
	if err != nil {
		return err
	}
	down, err := c.kernelShared("stream", "moeb_down_"+w.name, shDn)
	if err != nil {
		return err
	}
	if err := c.Launch(group, D1(1), D1(1024), 0, ids, x.T, topk, t.Shared, t.Routed, bt, s.Pos, s.List, s.TileE, s.TileS, s.TileN, s.NTiles, t.buf, rec); err != nil {
		return err
	}
	if err := c.Launch(gu, Dim{uint32(t.I / 128), uint32(tiles), 1}, D1(256), shGU,
		s.NTiles, s.List, t.I, t.K, x.Q, x.Scales, s.HQ.Q, s.HQ.Scales, rec); err != nil {
		return err
	}
	return c.Launch(down, Dim{uint32((t.K + 127) / 128), uint32(tiles), 1}, D1(256), shDn,
		s.NTiles, t.K, t.I, s.HQ.Q, s.HQ.Scales, s.Part, rec)
}
