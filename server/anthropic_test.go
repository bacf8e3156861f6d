package server

import (
	"bufio"
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"reflect"
	"strings"
	"testing"

	"github.com/mmfp4/mmfp4/engine"
)

const anthropicTools = `[{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}},
	{"name": "get_time", "input_schema": {"type": "object", "properties": {}}}]`

// reassembleAnthropic reads a Messages event stream, checks the order of
// its events, and builds the message a client would.
func reassembleAnthropic(t *testing.T, body []byte) map[string]any {
	var msg map[string]any
	var content []map[string]any
	var partial []string
	open := -1
	stage := "start" // start, blocks, delta, stop
	sc := bufio.NewScanner(bytes.NewReader(body))
	sc.Buffer(nil, 1<<20)
	var event string
	for sc.Scan() {
		line := sc.Text()
		if e, ok := strings.CutPrefix(line, "event: "); ok {
			event = e
			continue
		}
		data, ok := strings.CutPrefix(line, "data: ")
		if !ok {
			continue
		}
		var ev map[string]any
		if err := json.Unmarshal([]byte(data), &ev); err != nil || ev["type"] != event {
			t.Fatalf("event %s: data %s (%v)", event, data, err)
		}
		bad := func() { t.Errorf("event %s out of order (stage %s, open block %d): %s", event, stage, open, data) }
		switch event {
		case "message_start":
			if stage != "start" {
				bad()
			}
			msg = ev["message"].(map[string]any)
			stage = "blocks"
		case "content_block_start":
			idx := int(ev["index"].(float64))
			if stage != "blocks" || open != -1 || idx != len(content) {
				bad()
			}
			open = idx
			content = append(content, ev["content_block"].(map[string]any))
			partial = append(partial, "")
		case "content_block_delta":
			idx := int(ev["index"].(float64))
			if stage != "blocks" || idx != open {
				bad()
				continue
			}
			d := ev["delta"].(map[string]any)
			b := content[idx]
			switch d["type"] {
			case "text_delta":
				b["text"] = b["text"].(string) + d["text"].(string)
			case "thinking_delta":
				b["thinking"] = b["thinking"].(string) + d["thinking"].(string)
			case "signature_delta":
			case "input_json_delta":
				partial[idx] += d["partial_json"].(string)
			default:
				bad()
			}
		case "content_block_stop":
			if stage != "blocks" || int(ev["index"].(float64)) != open {
				bad()
			}
			if content[open]["type"] == "tool_use" {
				var input any = map[string]any{}
				if partial[open] != "" {
					if err := json.Unmarshal([]byte(partial[open]), &input); err != nil {
						t.Errorf("tool_use input %q: %v", partial[open], err)
					}
				}
				content[open]["input"] = input
			}
			open = -1
		case "message_delta":
			if stage != "blocks" || open != -1 {
				bad()
			}
			d := ev["delta"].(map[string]any)
			msg["stop_reason"], msg["stop_sequence"] = d["stop_reason"], d["stop_sequence"]
			msg["usage"].(map[string]any)["output_tokens"] = ev["usage"].(map[string]any)["output_tokens"]
			stage = "delta"
		case "message_stop":
			if stage != "delta" {
				bad()
			}
			stage = "stop"
		default:
			bad()
		}
	}
	if stage != "stop" {
		t.Errorf("the stream ended at stage %s", stage)
	}
	list := make([]any, len(content))
	for i, b := range content {
		list[i] = b
	}
	msg["content"] = list
	return msg
}

