package server

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/mmfp4/mmfp4/engine"
)

// The golden traces: model output, replayed token by token through the
// server in place of the engine, and the message a client must get,
// written by hand from the format's rules. Tool call ids are random, so
// they are checked for shape and then written as call_0, call_1, ...

const goldenToolsJSON = `[
	{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}},
	{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
	{"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {"query": {"type": "string"}, "filters": {"type": "object"}, "limit": {"type": "integer"}}}}},
	{"type": "function", "function": {"name": "write_file", "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}}}}}]`

var serverGolden = []struct {
	name     string
	thinking bool // the prompt ends inside <think>
	output   string
	finish   engine.Finish
	message  string // the expected OpenAI message, JSON
	reason   string // the expected finish_reason
	blocks   string // the expected Anthropic content blocks, JSON
	stop     string // the expected stop_reason
}{
	{"plain answer", false, "Hello! How can I help you today?", engine.FinishEOS,
		`{"role": "assistant", "content": "Hello! How can I help you today?"}`, "stop",
		`[{"type": "text", "text": "Hello! How can I help you today?"}]`, "end_turn"},
	{"thinking then answer", true, "The user greets me; 2 < 3 and a <b> tag stay text.</think>\nHello there!", engine.FinishEOS,
		`{"role": "assistant", "content": "Hello there!", "reasoning_content": "The user greets me; 2 < 3 and a <b> tag stay text.", "reasoning": "The user greets me; 2 < 3 and a <b> tag stay text."}`, "stop",
		`[{"type": "thinking", "thinking": "The user greets me; 2 < 3 and a <b> tag stay text.", "signature": ""}, {"type": "text", "text": "Hello there!"}]`, "end_turn"},
	{"one tool call", true, "I need the weather.</think>" +
		"<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value><arg_key>days</arg_key><arg_value>3</arg_value></tool_call>", engine.FinishEOS,
		`{"role": "assistant", "content": null, "reasoning_content": "I need the weather.", "reasoning": "I need the weather.",
		  "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\",\"days\":3}"}}]}`, "tool_calls",
		`[{"type": "thinking", "thinking": "I need the weather.", "signature": ""}, {"type": "tool_use", "id": "call_0", "name": "get_weather", "input": {"city": "Paris", "days": 3}}]`, "tool_use"},
	{"parallel calls", false, "Checking both cities.\n" +
		"<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>\n" +
		"<tool_call>get_weather<arg_key>city</arg_key><arg_value>São Paulo</arg_value><arg_key>days</arg_key><arg_value>2</arg_value></tool_call>", engine.FinishEOS,
		`{"role": "assistant", "content": "Checking both cities.\n", "tool_calls": [
		  {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
		  {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"São Paulo\",\"days\":2}"}}]}`, "tool_calls",
		`[{"type": "text", "text": "Checking both cities.\n"}, {"type": "tool_use", "id": "call_0", "name": "get_weather", "input": {"city": "Paris"}},
		  {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "São Paulo", "days": 2}}]`, "tool_use"},
	{"zero-argument call", true, "</think><tool_call>get_time</tool_call>", engine.FinishEOS,
		`{"role": "assistant", "content": null, "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}`, "tool_calls",
		`[{"type": "tool_use", "id": "call_0", "name": "get_time", "input": {}}]`, "tool_use"},
	{"nested JSON arguments", false, "<tool_call>search<arg_key>query</arg_key><arg_value>mla attention</arg_value>" +
		"<arg_key>filters</arg_key><arg_value>{\"lang\": [\"en\", \"fr\"],\n \"since\": {\"year\": 2024, \"exact\": true}}</arg_value>" +
		"<arg_key>limit</arg_key><arg_value> 10 </arg_value></tool_call>", engine.FinishEOS,
		`{"role": "assistant", "content": null, "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": "search",
		  "arguments": "{\"query\":\"mla attention\",\"filters\":{\"lang\":[\"en\",\"fr\"],\"since\":{\"year\":2024,\"exact\":true}},\"limit\":10}"}}]}`, "tool_calls",
		`[{"type": "tool_use", "id": "call_0", "name": "search", "input": {"query": "mla attention", "filters": {"lang": ["en", "fr"], "since": {"year": 2024, "exact": true}}, "limit": 10}}]`, "tool_use"},
	{"string argument with tag-like text", false, "<tool_call>write_file<arg_key>path</arg_key><arg_value>a.go</arg_value><arg_key>content</arg_key><arg_value>" +
		"if strings.HasSuffix(s, \"</arg_value>\") {\n\t// </arg_val <arg_key>k</arg_key> and </tool_call> are text here ✓\n}\n" +
		"</arg_value></tool_call>", engine.FinishEOS,
		`{"role": "assistant", "content": null, "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": "write_file",
		  "arguments": "{\"path\":\"a.go\",\"content\":\"if strings.HasSuffix(s, \\\"</arg_value>\\\") {\\n\\t// </arg_val <arg_key>k</arg_key> and </tool_call> are text here ✓\\n}\\n\"}"}}]}`, "tool_calls",
		`[{"type": "tool_use", "id": "call_0", "name": "write_file",
		  "input": {"path": "a.go", "content": "if strings.HasSuffix(s, \"</arg_value>\") {\n\t// </arg_val <arg_key>k</arg_key> and </tool_call> are text here ✓\n}\n"}}]`, "tool_use"},
	{"malformed call", false, "Let me look.<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}</tool_call>", engine.FinishEOS,
		`{"role": "assistant", "content": "Let me look.<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}</tool_call>"}`, "stop",
		`[{"type": "text", "text": "Let me look.<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}</tool_call>"}]`, "end_turn"},
	{"call cut off by max_tokens", false, "<tool_call>write_file<arg_key>path</arg_key><arg_value>notes.txt</arg_value><arg_key>content</arg_key><arg_value>line one\nline </arg", engine.FinishMaxTokens,
		`{"role": "assistant", "content": null, "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": "write_file",
		  "arguments": "{\"path\":\"notes.txt\",\"content\":\"line one\\nline </arg\"}"}}]}`, "length",
		`[{"type": "tool_use", "id": "call_0", "name": "write_file", "input": {"path": "notes.txt", "content": "line one\nline </arg"}}]`, "max_tokens"},
}

