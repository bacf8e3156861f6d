package tokenizer

import (
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/ardanlabs/jinja"
)

// Message is one chat turn, JSON-compatible with OpenAI and HF messages.
type Message struct {
	Role string `json:"role"`
	// Content is the text. ContentNull marks "content": null (an assistant
	// turn that only calls tools); ContentParts holds a list content such
	// as [{"type": "text", "text": ...}] as written.
	Content          string          `json:"-"`
	ContentNull      bool            `json:"-"`
	ContentParts     json.RawMessage `json:"-"`
	ReasoningContent string          `json:"reasoning_content,omitempty"`
	ToolCalls        []ToolCall      `json:"tool_calls,omitempty"`
	ToolCallID       string          `json:"tool_call_id,omitempty"`
	Name             string          `json:"name,omitempty"`
	// Extra holds any other fields; the template sees them as they are.
	Extra map[string]json.RawMessage `json:"-"`
}

// ToolCall is an assistant's call of a tool.
type ToolCall struct {
	ID       string       `json:"id,omitempty"`
	Type     string       `json:"type,omitempty"`
	Function FunctionCall `json:"function"`
}

// FunctionCall names the function; Arguments is a JSON object, or a JSON
// string holding one (OpenAI style). Templates get it as written.
type FunctionCall struct {
	Name      string          `json:"name"`
	Arguments json.RawMessage `json:"arguments,omitempty"`
}

var knownMessageFields = map[string]bool{
	"role": true, "content": true, "reasoning_content": true, "tool_calls": true, "tool_call_id": true, "name": true,
}

