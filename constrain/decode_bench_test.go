package constrain_test

// In the external test package, so that the root package (which will
// import the engine, and the engine this package) makes no import cycle.

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/mmfp4/mmfp4"
	"github.com/mmfp4/mmfp4/constrain"
	"github.com/mmfp4/mmfp4/defaultmodel"
	"github.com/mmfp4/mmfp4/engine"
	"github.com/mmfp4/mmfp4/internal/benchmode"
	"github.com/mmfp4/mmfp4/sample"
	"github.com/mmfp4/mmfp4/tokenizer"
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

// BenchmarkConstrainedDecodeBuiltin is the per-token cost of constrained
// decoding on the built-in model (json_schema, the person schema of
// TestSchemaOutputBuiltinModel, with its token sets already cached), as
// decode steps with the mask and without:
//
//   - free, json_schema: one request at a time on the engine, sampled at
//     temperature 0.8; ns/token is the time from the first generated token
//     to the last over the steps between them (prefill excluded).
//   - sample-free, sample-constrained: the sampling alone on the model's
//     own logits rows for such outputs, without and with the constraint
//     (Constraint.Sample and Advance, what the engine runs per token): the
//     difference is the constraint's own cost, without the noise of whole
//     steps. Constraint.Sample looks only at the allowed tokens when they
//     are few, so it can cost less than free sampling.
//   - copy, mask: the row copy alone, and with Mask and Advance on the
//     whole row: the constraint's work by itself, as if sampling were
//     free (an upper bound on what it adds).
func BenchmarkConstrainedDecodeBuiltin(b *testing.B) {
	benchmode.Check(b)
	dir, err := defaultmodel.Dir()
	if err != nil {
		b.Fatal(err)
	}
	m, err := mmfp4.Load(dir, mmfp4.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	tok, err := m.Tokenizer()
	if err != nil {
		b.Fatal(err)
	}
	v, err := constrain.VocabOf(tok, m.EOS())
	if err != nil {
		b.Fatal(err)
	}
	e, err := constrain.JSONSchema([]byte(builtinSchemas[0].schema), constrain.SchemaOptions{})
	if err != nil {
		b.Fatal(err)
	}
	g, err := constrain.Compile(v, e, constrain.Options{})
	if err != nil {
		b.Fatal(err)
	}
	eng, err := m.Engine()
	if err != nil {
		b.Fatal(err)
	}
	off := false
	prompt, err := m.EncodeChat([]tokenizer.Message{{Role: "user", Content: "Answer in JSON."}}, tokenizer.ChatOptions{AddGenerationPrompt: true, EnableThinking: &off})
	if err != nil {
		b.Fatal(err)
	}
	// generate runs one request and returns its tokens and the time from
	// the first token to the last.
	generate := func(b *testing.B, seed uint64, constrained bool) ([]int, time.Duration) {
		req := engine.Request{Prompt: prompt, MaxTokens: 48, Sampling: sample.Options{Temperature: 0.8, Seed: seed}}
		if constrained {
			req.Constraint = g.Start()
		} else {
			req.StopIDs = []int{}
		}
		st, err := eng.Submit(context.Background(), req)
		if err != nil {
			b.Fatal(err)
		}
		var ids []int
		var first, last time.Time
		for {
			ev, err := st.Recv(context.Background())
			if err != nil {
				b.Fatal(err)
			}
			if ev.Done {
				if ev.Finish == engine.FinishError {
					b.Fatal(ev.Err)
				}
				return ids, last.Sub(first)
			}
			if first.IsZero() {
				first = ev.Time
			}
			last = ev.Time
			ids = append(ids, ev.Token)
		}
	}
	// Warm up: the token sets of the states these outputs reach, the
	// engine's buffers; and keep the outputs for the sampling cases.
	var outputs [][]int
	for seed := range uint64(8) {
		ids, _ := generate(b, seed, true)
		outputs = append(outputs, ids)
		generate(b, seed, false)
	}
	for _, mode := range []string{"free", "json_schema"} {
		b.Run(mode, func(b *testing.B) {
			steps := 0
			var spent time.Duration
			for i := range b.N {
				ids, d := generate(b, uint64(i%8), mode == "json_schema")
				steps += len(ids) - 1
				spent += d
			}
			b.ReportMetric(float64(spent.Nanoseconds())/float64(steps), "ns/token")
			b.ReportMetric(float64(steps)/float64(b.N), "tokens/op")
			b.ReportMetric(0, "ns/op")
		})
	}
	// The model's logits rows for the constrained outputs: row j of
	// output k is what the engine sampled token j from.
	type row struct {
		logits []float32
		id     int
	}
	var rows [][]row
	for _, ids := range outputs {
		all, err := m.Logits(append(append([]int{}, prompt...), ids...))
		if err != nil {
			b.Fatal(err)
		}
		n := len(all) / (len(prompt) + len(ids))
		var rs []row
		for j, id := range ids {
			p := len(prompt) - 1 + j
			rs = append(rs, row{all[p*n : (p+1)*n], id})
		}
		rows = append(rows, rs)
	}
	for _, mode := range []string{"sample-free", "sample-constrained", "copy", "mask"} {
		b.Run(mode, func(b *testing.B) {
			s, err := sample.New(sample.Options{Temperature: 0.8, Seed: 1})
			if err != nil {
				b.Fatal(err)
			}
			scratch := make([]float32, len(rows[0][0].logits))
			tokens := 0
			b.ResetTimer()
			for i := range b.N {
				rs := rows[i%len(rows)]
				c := g.Start()
				for _, r := range rs {
					copy(scratch, r.logits) // every case: the engine's row is consumed
					switch mode {
					case "copy":
						continue
					case "sample-free":
						if _, err := s.Sample(scratch); err != nil {
							b.Fatal(err)
						}
						continue
					case "sample-constrained":
						if _, err := c.Sample(s, scratch); err != nil {
							b.Fatal(err)
						}
					case "mask":
						c.Mask(scratch)
					}
					if err := c.Advance(r.id); err != nil {
						b.Fatal(err)
					}
				}
				tokens += len(rs)
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(tokens), "ns/token")
			b.ReportMetric(0, "ns/op")
		})
	}
}
