//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"
	"math/rand/v2"
	"testing"
)

// BenchmarkDecodeMoECluster: BenchmarkDecodeLayerMoE's router+moe and
// layer chains with the gate/up launch as moe_gate_up_q (each group of h
// quantized by its last block, through a counter and L2) and as
// moe_gate_up_c (inside a cluster), device time a layer.
func BenchmarkDecodeMoECluster(b *testing.B) {
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
		for round := 0; round < 2; round++ {
			for _, mode := range []string{"router+moe", "layer"} {
				for _, cl := range []int{0, 4, 8} {
					old := moeGateUpCluster
					moeGateUpCluster = cl
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
						b.Logf("%s: round %d: %-10s cluster %d %6.2f us a layer", name, round, mode, cl, us/layers)
						return nil
					})
					moeGateUpCluster = old
					if err != nil {
						return fmt.Errorf("%s cluster %v: %w", mode, cl, err)
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
