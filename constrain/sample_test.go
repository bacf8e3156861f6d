package constrain

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"sync"
	"testing"

	"github.com/mmfp4/mmfp4/sample"
)

// Schemas for the sampling tests: the supported keywords, nested.
var testSchemas = []struct{ name, schema string }{
	{"person", `{"type": "object", "properties": {
		"name": {"type": "string", "minLength": 1, "maxLength": 12},
		"age": {"type": "integer"},
		"email": {"type": ["string", "null"]},
		"tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
		"role": {"enum": ["admin", "user", null, 7]},
		"address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}}, "required": ["city"]},
		"score": {"type": "number"},
		"active": {"type": "boolean"}},
		"required": ["name", "age", "active"], "additionalProperties": false}`},
	{"one of", `{"type": "object", "properties": {"shape": {"oneOf": [
		{"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "number"}}, "required": ["kind", "r"], "additionalProperties": false},
		{"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "integer"}}, "required": ["kind", "side"], "additionalProperties": false}]}},
		"required": ["shape"], "additionalProperties": false}`},
	{"recursive", `{"$defs": {"node": {"type": "object", "properties": {
		"value": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
		"required": ["value"], "additionalProperties": false}}, "$ref": "#/$defs/node"}`},
	{"number list", `{"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 5}`},
	{"free map", `{"type": "object", "additionalProperties": {"type": "integer"}}`},
	{"const", `{"const": {"ok": true, "list": [1, "two"]}}`},
	{"json_object", `{"type": "object"}`},
}

// generate samples under the constraint with random logits until an end
// id, and returns the text. After finishAfter steps it favours tokens
// with a quote or closing bracket in them and the end ids, so that every
// seed ends in a bounded number of steps: random tokens of a large
// vocabulary rarely close a string. bias, if set, also adds to the logits.
func generate(t testing.TB, g *Grammar, seed uint64, finishAfter int, bias func(step int, logits []float32)) (string, bool) {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, 99))
	s, err := sample.New(sample.Options{Temperature: 1, Seed: seed})
	if err != nil {
		t.Fatal(err)
	}
	c := g.Start()
	logits := make([]float32, g.v.Size()+7) // padding rows, as a model may have
	var closers []int
	for id, tok := range g.v.tokens {
		if g.v.isEOS[id] || bytes.ContainsAny(tok, `"}]`) {
			closers = append(closers, id)
		}
	}
	var out []byte
	for step := range finishAfter + 2000 {
		for i := range logits {
			logits[i] = r.Float32() * 8
		}
		if step >= finishAfter {
			for _, id := range closers {
				logits[id] += 12
			}
		}
		if bias != nil {
			bias(step, logits)
		}
		var id int
		var err error
		if len(logits) < 1000 {
			// Small vocabularies take the masked row; large ones sample
			// among the allowed tokens (both ways are tested).
			c.Mask(logits)
			id, err = s.Sample(logits)
		} else {
			id, err = c.Sample(s, logits)
		}
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Advance(id); err != nil {
			t.Fatalf("seed %d step %d: sampled a refused token: %v (text so far %q)", seed, step, err, out)
		}
		if g.v.isEOS[id] {
			if !c.Done() {
				t.Fatalf("seed %d: ended but not Done", seed)
			}
			return string(out), true
		}
		out = append(out, g.v.tokens[id]...)
	}
	return string(out), false
}

func checkOutputs(t *testing.T, dir string, seeds int, schemas ...string) {
	tok := loadTok(t, dir)
	v := vocabOf(t, tok)
	for _, sc := range testSchemas {
		if len(schemas) > 0 && !slices.Contains(schemas, sc.name) {
			continue
		}
		t.Run(sc.name, func(t *testing.T) {
			e, err := JSONSchema([]byte(sc.schema), SchemaOptions{MaxDepth: 5})
			if err != nil {
				t.Fatal(err)
			}
			g, err := Compile(v, e, Options{})
			if err != nil {
				t.Fatal(err)
			}
			val, err := NewValidator([]byte(sc.schema))
			if err != nil {
				t.Fatal(err)
			}
			for seed := uint64(1); seed <= uint64(seeds); seed++ {
				out, ok := generate(t, g, seed, 300, nil)
				if !ok {
					t.Fatalf("seed %d: no end: %.200q", seed, out)
				}
				if !json.Valid([]byte(out)) {
					t.Fatalf("seed %d: not JSON: %q", seed, out)
				}
				if err := val.Validate([]byte(out)); err != nil {
					t.Fatalf("seed %d: %q does not validate: %v", seed, out, err)
				}
				if seed <= 2 {
					t.Logf("seed %d: %.300s", seed, out)
				}
			}
		})
	}
}

func TestSampledJSONValidatesTiny(t *testing.T) { checkOutputs(t, tinyDir, 40) }

// Real vocabularies: a byte-level one of 151k tokens and a SentencePiece
// one with byte fallback. Fewer seeds: each step draws 151k logits.
func TestSampledJSONValidatesReal(t *testing.T) {
	t.Run("qwen3", func(t *testing.T) {
		checkOutputs(t, filepath.Join(realDir, "qwen3"), 2, "person")
	})
	t.Run("llama2", func(t *testing.T) { checkOutputs(t, filepath.Join(realDir, "llama2"), 2) })
}

