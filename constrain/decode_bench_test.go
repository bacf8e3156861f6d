package constrain_test

// In the external test package, so that the root package (which will
// import the engine, and the engine this package) makes no import cycle.

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/mmfp4/mmfp4"
	"github.com/mmfp4/mmfp4/internal/benchmode"
)

// BenchmarkDecodeStepTiny is a decode step of the tiny built-in test
// model, for comparison with the constraint's per-token cost.
func BenchmarkDecodeStepTiny(b *testing.B) {
	benchmode.Check(b)
	m, err := mmfp4.Load(filepath.Join("..", "testdata", "glm4moelite-tiny"), mmfp4.Options{})
	if err != nil {
		b.Fatal(err)
	}
	prompt := []int{248, 475, 240, 439, 34, 19, 502, 29, 502, 22, 169, 295}
	var steps int
	var spent time.Duration
	for range b.N {
		res, err := m.Generate(context.Background(), prompt, mmfp4.GenerateOptions{MaxTokens: 64})
		if err != nil {
			b.Fatal(err)
		}
		steps += len(res.Tokens) - 1
		spent += res.DecodeTime
	}
	b.ReportMetric(float64(spent.Nanoseconds())/float64(steps), "ns/token")
	b.ReportMetric(0, "ns/op")
}
