//go:build amd64

package cpu

import (
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/internal/benchmode"
)

// BenchmarkExpertFirstTouch measures what reading a routed expert costs the
// first time after a while, on the model named by MMFP4_BENCH_MODEL. A
// decode step picks 4 of 64 experts a layer, so most of the experts it
// reads were last read many steps (about a second) before. Each pass takes
// 8 random picks of 4 experts (a random MoE layer each) and
//
//   - cold-GB/s: reads the picks' 96 matrices (codes) on both threads,
//     each thread one half of every matrix, as long streams;
//   - again-GB/s: reads the same bytes again at once (about 150 MB, mostly
//     from memory again, not from the caches);
//   - first-touch-us: for 32 other random experts, times one byte load
//     from the start of the up matrix, which no pass has read for a while;
//   - retouch-us: then one load from another line of the same 4 KB page
//     (the page's first use already paid).
//
// On a machine whose memory costs nothing extra on a first touch, cold and
// again read at about the same rate.
func BenchmarkExpertFirstTouch(b *testing.B) {
	benchmode.Check(b)
	be, _, layers := benchModelMoE(b)
	r := rand.New(rand.NewPCG(17, 18))
	E := len(layers[0])
	var sink [64]uint64
	var first, again []float64
	var coldBytes, coldSecs, againSecs float64
	for i := 0; i < b.N; i++ {
		var halves [2][][]byte
		bytes := 0
		for p := 0; p < 8; p++ {
			l := r.IntN(len(layers))
			for _, e := range r.Perm(E)[:4] {
				ex := layers[l][e]
				for _, w := range []backend.Weight{ex.Gate, ex.Up, ex.Down} {
					c := w.(*quant).m.Codes
					h := len(c) / 2 &^ 255
					halves[0] = append(halves[0], c[:h])
					halves[1] = append(halves[1], c[h:h+(len(c)-h)&^255])
					bytes += h + (len(c)-h)&^255
				}
			}
		}
		read := func() float64 {
			t0 := time.Now()
			be.workers.run(2, 1, func(lo, hi int) {
				for _, s := range halves[lo] {
					sink[8*lo] += readAVX512(&s[0], len(s))
				}
			})
			return time.Since(t0).Seconds()
		}
		coldSecs += read()
		againSecs += read()
		coldBytes += float64(bytes)
		for p := 0; p < 32; p++ {
			up := layers[r.IntN(len(layers))][r.IntN(E)].Up.(*quant).m.Codes
			t0 := time.Now()
			sink[0] += uint64(up[0])
			first = append(first, time.Since(t0).Seconds()*1e6)
			t0 = time.Now()
			sink[1] += uint64(up[2048])
			again = append(again, time.Since(t0).Seconds()*1e6)
		}
	}
	slices.Sort(first)
	slices.Sort(again)
	b.ReportMetric(first[len(first)/2], "first-touch-us")
	b.ReportMetric(again[len(again)/2], "retouch-us")
	b.ReportMetric(coldBytes/coldSecs/1e9, "cold-GB/s")
	b.ReportMetric(coldBytes/againSecs/1e9, "again-GB/s")
}