// The Messages API over replayed golden outputs: the whole response's
// content blocks are the expected ones, the event stream is in Anthropic's
// order and rebuilds the same message, in every chunking.
func TestAnthropicMessages(t *testing.T) {
	s := startServer(t, Config{}, engine.Options{})
	cases := []struct {
		name, output, want string
		thinking           bool
	}{
		{"thinking then answer", "Let me think.</think>Hello there!",
			`{"content": [{"type": "thinking", "thinking": "Let me think.", "signature": ""}, {"type": "text", "text": "Hello there!"}], "stop_reason": "end_turn"}`, true},
		{"tool use", "Weather first.</think>Checking.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value><arg_key>days</arg_key><arg_value>3</arg_value></tool_call>" +
			"<tool_call>get_time</tool_call>",
			`{"content": [{"type": "thinking", "thinking": "Weather first.", "signature": ""}, {"type": "text", "text": "Checking."},
			  {"type": "tool_use", "id": "call_0", "name": "get_weather", "input": {"city": "Paris", "days": 3}},
			  {"type": "tool_use", "id": "call_1", "name": "get_time", "input": {}}], "stop_reason": "tool_use"}`, true},
		{"plain, thinking off", "Just text.", `{"content": [{"type": "text", "text": "Just text."}], "stop_reason": "end_turn"}`, false},
	}
	for _, c := range cases {
		var want map[string]any
		if err := json.Unmarshal([]byte(c.want), &want); err != nil {
			t.Fatal(err)
		}
		for _, ch := range chunkings {
			cname := ch.name
			s.srv.replay = replayer(t, s, c.output, engine.FinishEOS, ch.split)
			thinking := `"enabled", "budget_tokens": 1024`
			if !c.thinking {
				thinking = `"disabled"`
			}
			body := `{"model": "tiny", "max_tokens": 100, "system": "Be brief.", "thinking": {"type": ` + thinking + `}, "tools": ` + anthropicTools + `,
				"messages": [{"role": "user", "content": "Weather?"},
				  {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "x"}, {"type": "tool_use", "id": "t1", "name": "get_time", "input": {}}]},
				  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "noon"}, {"type": "text", "text": "And Paris?"}]}]`
			code, data := s.post(t, "/v1/messages", body+`}`)
			var whole map[string]any
			if code != 200 || json.Unmarshal(data, &whole) != nil {
				t.Fatalf("%s, %s: %d %s", c.name, cname, code, data)
			}
			if whole["type"] != "message" || whole["role"] != "assistant" || !strings.HasPrefix(whole["id"].(string), "msg_") {
				t.Errorf("%s: envelope %s", c.name, data)
			}
			ids := func(m map[string]any) {
				n := 0
				for _, b := range m["content"].([]any) {
					if b := b.(map[string]any); b["type"] == "tool_use" {
						if id, _ := b["id"].(string); !strings.HasPrefix(id, "call_") {
							t.Errorf("tool_use id %q", id)
						}
						b["id"] = "call_" + string(rune('0'+n))
						n++
					}
				}
			}
			ids(whole)
			got := map[string]any{"content": whole["content"], "stop_reason": whole["stop_reason"]}
			if !reflect.DeepEqual(got, want) {
				g, _ := json.Marshal(got)
				t.Errorf("%s, %s:\n got %s\nwant %s", c.name, cname, g, c.want)
			}
			code, data = s.post(t, "/v1/messages", body+`, "stream": true}`)
			if code != 200 {
				t.Fatalf("%s: streaming %d %s", c.name, code, data)
			}
			streamed := reassembleAnthropic(t, data)
			ids(streamed)
			delete(streamed, "id")
			delete(whole, "id")
			if !reflect.DeepEqual(streamed, whole) {
				a, _ := json.Marshal(streamed)
				b, _ := json.Marshal(whole)
				t.Errorf("%s, %s: streamed\n%s\nwhole\n%s", c.name, cname, a, b)
			}
		}
	}
	s.srv.replay = nil

	code, data := s.post(t, "/v1/messages/count_tokens", `{"model": "tiny", "messages": [{"role": "user", "content": "Hello"}]}`)
	var count struct {
		InputTokens int `json:"input_tokens"`
	}
	if code != 200 || json.Unmarshal(data, &count) != nil || count.InputTokens < 3 {
		t.Errorf("count_tokens: %d %s", code, data)
	}
	code, data = s.post(t, "/v1/messages", `{"model": "tiny", "messages": [{"role": "user", "content": "Hello"}]}`)
	var e struct {
		Type  string `json:"type"`
		Error struct {
			Type    string `json:"type"`
			Message string `json:"message"`
		} `json:"error"`
	}
	if code != 400 || json.Unmarshal(data, &e) != nil || e.Type != "error" || e.Error.Type != "invalid_request_error" || !strings.Contains(e.Error.Message, "max_tokens") {
		t.Errorf("missing max_tokens: %d %s", code, data)
	}
	// The real model answers through the same path.
	code, data = s.post(t, "/v1/messages", `{"model": "tiny", "max_tokens": 5, "temperature": 0, "thinking": {"type": "disabled"}, "messages": [{"role": "user", "content": "Hello"}]}`)
	if code != 200 || !strings.Contains(string(data), `"stop_reason":"max_tokens"`) || !strings.Contains(string(data), `"output_tokens":5`) {
		t.Errorf("real model: %d %s", code, data)
	}
}

