package server

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/mmfp4/mmfp4/constrain"
	"github.com/mmfp4/mmfp4/engine"
)

// response_format json_schema on the built-in test model: over seeds and
// temperatures the content always parses and validates against the schema,
// and a schema the compiler refuses is a 400 naming it.
func TestJSONSchemaOutput(t *testing.T) {
	s := startServer(t, Config{}, engine.Options{})
	schema := `{"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}, "required": ["name", "age"], "additionalProperties": false}`
	val, err := constrain.NewValidator([]byte(schema))
	if err != nil {
		t.Fatal(err)
	}
	for i, temp := range []float64{0, 0.7, 1.0, 1.5} {
		for _, format := range []string{`{"type": "json_schema", "json_schema": {"name": "person", "schema": ` + schema + `}}`, `{"type": "json_object"}`} {
			body := fmt.Sprintf(`{"messages": [{"role": "user", "content": "Describe someone"}], "max_tokens": 200, "temperature": %g, "seed": %d,
				"chat_template_kwargs": {"enable_thinking": false}, "response_format": %s}`, temp, i, format)
			code, data := s.post(t, "/v1/chat/completions", body)
			var r struct {
				Choices []struct {
					FinishReason string `json:"finish_reason"`
					Message      struct {
						Content string `json:"content"`
					} `json:"message"`
				} `json:"choices"`
			}
			if code != 200 || json.Unmarshal(data, &r) != nil || len(r.Choices) != 1 {
				t.Fatalf("temperature %g: %d %s", temp, code, data)
			}
			c := r.Choices[0]
			if strings.Contains(format, "json_object") && c.FinishReason == "length" {
				// A free object may outrun max_tokens (long strings of a
				// random model); what there is must still start one.
				if !strings.HasPrefix(strings.TrimLeft(c.Message.Content, " \n\t"), "{") {
					t.Errorf("json_object cut off: %q", c.Message.Content)
				}
				continue
			}
			var v any
			if c.FinishReason != "stop" || json.Unmarshal([]byte(c.Message.Content), &v) != nil {
				t.Errorf("temperature %g, %s: finish %s, content %q is not JSON", temp, format, c.FinishReason, c.Message.Content)
				continue
			}
			if _, ok := v.(map[string]any); !ok {
				t.Errorf("content %q is not an object", c.Message.Content)
			}
			if strings.Contains(format, "json_schema") {
				if err := val.Validate([]byte(c.Message.Content)); err != nil {
					t.Errorf("temperature %g: %q does not validate: %v", temp, c.Message.Content, err)
				}
			}
		}
	}
	code, data := s.post(t, "/v1/chat/completions", `{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "string", "pattern": "^a+$"}}}}`)
	if code != 400 || !strings.Contains(string(data), `"param":"response_format.json_schema.schema"`) || !strings.Contains(string(data), "pattern") {
		t.Errorf("unsupported schema: %d %s", code, data)
	}
}

// With thinking on, the server's grammar for json_schema lets reasoning
// run free and constrains what follows </think>: a replayed output is
// checked token by token against the constraint the request carries.
func TestSchemaAfterThinking(t *testing.T) {
	s := startServer(t, Config{}, engine.Options{})
	tok, err := s.m.Tokenizer()
	if err != nil {
		t.Fatal(err)
	}
	body := `{"messages": [{"role": "user", "content": "Give a"}], "response_format": {"type": "json_schema", "json_schema": {"name": "a",
		"schema": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": false}}}}`
	for _, c := range []struct {
		output string
		ok     bool
	}{
		{"I think {\"a\": \"x\"} is wrong; <b>.</think>{\"a\": 12}", true},
		{"Plan.</think>\n{\"a\": 3}", true},
		{"Plan.</think>{\"a\": \"x\"}", false},
		{"Plan.</think>Sure: {\"a\": 3}", false},
	} {
		ids, err := tok.Encode(c.output, false)
		if err != nil {
			t.Fatal(err)
		}
		accepted := true
		s.srv.replay = func(req engine.Request) []engine.Event {
			con := req.Constraint
			if con == nil {
				t.Fatal("a json_schema request without a constraint")
			}
			for _, id := range ids {
				if con.Advance(id) != nil {
					accepted = false
					break
				}
			}
			accepted = accepted && con.Done()
			return []engine.Event{{Done: true, Finish: engine.FinishEOS}}
		}
		if code, data := s.post(t, "/v1/chat/completions", body); code != 200 {
			t.Fatalf("%d %s", code, data)
		}
		if accepted != c.ok {
			t.Errorf("%q: accepted %v, want %v", c.output, accepted, c.ok)
		}
	}
	s.srv.replay = nil
}

