package chat

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"unicode/utf8"

	"github.com/mmfp4/mmfp4/tokenizer"
)

// The golden traces: for each case, model output text (what follows the
// generation prompt) and the response a client must get, written by hand
// from the format's rules (see the Parser doc), not from the parser's own
// output.

var goldenTools = []Tool{
	{Name: "get_weather", Parameters: json.RawMessage(`{"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}`)},
	{Name: "get_time", Parameters: json.RawMessage(`{"type": "object", "properties": {}}`)},
	{Name: "search", Parameters: json.RawMessage(`{"type": "object", "properties": {"query": {"type": "string"}, "filters": {"type": "object"}, "limit": {"type": "integer"}}}`)},
	{Name: "write_file", Parameters: json.RawMessage(`{"type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}}}`)},
}

type goldenCase struct {
	name      string
	reasoning bool // the prompt ended inside <think>
	output    string
	want      Result
}

var goldenCases = []goldenCase{
	{
		name:   "plain answer",
		output: "Hello! How can I help you today?",
		want:   Result{Content: "Hello! How can I help you today?"},
	},
	{
		name:      "thinking then answer",
		reasoning: true,
		output:    "The user greets me; 2 < 3 and a <b> tag stay text.</think>\nHello there!",
		want:      Result{Reasoning: "The user greets me; 2 < 3 and a <b> tag stay text.", Content: "Hello there!"},
	},
	{
		name:      "one tool call",
		reasoning: true,
		output: "I need the weather.</think>" +
			"<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value><arg_key>days</arg_key><arg_value>3</arg_value></tool_call>",
		want: Result{Reasoning: "I need the weather.", ToolCalls: []ToolCall{
			{ID: "call_0", Name: "get_weather", Arguments: `{"city":"Paris","days":3}`}}},
	},
	{
		name: "parallel calls",
		// The first call in the GLM-4.5/4.6 layout (newlines), the second
		// in GLM-4.7's.
		output: "Checking both cities.\n" +
			"<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>\n" +
			"<tool_call>get_weather<arg_key>city</arg_key><arg_value>São Paulo</arg_value><arg_key>days</arg_key><arg_value>2</arg_value></tool_call>",
		want: Result{Content: "Checking both cities.\n", ToolCalls: []ToolCall{
			{ID: "call_0", Name: "get_weather", Arguments: `{"city":"Paris"}`},
			{ID: "call_1", Name: "get_weather", Arguments: `{"city":"São Paulo","days":2}`}}},
	},
	{
		name:      "zero-argument call",
		reasoning: true,
		output:    "</think><tool_call>get_time</tool_call>",
		want:      Result{ToolCalls: []ToolCall{{ID: "call_0", Name: "get_time", Arguments: `{}`}}},
	},
	{
		name: "nested JSON arguments",
		output: "<tool_call>search<arg_key>query</arg_key><arg_value>mla attention</arg_value>" +
			"<arg_key>filters</arg_key><arg_value>{\"lang\": [\"en\", \"fr\"],\n \"since\": {\"year\": 2024, \"exact\": true}}</arg_value>" +
			"<arg_key>limit</arg_key><arg_value> 10 </arg_value></tool_call>",
		want: Result{ToolCalls: []ToolCall{{ID: "call_0", Name: "search",
			Arguments: `{"query":"mla attention","filters":{"lang":["en","fr"],"since":{"year":2024,"exact":true}},"limit":10}`}}},
	},
	{
		name: "string argument with tag-like text",
		output: "<tool_call>write_file<arg_key>path</arg_key><arg_value>a.go</arg_value><arg_key>content</arg_key><arg_value>" +
			"if strings.HasSuffix(s, \"</arg_value>\") {\n\t// </arg_val <arg_key>k</arg_key> and </tool_call> are text here ✓\n}\n" +
			"</arg_value></tool_call>",
		want: Result{ToolCalls: []ToolCall{{ID: "call_0", Name: "write_file",
			Arguments: `{"path":"a.go","content":"if strings.HasSuffix(s, \"</arg_value>\") {\n\t// </arg_val <arg_key>k</arg_key> and </tool_call> are text here ✓\n}\n"}`}}},
	},
	{
		name: "malformed call",
		// JSON inside the tags (another model family's format) is not a
		// GLM call: it comes back as content, tags and all.
		output: "Let me look.<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}</tool_call>",
		want:   Result{Content: "Let me look.<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}</tool_call>"},
	},
	{
		name:   "unknown tool",
		output: "<tool_call>launch<arg_key>n</arg_key><arg_value>3</arg_value></tool_call>",
		want:   Result{Content: "<tool_call>launch<arg_key>n</arg_key><arg_value>3</arg_value></tool_call>"},
	},
	{
		name: "call broken after its name",
		// Text where <arg_key> belongs: the call keeps the complete
		// argument, the rest is content.
		output: "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>" +
			"<arg_key>days</arg_key>two<arg_value>2</arg_value></tool_call>",
		want: Result{Content: "<arg_key>days</arg_key>two<arg_value>2</arg_value></tool_call>",
			ToolCalls: []ToolCall{{ID: "call_0", Name: "get_weather", Arguments: `{"city":"Paris"}`}}},
	},
	{
		name:      "call inside thinking",
		reasoning: true,
		output: "I should check.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</arg_value></tool_call>" +
			"Then answer.</think>Done.",
		want: Result{Reasoning: "I should check.Then answer.", Content: "Done.",
			ToolCalls: []ToolCall{{ID: "call_0", Name: "get_weather", Arguments: `{"city":"Oslo"}`}}},
	},
	{
		name:   "cut off in a string argument",
		output: "<tool_call>write_file<arg_key>path</arg_key><arg_value>notes.txt</arg_value><arg_key>content</arg_key><arg_value>line one\nline </arg",
		want: Result{ToolCalls: []ToolCall{{ID: "call_0", Name: "write_file",
			Arguments: `{"path":"notes.txt","content":"line one\nline </arg"}`}}},
	},
	{
		name:   "cut off in a number argument",
		output: "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Rome</arg_value><arg_key>days</arg_key><arg_value>1",
		want: Result{Content: "<arg_key>days</arg_key><arg_value>1",
			ToolCalls: []ToolCall{{ID: "call_0", Name: "get_weather", Arguments: `{"city":"Rome"}`}}},
	},
	{
		name:   "think tag at the start",
		output: "\n<think>Hmm.</think>Yes.",
		want:   Result{Reasoning: "Hmm.", Content: "Yes."},
	},
}