// /v1/messages counts in the metrics as the OpenAI routes do, and a bad
// key gets Anthropic's error shape.
func TestAnthropicMetricsAndAuth(t *testing.T) {
	s := startServer(t, Config{}, engine.Options{})
	// Greedy, so that both requests run to max_tokens (sampled, the model
	// may end sooner).
	body := `{"model": "tiny", "max_tokens": 5, "temperature": 0, "thinking": {"type": "disabled"}, "messages": [{"role": "user", "content": "Hello"}]`
	for _, tail := range []string{`}`, `, "stream": true}`} {
		if code, data := s.post(t, "/v1/messages", body+tail); code != 200 {
			t.Fatalf("%d %s", code, data)
		}
	}
	code, data := s.post(t, "/v1/messages/count_tokens", body+`}`)
	var count struct {
		InputTokens int `json:"input_tokens"`
	}
	if code != 200 || json.Unmarshal(data, &count) != nil {
		t.Fatalf("count_tokens: %d %s", code, data)
	}
	for metric, want := range map[string]float64{
		"mmfp4:generation_tokens_total":           10,
		"mmfp4:prompt_tokens_total":               float64(2 * count.InputTokens),
		"mmfp4:e2e_request_latency_seconds_count": 2,
		"mmfp4:time_to_first_token_seconds_count": 2,
		"mmfp4:inter_token_latency_seconds_count": 8,
	} {
		if got := metricValue(t, s, metric); got != want {
			t.Errorf("%s = %v, want %v", metric, got, want)
		}
	}

	resp, err := s.http.Get(s.ts.URL + "/v1/messages")
	if err != nil {
		t.Fatal(err)
	}
	data, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 404 || !strings.Contains(string(data), `"type":"not_found_error"`) {
		t.Errorf("GET /v1/messages: %d %s", resp.StatusCode, data)
	}

	k := startServer(t, Config{APIKey: "sekret"}, engine.Options{})
	for _, path := range []string{"/v1/messages", "/v1/messages/count_tokens"} {
		req, _ := http.NewRequest("POST", k.ts.URL+path, strings.NewReader(body+`}`))
		req.Header.Set("x-api-key", "wrong")
		resp, err := k.http.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var e struct {
			Type  string `json:"type"`
			Error struct {
				Type    string `json:"type"`
				Message string `json:"message"`
			} `json:"error"`
		}
		err = json.NewDecoder(resp.Body).Decode(&e)
		resp.Body.Close()
		if resp.StatusCode != 401 || err != nil || e.Type != "error" || e.Error.Type != "authentication_error" || !strings.Contains(e.Error.Message, "x-api-key") {
			t.Errorf("%s with a wrong key: %d %+v (%v)", path, resp.StatusCode, e, err)
		}
	}
}

// A request cut short by a shutdown ends its event stream with an error
// event of Anthropic's overloaded type, and a whole response is a 503.
func TestAnthropicCancelledError(t *testing.T) {
	s := startServer(t, Config{}, engine.Options{})
	s.srv.replay = func(engine.Request) []engine.Event {
		return []engine.Event{{Done: true, Finish: engine.FinishCanceled}}
	}
	defer func() { s.srv.replay = nil }()
	body := `{"model": "tiny", "max_tokens": 5, "messages": [{"role": "user", "content": "Hello"}]`
	code, data := s.post(t, "/v1/messages", body+`, "stream": true}`)
	if code != 200 || !strings.Contains(string(data), "event: error\ndata: {\"error\":{\"message\":") || !strings.Contains(string(data), `"type":"overloaded_error"`) {
		t.Errorf("streamed: %d %s", code, data)
	}
	code, data = s.post(t, "/v1/messages", body+`}`)
	if code != 503 || !strings.Contains(string(data), `"type":"overloaded_error"`) {
		t.Errorf("whole: %d %s", code, data)
	}
}