// Under tool_choice "none" the request carries a constraint that refuses
// <tool_call> anywhere (the reasoning included), as the special token or
// spelled out, and allows any other output; through both APIs. Without
// tools there is nothing to refuse and no constraint.
func TestToolChoiceNone(t *testing.T) {
	s := startServer(t, Config{}, engine.Options{})
	tok, err := s.m.Tokenizer()
	if err != nil {
		t.Fatal(err)
	}
	callID, ok := tok.TokenID("<tool_call>")
	if !ok {
		t.Fatal("the fixture tokenizer has no <tool_call> token")
	}
	spelled, err := tok.Encode("<tool_call", false)
	if err != nil {
		t.Fatal(err)
	}
	if slices.Contains(spelled, callID) {
		t.Fatalf("%q encodes with the special token", "<tool_call")
	}
	text := func(s string) []int {
		ids, err := tok.Encode(s, false)
		if err != nil {
			t.Fatal(err)
		}
		return ids
	}
	cases := []struct {
		name string
		ids  []int
		ok   bool
	}{
		{"plain answer", text("Sure, the weather in Paris is mild."), true},
		{"thinking then answer", text("Let me think; <b> and </tool_call> are text.</think>\nIt is noon."), true},
		{"call token", append(text("I will call it."), callID), false},
		{"call token in the reasoning", append(text("Maybe "), callID), false},
		{"call spelled out", append(text("Here: "), append(spelled, text(">get_time</tool_call>")...)...), false},
	}
	requests := map[string]string{
		"/v1/chat/completions": `{"messages": [{"role": "user", "content": "Time?"}], "tool_choice": "none", "tools": ` + goldenToolsJSON + `}`,
		"/v1/messages": `{"model": "tiny", "max_tokens": 50, "tool_choice": {"type": "none"}, "tools": ` + anthropicToolsOf(t, goldenToolsJSON) +
			`, "messages": [{"role": "user", "content": "Time?"}]}`,
	}
	for path, body := range requests {
		for _, c := range cases {
			accepted := true
			s.srv.replay = func(req engine.Request) []engine.Event {
				con := req.Constraint
				if con == nil {
					t.Fatalf("%s: tool_choice none without a constraint", path)
				}
				for _, id := range c.ids {
					if con.Advance(id) != nil {
						accepted = false
						break
					}
				}
				return []engine.Event{{Done: true, Finish: engine.FinishEOS}}
			}
			if code, data := s.post(t, path, body); code != 200 {
				t.Fatalf("%s: %d %s", path, code, data)
			}
			if accepted != c.ok {
				t.Errorf("%s, %s: accepted %v, want %v", path, c.name, accepted, c.ok)
			}
		}
	}
	// Should a call get through anyway, the parser reads it as text.
	s.srv.replay = replayer(t, s, "<tool_call>get_time</tool_call>", engine.FinishEOS, chunkings[0].split)
	code, data := s.post(t, "/v1/chat/completions", requests["/v1/chat/completions"])
	var r struct {
		Choices []struct {
			Message map[string]any `json:"message"`
		} `json:"choices"`
	}
	if code != 200 || json.Unmarshal(data, &r) != nil || len(r.Choices) != 1 {
		t.Fatalf("%d %s", code, data)
	}
	// (The prompt ends inside <think>, so the text is reasoning.)
	if msg := r.Choices[0].Message; msg["tool_calls"] != nil || msg["reasoning_content"] != "<tool_call>get_time</tool_call>" || msg["content"] != "" {
		t.Errorf("a call under tool_choice none: %s", data)
	}
	// With ignore_eos the end ids are ordinary tokens to the constraint
	// and stop nothing.
	s.srv.replay = func(req engine.Request) []engine.Event {
		eos := s.m.EOS()[0]
		if req.StopIDs == nil || len(req.StopIDs) != 0 || req.Constraint == nil {
			t.Errorf("ignore_eos under tool_choice none: stop ids %v, constraint %v", req.StopIDs, req.Constraint != nil)
		} else if err := req.Constraint.Advance(eos); err != nil || req.Constraint.Done() || req.Constraint.Advance(callID) == nil {
			t.Errorf("ignore_eos under tool_choice none: after the end id %d: %v, done %v", eos, err, req.Constraint.Done())
		}
		return []engine.Event{{Done: true, Finish: engine.FinishMaxTokens}}
	}
	if code, data := s.post(t, "/v1/chat/completions", strings.Replace(requests["/v1/chat/completions"], `"tool_choice"`, `"ignore_eos": true, "tool_choice"`, 1)); code != 200 {
		t.Fatalf("%d %s", code, data)
	}
	// No tools, no constraint.
	s.srv.replay = func(req engine.Request) []engine.Event {
		if req.Constraint != nil {
			t.Error("tool_choice none without tools got a constraint")
		}
		return []engine.Event{{Done: true, Finish: engine.FinishEOS}}
	}
	if code, data := s.post(t, "/v1/chat/completions", `{"messages": [{"role": "user", "content": "Hi"}], "tool_choice": "none"}`); code != 200 {
		t.Fatalf("%d %s", code, data)
	}
	s.srv.replay = nil
}
