package cpu

import (
	"math/rand/v2"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/format"
	"github.com/mmfp4/mmfp4/internal/benchmode"
)

// BenchmarkDecodeMatMul times one token through a GLM-4.7-Flash expert-sized
// MMFP4 matrix (1536 x 2048, group 128). SetBytes counts the weight bytes
// read, so the MB/s column compares directly with the memory bandwidth.
func BenchmarkDecodeMatMul(b *testing.B) {
	benchmode.Check(b)
	for _, floatActs := range []bool{false, true} {
		name := "int8"
		if floatActs {
			name = "float32"
		}
		b.Run(name, func(b *testing.B) {
			const N, K = 1536, 2048
			r := rand.New(rand.NewPCG(1, 2))
			q, err := format.Quantize(randMat(r, N*K, 0.02), N, K, format.QuantOptions{GroupSize: 128})
			if err != nil {
				b.Fatal(err)
			}
			be := New(Options{FloatActivations: floatActs})
			w, err := be.NewWeight(backend.HostWeight{Name: "w", N: N, K: K, Quant: q})
			if err != nil {
				b.Fatal(err)
			}
			x, out := be.NewTensor(1, K), be.NewTensor(1, N)
			be.Upload(x, randMat(r, K, 1))
			b.SetBytes(int64(len(q.Codes) + len(q.Scales) + 4*len(q.RowScale)))
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				be.MatMul(out, x, w)
			}
		})
	}
}
