//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/mmfp4/mmfp4/format"
)

// moeStageSet names a pair of batch-1 MoE kernels: "" is main's
// (moe_gate_up_q or moe_down_hq).
type moeStageSet struct{ gu, down string }

func (s moeStageSet) String() string {
	n := func(k, def string) string {
		if k == "" {
			return def
		}
		return k
	}
	return n(s.gu, "gate_up_q") + "+" + n(s.down, "down_hq")
}

// withMoEStage runs fn with the MoE kernels of s.
func withMoEStage(s moeStageSet, fn func() error) error {
	og, od := moeStageGU, moeStageDown
	moeStageGU, moeStageDown = s.gu, s.down
	defer func() { moeStageGU, moeStageDown = og, od }()
	return fn()
}

var moeStageSets = []moeStageSet{
	{"moe_gate_up_sb", "moe_down_sb"},
	{"moe_gate_up_sb", ""},
	{"moe_gate_up_sc", ""},
	{"moe_gate_up_sc", "moe_down_sc"},
	{"", "moe_down_sb"},
}

// The MoE kernels that stage each warp's weights in shared memory (bulk
// copies or cp.async) against moe_gate_up_q and moe_down_hq: the same bits,
// on random experts at GLM-4.7-Flash's shape with group sizes 128 and 32,
// and at a small shape with 6 routed and 2 shared slots (whose down rows
// the staged down kernel does not take: main's runs there), both writing
// and adding to y.
func TestMoEStagedMatchesRegisters(t *testing.T) {
	d := testDevice(t)
	r := testRand(t)
	for _, tc := range []struct{ K, I, G, E, topK, shared int }{
		{2048, 1536, 128, 8, 4, 1},
		{2048, 1536, 32, 6, 4, 1},
		{512, 384, 128, 10, 6, 2},
	} {
		err := d.Do(func(c *Ctx) error {
			var all []ExpertMats
			for e := 0; e < tc.E+tc.shared; e++ {
				var q [3]*QMatrix
				for i, m := range []*format.Matrix{synthMatrix(r, tc.I, tc.K, tc.G), synthMatrix(r, tc.I, tc.K, tc.G), synthMatrix(r, tc.K, tc.I, tc.G)} {
					var err error
					if q[i], err = c.UploadMatrix(m); err != nil {
						return err
					}
				}
				all = append(all, ExpertMats{q[0], q[1], q[2]})
			}
			tab, err := c.NewExpertTable(all[:tc.E], all[tc.E:])
			if err != nil {
				return err
			}
			scr, err := c.NewMoEScratch(tab, tc.topK)
			if err != nil {
				return err
			}
			xa, err := c.NewQActs(1, tc.K, tc.G)
			if err != nil {
				return err
			}
			ids := make([]int32, tc.topK)
			for k, e := range r.Perm(tc.E)[:tc.topK] {
				ids[k] = int32(e)
			}
			y0 := randVec(r, tc.K, 1)
			xb, err1 := upload(c, randVec(r, tc.K, 1))
			wb, err2 := upload(c, randVec(r, tc.topK, 0.5))
			ib, err3 := c.Alloc(4 * tc.topK)
			yb, err4 := c.Alloc(4 * tc.K)
			if err := errors.Join(err1, err2, err3, err4, CopyIn(c, ib.Ptr, ids)); err != nil {
				return err
			}
			if err := c.RMSNormQuant(xb.Ptr, tc.K, 0, 0, 0, 0, 1, tc.K, tc.G, xa); err != nil {
				return err
			}
			run := func(s moeStageSet, acc bool) ([]float32, error) {
				var got []float32
				err := withMoEStage(s, func() error {
					if err := CopyIn(c, yb.Ptr, y0); err != nil {
						return err
					}
					if err := c.MoE(yb.Ptr, acc, tab, ib.Ptr, wb.Ptr, tc.topK, xa, scr); err != nil {
						return err
					}
					got = make([]float32, tc.K)
					return CopyOut(c, got, yb.Ptr)
				})
				return got, err
			}
			for _, acc := range []bool{false, true} {
				want, err := run(moeStageSet{}, acc)
				if err != nil {
					return err
				}
				zeros := 0
				for i := range want {
					if want[i] == 0 {
						zeros++
					}
				}
				if zeros > tc.K/100 {
					return fmt.Errorf("%+v: %d of %d outputs are zero", tc, zeros, tc.K)
				}
				for _, s := range moeStageSets {
					got, err := run(s, acc)
					if err != nil {
						return fmt.Errorf("%v: %w", s, err)
					}
					for i := range got {
						if math.Float32bits(got[i]) != math.Float32bits(want[i]) {
							return fmt.Errorf("%+v %v accumulate=%v: y[%d] = %g, main's kernels %g", tc, s, acc, i, got[i], want[i])
						}
					}
				}
			}
			groups := make([]uint32, scr.Groups.Size/4)
			if err := CopyOut(c, groups, scr.Groups.Ptr); err != nil {
				return err
			}
			for i, v := range groups {
				if v != 0 {
					return fmt.Errorf("%+v: group counter %d is %d after the calls", tc, i, v)
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
}

// cloneExpert copies an expert's three matrices into new allocations.
func cloneExpert(c *Ctx, e ExpertMats) (ExpertMats, error) {
	var out [3]*QMatrix
	for i, q := range []*QMatrix{e.Gate, e.Up, e.Down} {
		buf, err := c.Alloc(q.buf.Size)
		if err != nil {
			return ExpertMats{}, err
		}
		if err := c.CopyDevice(buf.Ptr, q.buf.Ptr, q.buf.Size); err != nil {
			return ExpertMats{}, err
		}
		n := *q
		n.buf = buf
		n.Codes, n.Scales, n.RowScale = buf.Ptr+(q.Codes-q.buf.Ptr), buf.Ptr+(q.Scales-q.buf.Ptr), buf.Ptr+(q.RowScale-q.buf.Ptr)
		out[i] = &n
	}
	return ExpertMats{out[0], out[1], out[2]}, nil
}

// BenchmarkDecodeMoEStaged: BenchmarkDecodeLayerMoE's router+moe and
// layer chains with each pair of MoE kernels, with the 64 routed experts
// common to all 24 layers (about 0.3 GB) or each layer its own copies
// (about 7.4 GB, spread as a whole model's experts are).
func BenchmarkDecodeMoEStaged(b *testing.B) {
	d := benchDevice(b)
	r := rand.New(rand.NewPCG(9, 12))
	const layers, I, E, topK = 24, 1536, 64, 4
	err := d.Do(func(c *Ctx) error {
		pb, err := newChainBufs(c, r, glmShape)
		if err != nil {
			return err
		}
		ls, err := newPDLLayers(c, r, glmShape, layers)
		if err != nil {
			return err
		}
		mb, err := newMoEHalfBufs(c, r, glmShape, I, E)
		if err != nil {
			return err
		}
		base := mb.routed
		var ms, spread []*moeHalf
		for range layers {
			m, err := mb.newLayer(c, r, glmShape, E, topK)
			if err != nil {
				return err
			}
			ms = append(ms, m)
		}
		for range layers {
			var own []ExpertMats
			for _, e := range base {
				ce, err := cloneExpert(c, e)
				if err != nil {
					return err
				}
				own = append(own, ce)
			}
			mb.routed = own
			m, err := mb.newLayer(c, r, glmShape, E, topK)
			if err != nil {
				return err
			}
			spread = append(spread, m)
		}
		mb.routed = base
		name := c.Info().Name
		sets := append([]moeStageSet{{}}, moeStageSets...)
		type pass struct {
			round int
			modes []string
			sets  []moeStageSet
		}
		mo := []string{"router+moe", "router+moe spread"}
		passes := []pass{{0, mo, sets}, {1, mo, sets}, {0, []string{"layer", "layer spread"}, sets[:3]}}
		for _, p := range passes {
			round := p.round
			for _, mode := range p.modes {
				for _, s := range p.sets {
					err := withMoEStage(s, func() error {
						return withPDL(c, c.info.CC >= 90, func() error {
							g, release, err := capturedPDL(c, func() error {
								for i := range layers {
									lm := ms[i]
									if mode == "router+moe spread" || mode == "layer spread" {
										lm = spread[i]
									}
									if mode == "layer" || mode == "layer spread" {
										if err := pb.queueChain(c, ls[i], chainAll); err != nil {
											return err
										}
									}
									if err := mb.queue(c, pb.pdlBufs, lm, topK); err != nil {
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
							b.Logf("%s: round %d: %-18s %-32v %6.2f us a layer", name, round, mode, s, us/layers)
							return nil
						})
					})
					if err != nil {
						return fmt.Errorf("%s %v: %w", mode, s, err)
					}
				}
			}
		}
		return c.Sync()
	})
	if err != nil {
		b.Fatal(err)
	}
}