// replayer returns a stand-in for the engine that encodes output with the
// model's tokenizer and delivers it as the engine would, with the tokens
// merged into steps by split (the sizes of the steps).
func replayer(t *testing.T, s *testServer, output string, finish engine.Finish, split func(n int) []int) func(engine.Request) []engine.Event {
	tok, err := s.m.Tokenizer()
	if err != nil {
		t.Fatal(err)
	}
	ids, err := tok.Encode(output, false)
	if err != nil {
		t.Fatal(err)
	}
	if back, err := tok.Decode(ids); err != nil || back != output {
		t.Fatalf("the fixture tokenizer does not round-trip %q: %q, %v", output, back, err)
	}
	return func(req engine.Request) []engine.Event {
		ts := engine.NewTextStream(tok, req.Stop, req.SkipSpecial)
		var evs []engine.Event
		i := 0
		for _, n := range split(len(ids)) {
			ev := engine.Event{Time: time.Now()}
			for _, id := range ids[i : i+n] {
				text, _, err := ts.Add(id)
				if err != nil {
					t.Error(err)
				}
				ev.Token, ev.Text = id, ev.Text+text
			}
			i += n
			evs = append(evs, ev)
		}
		done := engine.Event{Done: true, Finish: finish, Text: ts.Flush(), Time: time.Now(),
			Usage: engine.Usage{PromptTokens: len(req.Prompt), CompletionTokens: len(ids)}}
		return append(evs, done)
	}
}

// chunking is a way to cut the token stream into engine steps: split
// returns the sizes of the steps for n tokens.
type chunking struct {
	name  string
	split func(n int) []int
}

// randomMerges merges runs of 1 to 5 tokens into a step, at random with a
// fixed seed.
func randomMerges(seed uint64) chunking {
	return chunking{fmt.Sprintf("random merges, seed %d", seed), func(n int) []int {
		r := rand.New(rand.NewPCG(seed, uint64(n)))
		var out []int
		for n > 0 {
			k := min(n, 1+r.IntN(5))
			out = append(out, k)
			n -= k
		}
		return out
	}}
}

