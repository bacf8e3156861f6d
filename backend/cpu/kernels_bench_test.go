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
