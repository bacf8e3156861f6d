package server

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
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
	message  string // the expected message, JSON
	reason   string // the expected finish_reason
}{
	{"plain answer", false, "Hello! How can I help you today?", engine.FinishEOS,
		`{"role": "assistant", "content": "Hello! How can I help you today?"}`, "stop"},
	{"thinking then answer", true, "The user greets me; 2 < 3 and a <b> tag stay text.</think>\nHello there!", engine.FinishEOS,
		`{"role": "assistant", "content": "Hello there!", "reasoning_content": "The user greets me; 2 < 3 and a <b> tag stay text.", "reasoning": "The user greets me; 2 < 3 and a <b> tag stay text."}`, "stop"},
	{"one tool call", true, "I need the weather.</think>" +
		"<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value><arg_key>days</arg_key><arg_value>3</arg_value></tool_call>", engine.FinishEOS,
		`{"role": "assistant", "content": null, "reasoning_content": "I need the weather.", "reasoning": "I need the weather.",
		  "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\",\"days\":3}"}}]}`, "tool_calls"},
	{"parallel calls", false, "Checking both cities.\n" +
		"<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>\n" +
		"<tool_call>get_weather<arg_key>city</arg_key><arg_value>São Paulo</arg_value><arg_key>days</arg_key><arg_value>2</arg_value></tool_call>", engine.FinishEOS,
		`{"role": "assistant", "content": "Checking both cities.\n", "tool_calls": [
		  {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
		  {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"São Paulo\",\"days\":2}"}}]}`, "tool_calls"},
	{"zero-argument call", true, "</think><tool_call>get_time</tool_call>", engine.FinishEOS,
		`{"role": "assistant", "content": null, "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}`, "tool_calls"},
	{"nested JSON arguments", false, "<tool_call>search<arg_key>query</arg_key><arg_value>mla attention</arg_value>" +
		"<arg_key>filters</arg_key><arg_value>{\"lang\": [\"en\", \"fr\"],\n \"since\": {\"year\": 2024, \"exact\": true}}</arg_value>" +
		"<arg_key>limit</arg_key><arg_value> 10 </arg_value></tool_call>", engine.FinishEOS,
		`{"role": "assistant", "content": null, "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": "search",
		  "arguments": "{\"query\":\"mla attention\",\"filters\":{\"lang\":[\"en\",\"fr\"],\"since\":{\"year\":2024,\"exact\":true}},\"limit\":10}"}}]}`, "tool_calls"},
	{"string argument with tag-like text", false, "<tool_call>write_file<arg_key>path</arg_key><arg_value>a.go</arg_value><arg_key>content</arg_key><arg_value>" +
		"if strings.HasSuffix(s, \"</arg_value>\") {\n\t// </arg_val <arg_key>k</arg_key> and </tool_call> are text here ✓\n}\n" +
		"</arg_value></tool_call>", engine.FinishEOS,
		`{"role": "assistant", "content": null, "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": "write_file",
		  "arguments": "{\"path\":\"a.go\",\"content\":\"if strings.HasSuffix(s, \\\"</arg_value>\\\") {\\n\\t// </arg_val <arg_key>k</arg_key> and </tool_call> are text here ✓\\n}\\n\"}"}}]}`, "tool_calls"},
	{"malformed call", false, "Let me look.<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}</tool_call>", engine.FinishEOS,
		`{"role": "assistant", "content": "Let me look.<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}</tool_call>"}`, "stop"},
	{"call cut off by max_tokens", false, "<tool_call>write_file<arg_key>path</arg_key><arg_value>notes.txt</arg_value><arg_key>content</arg_key><arg_value>line one\nline </arg", engine.FinishMaxTokens,
		`{"role": "assistant", "content": null, "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": "write_file",
		  "arguments": "{\"path\":\"notes.txt\",\"content\":\"line one\\nline </arg\"}"}}]}`, "length"},
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

// chunkings are the ways the token stream is cut into engine steps.
var chunkings = map[string]func(n int) []int{
	"one token per step": func(n int) []int {
		out := make([]int, n)
		for i := range out {
			out[i] = 1
		}
		return out
	},
	"all in one step": func(n int) []int { return []int{n} },
	"random merges": func(n int) []int {
		r := rand.New(rand.NewPCG(uint64(n), 7))
		var out []int
		for n > 0 {
			k := min(n, 1+r.IntN(5))
			out = append(out, k)
			n -= k
		}
		return out
	},
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

// Every golden case, in every chunking: the whole response is the
// expected one, and the stream reassembles to it.
func TestGoldenTraces(t *testing.T) {
	s := startServer(t, Config{}, engine.Options{})
	for _, c := range serverGolden {
		var want map[string]any
		if err := json.Unmarshal([]byte(c.message), &want); err != nil {
			t.Fatalf("%s: expected message: %v", c.name, err)
		}
		for cname, split := range chunkings {
			s.srv.replay = replayer(t, s, c.output, c.finish, split)
			kwargs := ""
			if !c.thinking {
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
				t.Fatalf("%s, %s: %d %s", c.name, cname, code, data)
			}
			got := whole.Choices[0].Message
			normalizeIDs(t, got)
			if !reflect.DeepEqual(got, want) || whole.Choices[0].FinishReason != c.reason {
				g, _ := json.Marshal(got)
				t.Errorf("%s, %s:\n got %s (%s)\nwant %s (%s)", c.name, cname, g, whole.Choices[0].FinishReason, c.message, c.reason)
			}
			code, data = s.post(t, "/v1/chat/completions", body+`, "stream": true}`)
			if code != 200 {
				t.Fatalf("%s, %s: streaming: %d %s", c.name, cname, code, data)
			}
			streamed, finish := reassemble(t, data)
			normalizeIDs(t, streamed)
			if !reflect.DeepEqual(streamed, got) || finish != c.reason {
				g, _ := json.Marshal(streamed)
				t.Errorf("%s, %s: streamed\n got %s (%s)\nwant %s", c.name, cname, g, finish, c.message)
			}
		}
	}
	s.srv.replay = nil
}