// chunkings are the ways the token stream is cut into engine steps.
var chunkings = []chunking{
	{"one token per step", func(n int) []int {
		out := make([]int, n)
		for i := range out {
			out[i] = 1
		}
		return out
	}},
	randomMerges(1), randomMerges(2), randomMerges(3),
	{"all in one step", func(n int) []int { return []int{n} }},
}

// normalizeIDs checks the tool call ids of a message and renames them
// call_0, call_1, ... in order.
func normalizeIDs(t *testing.T, msg map[string]any) {
	calls, _ := msg["tool_calls"].([]any)
	seen := map[string]bool{}
	for i, c := range calls {
		call := c.(map[string]any)
		id, _ := call["id"].(string)
		if !strings.HasPrefix(id, "call_") || len(id) < 10 || seen[id] {
			t.Errorf("tool call id %q: want a fresh call_ id", id)
		}
		seen[id] = true
		call["id"] = fmt.Sprintf("call_%d", i)
	}
}

// reassemble reads an SSE chat stream and puts the deltas together as a
// client does, into the shape of a whole message.
func reassemble(t *testing.T, body []byte) (map[string]any, string) {
	var content, reasoning, reasoning2 strings.Builder
	var calls []map[string]any
	var args []*strings.Builder
	finish := ""
	sc := bufio.NewScanner(bytes.NewReader(body))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok || line == "[DONE]" {
			continue
		}
		var chunk struct {
			Choices []struct {
				Delta struct {
					Content          *string `json:"content"`
					ReasoningContent *string `json:"reasoning_content"`
					Reasoning        *string `json:"reasoning"`
					ToolCalls        []struct {
						Index    int     `json:"index"`
						ID       *string `json:"id"`
						Type     *string `json:"type"`
						Function struct {
							Name      *string `json:"name"`
							Arguments *string `json:"arguments"`
						} `json:"function"`
					} `json:"tool_calls"`
				} `json:"delta"`
				FinishReason *string `json:"finish_reason"`
			} `json:"choices"`
		}
		if err := json.Unmarshal([]byte(line), &chunk); err != nil {
			t.Fatalf("chunk %s: %v", line, err)
		}
		for _, ch := range chunk.Choices {
			d := ch.Delta
			if d.Content != nil {
				content.WriteString(*d.Content)
			}
			if d.ReasoningContent != nil {
				reasoning.WriteString(*d.ReasoningContent)
			}
			if d.Reasoning != nil {
				reasoning2.WriteString(*d.Reasoning)
			}
			for _, tc := range d.ToolCalls {
				if tc.ID != nil {
					if tc.Index != len(calls) || tc.Function.Name == nil || tc.Type == nil || *tc.Type != "function" {
						t.Errorf("tool call start %s: want index %d, a name and type function", line, len(calls))
						continue
					}
					calls = append(calls, map[string]any{"id": *tc.ID, "type": "function", "function": map[string]any{"name": *tc.Function.Name}})
					args = append(args, &strings.Builder{})
				}
				if tc.Index >= len(calls) {
					t.Errorf("arguments of call %d before its start", tc.Index)
					continue
				}
				if tc.Function.Arguments != nil {
					args[tc.Index].WriteString(*tc.Function.Arguments)
				}
			}
			if ch.FinishReason != nil {
				finish = *ch.FinishReason
			}
		}
	}
	if reasoning.String() != reasoning2.String() {
		t.Errorf("streamed reasoning_content %q and reasoning %q differ", reasoning.String(), reasoning2.String())
	}
	msg := map[string]any{"role": "assistant", "content": content.String()}
	if reasoning.Len() > 0 {
		msg["reasoning_content"], msg["reasoning"] = reasoning.String(), reasoning.String()
	}
	if len(calls) > 0 {
		if content.Len() == 0 {
			msg["content"] = nil
		}
		list := make([]any, len(calls))
		for i, c := range calls {
			c["function"].(map[string]any)["arguments"] = args[i].String()
			list[i] = c
		}
		msg["tool_calls"] = list
	}
	// Through JSON, so that it compares with a decoded whole response.
	data, _ := json.Marshal(msg)
	var out map[string]any
	json.Unmarshal(data, &out)
	return out, finish
}