// UnmarshalJSON reads content as a string, null or a list, and keeps
// unknown fields in Extra.
func (m *Message) UnmarshalJSON(data []byte) error {
	type plain Message
	var p plain
	if err := json.Unmarshal(data, &p); err != nil {
		return err
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(data, &fields); err != nil {
		return err
	}
	*m = Message(p)
	if raw, ok := fields["content"]; ok {
		switch {
		case isNull(raw):
			m.ContentNull = true
		case json.Unmarshal(raw, &m.Content) == nil:
		default:
			var parts []json.RawMessage
			if err := json.Unmarshal(raw, &parts); err != nil {
				return fmt.Errorf("message content: want a string, null or a list")
			}
			m.ContentParts = raw
		}
	}
	for k, v := range fields {
		if !knownMessageFields[k] {
			if m.Extra == nil {
				m.Extra = map[string]json.RawMessage{}
			}
			m.Extra[k] = v
		}
	}
	return nil
}

// MarshalJSON writes the message as UnmarshalJSON reads it: role,
// content, the other set fields, then Extra by key.
func (m Message) MarshalJSON() ([]byte, error) {
	var b strings.Builder
	b.WriteByte('{')
	field := func(k string, v any) error {
		data, err := json.Marshal(v)
		if err != nil {
			return err
		}
		if b.Len() > 1 {
			b.WriteByte(',')
		}
		kb, _ := json.Marshal(k)
		b.Write(kb)
		b.WriteByte(':')
		b.Write(data)
		return nil
	}
	var content any = m.Content
	switch {
	case m.ContentNull:
		content = nil
	case m.ContentParts != nil:
		content = m.ContentParts
	}
	fields := []struct {
		key  string
		val  any
		keep bool
	}{
		{"role", m.Role, true},
		{"content", content, true},
		{"reasoning_content", m.ReasoningContent, m.ReasoningContent != ""},
		{"tool_calls", m.ToolCalls, len(m.ToolCalls) > 0},
		{"tool_call_id", m.ToolCallID, m.ToolCallID != ""},
		{"name", m.Name, m.Name != ""},
	}
	for _, f := range fields {
		if f.keep {
			if err := field(f.key, f.val); err != nil {
				return nil, err
			}
		}
	}
	keys := make([]string, 0, len(m.Extra))
	for k := range m.Extra {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if err := field(k, m.Extra[k]); err != nil {
			return nil, err
		}
	}
	b.WriteByte('}')
	return []byte(b.String()), nil
}

// ChatOptions are the arguments of apply_chat_template besides messages.
type ChatOptions struct {
	AddGenerationPrompt bool
	EnableThinking      *bool // nil: leave undefined, as the template's default
	Tools               []any // tool schemas; json.RawMessage keeps key order
	// Extra variables for the template (e.g. "reasoning_effort").
	Extra map[string]any
	// Now is the time strftime_now() shows; zero means the current time.
	Now time.Time
}

// chatTemplate is a compiled chat template.
type chatTemplate struct {
	tmpl *jinja.Template
}

func compileChatTemplate(src string) (*chatTemplate, error) {
	rewritten, err := rewriteTemplate(src)
	if err != nil {
		return nil, err
	}
	tmpl, err := jinja.Compile(rewritten)
	if err != nil {
		return nil, err
	}
	return &chatTemplate{tmpl}, nil
}

// HasChatTemplate reports whether the files carried a chat template.
func (t *Tokenizer) HasChatTemplate() bool { return t.chatTemplate != nil }

// ApplyChatTemplate renders messages into the prompt text, as
// transformers' apply_chat_template(..., tokenize=False) does.
func (t *Tokenizer) ApplyChatTemplate(messages []Message, opt ChatOptions) (string, error) {
	if t.chatTemplate == nil {
		return "", errors.New("tokenizer: the model has no chat template")
	}
	msgs, err := valueOf(messages)
	if err != nil {
		return "", fmt.Errorf("tokenizer: messages: %w", err)
	}
	now := opt.Now
	if now.IsZero() {
		now = time.Now()
	}
	vars := map[string]jinja.Value{
		"messages":              msgs,
		"add_generation_prompt": jinja.NewBool(opt.AddGenerationPrompt),
		"documents":             jinja.None(),
		"strftime_now": jinja.NewCallable("strftime_now", func(args []jinja.Value, _ map[string]jinja.Value) (jinja.Value, error) {
			if len(args) != 1 || !args[0].IsString() {
				return jinja.Undefined(), errors.New("strftime_now takes one format string")
			}
			return jinja.NewString(strftime(now, args[0].AsString())), nil
		}),
	}
	// Like transformers, pass the special tokens that the config sets.
	for name, tok := range map[string]string{"bos_token": t.bosToken, "eos_token": t.eosToken, "pad_token": t.padToken, "unk_token": t.unkToken} {
		if tok != "" {
			vars[name] = jinja.NewString(tok)
		}
	}
	if opt.Tools != nil {
		tools, err := valueOf(opt.Tools)
		if err != nil {
			return "", fmt.Errorf("tokenizer: tools: %w", err)
		}
		vars["tools"] = tools
	} else {
		vars["tools"] = jinja.None()
	}
	if opt.EnableThinking != nil {
		vars["enable_thinking"] = jinja.NewBool(*opt.EnableThinking)
	}
	for k, x := range opt.Extra {
		v, err := valueOf(x)
		if err != nil {
			return "", fmt.Errorf("tokenizer: chat option %q: %w", k, err)
		}
		vars[k] = v
	}
	return t.chatTemplate.render(vars)
}

// render runs the template within the default limits; errors name the
// template line that was running.
func (c *chatTemplate) render(vars map[string]jinja.Value) (string, error) {
	return c.renderLimited(vars, defaultRenderLimits)
}

// engineFailure is a panic inside the template engine, turned into an
// error; the fuzz tests look for it.
type engineFailure struct{ v any }

func (e *engineFailure) Error() string { return fmt.Sprintf("the template engine failed: %v", e.v) }

func (c *chatTemplate) renderLimited(vars map[string]jinja.Value, lim renderLimits) (out string, err error) {
	line := 0
	defer func() {
		if r := recover(); r != nil {
			out, err = "", fmt.Errorf("chat template line %d: %w", line, &engineFailure{r})
		}
	}()
	g := newRenderGuard(lim)
	vars[lineFunc] = jinja.NewCallable(lineFunc, func(args []jinja.Value, _ map[string]jinja.Value) (jinja.Value, error) {
		if len(args) == 1 && args[0].IsInt() {
			line = int(args[0].AsInt())
		}
		return jinja.NewString(""), nil
	})
	for name, fn := range g.functions() {
		vars[name] = fn
	}
	out, err = c.tmpl.RenderValues(vars)
	if err != nil {
		return "", fmt.Errorf("chat template line %d: %w", line, err)
	}
	return out, nil
}

// tojsonFilter is HF's tojson: json.dumps(x, ensure_ascii=False,
// indent=None, separators=None, sort_keys=False).
func tojsonFilter(args []jinja.Value, kwargs map[string]jinja.Value, limit int) (jinja.Value, error) {
	if len(args) < 1 {
		return jinja.Undefined(), errors.New("tojson: missing value")
	}
	o := jsonOptions{indent: -1, limit: limit}
	get := func(name string, pos int) (jinja.Value, bool) {
		if v, ok := kwargs[name]; ok {
			return v, true
		}
		if pos < len(args) {
			return args[pos], true
		}
		return jinja.Undefined(), false
	}
	if v, ok := get("ensure_ascii", 1); ok {
		o.ensureASCII = v.IsTruthy()
	}
	if v, ok := get("indent", 2); ok && v.IsInt() {
		o.indent = int(v.AsInt())
	}
	o.itemSep, o.keySep = ", ", ": "
	if o.indent >= 0 {
		o.itemSep = ","
	}
	if v, ok := get("separators", 3); ok && v.IsList() && v.AsList().Len() == 2 {
		seps := v.AsList().Items
		o.itemSep, o.keySep = seps[0].AsString(), seps[1].AsString()
	}
	if v, ok := get("sort_keys", 4); ok {
		o.sortKeys = v.IsTruthy()
	}
	s, err := pyJSON(args[0], o)
	if err != nil {
		return jinja.Undefined(), err
	}
	return jinja.NewString(s), nil
}
