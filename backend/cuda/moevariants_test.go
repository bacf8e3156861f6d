//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
)

// BenchmarkDecodeMoEVariants: BenchmarkDecodeLayerMoE's "router+moe" and
// "layer" chains (24 layers' weights, a graph with programmatic dependent
// launch) with the measurement forms of the batch-1 MoE's gate/up launch
// (moeGateUpCluster) and of the router's exchange and choice
// (routerVariant), by turns in one process, two rounds; then the router's
// timer stamps (router_cluster_norm_x with STAMP) in the router+moe chain
// of each router form. Printed (a benchmark's log keeps ten lines).
func BenchmarkDecodeMoEVariants(b *testing.B) {
	d := benchDevice(b)
	r := rand.New(rand.NewPCG(9, 12))
	const layers, I, E, topK = 24, 1536, 64, 4
	err := d.Do(func(c *Ctx) error {
		if c.info.CC < 90 {
			b.Skipf("clusters need compute capability 9.0, the device has %d", c.info.CC)
		}
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
		// graph captures the chain (attn: with the attention half) and
		// returns its replay time a layer.
		graph := func(attn bool, reps int) (float64, error) {
			var us float64
			err := withPDL(c, true, func() error {
				g, release, err := capturedPDL(c, func() error {
					for i := range layers {
						if attn {
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
				t, err := timeReplay(c, g.exec, reps)
				us = t / layers
				return err
			})
			return us, err
		}
		type variant struct {
			name   string
			gu, rv int
			excl   bool
		}
		vs := []variant{
			{"main", 0, 0, false},
			{"gate/up c8", 8, 0, false},
			{"router poll", 0, 2, false},
			{"router ballot", 0, 3, false},
			{"ballot excl", 0, 3, true},
			{"c8 + poll", 8, 2, false},
			{"c8 + ballot", 8, 3, false},
			{"c8 + ballot x", 8, 3, true},
		}
		set := func(gu, rv int, excl bool) func() {
			og, or, oe := moeGateUpCluster, routerVariant, routerExclusive
			moeGateUpCluster, routerVariant, routerExclusive = gu, rv, excl
			return func() { moeGateUpCluster, routerVariant, routerExclusive = og, or, oe }
		}
		for round := range 2 {
			for _, attn := range []bool{false, true} {
				mode := "router+moe"
				if attn {
					mode = "layer"
				}
				for _, v := range vs {
					restore := set(v.gu, v.rv, v.excl)
					us, err := graph(attn, 5)
					restore()
					if err != nil {
						return fmt.Errorf("%s %s: %w", mode, v.name, err)
					}
					fmt.Printf("%s: round %d: %-10s %-14s %6.2f us a layer\n", name, round, mode, v.name, us)
				}
			}
		}
		// Timer stamps: 8 + 8*16*RSTAMP_RING words (moe.cu).
		const ring = 256
		st, err := c.Alloc(8 * (8 + 8*16*ring))
		if err != nil {
			return err
		}
		defer c.Free(st)
		for _, v := range []variant{{"router 0", 0, 0, false}, {"router 2", 0, 2, false}, {"router 3", 0, 3, false}, {"router 3 excl", 0, 3, true}, {"c8, router 3", 8, 3, false}} {
			if err := c.Memset(st.Ptr, 0, st.Size); err != nil {
				return err
			}
			restore := set(v.gu, v.rv, v.excl)
			routerStamps = st.Ptr
			_, err := graph(false, 5)
			routerStamps = 0
			restore()
			if err != nil {
				return fmt.Errorf("stamps, %s: %w", v.name, err)
			}
			words := make([]uint64, 8+8*16*ring)
			if err := CopyOut(c, words, st.Ptr); err != nil {
				return err
			}
			printRouterStamps(name, v.name, words[8:], ring)
		}
		return c.Sync()
	})
	if err != nil {
		b.Fatal(err)
	}
}

// printRouterStamps prints the medians over the launches in the ring of
// the router's stamps: block 0's and the other blocks' clock64 cycles
// between points, and each point's %globaltimer in us from the cluster's
// first entry (block 0; the median and the latest of the others).
func printRouterStamps(name, rv string, w []uint64, ring int) {
	med := func(v []float64) float64 {
		if len(v) == 0 {
			return 0
		}
		slices.Sort(v)
		return v[len(v)/2]
	}
	var cyc0, cycN, t0, tN, tMax [8][]float64
	for n := range ring {
		rec := w[n*8*16 : (n+1)*8*16]
		if rec[0] == 0 {
			continue
		}
		first := rec[8]
		for b := range 8 {
			if g := rec[b*16+8]; g < first {
				first = g
			}
		}
		var mx [8]float64
		for b := range 8 {
			s := rec[b*16 : b*16+16]
			prev := s[0]
			for k := 1; k < 8; k++ {
				if s[k] == 0 {
					continue
				}
				dc := float64(int64(s[k] - prev))
				prev = s[k]
				if b == 0 {
					cyc0[k] = append(cyc0[k], dc)
				} else {
					cycN[k] = append(cycN[k], dc)
				}
			}
			for k := range 8 {
				if s[8+k] == 0 {
					continue
				}
				t := float64(int64(s[8+k]-first)) / 1e3
				if b == 0 {
					t0[k] = append(t0[k], t)
				} else {
					tN[k] = append(tN[k], t)
				}
				mx[k] = max(mx[k], t)
			}
		}
		for k := range 8 {
			tMax[k] = append(tMax[k], mx[k])
		}
	}
	points := []string{"entry", "wait", "logits", "sent", "all in/int8", "choices", "ranked", "end"}
	fmt.Printf("%s: %s stamps (%d launches): point: block 0 cycles since the last point, others; us from the first entry: block 0, others (median), latest block\n", name, rv, len(tMax[0]))
	for k := range 8 {
		fmt.Printf("%s: %s   %-12s %7.0f %7.0f  %6.2f %6.2f %6.2f\n", name, rv, points[k], med(cyc0[k]), med(cycN[k]), med(t0[k]), med(tN[k]), med(tMax[k]))
	}
}
