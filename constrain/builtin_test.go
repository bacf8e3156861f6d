package constrain_test

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"testing"

	"github.com/mmfp4/mmfp4"
	"github.com/mmfp4/mmfp4/constrain"
	"github.com/mmfp4/mmfp4/defaultmodel"
	"github.com/mmfp4/mmfp4/engine"
	"github.com/mmfp4/mmfp4/sample"
	"github.com/mmfp4/mmfp4/tokenizer"
)

// Schemas for the built-in model: the supported keywords, bounded where
// the schema allows it, so that every output is complete well within
// maxTokens.
var builtinSchemas = []struct{ name, schema string }{
	{"person", `{"type": "object", "properties": {
		"name": {"type": "string", "minLength": 1, "maxLength": 12},
		"age": {"type": "integer"},
		"member": {"type": "boolean"},
		"tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
		"party": {"enum": ["federalist", "whig", null, 1812]}},
		"required": ["name", "age", "member"], "additionalProperties": false}`},
	{"one of", `{"type": "object", "properties": {"shape": {"oneOf": [
		{"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "number"}}, "required": ["kind", "r"], "additionalProperties": false},
		{"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "integer"}}, "required": ["kind", "side"], "additionalProperties": false}]}},
		"required": ["shape"], "additionalProperties": false}`},
	{"number list", `{"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 4}`},
	{"nested", `{"type": "object", "properties": {"bill": {"type": "object", "properties": {
		"title": {"type": "string", "maxLength": 16}, "votes": {"type": "array", "items": {"enum": ["yea", "nay"]}, "maxItems": 4}},
		"required": ["title", "votes"], "additionalProperties": false}}, "required": ["bill"], "additionalProperties": false}`},
}

// On the built-in model, output under a json_schema constraint always
// parses and validates against the schema (checked by an independent
// JSON-schema validator), over seeds and temperatures from greedy to 1.6.
// All requests run at once, so that the engine batches them.
func TestSchemaOutputBuiltinModel(t *testing.T) {
	dir, err := defaultmodel.Dir()
	if err != nil {
		t.Fatal(err)
	}
	m, err := mmfp4.Load(dir, mmfp4.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	tok, err := m.Tokenizer()
	if err != nil {
		t.Fatal(err)
	}
	v, err := constrain.VocabOf(tok, m.EOS())
	if err != nil {
		t.Fatal(err)
	}
	eng, err := m.Engine()
	if err != nil {
		t.Fatal(err)
	}
	off := false
	prompt, err := m.EncodeChat([]tokenizer.Message{{Role: "user", Content: "Answer in JSON."}}, tokenizer.ChatOptions{AddGenerationPrompt: true, EnableThinking: &off})
	if err != nil {
		t.Fatal(err)
	}
	const maxTokens = 160
	temperatures := []float32{0, 0.4, 0.8, 1.2, 1.6}
	const seeds = 5
	type outcome struct {
		schema, text string
		temp         float32
		seed         uint64
		ev           engine.Event
	}
	var (
		mu       sync.Mutex
		outcomes []outcome
		wg       sync.WaitGroup
	)
	validators := map[string]*constrain.Validator{}
	for _, s := range builtinSchemas {
		e, err := constrain.JSONSchema([]byte(s.schema), constrain.SchemaOptions{})
		if err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		g, err := constrain.Compile(v, e, constrain.Options{})
		if err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		if validators[s.name], err = constrain.NewValidator([]byte(s.schema)); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		for _, temp := range temperatures {
			for seed := range uint64(seeds) {
				if temp == 0 && seed > 0 {
					continue // greedy output does not depend on the seed
				}
				st, err := eng.Submit(context.Background(), engine.Request{Prompt: prompt, MaxTokens: maxTokens, Text: true,
					Constraint: g.Start(), Sampling: sample.Options{Temperature: temp, Seed: seed}})
				if err != nil {
					t.Fatal(err)
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					o := outcome{schema: s.name, temp: temp, seed: seed}
					for {
						ev, err := st.Recv(context.Background())
						if err != nil {
							t.Error(err)
							return
						}
						o.text += ev.Text
						if ev.Done {
							o.ev = ev
							break
						}
					}
					mu.Lock()
					outcomes = append(outcomes, o)
					mu.Unlock()
				}()
			}
		}
	}
	wg.Wait()
	want := len(builtinSchemas) * (1 + (len(temperatures)-1)*seeds)
	if len(outcomes) != want {
		t.Fatalf("%d outputs, want %d", len(outcomes), want)
	}
	distinct := map[string]bool{}
	longest := 0
	for _, o := range outcomes {
		longest = max(longest, o.ev.Usage.CompletionTokens)
		name := fmt.Sprintf("%s, temperature %g, seed %d", o.schema, o.temp, o.seed)
		if o.ev.Finish != engine.FinishEOS {
			t.Errorf("%s: finished %s (%v) after %d tokens: %q", name, o.ev.Finish, o.ev.Err, o.ev.Usage.CompletionTokens, o.text)
			continue
		}
		var x any
		if err := json.Unmarshal([]byte(o.text), &x); err != nil {
			t.Errorf("%s: %q does not parse: %v", name, o.text, err)
			continue
		}
		if err := validators[o.schema].Validate([]byte(o.text)); err != nil {
			t.Errorf("%s: %q does not validate: %v", name, o.text, err)
		}
		distinct[o.schema+"\x00"+o.text] = true
	}
	// The outputs differ (the sampling is not stuck on one answer), so the
	// check covers many texts.
	if len(distinct) < len(outcomes)/2 {
		t.Errorf("only %d distinct outputs of %d", len(distinct), len(outcomes))
	}
	t.Logf("%d outputs, %d distinct, the longest %d tokens; e.g. %q", len(outcomes), len(distinct), longest, outcomes[len(outcomes)-1].text)
}
