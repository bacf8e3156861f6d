package cpu

import (
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/internal/benchmode"
)

// glmShapes are GLM-4.7-Flash's matrix shapes (N outputs x K inputs), and
// how many distinct copies a benchmark cycles through so that the weights
// come from DRAM (about 256 MB in all), as in a real decode step.
var glmShapes = []struct {
	name   string
	N, K   int
	copies int
}{
	{"expert_1536x2048", 1536, 2048, 160},
	{"down_2048x1536", 2048, 1536, 160},
	{"q_b_5120x768", 5120, 768, 128},
	{"o_proj_2048x5120", 2048, 5120, 48},
	{"dense_10240x2048", 10240, 2048, 24},
	{"lm_head_154880x2048", 154880, 2048, 1},
}

// benchWeights returns copies distinct random MMFP4 matrices of one shape
// (random codes and scales: the kernels' speed does not depend on values).
func benchWeights(b *testing.B, be *Backend, N, K, copies int) ([]backend.Weight, int64) {
	r := rand.New(rand.NewPCG(1, 2))
	var ws []backend.Weight
	var bytes int64
	for i := 0; i < copies; i++ {
		m := randQuant(r, N, K, 128)
		for j := range m.Scales {
			m.Scales[j] = byte(0x30 + r.IntN(8))
		}
		w, err := be.NewWeight(backend.HostWeight{Name: "w", N: N, K: K, Quant: m})
		if err != nil {
			b.Fatal(err)
		}
		ws = append(ws, w)
		bytes = int64(len(m.Codes) + len(m.Scales) + 4*len(m.RowScale))
	}
	return ws, bytes
}

// BenchmarkDecodeGemv times one token through GLM-4.7-Flash's matrices
// (MatMul with T = 1: activation quantization, dispatch and the product),
// cycling through distinct copies so the weights stream from DRAM. GB/s
// counts the packed weight bytes read.
func BenchmarkDecodeGemv(b *testing.B) {
	benchmode.Check(b)
	for _, k := range Kernels() {
		for _, s := range glmShapes {
			b.Run(fmt.Sprintf("%s/%s", k, s.name), func(b *testing.B) {
				be := New(Options{Kernel: k})
				ws, bytes := benchWeights(b, be, s.N, s.K, s.copies)
				x, out := be.NewTensor(1, s.K), be.NewTensor(1, s.N)
				be.Upload(x, randMat(rand.New(rand.NewPCG(3, 4)), s.K, 1))
				b.SetBytes(bytes)
				var best passTimer
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					if i%len(ws) == 0 {
						best.start()
					}
					be.MatMul(out, x, ws[i%len(ws)])
					if i%len(ws) == len(ws)-1 {
						best.stop(bytes * int64(len(ws)))
					}
				}
				b.ReportMetric(float64(bytes)*float64(b.N)/b.Elapsed().Seconds()/1e9, "GB/s")
				best.report(b)
			})
		}
	}
}

// passTimer keeps the fastest of several timed passes over all of a
// benchmark's data, as the C read-bandwidth reference does (best of 10):
// on a shared machine the mean mixes in other programs' use of the memory.
type passTimer struct {
	t0   time.Time
	best float64 // bytes per second
}

func (p *passTimer) start() { p.t0 = time.Now() }

func (p *passTimer) stop(bytes int64) {
	p.best = max(p.best, float64(bytes)/time.Since(p.t0).Seconds())
}

func (p *passTimer) report(b *testing.B) {
	if p.best > 0 {
		b.ReportMetric(p.best/1e9, "best-GB/s")
	}
}

// BenchmarkQuantizeRow times the activation quantizer on one 2048-wide row.
func BenchmarkQuantizeRow(b *testing.B) {
	benchmode.Check(b)
	for _, be := range backends(1) {
		b.Run(be.isa.String(), func(b *testing.B) {
			a := newQActs(1, 2048, 128)
			x := randMat(rand.New(rand.NewPCG(1, 2)), 2048, 1)
			q, s, sum := a.row(0)
			b.SetBytes(4 * 2048)
			for i := 0; i < b.N; i++ {
				be.quantizeRow(x, 128, q, s, sum)
			}
		})
	}
}

// BenchmarkPrefillGemm times a batch of T tokens through GLM-4.7-Flash's
// matrices (MatMul: quantization, dispatch, product). GOP/s counts 2*N*K*T
// operations (a multiply and an add per weight and token).
func BenchmarkPrefillGemm(b *testing.B) {
	benchmode.Check(b)
	for _, k := range Kernels() {
		for _, s := range glmShapes[:3] {
			for _, T := range []int{64, 512} {
				b.Run(fmt.Sprintf("%s/%s/T=%d", k, s.name, T), func(b *testing.B) {
					be := New(Options{Kernel: k})
					ws, _ := benchWeights(b, be, s.N, s.K, 1)
					x, out := be.NewTensor(T, s.K), be.NewTensor(T, s.N)
					be.Upload(x, randMat(rand.New(rand.NewPCG(3, 4)), T*s.K, 1))
					b.ResetTimer()
					for i := 0; i < b.N; i++ {
						be.MatMul(out, x, ws[0])
					}
					b.ReportMetric(2*float64(s.N)*float64(s.K)*float64(T)*float64(b.N)/b.Elapsed().Seconds()/1e9, "GOP/s")
				})
			}
		}
	}
}

