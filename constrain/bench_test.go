package constrain

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/mmfp4/mmfp4/internal/benchmode"
	"github.com/mmfp4/mmfp4/sample"
)

// trace generates one constrained output (as token ids, end id included)
// for the person schema.
func trace(b *testing.B, g *Grammar, seed uint64) []int {
	b.Helper()
	var ids []int
	c := g.Start()
	s, _ := sample.New(sample.Options{Temperature: 1, Seed: seed})
	logits := make([]float32, g.v.Size())
	for step := 0; step < 3000; step++ {
		for i := range logits {
			logits[i] = float32((i*2654435761+step*40503)%1000) / 100
		}
		if step > 200 {
			for id, tok := range g.v.tokens {
				if g.v.isEOS[id] || len(tok) > 0 && (tok[0] == '"' || tok[0] == '}') {
					logits[id] += 20
				}
			}
		}
		c.Mask(logits)
		id, err := s.Sample(logits)
		if err != nil {
			b.Fatal(err)
		}
		if err := c.Advance(id); err != nil {
			b.Fatal(err)
		}
		ids = append(ids, id)
		if g.v.isEOS[id] {
			return ids
		}
	}
	b.Fatal("the trace does not end")
	return nil
}

// BenchmarkConstrainedToken is the per-token cost of a constraint once the
// token sets of its states are cached: Mask on a logits row and Advance
// past the sampled token, replayed over a generated JSON output.
func BenchmarkConstrainedToken(b *testing.B) {
	benchmode.Check(b)
	for _, name := range []string{"tiny", "qwen3"} {
		b.Run(name, func(b *testing.B) {
			dir := tinyDir
			if name != "tiny" {
				dir = filepath.Join(realDir, name)
			}
			v := vocabOf(b, loadTok(b, dir))
			e, err := JSONSchema([]byte(testSchemas[0].schema), SchemaOptions{})
			if err != nil {
				b.Fatal(err)
			}
			g, err := Compile(v, e, Options{})
			if err != nil {
				b.Fatal(err)
			}
			ids := trace(b, g, 1) // also warms the cache
			logits := make([]float32, v.Size())
			for i := range logits {
				logits[i] = float32(i%97) / 10
			}
			row := make([]float32, len(logits))
			// Mask in place and Advance: the constraint's own work.
			b.Run("mask", func(b *testing.B) {
				tokens := 0
				for range b.N {
					c := g.Start()
					for _, id := range ids {
						copy(row, logits)
						c.Mask(row)
						if err := c.Advance(id); err != nil {
							b.Fatal(err)
						}
					}
					tokens += len(ids)
				}
				b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(tokens), "ns/token")
				b.ReportMetric(0, "ns/op")
			})
			// The row copy alone, which the mask case includes.
			b.Run("copy", func(b *testing.B) {
				tokens := 0
				for range b.N {
					for range ids {
						copy(row, logits)
					}
					tokens += len(ids)
				}
				b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(tokens), "ns/token")
				b.ReportMetric(0, "ns/op")
			})
			// Sampling under the constraint (the engine's path) and
			// without it, at temperature 1: the difference is the
			// overhead a decode step sees.
			s, _ := sample.New(sample.Options{Temperature: 1, Seed: 1})
			b.Run("sample", func(b *testing.B) {
				tokens := 0
				for range b.N {
					c := g.Start()
					for _, id := range ids {
						copy(row, logits)
						if _, err := c.Sample(s, row); err != nil {
							b.Fatal(err)
						}
						if err := c.Advance(id); err != nil {
							b.Fatal(err)
						}
					}
					tokens += len(ids)
				}
				b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(tokens), "ns/token")
				b.ReportMetric(0, "ns/op")
			})
			b.Run("sample-free", func(b *testing.B) {
				tokens := 0
				for range b.N {
					for range ids {
						copy(row, logits)
						if _, err := s.Sample(row); err != nil {
							b.Fatal(err)
						}
					}
					tokens += len(ids)
				}
				b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(tokens), "ns/token")
				b.ReportMetric(0, "ns/op")
			})
		})
	}
}

// BenchmarkTokenSet is the cost of working out one new state's token set
// (a walk of the vocabulary trie): what a state's first use costs, once.
func BenchmarkTokenSet(b *testing.B) {
	benchmode.Check(b)
	for _, name := range []string{"tiny", "qwen3"} {
		b.Run(name, func(b *testing.B) {
			dir := tinyDir
			if name != "tiny" {
				dir = filepath.Join(realDir, name)
			}
			v := vocabOf(b, loadTok(b, dir))
			e, err := JSONSchema([]byte(testSchemas[0].schema), SchemaOptions{})
			if err != nil {
				b.Fatal(err)
			}
			states := 0
			var spent time.Duration
			for range b.N {
				g, err := Compile(v, e, Options{})
				if err != nil {
					b.Fatal(err)
				}
				t0 := time.Now()
				states += g.Precompute(200)
				spent += time.Since(t0)
			}
			b.ReportMetric(float64(spent.Nanoseconds())/float64(states), "ns/state")
			b.ReportMetric(0, "ns/op")
		})
	}
}
