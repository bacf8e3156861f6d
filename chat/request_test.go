package chat

import (
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/mmfp4/mmfp4/tokenizer"
)

func messages(t *testing.T, s string) []tokenizer.Message {
	t.Helper()
	var m []tokenizer.Message
	if err := json.Unmarshal([]byte(s), &m); err != nil {
		t.Fatal(err)
	}
	return m
}

const weatherTool = `{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}`

// The expected prompts follow the rules of the GLM-style reference
// template (testdata/glm4moelite-tiny/chat_template.jinja) by hand.
func TestPrepareRendersHistory(t *testing.T) {
	tok := tinyTokenizer(t)
	msgs := messages(t, `[
		{"role": "developer", "content": "Be brief."},
		{"role": "user", "content": "Weather in Paris?"},
		{"role": "assistant", "content": null, "reasoning": "Need the tool.",
		 "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"days\": 2}"}}]},
		{"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
		{"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "22 C"}]}
	]`)
	tools := "[gMASK]<sop><|system|>\n# Tools\n\nYou may call the functions listed inside <tools></tools>, one JSON object a line:\n<tools>\n" +
		weatherTool + "\n</tools>\n\nCall a function as <tool_call>NAME<arg_key>KEY</arg_key><arg_value>VALUE</arg_value></tool_call>."
	history := "<|system|>Be brief.<|user|>Weather in Paris?" +
		"<|assistant|><think>Need the tool.</think>" +
		"<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value><arg_key>days</arg_key><arg_value>2</arg_value></tool_call>" +
		"<|observation|><tool_response>sunny</tool_response><tool_response>22 C</tool_response>"
	cases := []struct {
		name string
		req  Request
		want string
	}{
		{"thinking", Request{}, tools + history + "<|assistant|><think>"},
		{"enable_thinking false", Request{ChatTemplateKwargs: map[string]any{"enable_thinking": false}},
			tools + history + "<|assistant|><think></think>"},
		{"reasoning_effort none", Request{ReasoningEffort: "none"}, tools + history + "<|assistant|><think></think>"},
		{"reasoning_effort high", Request{ReasoningEffort: "high"}, tools + history + "<|assistant|><think>"},
	}
	for _, c := range cases {
		c.req.Messages = msgs
		c.req.Tools = []json.RawMessage{json.RawMessage(weatherTool)}
		p, err := Prepare(c.req)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		got, err := tok.ApplyChatTemplate(p.Messages, p.Options)
		if err != nil || got != c.want {
			t.Errorf("%s:\n got %q %v\nwant %q", c.name, got, err, c.want)
		}
		if want := !strings.HasSuffix(c.want, "</think>"); p.ParserOptions(got).Reasoning != want {
			t.Errorf("%s: parser starts in reasoning = %v, want %v", c.name, !want, want)
		}
	}
}

func TestPrepareKeepsReasoningContent(t *testing.T) {
	p, err := Prepare(Request{Messages: messages(t, `[
		{"role": "user", "content": "x"},
		{"role": "assistant", "content": "y", "reasoning_content": "first", "reasoning": "second"}]`)})
	if err != nil {
		t.Fatal(err)
	}
	if m := p.Messages[1]; m.ReasoningContent != "first" || m.Extra["reasoning"] != nil {
		t.Errorf("reasoning_content %q, extra %v: reasoning_content wins and reasoning is consumed", m.ReasoningContent, m.Extra)
	}
}

func TestPrepareArguments(t *testing.T) {
	for args, want := range map[string]string{
		`"{\"a\": [1, 2]}"`: `{"a": [1, 2]}`,
		`{"a": 1}`:          `{"a": 1}`,
		`""`:                `{}`,
		`null`:              `{}`,
	} {
		p, err := Prepare(Request{Messages: messages(t, `[{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": `+args+`}}]}]`)})
		if err != nil {
			t.Errorf("%s: %v", args, err)
			continue
		}
		c := p.Messages[0].ToolCalls[0]
		if string(c.Function.Arguments) != want || c.Type != "function" {
			t.Errorf("arguments %s became %s (type %q), want %s", args, c.Function.Arguments, c.Type, want)
		}
	}
}

func TestToolChoice(t *testing.T) {
	tools := []json.RawMessage{json.RawMessage(weatherTool)}
	user := messages(t, `[{"role": "user", "content": "hi"}]`)
	for choice, want := range map[string]ToolChoice{
		``:           {Mode: ChoiceAuto},
		`"auto"`:     {Mode: ChoiceAuto},
		`"none"`:     {Mode: ChoiceNone},
		`"required"`: {Mode: ChoiceRequired},
		`{"type": "function", "function": {"name": "get_weather"}}`: {Mode: ChoiceFunction, Name: "get_weather"},
	} {
		p, err := Prepare(Request{Messages: user, Tools: tools, ToolChoice: json.RawMessage(choice)})
		if err != nil || p.Choice != want {
			t.Errorf("tool_choice %s: got %+v %v, want %+v", choice, p.Choice, err, want)
			continue
		}
		if got := p.ParserOptions(""); (got.Tools == nil) != (want.Mode == ChoiceNone) {
			t.Errorf("tool_choice %s: parser tools %v", choice, got.Tools)
		}
	}
	f := false
	p, _ := Prepare(Request{Messages: user, ParallelToolCalls: &f})
	if p.Parallel {
		t.Error("parallel_tool_calls false is lost")
	}
}

