//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"
	"math/rand/v2"
	"testing"
)

// BenchmarkDecodeMoENew: BenchmarkDecodeLayerMoE's router+moe and layer
// chains with main's kernels ("moe") and the new moe.cu ("moetma": the
// router's bias and the gate/up row scales read early), with the modes of
// moe_gate_up_p and moe_down_p: 8 the shared expert's loads after the
// wait; timing only (wrong values): 16 no gate/up products, 32 no group
// count and quantization, 64 the down products before the wait.
func BenchmarkDecodeMoENew(b *testing.B) {
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
		type variant struct {
			module string
			pf     int
		}
		vs := []variant{{"moe", -1}, {"moetma", 0}, {"moetma", 8}, {"moetma", 16}, {"moetma", 32}, {"moetma", 48}, {"moetma", 64}, {"moetma", 112}}
		for round := 0; round < 2; round++ {
			for _, mode := range []string{"router+moe", "layer"} {
				for _, v := range vs {
					om, op := moeModule, moeGUPrefetch
					moeModule, moeGUPrefetch = v.module, v.pf
					err := withPDL(c, c.info.CC >= 90, func() error {
						g, release, err := capturedPDL(c, func() error {
							for i := range layers {
								if mode == "layer" {
									if err := pb.queueChain(c, ls[i], chainAll); err != nil {
										return err
									}
								}
								if err := mb.queue(c, pb.pdlBufs, ms[i], topK); err != nil {
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
						b.Logf("%s: round %d: %-10s %-6s pf %2d %6.2f us a layer", name, round, mode, v.module, v.pf, us/layers)
						return nil
					})
					moeModule, moeGUPrefetch = om, op
					if err != nil {
						return fmt.Errorf("%s %+v: %w", mode, v, err)
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