// counterIDs gives call_0, call_1, ... so that expected ids can be
// written down.
func counterIDs() func() string {
	n := 0
	return func() string { n++; return fmt.Sprintf("call_%d", n-1) }
}

var (
	fixtureTokOnce sync.Once
	fixtureTok     *tokenizer.Tokenizer
	fixtureTokErr  error
)

// tinyTokenizer is the tokenizer of the built-in test model: GLM-style,
// with the tags as special tokens.
func tinyTokenizer(t testing.TB) *tokenizer.Tokenizer {
	t.Helper()
	fixtureTokOnce.Do(func() {
		fixtureTok, fixtureTokErr = tokenizer.Load(filepath.Join("..", "testdata", "glm4moelite-tiny"))
	})
	if fixtureTokErr != nil {
		t.Fatal(fixtureTokErr)
	}
	return fixtureTok
}

// tokenPieces is the text of output one token at a time, as the engine
// streams it.
func tokenPieces(t testing.TB, tok *tokenizer.Tokenizer, output string) []string {
	t.Helper()
	ids, err := tok.Encode(output, false)
	if err != nil {
		t.Fatal(err)
	}
	dec := tok.NewStreamDecoder()
	var pieces []string
	for _, id := range ids {
		s, err := dec.Add(id)
		if err != nil {
			t.Fatal(err)
		}
		pieces = append(pieces, s) // empty pieces too: a token may finish no character
	}
	pieces = append(pieces, dec.Flush())
	if got := strings.Join(pieces, ""); got != output {
		t.Fatalf("the tokenizer does not round-trip the output:\n got %q\nwant %q", got, output)
	}
	return pieces
}

// mergePieces joins runs of neighbouring pieces at random.
func mergePieces(pieces []string, seed uint64) []string {
	r := rand.New(rand.NewPCG(seed, 7))
	var out []string
	for i := 0; i < len(pieces); {
		n := 1 + r.IntN(4)
		out = append(out, strings.Join(pieces[i:min(i+n, len(pieces))], ""))
		i += n
	}
	return out
}

// runePieces cuts s into single characters.
func runePieces(s string) []string {
	var out []string
	for _, r := range s {
		out = append(out, string(r))
	}
	return out
}

// splitPieces cuts s at random character boundaries, cutting tags apart.
func splitPieces(s string, seed uint64) []string {
	r := rand.New(rand.NewPCG(seed, 11))
	var out []string
	for len(s) > 0 {
		n := 0
		for k := 1 + r.IntN(8); k > 0 && n < len(s); k-- {
			_, size := utf8.DecodeRuneInString(s[n:])
			n += size
		}
		out = append(out, s[:n])
		s = s[n:]
	}
	return out
}

type chunking struct {
	name   string
	pieces func(t testing.TB, output string) []string
}

func chunkings() []chunking {
	cs := []chunking{
		{"whole", func(_ testing.TB, s string) []string { return []string{s} }},
		{"tokens", func(t testing.TB, s string) []string { return tokenPieces(t, tinyTokenizer(t), s) }},
	}
	for seed := uint64(1); seed <= 4; seed++ {
		cs = append(cs, chunking{fmt.Sprintf("merged/%d", seed), func(t testing.TB, s string) []string {
			return mergePieces(tokenPieces(t, tinyTokenizer(t), s), seed)
		}})
	}
	cs = append(cs, chunking{"chars", func(_ testing.TB, s string) []string { return runePieces(s) }})
	for seed := uint64(1); seed <= 4; seed++ {
		cs = append(cs, chunking{fmt.Sprintf("split/%d", seed), func(_ testing.TB, s string) []string { return splitPieces(s, seed) }})
	}
	return cs
}

