package chat

import (
	"encoding/json"
	"strings"
	"testing"
)

func TestParseFile(t *testing.T) {
	p, err := ParseFile([]byte(` [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]`))
	if err != nil {
		t.Fatal(err)
	}
	// Prepared as a request: developer turns become system turns.
	if len(p.Messages) != 2 || p.Messages[0].Role != "system" || p.Messages[1].Content != "Hi" {
		t.Errorf("messages %+v", p.Messages)
	}
	if p.Options.EnableThinking != nil || p.Options.Tools != nil || p.Options.Extra != nil {
		t.Errorf("options %+v from a bare list", p.Options)
	}

	p, err = ParseFile([]byte(`{"messages": [{"role": "user", "content": "Hi"},
		{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{\"a\": 1}"}}]}],
		"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
		"enable_thinking": false, "today": {"z": 1, "a": 2}}`))
	if err != nil {
		t.Fatal(err)
	}
	if e := p.Options.EnableThinking; e == nil || *e {
		t.Errorf("enable_thinking %v, want false", e)
	}
	if len(p.Options.Tools) != 1 || len(p.Tools) != 1 || p.Tools[0].Name != "f" {
		t.Errorf("tools %v / %+v", p.Options.Tools, p.Tools)
	}
	if raw, ok := p.Options.Extra["today"].(json.RawMessage); !ok || string(raw) != `{"z": 1, "a": 2}` {
		t.Errorf("template variable today = %#v, want the object as written", p.Options.Extra["today"])
	}
	// OpenAI's string arguments become the object the template reads.
	if args := string(p.Messages[1].ToolCalls[0].Function.Arguments); args != `{"a": 1}` {
		t.Errorf("tool call arguments %s", args)
	}
}

func TestParseFileErrors(t *testing.T) {
	for _, c := range []struct{ file, want string }{
		{``, "want a JSON array"},
		{`[{"role": "user"`, "bad messages"},
		{`{"tools": []}`, `no "messages"`},
		{`{"messages": {}}`, "bad messages"},
		{`[]`, "non-empty"},
		{`[{"role": "robot", "content": "x"}]`, `messages[0]: unknown role "robot"`},
		{`{"messages": [{"role": "user", "content": "x"}], "tools": {}}`, "tools: want a list"},
		{`{"messages": [{"role": "user", "content": "x"}], "enable_thinking": "no"}`, "enable_thinking must be a boolean"},
		{`{"messages": [{"role": "user", "content": "x"}], "add_generation_prompt": true}`, "add_generation_prompt"},
	} {
		_, err := ParseFile([]byte(c.file))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err = %v, want one containing %q", c.file, err, c.want)
		}
	}
}

func FuzzParseFile(f *testing.F) {
	f.Add([]byte(`[{"role": "user", "content": "Hi"}]`))
	f.Add([]byte(`{"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}], "tools": [], "x": 1}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := ParseFile(data)
		if err == nil && len(p.Messages) == 0 {
			t.Errorf("%q: accepted with no messages", data)
		}
	})
}
