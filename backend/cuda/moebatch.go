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
// counters (moeStreamCounters bytes, any content; 0 for none) let the
// fused cp.async down kernel add each token's slots itself (three
// launches).
func (c *Ctx) MoEBatchedStream(y uint64, ldy int, accumulate bool, t *ExpertTable, ids, wts uint64, topk int, x *QActs, s *MoEBatch, v MoEStream, counters uint64) error {
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
	group, err := c.Kernel("stream", "moeb_group")
	if err != nil {
		return err
	}
	guName, downName, downRows, threads := "moeb_gate_up_s", "moeb_down_s", 128, 256
	guRows, guThreads, guShared, downShared := 128, 256, moeStreamShared(t.K), moeStreamShared(t.I)
	if moeStreamOld {
		guName, downName, downRows = "moeb_gate_up_"+string(v), "moeb_down_"+string(v), 256
	}
	fuse := false
	if cp := moeCPOn; cp != nil && !moeStreamOld && cp.fits(t, c.info.SharedOptin) {
		guName, guRows, guThreads, guShared = cp.GU.name("moeb_gate_up"), cp.GU.rows(), 32*cp.GU.W, cp.GU.shared(t.K, 2)
		downName, downRows, threads, downShared = cp.Down.name("moeb_down"), 16*cp.Down.W, 32*cp.Down.W, cp.Down.shared(t.I, 1)
		if fuse = cp.Fuse && counters != 0; fuse {
			downName += "f"
		}
	}
	acc := 0
	if accumulate {
		acc = 1
	}
	if fuse {
		groupZ, err := c.Kernel("stream", "moeb_group_z")
		if err != nil {
			return err
		}
		gu, err := c.kernelShared("stream", guName, guShared)
		if err != nil {
			return err
		}
		down, err := c.kernelShared("stream", downName, downShared)
		if err != nil {
			return err
		}
		ncb := (t.K + downRows - 1) / downRows
		if err := c.Launch(groupZ, D1(1), D1(1024), 0, ids, x.T, topk, t.Shared, t.Routed, moeStreamTile,
			s.Pos, s.List, s.TileE, s.TileS, s.TileN, s.NTiles, counters, x.T*ncb); err != nil {
			return err
		}
		if err := c.Launch(gu, Dim{uint32(t.I / guRows), uint32(s.MaxTiles), 1}, D1(guThreads), guShared,
			t.buf, s.TileE, s.TileS, s.TileN, s.NTiles, s.List, t.I, t.K, x.Q, x.Scales, s.HQ.Q, s.HQ.Scales); err != nil {
			return err
		}
		return c.Launch(down, Dim{uint32(ncb), uint32(s.MaxTiles), 1}, D1(threads), downShared,
			t.buf, s.TileE, s.TileS, s.TileN, s.NTiles, t.K, t.I, s.HQ.Q, s.HQ.Scales, s.Part,
			s.List, s.Pos, wts, topk, slots, counters, y, ldy, acc)
	}
	gu, err := c.kernelShared("stream", guName, guShared)
	if err != nil {
		return err
	}
	down, err := c.kernelShared("stream", downName, downShared)
	if err != nil {
		return err
	}
	comb, err := c.Kernel("stream", "moeb_combine")
	if err != nil {
		return err
	}
	if err := c.Launch(group, D1(1), D1(1024), 0, ids, x.T, topk, t.Shared, t.Routed, moeStreamTile,
		s.Pos, s.List, s.TileE, s.TileS, s.TileN, s.NTiles); err != nil {
		return err
	}
	if err := c.Launch(gu, Dim{uint32(t.I / guRows), uint32(s.MaxTiles), 1}, D1(guThreads), guShared,
		t.buf, s.TileE, s.TileS, s.TileN, s.NTiles, s.List, t.I, t.K, x.Q, x.Scales, s.HQ.Q, s.HQ.Scales); err != nil {
		return err
	}
	if err := c.Launch(down, Dim{uint32((t.K + downRows - 1) / downRows), uint32(s.MaxTiles), 1}, D1(threads), downShared,
		t.buf, s.TileE, s.TileS, s.TileN, s.NTiles, t.K, t.I, s.HQ.Q, s.HQ.Scales, s.Part); err != nil {
		return err
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
	counters := b.alloc(moeStreamCounters(T, t.K))
	b.do("moe batched", func(c *Ctx) error {
		return c.MoEBatchedStream(d.ptr, d.ld, true, t, rt.ids, rt.wts, rt.topK, a, s, v, counters)
	})
	return true
}

// moeCPKernel is one instance of the cp.async MoE kernels (stream.cu):
// W warps a block, D groups a stage, S stages a warp.
// V: scales through the hardware E4M3 conversion. PW (gate/up only): 16
// warps, gate and up rows in separate warps (moeb_gate_up_pw).
type moeCPKernel struct {
	W, D, S int
	V, PW   bool
}

func (k moeCPKernel) name(prefix string) string {
	v := ""
	if k.V {
		v = "v"
	}
	if k.PW {
		return fmt.Sprintf("%s_pw%d_%d%s", prefix, k.D, k.S, v)
	}
	return fmt.Sprintf("%s_c%d_%d_%d%s", prefix, k.W, k.D, k.S, v)
}

// shared is the kernel's dynamic shared memory for rows of K columns and
// MR m-tiles a warp: the staged token rows, the warps' rings, their scales.
func (k moeCPKernel) shared(K, mr int) int {
	if k.PW {
		mr = 1
	}
	return 8*(K+16) + 32*(K/128+1) + k.W*k.S*mr*16*64*k.D + k.W*mr*16*(K/128)
}

// rows is the gate/up kernel's rows of h a block.
func (k moeCPKernel) rows() int {
	if k.PW {
		return 128
	}
	return 16 * k.W
}

// MoECP pairs a gate/up and a down instance of the cp.async kernels; Fuse:
// the down kernel adds the slots up (no combine launch).
type MoECP struct {
	GU, Down moeCPKernel
	Fuse     bool
}

func (p MoECP) String() string {
	s := p.GU.name("gu") + "+" + p.Down.name("down")
	if p.Fuse {
		s += "f"
	}
	return s
}

// moeStreamCounters is the size of MoEBatchedStream's counters for T
// tokens of K columns: one u32 a token and block of the down kernel (at
// least 128 rows a block).
func moeStreamCounters(T, K int) int { return 4 * T * ((K + 127) / 128) }

// fits reports whether the pair takes t's experts.
func (p MoECP) fits(t *ExpertTable, sharedMax int) bool {
	GK, GI := t.K/128, t.I/128
	return t.I%p.GU.rows() == 0 && GK%p.GU.D == 0 && GI%p.Down.D == 0 && GK%4 == 0 && GI%4 == 0 &&
		p.GU.shared(t.K, 2) <= sharedMax && p.Down.shared(t.I, 1) <= sharedMax
}

// moeCPVariants are the instances stream.cu has; moeCPOn the pair in use
// (nil: the register kernels).
var moeCPVariants = []MoECP{
	{moeCPKernel{8, 1, 4, false, false}, moeCPKernel{8, 4, 3, false, false}, false},
	{moeCPKernel{8, 1, 5, false, false}, moeCPKernel{8, 4, 3, false, false}, false},
	{moeCPKernel{16, 2, 3, false, false}, moeCPKernel{16, 4, 3, false, false}, false},
	{moeCPKernel{16, 1, 6, false, false}, moeCPKernel{8, 2, 4, false, false}, false},
	{moeCPKernel{8, 1, 5, false, false}, moeCPKernel{8, 4, 2, false, false}, false},
	{moeCPKernel{8, 1, 3, false, false}, moeCPKernel{8, 2, 3, false, false}, false},
	{moeCPKernel{8, 1, 5, false, false}, moeCPKernel{8, 4, 3, false, false}, true},
	{moeCPKernel{16, 2, 3, false, false}, moeCPKernel{16, 4, 3, false, false}, true},
	{moeCPKernel{8, 1, 5, true, false}, moeCPKernel{8, 4, 3, true, false}, true},
	{moeCPKernel{16, 2, 4, false, true}, moeCPKernel{8, 4, 3, false, false}, true},
	{moeCPKernel{16, 2, 6, false, true}, moeCPKernel{8, 4, 3, false, false}, true},
	{moeCPKernel{16, 4, 3, false, true}, moeCPKernel{8, 4, 3, false, false}, true},
}

var moeCPOn = &moeCPVariants[6]

func init() {
	switch v := os.Getenv("MMFP4_CUDA_MOE_CP"); v {
	case "":
	case "off":
		moeCPOn = nil
	default:
		if i, err := strconv.Atoi(v); err == nil && i >= 0 && i < len(moeCPVariants) {
			moeCPOn = &moeCPVariants[i]
		}
	}
}
