//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"
)

// moeHalf is the second half of a batch-1 decode layer at GLM-4.7-Flash's
// shapes: the router with its residual add and norm, and the MoE block
// (its own shared expert and router, the 64 routed experts common to all
// layers).
type moeHalf struct {
	tab          *ExpertTable
	scr          *MoEScratch
	W, bias      uint64
	gain, logits uint64
	ids, wts     uint64
}

type moeHalfBufs struct {
	routed []ExpertMats
	hv     uint64 // the norm's output
	nq     *QActs // its int8 form, the MoE's input
}

func newMoEHalfBufs(c *Ctx, r *rand.Rand, s pdlShape, I, E int) (*moeHalfBufs, error) {
	b := &moeHalfBufs{}
	for range E {
		m, err := uploadExpert(c, r, s.hidden, I, s.G)
		if err != nil {
			return nil, err
		}
		b.routed = append(b.routed, m)
	}
	hv, err1 := c.Alloc(4 * s.hidden)
	nq, err2 := c.NewQActs(1, s.hidden, s.G)
	b.hv, b.nq = hv.Ptr, nq
	return b, errors.Join(err1, err2)
}

// uploadExpert uploads one expert's random gate, up and down matrices.
func uploadExpert(c *Ctx, r *rand.Rand, K, I, G int) (ExpertMats, error) {
	var q [3]*QMatrix
	for i, nk := range [][2]int{{I, K}, {I, K}, {K, I}} {
		var err error
		if q[i], err = c.UploadMatrix(synthMatrix(r, nk[0], nk[1], G)); err != nil {
			return ExpertMats{}, err
		}
	}
	return ExpertMats{q[0], q[1], q[2]}, nil
}

func (b *moeHalfBufs) newLayer(c *Ctx, r *rand.Rand, s pdlShape, E, topK int) (*moeHalf, error) {
	sh, err := uploadExpert(c, r, s.hidden, b.routed[0].Gate.N, s.G)
	if err != nil {
		return nil, err
	}
	l := &moeHalf{}
	if l.tab, err = c.NewExpertTable(b.routed, []ExpertMats{sh}); err != nil {
		return nil, err
	}
	if l.scr, err = c.NewMoEScratch(l.tab, topK); err != nil {
		return nil, err
	}
	tb := &testBufs{c: c}
	up, alloc := tb.up, tb.alloc
	l.W, l.bias, l.gain = up(randVec(r, E*s.hidden, 0.02)), up(randVec(r, E, 0.05)), up(randVec(r, s.hidden, 1))
	l.logits, l.ids, l.wts = alloc(4*E), alloc(4*topK), alloc(4*topK)
	return l, errors.Join(tb.errs...)
}

// queue launches the router with the add and norm of d = d + c, then the
// MoE of the norm's output into c (the next layer's add takes it).
func (b *moeHalfBufs) queue(c *Ctx, pb *pdlBufs, l *moeHalf, topK int) error {
	in := FusedIn{Mode: fuseAddNorm, D: pb.d, A: pb.d, C: pb.c, Gain: l.gain, Eps: 1e-5, Out: b.hv, Q: b.nq, Layout8: true}
	if err := c.RouterClusterNorm(l.W, pb.s.hidden, l.logits, l.bias, topK, true, 1.8, l.ids, l.wts, nil, in); err != nil {
		return err
	}
	return c.MoE(pb.c, false, l.tab, l.ids, l.wts, topK, b.nq, l.scr)
}

// BenchmarkDecodeLayerMoE: batch-1 decode layers at GLM-4.7-Flash's shapes
// replayed from a graph with programmatic dependent launch, device time
// per layer: the attention half without the attention (BenchmarkChainLayer's
// chain, all launches shared; the "model's" lines take the model's add and
// norm with q_a/kv_a and its q_b with the absorbed query, and still stand
// in for the attention and its merge with W_UV: docs/perf.md, 2026-11-30
// (30)), then the router with its add and norm and
// the MoE block, over 24 layers' weights in turn (more than L2); each half
// alone; and bounds on what L2 could give: every layer on one layer's
// attention weights (those stay in L2) or on one layer's MoE (its router
// and shared expert stay in L2; the routed experts the routing picks
// vary); and both chains with moe_gate_up_q for moe_gate_up_c. Printed (a
// benchmark's log keeps ten lines).
func BenchmarkDecodeLayerMoE(b *testing.B) {
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
		var ms []*moeHalf
		for range layers {
			m, err := mb.newLayer(c, r, glmShape, E, topK)
			if err != nil {
				return err
			}
			ms = append(ms, m)
		}
		name := c.Info().Name
		vs := []struct {
			name      string
			attn, moe bool
			attnOne   bool // every layer on layer 0's attention weights
			moeOne    bool // every layer on layer 0's router and shared expert
			gateUpQ   bool // moe_gate_up_q instead of moe_gate_up_c
			model     bool // the model's add and norm with q_a/kv_a, and q_b with the absorbed query
		}{
			{"layer", true, true, false, false, false, false},
			{"layer, model's norms", true, true, false, false, false, true},
			{"layer, gate/up q", true, true, false, false, true, false},
			{"layer, one attention", true, true, true, false, false, false},
			{"layer, one moe", true, true, false, true, false, false},
			{"attention half", true, false, false, false, false, false},
			{"attention half, model's", true, false, false, false, false, true},
			{"attention half, one", true, false, true, false, false, false},
			{"router+moe", false, true, false, false, false, false},
			{"router+moe, gate/up q", false, true, false, false, true, false},
			{"router+moe, one", false, true, false, true, false, false},
		}
		for round := 0; round < 2; round++ {
			for _, v := range vs {
				moeGateUpQ = v.gateUpQ
				err := withPDL(c, c.info.CC >= 90, func() error {
					g, release, err := capturedPDL(c, func() error {
						for i := range layers {
							la, lm := ls[i], ms[i]
							if v.attnOne {
								la = ls[0]
							}
							if v.moeOne {
								lm = ms[0]
							}
							merged := chainAll
							if v.model {
								merged |= 1<<chainAddNormGEMV | 1<<chainNormAbsorb
							}
							if v.attn {
								if err := pb.queueChain(c, la, merged); err != nil {
									return err
								}
							}
							if v.moe {
								if err := mb.queue(c, pb.pdlBufs, lm, topK); err != nil {
									return err
								}
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
					fmt.Printf("%s: round %d: %-22s %6.2f us a layer (PDL %v)\n", name, round, v.name, us/layers, c.pdl)
					return nil
				})
				moeGateUpQ = false
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