// BenchmarkLatentAttentionDecode times one decode row's attention at
// GLM-4.7-Flash's shapes (20 heads, rank 512, rope 64) over a context of
// 1024 cached positions, per cache dtype.
func BenchmarkLatentAttentionDecode(b *testing.B) {
	benchmode.Check(b)
	s := backend.MLAShape{Heads: 20, NopeDim: 192, RopeDim: 64, VDim: 256, Rank: 512}
	const ctx, bs = 1024, 64
	for _, dt := range []backend.CacheDType{backend.CacheF32, backend.CacheBF16} {
		b.Run(dt.String(), func(b *testing.B) {
			be := New(Options{})
			p, err := be.NewCachePool(1, ctx/bs+1, bs, s.Rank, s.RopeDim, dt)
			if err != nil {
				b.Fatal(err)
			}
			blocks := make([]int32, ctx/bs+1)
			for i := range blocks {
				blocks[i] = int32(i)
			}
			r := rand.New(rand.NewPCG(1, 2))
			fill := &backend.Batch{Seqs: []backend.Seq{{Len: ctx, Blocks: blocks}}}
			for j := 0; j < ctx; j++ {
				fill.Tokens = append(fill.Tokens, 0)
				fill.Positions = append(fill.Positions, int32(j))
			}
			be.SetBatch(fill, p)
			lat, kpe := be.NewTensor(ctx, s.Rank), be.NewTensor(ctx, s.RopeDim)
			be.Upload(lat, randMat(r, ctx*s.Rank, 1))
			be.Upload(kpe, randMat(r, ctx*s.RopeDim, 1))
			be.CacheWrite(0, lat, kpe)
			step := &backend.Batch{Tokens: []int32{0}, Positions: []int32{ctx}, Seqs: []backend.Seq{{Len: 1, Blocks: blocks}}}
			be.SetBatch(step, p)
			ql, q := be.NewTensor(1, s.Heads*s.Rank), be.NewTensor(1, s.Heads*(s.NopeDim+s.RopeDim))
			be.Upload(ql, randMat(r, s.Heads*s.Rank, 0.05))
			be.Upload(q, randMat(r, s.Heads*(s.NopeDim+s.RopeDim), 0.05))
			out := be.NewTensor(1, s.Heads*s.Rank)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				be.LatentAttention(out, ql, q, 0, s, 0.07)
			}
			b.ReportMetric(b.Elapsed().Seconds()*1e6/float64(b.N), "us/op")
		})
	}
}

// BenchmarkMoEDecode runs one token through a GLM-4.7-Flash MoE layer's
// routed experts (64 experts of 1536 x 2048, 4 chosen at random per step,
// so their weights come from memory). GB/s counts the chosen experts'
// weight bytes.
func BenchmarkMoEDecode(b *testing.B) {
	benchmode.Check(b)
	const hidden, inter, E, topK = 2048, 1536, 64, 4
	be := New(Options{})
	r := rand.New(rand.NewPCG(5, 6))
	var experts []backend.Expert
	var bytes int64
	for e := 0; e < E; e++ {
		ws, n1 := benchWeights(b, be, inter, hidden, 2)
		down, n2 := benchWeights(b, be, hidden, inter, 1)
		experts = append(experts, backend.Expert{Gate: ws[0], Up: ws[1], Down: down[0]})
		bytes = 2*n1 + n2
	}
	x, out := be.NewTensor(1, hidden), be.NewTensor(1, hidden)
	be.Upload(x, randMat(r, hidden, 1))
	routes := make([]*routing, 64)
	for i := range routes {
		perm := r.Perm(E)
		routes[i] = &routing{topK: topK, experts: perm[:topK], weights: []float32{0.4, 0.3, 0.2, 0.1}}
	}
	step := bytes * topK
	b.SetBytes(step)
	var best passTimer
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		best.start()
		be.MoE(out, x, routes[i%len(routes)], experts)
		best.stop(step)
	}
	b.ReportMetric(float64(step)*float64(b.N)/b.Elapsed().Seconds()/1e9, "GB/s")
	best.report(b)
}

// BenchmarkGemvL2 runs the decode kernel of each family on one thread over
// a 128 x 2048 matrix (128 KB of codes) that stays in the L2 cache: the
// kernel's compute rate per byte, which bounds what it can stream from
// memory per core.
//
//   - normal: every group scale a normal e4m3 number, as in quantized
//     checkpoints (a group's scale is subnormal only where its largest
//     weight is below 3.5e-5 of its row's; none of the trained test
//     fixture's 83,920 groups, none in a sample of the synthetic model).
//   - subnormal: random scales, a sixteenth of them subnormal (the kernel
//     tests' matrices). The AVX-512 kernel widens the scales by a float
//     multiply, and subnormal inputs take a slow path in the FPU: about
//     half the rate (docs/perf.md, 2026-11-28 (4)).
func BenchmarkGemvL2(b *testing.B) {
	benchmode.Check(b)
	for _, k := range Kernels() {
		for _, scales := range []string{"normal", "subnormal"} {
			b.Run(k+"/"+scales, func(b *testing.B) {
				be := New(Options{Kernel: k, Threads: 1})
				r := rand.New(rand.NewPCG(1, 2))
				m := randQuant(r, 128, 2048, 128)
				if scales == "normal" {
					for j := range m.Scales {
						m.Scales[j] = byte(0x30 + r.IntN(16)) // 0.5 to 1.875
					}
				}
				x := randMat(r, 2048, 1)
				a := be.quantizeActivations(&mat{rows: 1, cols: 2048, stride: 2048, data: x}, 128)
				out := make([]float32, 128)
				b.SetBytes(int64(len(m.Codes) + len(m.Scales) + 4*len(m.RowScale)))
				for i := 0; i < b.N; i++ {
					be.gemvRows(m, 0, 128, a, 0, out)
				}
			})
		}
	}
}
