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

// BenchmarkDecodeMatMulDRAM cycles through 160 expert-sized MMFP4 matrices
// (256 MB, far more than the caches), so the weights come from DRAM as in a
// real decode step. MB/s counts the packed weight bytes read.
func BenchmarkDecodeMatMulDRAM(b *testing.B) {
	benchmode.Check(b)
	const N, K, count = 1536, 2048, 160
	r := rand.New(rand.NewPCG(1, 2))
	q, err := format.Quantize(randMat(r, N*K, 0.02), N, K, format.QuantOptions{GroupSize: 128})
	if err != nil {
		b.Fatal(err)
	}
	be := New(Options{})
	var ws []backend.Weight
	for i := 0; i < count; i++ {
		c := *q
		c.Codes = append([]byte(nil), q.Codes...) // distinct memory for each
		c.Scales = append([]byte(nil), q.Scales...)
		w, err := be.NewWeight(backend.HostWeight{Name: "w", N: N, K: K, Quant: &c})
		if err != nil {
			b.Fatal(err)
		}
		ws = append(ws, w)
	}
	x, out := be.NewTensor(1, K), be.NewTensor(1, N)
	be.Upload(x, randMat(r, K, 1))
	b.SetBytes(int64(len(q.Codes) + len(q.Scales) + 4*len(q.RowScale)))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		be.MatMul(out, x, ws[i%count])
	}
}

// BenchmarkMemoryRead sums a 512 MB buffer with every thread: the machine's
// read bandwidth, measured the same way as the kernels above.
func BenchmarkMemoryRead(b *testing.B) {
	benchmode.Check(b)
	buf := make([]uint64, 64<<20)
	for i := range buf {
		buf[i] = uint64(i)
	}
	be := New(Options{})
	b.SetBytes(int64(8 * len(buf)))
	b.ResetTimer()
	var sink [64]uint64
	for i := 0; i < b.N; i++ {
		be.parallel(64, func(lo, hi int) {
			for c := lo; c < hi; c++ {
				var s uint64
				for _, v := range buf[c*len(buf)/64 : (c+1)*len(buf)/64] {
					s += v
				}
				sink[c] = s
			}
		})
	}
	_ = sink
}
