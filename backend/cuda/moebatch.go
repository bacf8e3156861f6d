//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"
	"os"
	"strconv"
)

// MoEStream names a variant of the streaming batched MoE (stream.cu):
// the 128-column groups each warp keeps in flight (D) and with them the
// register budget. d2 (three blocks of 256 threads a multiprocessor) is
// the one left: d4 (two blocks) measured within 2% of it.
type MoEStream string

const MoEStreamD2 MoEStream = "d2"

func (v MoEStream) groups() int { return 2 }

func (v MoEStream) valid() bool { return v == MoEStreamD2 }

// moeStreamTile is MB_TT in stream.cu: the pairs of a tile.
const moeStreamTile = 8

// MoEStreamFits reports whether the streaming kernels of variant v take
// the table's experts: groups of 128, K and I whole multiples of D groups,
// K a multiple of 16 (the down product's m-tiles), and the staged
// activations within the default 48 KB of shared memory.
func MoEStreamFits(t *ExpertTable, v MoEStream) bool {
	d := 128 * v.groups()
	return t.G == 128 && t.K%d == 0 && t.I%d == 0 && t.K%16 == 0 && moeStreamShared(max(t.K, t.I)) <= 48<<10 && t.Routed+t.Shared <= 1024
}

// moeStreamShared is the dynamic shared memory of a kernel whose
// activation rows have K columns: MB_TT rows of K+16 bytes, then MB_TT
// rows of K/128+1 scales.
func moeStreamShared(K int) int { return moeStreamTile*(K+16) + 4*moeStreamTile*(K/128+1) }

// MoEBatchedStream computes what MoEBatched does, for few tokens an
// expert: moeb_group sorts the pairs into tiles of at most eight, then
// the gate/up kernel (SiLU product and its int8 quantization fused), the
// down kernel and the weighted sum per token (four launches). The kernels
// are moeb_gate_up_s and moeb_down_s (the variant's own with
// MMFP4_CUDA_STREAM_OLD=1). s must have
// room for the 8-pair tiles (MaxTiles >= moeMaxTiles(P, experts, 8));
// s.H is not used.
//
// rec (moeTileRec bytes a tile, s.MaxTiles of them; 0 for none) holds
// each tile's expert entry, written by moeb_group_x, so that the products
// find their weights in one round trip.
func (c *Ctx) MoEBatchedStream(y uint64, ldy int, accumulate bool, t *ExpertTable, ids, wts uint64, topk int, x *QActs, s *MoEBatch, v MoEStream, rec uint64) error {
	slots := topk + t.Shared
	P := x.T * slots
	switch {
	case x.K != t.K || x.G != t.G:
		return fmt.Errorf("cuda: moe stream: activations %dx%d G=%d, want K=%d G=%d", x.T, x.K, x.G, t.K, t.G)
	case !v.valid() || !MoEStreamFits(t, v):
		return fmt.Errorf("cuda: moe stream %s: experts [%d,%d] G=%d do not suit it", v, t.I, t.K, t.G)
	case s.T != x.T || s.Slots != slots || s.HQ.T != P || s.HQ.K != t.I || s.HQ.G != t.G:
		return fmt.Errorf("cuda: moe stream: work space for %d tokens of %d slots, want %d of %d", s.T, s.Slots, x.T, slots)
	case s.MaxTiles < moeMaxTiles(P, t.Routed+t.Shared, moeStreamTile):
		return fmt.Errorf("cuda: moe stream: %d tiles, want %d", s.MaxTiles, moeMaxTiles(P, t.Routed+t.Shared, moeStreamTile))
	}
	groupName := "moeb_group"
	if rec != 0 && !moeStreamOld {
		groupName = "moeb_group_x"
	}
	group, err := c.Kernel("stream", groupName)
	if err != nil {
		return err
	}
	kern := moeStreamKernels
	if kern == "s2f" && rec == 0 {
		kern = "s2" // the flags live in the tile records
	}
	guName, downName, downRows, threads := "moeb_gate_up_"+kern, "moeb_down_"+kern, 128, 256
	if moeStreamOld {
		guName, downName, downRows = "moeb_gate_up_"+string(v), "moeb_down_"+string(v), 256
	}
	gu, err := c.Kernel("stream", guName)
	if err != nil {
		return err
	}
	down, err := c.Kernel("stream", downName)
	if err != nil {
		return err
	}
	combName := "moeb_combine"
	if kern != "s" && !moeStreamOld && slots <= moeCombineMaxSlots {
		combName = "moeb_combine_w"
	}
	comb, err := c.Kernel("stream", combName)
	if err != nil {
		return err
	}
	groupArgs := []any{ids, x.T, topk, t.Shared, t.Routed, moeStreamTile, s.Pos, s.List, s.TileE, s.TileS, s.TileN, s.NTiles}
	guArgs := []any{t.buf, s.TileE, s.TileS, s.TileN, s.NTiles, s.List, t.I, t.K, x.Q, x.Scales, s.HQ.Q, s.HQ.Scales}
	downArgs := []any{t.buf, s.TileE, s.TileS, s.TileN, s.NTiles, t.K, t.I, s.HQ.Q, s.HQ.Scales, s.Part}
	if !moeStreamOld {
		guArgs, downArgs = append(guArgs, rec), append(downArgs, rec)
		if rec != 0 {
			groupArgs = append(groupArgs, t.buf, rec)
		}
	}
	if err := c.Launch(group, D1(1), D1(1024), 0, groupArgs...); err != nil {
		return err
	}
	if err := c.Launch(gu, Dim{uint32(t.I / 128), uint32(s.MaxTiles), 1}, D1(threads), moeStreamShared(t.K), guArgs...); err != nil {
		return err
	}
	if err := c.Launch(down, Dim{uint32((t.K + downRows - 1) / downRows), uint32(s.MaxTiles), 1}, D1(threads), moeStreamShared(t.I), downArgs...); err != nil {
		return err
	}
	acc := 0
	if accumulate {
		acc = 1
	}
	return c.Launch(comb, Dim{uint32(x.T), uint32((t.K + 511) / 512), 1}, D1(128), 0, s.Part, s.Pos, wts, topk, slots, t.K, y, ldy, acc)
}