// With thinking on, reasoning runs free up to </think> and the schema
// holds after it.
func TestSampledJSONAfterThinking(t *testing.T) {
	tok := loadTok(t, tinyDir)
	v := vocabOf(t, tok)
	schema := testSchemas[0].schema
	body, err := JSONSchema([]byte(schema), SchemaOptions{})
	if err != nil {
		t.Fatal(err)
	}
	g, err := Compile(v, Seq(TextWithout("</think>"), Lit("</think>"), body), Options{})
	if err != nil {
		t.Fatal(err)
	}
	val, _ := NewValidator([]byte(schema))
	think, _ := tok.TokenID("</think>")
	for seed := uint64(1); seed <= 20; seed++ {
		out, ok := generate(t, g, seed, 400, func(step int, logits []float32) {
			if step > 30 {
				logits[think] += 4 // end the reasoning sooner
			}
		})
		if !ok {
			t.Fatalf("seed %d: no end: %.200q", seed, out)
		}
		i := len(out) - 1
		for ; i >= 0 && (i+8 > len(out) || out[i:i+8] != "</think>"); i-- {
		}
		if i < 0 {
			t.Fatalf("seed %d: no </think> in %q", seed, out)
		}
		if err := val.Validate([]byte(out[i+8:])); err != nil {
			t.Fatalf("seed %d: %q does not validate: %v", seed, out[i+8:], err)
		}
	}
}

func TestSchemaErrors(t *testing.T) {
	for _, s := range []string{
		`{"type": "string", "pattern": "a+"}`,
		`{"type": "integer", "minimum": 0}`,
		`{"type": "object", "properties": {"a": {"not": {}}}}`,
		`{"$ref": "other.json"}`,
		`{"$ref": "#/$defs/missing"}`,
		`{"type": "strin"}`,
		`{"type": "array", "uniqueItems": true}`,
		`{"allOf": [{"type": "string"}, {"maxLength": 3}]}`,
		`{"type": "object", "anyOf": [{"required": ["a"]}]}`,
		`{"oneOf": [{"type": "integer"}, {"type": "number"}]}`,
		`{"oneOf": [{"type": "object", "properties": {"k": {"const": "a"}}}, {"type": "object", "properties": {"k": {"const": "b"}}}]}`,
		`{"type": "string", "maxLength": 100000}`,
		`{"type": "object", "required": ["x"], "additionalProperties": false}`,
		`{"type": "object", "properties": {"a": false}, "required": ["a"]}`,
		`false`,
		`{"type": "object"`,
		`[]`,
	} {
		if _, err := JSONSchema([]byte(s), SchemaOptions{}); err == nil {
			t.Errorf("%s: no error", s)
		} else if testing.Verbose() {
			fmt.Println(err)
		}
	}
}

// Greedy sampling among the allowed tokens picks what the masked row's
// argmax picks, in both of Sample's ways (few allowed, few refused).
func TestSampleMatchesMask(t *testing.T) {
	tok := loadTok(t, tinyDir)
	v := vocabOf(t, tok)
	e, err := JSONSchema([]byte(testSchemas[0].schema), SchemaOptions{})
	if err != nil {
		t.Fatal(err)
	}
	g, err := Compile(v, e, Options{})
	if err != nil {
		t.Fatal(err)
	}
	greedy, _ := sample.New(sample.Options{})
	r := rand.New(rand.NewPCG(8, 8))
	ways := map[bool]int{}
	for seed := uint64(1); seed <= 10; seed++ {
		out, _ := generate(t, g, seed, 300, nil)
		c := g.Start()
		ids, _ := tok.Encode(out, false)
		for _, id := range ids {
			logits := make([]float32, v.Size())
			for i := range logits {
				logits[i] = float32(r.NormFloat64())
			}
			masked := slices.Clone(logits)
			c.Mask(masked)
			want, _ := greedy.Sample(masked)
			got, err := c.Sample(greedy, logits)
			if err != nil || got != want {
				t.Fatalf("Sample = %d %v, masked argmax %d", got, err, want)
			}
			ways[c.set().allowed != nil]++
			if err := c.Advance(id); err != nil {
				// The re-encoded text may tokenize differently from the
				// generated tokens; stop at the first such token.
				break
			}
		}
	}
	if ways[true] == 0 || ways[false] == 0 {
		t.Errorf("both ways should be seen: %v", ways)
	}
}

// Many sequences may share a grammar from several goroutines.
func TestGrammarConcurrentUse(t *testing.T) {
	tok := loadTok(t, tinyDir)
	v := vocabOf(t, tok)
	e, err := AnyJSON("object", SchemaOptions{MaxDepth: 3})
	if err != nil {
		t.Fatal(err)
	}
	g, err := Compile(v, e, Options{})
	if err != nil {
		t.Fatal(err)
	}
	go g.Precompute(100)
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for seed := uint64(10 * w); seed < uint64(10*w+5); seed++ {
				out, ok := generate(t, g, seed, 200, nil)
				if !ok || !json.Valid([]byte(out)) {
					t.Errorf("seed %d: %q", seed, out)
				}
			}
		}()
	}
	wg.Wait()
}

func TestCache(t *testing.T) {
	v := vocabOf(t, loadTok(t, tinyDir))
	c := NewCache(2)
	builds := 0
	get := func(key string) *Grammar {
		g, err := c.Get(key, v, Options{}, func() (Expr, error) { builds++; return AnyJSON("", SchemaOptions{}) })
		if err != nil {
			t.Fatal(err)
		}
		return g
	}
	a := get("a")
	if get("a") != a || builds != 1 {
		t.Errorf("a second Get compiled again (%d builds)", builds)
	}
	get("b")
	get("c") // evicts a, the least recently used
	if get("a") == a || builds != 4 {
		t.Errorf("a was not evicted (%d builds)", builds)
	}
	if _, err := c.Get("bad", v, Options{}, func() (Expr, error) { return JSONSchema([]byte(`{"type": 1}`), SchemaOptions{}) }); err == nil {
		t.Error("a bad schema compiled")
	}
}