// updateDocs rewrites the golden-trace table in docs/agent.md from the
// results of TestGoldenTraces.
var updateDocs = flag.Bool("update-docs", false, "rewrite the golden-trace table in docs/agent.md")

// Every golden case, in every chunking, through both APIs: the whole
// response is the expected one, and the stream reassembles to it. The
// results make the table in docs/agent.md, which must match them.
func TestGoldenTraces(t *testing.T) {
	s := startServer(t, Config{}, engine.Options{})
	var table strings.Builder
	table.WriteString("| case | chunking | OpenAI | OpenAI stream | Anthropic | Anthropic stream |\n| --- | --- | --- | --- | --- | --- |\n")
	for _, c := range serverGolden {
		for _, ch := range chunkings {
			s.srv.replay = replayer(t, s, c.output, c.finish, ch.split)
			ow, ost := goldenOpenAI(t, s, c.name+", "+ch.name, c.thinking, c.message, c.reason)
			aw, ast := goldenAnthropic(t, s, c.name+", "+ch.name, c.thinking, c.blocks, c.stop)
			fmt.Fprintf(&table, "| %s | %s | %s | %s | %s | %s |\n", c.name, ch.name, verdict(ow), verdict(ost), verdict(aw), verdict(ast))
		}
	}
	s.srv.replay = nil
	checkDocTable(t, filepath.Join("..", "docs", "agent.md"), "golden traces", table.String())
}

func verdict(ok bool) string {
	if ok {
		return "pass"
	}
	return "FAIL"
}

// goldenOpenAI posts the golden request to /v1/chat/completions, whole and
// streamed, and reports whether each matched.
func goldenOpenAI(t *testing.T, s *testServer, name string, thinking bool, message, reason string) (wholeOK, streamOK bool) {
	t.Helper()
	var want map[string]any
	if err := json.Unmarshal([]byte(message), &want); err != nil {
		t.Fatalf("%s: expected message: %v", name, err)
	}
	kwargs := ""
	if !thinking {
		kwargs = `, "chat_template_kwargs": {"enable_thinking": false}`
	}
	body := `{"messages": [{"role": "user", "content": "Hi"}], "tools": ` + goldenToolsJSON + kwargs
	code, data := s.post(t, "/v1/chat/completions", body+`}`)
	var whole struct {
		Choices []struct {
			FinishReason string         `json:"finish_reason"`
			Message      map[string]any `json:"message"`
		} `json:"choices"`
	}
	if code != 200 || json.Unmarshal(data, &whole) != nil || len(whole.Choices) != 1 {
		t.Fatalf("%s: %d %s", name, code, data)
	}
	got := whole.Choices[0].Message
	normalizeIDs(t, got)
	wholeOK = reflect.DeepEqual(got, want) && whole.Choices[0].FinishReason == reason
	if !wholeOK {
		g, _ := json.Marshal(got)
		t.Errorf("%s:\n got %s (%s)\nwant %s (%s)", name, g, whole.Choices[0].FinishReason, message, reason)
	}
	code, data = s.post(t, "/v1/chat/completions", body+`, "stream": true}`)
	if code != 200 {
		t.Fatalf("%s: streaming: %d %s", name, code, data)
	}
	streamed, finish := reassemble(t, data)
	normalizeIDs(t, streamed)
	streamOK = reflect.DeepEqual(streamed, want) && finish == reason
	if !streamOK {
		g, _ := json.Marshal(streamed)
		t.Errorf("%s: streamed\n got %s (%s)\nwant %s", name, g, finish, message)
	}
	return wholeOK, streamOK
}

// anthropicToolsOf turns OpenAI tools into Messages API tools.
func anthropicToolsOf(t *testing.T, openaiTools string) string {
	var tools []struct {
		Function struct {
			Name       string          `json:"name"`
			Parameters json.RawMessage `json:"parameters"`
		} `json:"function"`
	}
	if err := json.Unmarshal([]byte(openaiTools), &tools); err != nil {
		t.Fatal(err)
	}
	var out []map[string]any
	for _, tl := range tools {
		out = append(out, map[string]any{"name": tl.Function.Name, "input_schema": tl.Function.Parameters})
	}
	data, _ := json.Marshal(out)
	return string(data)
}