// moeStreamMinTokens and moeStreamMaxTokens bound the batches whose MoE
// takes MoEBatchedStream; moeStreamVariant is the variant. Measured on an
// H200 (full-size layer, device time) with the earlier kernels: 40-42 /
// 49-50 / 72-74 / 120-121 / 141 us at 2 / 4 / 8 / 32 / 64 tokens against
// the tiled MoEBatched's 72 / 78 / 122 / 187-192 / 222 and the
// single-token kernels' 23-24 us a token; now 62 / 108 / 123 at 8 / 32 /
// 64 (docs/perf.md). MMFP4_CUDA_MOE_STREAM sets the bound (0 turns the
// path off), for comparisons in one binary.
var (
	moeStreamMinTokens = 2
	moeStreamMaxTokens = 64
	moeStreamVariant   = MoEStreamD2
)

// moeStreamOld restores the earlier gate/up and down kernels (plain
// widening, down products 256 rows a block), and MatMulStream products
// one a launch (no pairs): MMFP4_CUDA_STREAM_OLD=1, for an A/B of both in
// one binary.
var moeStreamOld = os.Getenv("MMFP4_CUDA_STREAM_OLD") == "1"

// moeStreamKernels is the gate/up and down pair (moeb_gate_up_<it>,
// moeb_down_<it>), and moeStreamRec whether the backend gives them tile
// records (for measurement).
// MMFP4_CUDA_MOE_KERN=s|s2|s2f and MMFP4_CUDA_MOE_REC=0 set them (measurement).
var (
	moeStreamKernels = "s2f"
	moeStreamRec     = os.Getenv("MMFP4_CUDA_MOE_REC") != "0"
)

func init() {
	if k := os.Getenv("MMFP4_CUDA_MOE_KERN"); k == "s" || k == "s2" || k == "s2f" {
		moeStreamKernels = k
	}
}

// moeCombineMaxSlots is MB_MAXS in stream.cu: the most slots a token
// moeb_combine_w takes.
const moeCombineMaxSlots = 16

// moeTileRec is the size of an MbTile (stream.cu): a BExpert (nine
// pointers) and four 32-bit words.
const moeTileRec = 88

func init() {
	if v, err := strconv.Atoi(os.Getenv("MMFP4_CUDA_MOE_STREAM")); err == nil && v >= 0 {
		moeStreamMaxTokens = v
	}
}

// moeStreams reports whether a batch of T tokens over t takes
// MoEBatchedStream.
func (b *Backend) moeStreams(T int, t *ExpertTable) bool {
	return T >= moeStreamMinTokens && T <= moeStreamMaxTokens && MoEStreamFits(t, moeStreamVariant)
}

// moeStreamed runs MoEBatchedStream for the batch when it applies (batch
// size, shapes) and reports whether it did; the work space comes from the
// step's arena.
func (b *Backend) moeStreamed(d, xm *tensor, rt *routing, l *moeLayer) bool {
	t, v := l.table, moeStreamVariant
	T := d.rows
	if !b.moeStreams(T, t) {
		return false
	}
	slots := rt.topK + t.Shared
	P := T * slots
	a := b.quantize(xm, t.G)
	s := &MoEBatch{T: T, Slots: slots, MaxTiles: moeMaxTiles(P, t.Routed+t.Shared, moeStreamTile)}
	s.Pos, s.List = b.alloc(4*P), b.alloc(4*P)
	s.TileE, s.TileS, s.TileN, s.NTiles = b.alloc(4*s.MaxTiles), b.alloc(4*s.MaxTiles), b.alloc(4*s.MaxTiles), b.alloc(4)
	s.Part = b.alloc(4 * P * t.K)
	s.HQ = b.quantizeInto(&tensor{rows: P, cols: t.I, ld: t.I}, t.G)
	var rec uint64
	if moeStreamRec {
		rec = b.alloc(moeTileRec * s.MaxTiles)
	}
	b.do("moe batched", func(c *Ctx) error {
		return c.MoEBatchedStream(d.ptr, d.ld, true, t, rt.ids, rt.wts, rt.topK, a, s, v, rec)
	})
	return true
}