func TestPrepareErrors(t *testing.T) {
	tools := []json.RawMessage{json.RawMessage(weatherTool)}
	user := messages(t, `[{"role": "user", "content": "hi"}]`)
	cases := []struct {
		req   Request
		param string
	}{
		{Request{}, "messages"},
		{Request{Messages: messages(t, `[{"role": "robot", "content": "x"}]`)}, "messages[0].role"},
		{Request{Messages: messages(t, `[{"content": "x"}]`)}, "messages[0].role"},
		{Request{Messages: messages(t, `[{"role": "assistant", "reasoning": 3}]`)}, "messages[0].reasoning"},
		{Request{Messages: messages(t, `[{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}]`)},
			"messages[0].tool_calls[0].function.arguments"},
		{Request{Messages: messages(t, `[{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]`)},
			"messages[0].tool_calls[0].function.arguments"},
		{Request{Messages: messages(t, `[{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]`)},
			"messages[0].tool_calls[0].function.name"},
		{Request{Messages: messages(t, `[{"role": "user", "tool_calls": [{"function": {"name": "f"}}]}]`)}, "messages[0].tool_calls"},
		{Request{Messages: user, ToolChoice: json.RawMessage(`"required"`)}, "tool_choice"},
		{Request{Messages: user, ToolChoice: json.RawMessage(`"always"`)}, "tool_choice"},
		{Request{Messages: user, Tools: tools, ToolChoice: json.RawMessage(`{"type": "function", "function": {"name": "nope"}}`)}, "tool_choice"},
		{Request{Messages: user, Tools: []json.RawMessage{json.RawMessage(`{"type": "function"}`)}}, "tools[0].function"},
		{Request{Messages: user, Tools: []json.RawMessage{json.RawMessage(`{"type": "retrieval"}`)}}, "tools[0].type"},
		{Request{Messages: user, Tools: []json.RawMessage{json.RawMessage(`{"type": "function", "function": {"name": "a b"}}`)}}, "tools[0].function.name"},
		{Request{Messages: user, Tools: []json.RawMessage{json.RawMessage(`{"type": "function", "function": {"name": "f", "parameters": []}}`)}}, "tools[0].function.parameters"},
		{Request{Messages: user, Tools: append(tools, tools...)}, "tools[1].function.name"},
		{Request{Messages: user, ChatTemplateKwargs: map[string]any{"enable_thinking": "yes"}}, "chat_template_kwargs.enable_thinking"},
		{Request{Messages: user, ChatTemplateKwargs: map[string]any{"clear_thinking": 1.0}}, "chat_template_kwargs.clear_thinking"},
		{Request{Messages: user, ChatTemplateKwargs: map[string]any{"enable_thinking": true}, ReasoningEffort: "none"}, "reasoning_effort"},
		{Request{Messages: user, ReasoningEffort: "max"}, "reasoning_effort"},
	}
	for i, c := range cases {
		_, err := Prepare(c.req)
		var re *RequestError
		if !errors.As(err, &re) || re.Param != c.param || re.Msg == "" {
			t.Errorf("case %d: error %v, want one about %s", i, err, c.param)
		}
	}
}

func TestPrepareTemplateVariables(t *testing.T) {
	p, err := Prepare(Request{Messages: messages(t, `[{"role": "user", "content": "hi"}]`),
		ChatTemplateKwargs: map[string]any{"clear_thinking": false, "custom": "x"}})
	if err != nil {
		t.Fatal(err)
	}
	if want := map[string]any{"clear_thinking": false, "custom": "x"}; !reflect.DeepEqual(p.Options.Extra, want) {
		t.Errorf("template variables %v, want %v", p.Options.Extra, want)
	}
}

func TestStringTyped(t *testing.T) {
	for schema, want := range map[string]bool{
		`{"type": "string"}`:                                  true,
		`{"type": ["string", "null"]}`:                        true,
		`{"type": ["string", "integer"]}`:                     false,
		`{"type": "integer"}`:                                 false,
		`{"enum": ["a", "b"]}`:                                true,
		`{"enum": ["a", 1]}`:                                  false,
		`{"const": "x"}`:                                      true,
		`{"anyOf": [{"type": "string"}, {"type": "null"}]}`:   true,
		`{"anyOf": [{"type": "string"}, {"type": "number"}]}`: false,
		`{}`:    false,
		`true`:  false,
		`"bad"`: false,
	} {
		if got := StringTyped(json.RawMessage(schema)); got != want {
			t.Errorf("StringTyped(%s) = %v, want %v", schema, got, want)
		}
	}
}
