package chat

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/mmfp4/mmfp4/constrain"
	"github.com/mmfp4/mmfp4/sample"
	"github.com/mmfp4/mmfp4/tokenizer"
)

var grammarTools = append(slices.Clone(goldenTools),
	Tool{Name: "book", Parameters: json.RawMessage(`{"type": "object", "properties": {
		"seat": {"enum": ["aisle", "window"]},
		"when": {"type": "object", "properties": {"day": {"type": "integer"}, "late": {"type": "boolean"}}, "required": ["day"]},
		"note": {"type": "string"},
		"count": {"type": "integer", "minimum": 1}},
		"required": ["seat", "when"]}`)})

// sampleText generates under g with random logits, favouring after 200
// steps the tokens that close things, and returns the text.
func sampleText(t *testing.T, tok *tokenizer.Tokenizer, g *constrain.Grammar, seed uint64) string {
	t.Helper()
	texts := make([]string, tok.VocabSize())
	for id := range texts {
		texts[id], _ = tok.Decode([]int{id})
	}
	eos := tok.EOSIDs()
	r := rand.New(rand.NewPCG(seed, 1))
	s, _ := sample.New(sample.Options{Temperature: 1, Seed: seed})
	c := g.Start()
	var ids []int
	logits := make([]float32, len(texts))
	for step := range 3000 {
		for i := range logits {
			logits[i] = r.Float32() * 8
			if step > 200 && (strings.ContainsAny(texts[i], `<"}]`) || slices.Contains(eos, i)) {
				logits[i] += 10
			}
		}
		id, err := c.Sample(s, logits)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Advance(id); err != nil {
			t.Fatal(err)
		}
		if slices.Contains(eos, id) {
			text, _ := tok.Decode(ids)
			return text
		}
		ids = append(ids, id)
	}
	t.Fatalf("seed %d: no end", seed)
	return ""
}

// Forced tool calls, generated at random under the grammar, parse as
// calls (and nothing else) whose arguments validate against the tool's
// schema.
func TestForcedToolCallsParseAndValidate(t *testing.T) {
	tok := tinyTokenizer(t)
	v, err := constrain.VocabOf(tok, tok.EOSIDs())
	if err != nil {
		t.Fatal(err)
	}
	validators := map[string]*constrain.Validator{}
	for _, tl := range grammarTools {
		if validators[tl.Name], err = constrain.NewValidator(tl.Parameters); err != nil {
			t.Fatal(err)
		}
	}
	cases := []struct {
		choice   ToolChoice
		parallel bool
		thinking bool
	}{
		{ToolChoice{Mode: ChoiceRequired}, true, false},
		{ToolChoice{Mode: ChoiceRequired}, false, true},
		{ToolChoice{Mode: ChoiceFunction, Name: "book"}, true, false},
		{ToolChoice{Mode: ChoiceFunction, Name: "get_time"}, false, true},
	}
	for _, c := range cases {
		name := fmt.Sprintf("%v/%s/parallel=%v/thinking=%v", c.choice.Mode, c.choice.Name, c.parallel, c.thinking)
		t.Run(name, func(t *testing.T) {
			body, err := ToolCallExpr(grammarTools, c.choice, c.parallel, constrain.SchemaOptions{MaxDepth: 3})
			if err != nil {
				t.Fatal(err)
			}
			g, err := constrain.Compile(v, OutputExpr(c.thinking, body), constrain.Options{})
			if err != nil {
				t.Fatal(err)
			}
			for seed := uint64(1); seed <= 25; seed++ {
				out := sampleText(t, tok, g, seed)
				res := Parse(out, ParserOptions{Reasoning: c.thinking, Tools: grammarTools, NewID: counterIDs()})
				if res.Content != "" || len(res.ToolCalls) == 0 || (!c.parallel || c.choice.Mode == ChoiceFunction) && len(res.ToolCalls) != 1 {
					t.Fatalf("seed %d: %q parsed as %#v", seed, out, res)
				}
				for _, call := range res.ToolCalls {
					if c.choice.Mode == ChoiceFunction && call.Name != c.choice.Name {
						t.Fatalf("seed %d: called %s", seed, call.Name)
					}
					err := validators[call.Name].Validate([]byte(call.Arguments))
					if err != nil && !strings.Contains(err.Error(), "minimum") {
						// (minimum is not enforced: the argument falls
						// back to any integer.)
						t.Fatalf("seed %d: %s(%s): %v\noutput %q", seed, call.Name, call.Arguments, err, out)
					}
				}
				if seed == 1 {
					t.Logf("%q", out)
				}
			}
		})
	}
}

// Under tool_choice "none" the grammar refuses <tool_call> and allows
// everything else, the end included.
func TestNoToolCallsExpr(t *testing.T) {
	tok := tinyTokenizer(t)
	v, err := constrain.VocabOf(tok, tok.EOSIDs())
	if err != nil {
		t.Fatal(err)
	}
	g, err := constrain.Compile(v, NoToolCallsExpr(), constrain.Options{AllowSpecial: true})
	if err != nil {
		t.Fatal(err)
	}
	call, _ := tok.TokenID(CallOpen)
	think, _ := tok.TokenID(ThinkClose)
	c := g.Start()
	allowed := func(id int) bool { return c.Allowed()[id/64]>>(id%64)&1 == 1 }
	if allowed(call) || !allowed(think) || !allowed(tok.EOSIDs()[0]) {
		t.Errorf("<tool_call> allowed %v, </think> %v, end %v", allowed(call), allowed(think), allowed(tok.EOSIDs()[0]))
	}
	// Spelled out in pieces, the tag is refused at its last piece.
	ids, _ := tok.Encode("<tool_call", false)
	for _, id := range ids {
		if err := c.Advance(id); err != nil {
			t.Fatal(err)
		}
	}
	gt, _ := tok.Encode(">", false)
	if allowed(gt[0]) {
		t.Error("the > that completes <tool_call> is allowed")
	}
}
