package engine

import (
	"testing"

	"github.com/mmfp4/mmfp4/constrain"
	"github.com/mmfp4/mmfp4/sample"
)

// A constrained request writes only text of its grammar, at any
// temperature, and ends as EOS when the grammar's text is complete; the
// unconstrained greedy output of the same prompt is something else.
func TestConstraintShapesOutput(t *testing.T) {
	e := newEngine(t, Options{})
	_, tok := fixture(t)
	v, err := constrain.VocabOf(tok, tok.EOSIDs())
	if err != nil {
		t.Fatal(err)
	}
	expr, err := constrain.JSONSchema([]byte(`{"enum": ["alpha", "beta", 17]}`), constrain.SchemaOptions{})
	if err != nil {
		t.Fatal(err)
	}
	g, err := constrain.Compile(v, expr, constrain.Options{})
	if err != nil {
		t.Fatal(err)
	}
	valid := map[string]bool{`"alpha"`: true, `"beta"`: true, `17`: true}
	for seed := range uint64(6) {
		temp := float32(seed) * 0.4
		r := run(t, e, Request{Prompt: refPrompt, MaxTokens: 40, Text: true, Constraint: g.Start(),
			Sampling: sample.Options{Temperature: temp, Seed: seed}})
		if r.final.Finish != FinishEOS {
			t.Errorf("seed %d: finished %s (%v), text %q", seed, r.final.Finish, r.final.Err, r.text)
		}
		// Leading whitespace is allowed by the JSON grammar.
		got := r.text
		for len(got) > 0 && (got[0] == ' ' || got[0] == '\n' || got[0] == '\t') {
			got = got[1:]
		}
		if !valid[got] {
			t.Errorf("seed %d, temperature %g: text %q is not one of the enum's values", seed, temp, r.text)
		}
	}
	plain := run(t, e, Request{Prompt: refPrompt, MaxTokens: 8, Text: true, StopIDs: []int{}})
	if valid[plain.text] {
		t.Fatalf("the unconstrained output %q already matches: the test shows nothing", plain.text)
	}
	waitIdle(t, e)
}