// streamCheck feeds pieces and checks the stream's invariants; it returns
// the events.
func streamCheck(t testing.TB, opt ParserOptions, pieces []string) []Event {
	t.Helper()
	p := NewParser(opt)
	var evs []Event
	for _, piece := range pieces {
		evs = append(evs, p.Feed(piece)...)
		// Plain text waits only while it may be a tag.
		if p.state == inText && p.held() >= len(CallClose) {
			t.Errorf("holds back %d bytes of text %q", p.held(), p.buf)
		}
	}
	evs = append(evs, p.Finish()...)
	if p.held() != 0 {
		t.Errorf("Finish left %q", p.buf)
	}
	// Each call: start, arguments that form a JSON object, end.
	open := map[int]bool{}
	ended := map[int]bool{}
	args := map[int]string{}
	for _, ev := range evs {
		switch ev.Kind {
		case ToolCallStart:
			if open[ev.Index] || ended[ev.Index] || ev.Name == "" || ev.ID == "" {
				t.Errorf("bad start %+v", ev)
			}
			open[ev.Index] = true
		case ToolCallArgs:
			if !open[ev.Index] {
				t.Errorf("arguments of call %d outside the call", ev.Index)
			}
			args[ev.Index] += ev.Text
		case ToolCallEnd:
			if !open[ev.Index] {
				t.Errorf("end of call %d that is not open", ev.Index)
			}
			open[ev.Index], ended[ev.Index] = false, true
			var obj map[string]any
			if err := json.Unmarshal([]byte(args[ev.Index]), &obj); err != nil {
				t.Errorf("call %d arguments %q: %v", ev.Index, args[ev.Index], err)
			}
		case ReasoningText, ContentText:
			if ev.Text == "" {
				t.Error("empty text event")
			}
		}
	}
	for i, o := range open {
		if o {
			t.Errorf("call %d never ends", i)
		}
	}
	return evs
}

func TestGoldenTraces(t *testing.T) {
	table := map[string]map[string]bool{}
	cs := chunkings()
	for _, c := range goldenCases {
		opt := func() ParserOptions {
			return ParserOptions{Reasoning: c.reasoning, Tools: goldenTools, NewID: counterIDs()}
		}
		table[c.name] = map[string]bool{}
		if got := Parse(c.output, opt()); !reflect.DeepEqual(got, c.want) {
			t.Errorf("%s: Parse\n got %#v\nwant %#v", c.name, got, c.want)
		}
		for _, ch := range cs {
			ok := t.Run(c.name+"/"+ch.name, func(t *testing.T) {
				pieces := ch.pieces(t, c.output)
				if strings.Join(pieces, "") != c.output {
					t.Fatal("pieces do not join to the output")
				}
				got := Assemble(streamCheck(t, opt(), pieces))
				if !reflect.DeepEqual(got, c.want) {
					t.Errorf("streamed in %d pieces, reassembled\n got %#v\nwant %#v", len(pieces), got, c.want)
				}
			})
			table[c.name][ch.name] = ok
		}
	}
	// The table for the record (go test -v -run TestGoldenTraces).
	var b strings.Builder
	b.WriteString("| case |")
	for _, ch := range cs {
		b.WriteString(" " + ch.name + " |")
	}
	b.WriteString("\n|---|" + strings.Repeat("---|", len(cs)) + "\n")
	for _, c := range goldenCases {
		b.WriteString("| " + c.name + " |")
		for _, ch := range cs {
			if table[c.name][ch.name] {
				b.WriteString(" pass |")
			} else {
				b.WriteString(" FAIL |")
			}
		}
		b.WriteByte('\n')
	}
	t.Logf("golden traces:\n%s", b.String())
}

// Without tools, <tool_call> is text: the request offered no tools.
func TestNoToolsNoCalls(t *testing.T) {
	out := "<tool_call>get_time</tool_call>"
	got := Parse(out, ParserOptions{})
	if want := (Result{Content: out}); !reflect.DeepEqual(got, want) {
		t.Errorf("got %#v, want %#v", got, want)
	}
}

func TestEndsInThinking(t *testing.T) {
	for prompt, want := range map[string]bool{
		"<|user|>hi<|assistant|><think>":          true,
		"<|user|>hi<|assistant|><think>\n":        true,
		"<|user|>hi<|assistant|><think></think>":  false,
		"<|user|>hi<|assistant|>":                 false,
		"<|assistant|><think>x</think><|user|>hi": false,
	} {
		if got := EndsInThinking(prompt); got != want {
			t.Errorf("EndsInThinking(%q) = %v, want %v", prompt, got, want)
		}
	}
}