// goldenAnthropic posts the golden request to /v1/messages, whole and
// streamed, and reports whether each matched: the content blocks and
// stop_reason are the expected ones, the events come in Anthropic's order
// and rebuild the whole message.
func goldenAnthropic(t *testing.T, s *testServer, name string, thinking bool, blocks, stop string) (wholeOK, streamOK bool) {
	t.Helper()
	var want []any
	if err := json.Unmarshal([]byte(blocks), &want); err != nil {
		t.Fatalf("%s: expected blocks: %v", name, err)
	}
	mode := `"disabled"`
	if thinking {
		mode = `"enabled", "budget_tokens": 1024`
	}
	body := `{"model": "tiny", "max_tokens": 100, "thinking": {"type": ` + mode + `}, "tools": ` + anthropicToolsOf(t, goldenToolsJSON) +
		`, "messages": [{"role": "user", "content": "Hi"}]`
	code, data := s.post(t, "/v1/messages", body+`}`)
	var whole map[string]any
	if code != 200 || json.Unmarshal(data, &whole) != nil {
		t.Fatalf("%s: %d %s", name, code, data)
	}
	if id, _ := whole["id"].(string); whole["type"] != "message" || whole["role"] != "assistant" || !strings.HasPrefix(id, "msg_") {
		t.Errorf("%s: envelope %s", name, data)
	}
	normalizeBlockIDs(t, whole)
	wholeOK = reflect.DeepEqual(whole["content"], want) && whole["stop_reason"] == stop
	if !wholeOK {
		g, _ := json.Marshal(whole["content"])
		t.Errorf("%s:\n got %s (%v)\nwant %s (%s)", name, g, whole["stop_reason"], blocks, stop)
	}
	code, data = s.post(t, "/v1/messages", body+`, "stream": true}`)
	if code != 200 {
		t.Fatalf("%s: streaming %d %s", name, code, data)
	}
	streamed := reassembleAnthropic(t, data)
	normalizeBlockIDs(t, streamed)
	delete(streamed, "id")
	delete(whole, "id")
	streamOK = reflect.DeepEqual(streamed, whole) && wholeOK
	if !streamOK {
		a, _ := json.Marshal(streamed)
		t.Errorf("%s: streamed\n got %s\nwant %s (%s)", name, a, blocks, stop)
	}
	return wholeOK, streamOK
}

// normalizeBlockIDs checks the ids of a message's tool_use blocks and
// renames them call_0, call_1, ... in order.
func normalizeBlockIDs(t *testing.T, msg map[string]any) {
	content, _ := msg["content"].([]any)
	seen := map[string]bool{}
	n := 0
	for _, b := range content {
		if b := b.(map[string]any); b["type"] == "tool_use" {
			id, _ := b["id"].(string)
			if !strings.HasPrefix(id, "call_") || len(id) < 10 || seen[id] {
				t.Errorf("tool_use id %q: want a fresh call_ id", id)
			}
			seen[id] = true
			b["id"] = fmt.Sprintf("call_%d", n)
			n++
		}
	}
}

// checkDocTable compares a table generated by a test with the one in a
// doc, between the lines <!-- begin NAME --> and <!-- end NAME -->, and
// rewrites it there under -update-docs.
func checkDocTable(t *testing.T, path, name, table string) {
	t.Helper()
	doc, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	begin, end := "<!-- begin "+name+" -->\n", "<!-- end "+name+" -->"
	i, j := bytes.Index(doc, []byte(begin)), bytes.Index(doc, []byte(end))
	if i < 0 || j < i {
		t.Fatalf("%s: no %q ... %q section", path, begin, end)
	}
	i += len(begin)
	if string(doc[i:j]) == table {
		return
	}
	if *updateDocs {
		out := append(append(append([]byte{}, doc[:i]...), table...), doc[j:]...)
		if err := os.WriteFile(path, out, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("rewrote the %s table in %s", name, path)
		return
	}
	t.Errorf("the %s table in %s is not what the test gives; run go test ./server -run TestGoldenTraces -update-docs\n%s", name, path, table)
}
