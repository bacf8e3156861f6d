package cpu

import (
	"math/rand/v2"
	"testing"
)

func BenchmarkTmpGemvHot(b *testing.B) {
	for _, th := range []int{1, 2} {
		be := New(Options{Threads: th})
		m := randQuant(rand.New(rand.NewPCG(1, 1)), 512, 2048, 128)
		a := newQActs(1, 2048, 128)
		q, s, sum := a.row(0)
		quantizeRowGo(randActRow(rand.New(rand.NewPCG(1, 2)), 16), 128, q, s, sum)
		out := make([]float32, 512)
		b.Run("", func(b *testing.B) {
			b.SetBytes(int64(len(m.Codes)))
			for i := 0; i < b.N; i++ {
				be.gemvRows(m, 0, 512, a, 0, out)
			}
		})
	}
}
