//go:build amd64

package cpu

import (
	"math/rand/v2"
	"os"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/format"
	"github.com/mmfp4/mmfp4/internal/benchmode"
	"github.com/mmfp4/mmfp4/model/glm4moelite"
)

// benchModelMoE loads the model named by MMFP4_BENCH_MODEL on a new CPU
// backend, maps in all its pages, and returns its MoE layers' routed
// experts; it skips without a model, without AVX-512 or without MoE
// layers. The model is closed when b ends.
func benchModelMoE(b *testing.B) (*Backend, *glm4moelite.Model, [][]backend.Expert) {
	dir := os.Getenv("MMFP4_BENCH_MODEL")
	if dir == "" {
		b.Skip("MMFP4_BENCH_MODEL names no model directory")
	}
	if !hasAVX512 {
		b.Skip("no AVX-512")
	}
	be := New(Options{})
	m, err := glm4moelite.Load(dir, be, glm4moelite.LoadOptions{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { m.Close() })
	if err := m.Prefault(); err != nil {
		b.Fatal(err)
	}
	var layers [][]backend.Expert
	for _, l := range m.Layers {
		if l.MoE != nil {
			layers = append(layers, l.MoE.Experts)
		}
	}
	if len(layers) == 0 {
		b.Skip("no MoE layer")
	}
	return be, m, layers
}

// BenchmarkMoEModelDir takes the routed experts of a memory-mapped model
// (the directory named by MMFP4_BENCH_MODEL, for example `mmfp4 synth
// --preset glm-4.7-flash`) apart: each pass picks a random MoE layer and 4
// random experts, as a decode step does, and reads their 12 matrices in one
// of several ways. GB/s counts the codes, scales and row scales read.
//
//   - read: AVX-512 loads over the same codes, 384 KB items on the pool:
//     what the memory gives for these pages.
//   - read_contig: as many bytes from one contiguous span of lm_head.
//   - gemv: the decode kernel on every matrix, in one dispatch (each matrix
//     cut in four items), no barrier between gate/up and down.
//   - moe: the backend's MoE op (two dispatches, SiLU, quantization).
//   - moe_1t: the same on one thread.
func BenchmarkMoEModelDir(b *testing.B) {
	benchmode.Check(b)
	be, m, layers := benchModelMoE(b)
	const topK = 4
	E := len(layers[0])
	hidden := layers[0][0].Gate.Cols()
	r := rand.New(rand.NewPCG(7, 8))
	type pick struct {
		layer int
		rt    *routing
	}
	picks := make([]pick, 256)
	for i := range picks {
		perm := r.Perm(E)
		picks[i] = pick{r.IntN(len(layers)), &routing{topK: topK, experts: perm[:topK], weights: []float32{0.4, 0.3, 0.2, 0.1}}}
	}
	mats := func(p pick) []*format.Matrix {
		var ms []*format.Matrix
		for _, e := range p.rt.experts {
			ex := layers[p.layer][e]
			for _, w := range []backend.Weight{ex.Gate, ex.Up, ex.Down} {
				ms = append(ms, w.(*quant).m)
			}
		}
		return ms
	}
	matBytes := func(m *format.Matrix) int64 {
		return int64(len(m.Codes) + len(m.Scales) + 4*len(m.RowScale))
	}
	var step int64
	for _, m := range mats(picks[0]) {
		step += matBytes(m)
	}
	x := be.NewTensor(1, hidden)
	be.Upload(x, randMat(r, hidden, 1))
	out := be.NewTensor(1, hidden)

	report := func(b *testing.B, run func(p pick)) {
		b.SetBytes(step)
		var best passTimer
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			best.start()
			run(picks[i%len(picks)])
			best.stop(step)
		}
		b.ReportMetric(float64(step)*float64(b.N)/b.Elapsed().Seconds()/1e9, "GB/s")
		b.ReportMetric(b.Elapsed().Seconds()*1e6/float64(b.N), "us/op")
		best.report(b)
	}
	var sink [64]uint64
	readItems := func(p pick, item int) {
		var spans [][]byte
		for _, m := range mats(p) {
			for o := 0; o < len(m.Codes); o += item {
				spans = append(spans, m.Codes[o:min(o+item, len(m.Codes))])
			}
		}
		be.workers.run(len(spans), 1, func(lo, hi int) {
			for _, s := range spans[lo:hi] {
				sink[lo%64] += readAVX512(&s[0], len(s)&^255)
			}
		})
	}
	// The first pass over the experts' pages in a process runs slower than
	// later ones: one untimed pass over every pick first.
	for _, p := range picks {
		readItems(p, 384<<10)
	}
	b.Run("read", func(b *testing.B) {
		report(b, func(p pick) { readItems(p, 384<<10) })
	})
	// The same number of bytes from one contiguous span of lm_head at a
	// random offset: the memory's rate without the jumps between matrices.
	b.Run("read_contig", func(b *testing.B) {
		lm := m.LMHead.(*quant).m.Codes
		n := int(step) &^ (384<<10 - 1)
		report(b, func(p pick) {
			base := (p.layer * 7919 * 4096) % (len(lm) - n) &^ 4095
			be.workers.run(n/(384<<10), 1, func(lo, hi int) {
				for it := lo; it < hi; it++ {
					sink[lo%64] += readAVX512(&lm[base+it*(384<<10)], 384<<10)
				}
			})
		})
	})
	qa := map[int]*qacts{}
	for _, k := range []int{hidden, layers[0][0].Down.Cols()} {
		xq := randMat(r, k, 1)
		qa[k] = be.quantizeActivations(&mat{rows: 1, cols: k, stride: k, data: xq}, 128)
	}
	b.Run("gemv", func(b *testing.B) {
		bufs := make([]float32, 12*4096)
		report(b, func(p pick) {
			ms := mats(p)
			be.workers.run(4*len(ms), 1, func(lo, hi int) {
				for it := lo; it < hi; it++ {
					m := ms[it/4]
					q := (m.N + 3) / 4
					r0, r1 := (it%4)*q, min((it%4+1)*q, m.N)
					be.gemvRows(m, r0, r1, qa[m.K], 0, bufs[(it/4)*4096+r0:])
				}
			})
		})
	})
	b.Run("moe", func(b *testing.B) {
		report(b, func(p pick) { be.MoE(out, x, p.rt, layers[p.layer]) })
	})
	b.Run("moe_1t", func(b *testing.B) {
		b1 := New(Options{Threads: 1})
		report(b, func(p pick) { b1.MoE(out, x, p.rt, layers[p.layer]) })
	})
}
