//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"errors"
	"fmt"
	"slices"
	"testing"
)

// clusterExchange runs cluster_exchange_probe over blocks blocks (clusters
// of 4) for rounds rounds in mode and returns the final values of threads
// 0-63 of each block and the time a round (us: the last block's end less
// the first block's start, over rounds).
func clusterExchange(c *Ctx, mode, blocks, rounds int) ([]float32, float64, error) {
	k, err := c.Kernel("util", "cluster_exchange_probe")
	if err != nil {
		return nil, 0, err
	}
	out, err1 := c.Alloc(4 * blocks * 64 * 3)
	st, err2 := c.Alloc(8 * 2 * blocks)
	if err := errors.Join(err1, err2); err != nil {
		return nil, 0, err
	}
	defer func() { _ = errors.Join(c.Free(out), c.Free(st)) }()
	if err := c.Launch(k, D1(blocks), D1(256), 0, int32(mode), int32(rounds), out.Ptr, st.Ptr); err != nil {
		return nil, 0, err
	}
	vals := make([]float32, blocks*64)
	ts := make([]uint64, 2*blocks)
	if err := errors.Join(CopyOut(c, vals, out.Ptr+uint64(4*blocks*128)), CopyOut(c, ts, st.Ptr)); err != nil {
		return nil, 0, err
	}
	lo, hi := ts[0], ts[1]
	for i := 0; i < len(ts); i += 2 {
		lo, hi = min(lo, ts[i]), max(hi, ts[i+1])
	}
	return vals, float64(hi-lo) / 1e3 / float64(rounds), nil
}

// clusterExchangeHost is the probe's arithmetic with its default (release
// and acquire) barrier: each round a block's value for thread t becomes a
// quarter of the sum of the other three blocks' in rank order, plus one.
func clusterExchangeHost(blocks, rounds int) []float32 {
	v := make([]float32, blocks*64)
	for b := range blocks {
		for t := range 64 {
			v[b*64+t] = float32(t + 64*(b%4))
		}
	}
	for range rounds {
		next := make([]float32, len(v))
		for b := range blocks {
			base := b / 4 * 4
			for t := range 64 {
				var s float32
				for q := range 4 {
					if base+q != b {
						s += v[(base+q)*64+t]
					}
				}
				next[b*64+t] = s*0.25 + 1
			}
		}
		v = next
	}
	return v
}

// The probe with its ordered barrier gives the host's values bit for bit
// (every word it reads arrived that round), with and without the global
// stores.
func TestClusterExchangeProbe(t *testing.T) {
	d := testDevice(t)
	const blocks, rounds = 132, 37
	want := clusterExchangeHost(blocks, rounds)
	err := d.Do(func(c *Ctx) error {
		for _, mode := range []int{0, 2} {
			got, _, err := clusterExchange(c, mode, blocks, rounds)
			if err != nil {
				return err
			}
			for i := range want {
				if got[i] != want[i] {
					return fmt.Errorf("mode %d: block %d thread %d: %v, want %v", mode, i/64, i%64, got[i], want[i])
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// BenchmarkClusterExchange: us a round of the probe in each mode, 33
// clusters of 4 (every multiprocessor of an H100 or H200 SXM), 2,000
// rounds, the median of 5 launches. The release form against the relaxed
// one is what the fence before a cluster's arrive costs the chain kernels
// that exchange through shared memory. Run with -test.benchtime=1x.
func BenchmarkClusterExchange(b *testing.B) {
	d := benchDevice(b)
	const blocks, rounds, launches = 132, 2000, 5
	var lines []string
	err := d.Do(func(c *Ctx) error {
		for round := 1; round <= 2; round++ {
			for _, mode := range []int{0, 1, 2, 3} {
				if mode&1 != 0 && rtcVersion[0] < 12 {
					continue // cluster_arrive_relaxed is the release form there
				}
				var us []float64
				for range launches {
					_, u, err := clusterExchange(c, mode, blocks, rounds)
					if err != nil {
						return err
					}
					us = append(us, u)
				}
				slices.Sort(us)
				name := map[int]string{0: "release", 1: "relaxed", 2: "release, global store", 3: "relaxed, global store"}[mode]
				lines = append(lines, fmt.Sprintf("round %d %-22s %.3f us a round (min %.3f, max %.3f)", round, name, us[len(us)/2], us[0], us[len(us)-1]))
			}
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
	for _, l := range lines {
		b.Log(l)
	}
}
