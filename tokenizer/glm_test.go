package tokenizer

import (
	"encoding/json"
	"slices"
	"testing"
)

// The GLM-style files in testdata/tokenizer/glm were written for these
// tests (tools/tokenizer_make_glm.py and a hand-written template). The
// expected prompts below follow the template's rules by hand.

func boolp(b bool) *bool { return &b }

func TestGLMChatTemplate(t *testing.T) {
	tok := loadTokenizer(t, "glm")
	sys := Message{Role: "system", Content: "You are a helpful assistant."}
	user := Message{Role: "user", Content: "Hello! How are you?"}
	cases := []struct {
		name string
		msgs []Message
		opt  ChatOptions
		want string
	}{
		{"no generation prompt", []Message{sys, user}, ChatOptions{},
			"[gMASK]<sop><|system|>You are a helpful assistant.<|user|>Hello! How are you?"},
		{"generation prompt opens thinking", []Message{sys, user}, ChatOptions{AddGenerationPrompt: true},
			"[gMASK]<sop><|system|>You are a helpful assistant.<|user|>Hello! How are you?<|assistant|><think>"},
		{"thinking off", []Message{user}, ChatOptions{AddGenerationPrompt: true, EnableThinking: boolp(false)},
			"[gMASK]<sop><|user|>Hello! How are you?<|assistant|><think></think>"},
		{"thinking on", []Message{user}, ChatOptions{AddGenerationPrompt: true, EnableThinking: boolp(true)},
			"[gMASK]<sop><|user|>Hello! How are you?<|assistant|><think>"},
		{"old reasoning is dropped", []Message{
			{Role: "user", Content: "Solve x+1=2"},
			{Role: "assistant", Content: "<think>\nx = 2-1\n</think>\n\nx = 1"},
			{Role: "user", Content: "Thanks"},
		}, ChatOptions{AddGenerationPrompt: true},
			"[gMASK]<sop><|user|>Solve x+1=2<|assistant|><think></think>x = 1<|user|>Thanks<|assistant|><think>"},
		{"reasoning after the last user turn is kept", []Message{
			{Role: "user", Content: "Solve x+1=2"},
			{Role: "assistant", Content: "x = 1", ReasoningContent: " x = 2-1 "},
		}, ChatOptions{},
			"[gMASK]<sop><|user|>Solve x+1=2<|assistant|><think>x = 2-1</think>x = 1"},
		{"tools and tool turns", []Message{
			{Role: "user", Content: "Weather in Paris?"},
			{Role: "assistant", ToolCalls: []ToolCall{{Type: "function", Function: FunctionCall{
				Name: "get_weather", Arguments: json.RawMessage(`{"city": "Paris", "days": 2}`)}}}},
			{Role: "tool", Content: "sunny"},
			{Role: "tool", Content: "22°C"},
		}, ChatOptions{AddGenerationPrompt: true, Tools: []any{json.RawMessage(
			`{"type": "function", "function": {"name": "get_weather", "parameters": {"city": "string"}}}`)}},
			"[gMASK]<sop><|system|>\n# Tools\n\nYou may call the functions listed inside <tools></tools>, one JSON object a line:\n<tools>\n" +
				`{"type": "function", "function": {"name": "get_weather", "parameters": {"city": "string"}}}` +
				"\n</tools>\n\nCall a function as <tool_call>NAME<arg_key>KEY</arg_key><arg_value>VALUE</arg_value></tool_call>." +
				"<|user|>Weather in Paris?<|assistant|><think></think>" +
				"<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value><arg_key>days</arg_key><arg_value>2</arg_value></tool_call>" +
				"<|observation|><tool_response>sunny</tool_response><tool_response>22°C</tool_response><|assistant|><think>"},
	}
	for _, c := range cases {
		got, err := tok.ApplyChatTemplate(c.msgs, c.opt)
		if err != nil || got != c.want {
			t.Errorf("%s:\n got %q %v\nwant %q", c.name, got, err, c.want)
		}
	}
	if _, err := tok.ApplyChatTemplate([]Message{{Role: "robot", Content: "x"}}, ChatOptions{}); err == nil {
		t.Error("an unknown role must raise the template's exception")
	}
}

func TestGLMSpecialTokensAreSingleIDs(t *testing.T) {
	tok := loadTokenizer(t, "glm")
	specials := []string{"[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
		"<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "<arg_value>", "<|endoftext|>"}
	for _, s := range specials {
		id, ok := tok.TokenID(s)
		if !ok {
			t.Fatalf("%s is not a token", s)
		}
		got, err := tok.Encode(s, false)
		if err != nil || !slices.Equal(got, []int{id}) {
			t.Errorf("Encode(%q) = %v %v, want [%d]", s, got, err, id)
		}
	}
	prompt, err := tok.ApplyChatTemplate([]Message{{Role: "user", Content: "hi"}}, ChatOptions{AddGenerationPrompt: true})
	if err != nil {
		t.Fatal(err)
	}
	ids, err := tok.Encode(prompt, false)
	if err != nil {
		t.Fatal(err)
	}
	id := func(s string) int { v, _ := tok.TokenID(s); return v }
	want := []int{id("[gMASK]"), id("<sop>"), id("<|user|>")}
	if !slices.Equal(ids[:3], want) || ids[len(ids)-2] != id("<|assistant|>") || ids[len(ids)-1] != id("<think>") {
		t.Errorf("prompt ids %v do not start with %v and end with <|assistant|><think>", ids, want)
	}
	if back, _ := tok.Decode(ids); back != prompt {
		t.Errorf("Decode(Encode(prompt)) = %q, want %q", back, prompt)
	}
	// The post-processor of the GLM file adds [gMASK]<sop>.
	withSpecial, _ := tok.Encode("hi", true)
	plain, _ := tok.Encode("hi", false)
	if !slices.Equal(withSpecial, append([]int{id("[gMASK]"), id("<sop>")}, plain...)) {
		t.Errorf("Encode(hi, true) = %v, want [gMASK] <sop> %v", withSpecial, plain)
	}
	// generation_config.json lists <|endoftext|>, <|user|>, <|observation|>.
	if got, w := tok.EOSIDs(), []int{id("<|endoftext|>"), id("<|user|>"), id("<|observation|>")}; !slices.Equal(got, w) {
		t.Errorf("EOSIDs = %v, want %v", got, w)
	}
}
