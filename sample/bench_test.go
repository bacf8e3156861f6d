package sample

import (
	"math/rand/v2"
	"testing"

	"github.com/mmfp4/mmfp4/internal/benchmode"
)

const benchVocab = 154880

// benchLogits resembles a language-model output: mostly broad noise with a
// handful of clearly preferred tokens.
func benchLogits() []float32 {
	r := rand.New(rand.NewPCG(2024, 1))
	l := make([]float32, benchVocab)
	for i := range l {
		l[i] = float32(r.NormFloat64() * 2)
	}
	for i := 0; i < 20; i++ {
		l[r.IntN(benchVocab)] = float32(12 + r.Float64()*6)
	}
	return l
}

func BenchmarkSample(b *testing.B) {
	benchmode.Check(b)
	logits := benchLogits()
	for _, c := range []struct {
		name string
		o    Options
	}{
		{"greedy", Options{}},
		{"temp", Options{Temperature: 0.8}},
		{"topk40", Options{Temperature: 0.8, TopK: 40}},
		{"topp0.9", Options{Temperature: 0.8, TopP: 0.9}},
		{"topp0.95-flat", Options{Temperature: 5, TopP: 0.95}},
		{"minp0.05", Options{Temperature: 0.8, MinP: 0.05}},
		{"topk40-topp0.95-minp0.05", Options{Temperature: 0.8, TopK: 40, TopP: 0.95, MinP: 0.05}},
	} {
		b.Run(c.name, func(b *testing.B) {
			s, err := New(c.o)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := s.Sample(logits); err != nil { // size the buffers
				b.Fatal(err)
			}
			b.ReportAllocs()
			for b.Loop() {
				if _, err := s.Sample(logits); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
