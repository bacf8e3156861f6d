package chat

import (
	"bytes"
	"encoding/json"
	"fmt"

	"github.com/mmfp4/mmfp4/tokenizer"
)

// Request holds the fields of an OpenAI chat completion request that shape
// the prompt and how the output is read.
type Request struct {
	Messages           []tokenizer.Message
	Tools              []json.RawMessage
	ToolChoice         json.RawMessage // "none", "auto", "required" or {"type": "function", "function": {"name": ...}}
	ParallelToolCalls  *bool
	ChatTemplateKwargs map[string]any
	ReasoningEffort    string
}

// ChoiceMode is how the model may call tools.
type ChoiceMode uint8

const (
	ChoiceAuto     ChoiceMode = iota // the model decides
	ChoiceNone                       // no calls: the parser reads none
	ChoiceRequired                   // at least one call
	ChoiceFunction                   // a call of the named function
)

// ToolChoice is a request's tool_choice.
type ToolChoice struct {
	Mode ChoiceMode
	Name string // ChoiceFunction
}

// Prepared is a request ready to render and to read the output of.
type Prepared struct {
	// Messages and Options go to tokenizer.ApplyChatTemplate.
	Messages []tokenizer.Message
	Options  tokenizer.ChatOptions
	Tools    []Tool
	Choice   ToolChoice
	// Parallel is parallel_tool_calls (default true): whether the model
	// may make more than one call.
	Parallel bool
}

// Prepare checks a request and turns it into template inputs. Errors are
// *RequestError naming the field.
//
//   - Messages: "developer" turns become "system"; an assistant turn's
//     "reasoning" is taken as reasoning_content (both names are accepted);
//     tool_calls arguments given as a JSON string (OpenAI's way) become
//     the JSON object the template iterates over; "tool" turns are left
//     for the template, which renders them as observation turns.
//   - tools go to the template as written (key order kept).
//   - chat_template_kwargs: enable_thinking and clear_thinking must be
//     booleans; all kwargs are template variables. reasoning_effort
//     "none" turns thinking off (enable_thinking false).
func Prepare(r Request) (*Prepared, error) {
	p := &Prepared{Parallel: true, Options: tokenizer.ChatOptions{AddGenerationPrompt: true}}
	if len(r.Messages) == 0 {
		return nil, &RequestError{Param: "messages", Msg: "messages must be a non-empty list"}
	}
	for i, m := range r.Messages {
		m, err := prepareMessage(i, m)
		if err != nil {
			return nil, err
		}
		p.Messages = append(p.Messages, m)
	}
	tools, err := ParseTools(r.Tools)
	if err != nil {
		return nil, err
	}
	p.Tools = tools
	for _, t := range r.Tools {
		p.Options.Tools = append(p.Options.Tools, t)
	}
	if p.Choice, err = parseToolChoice(r.ToolChoice, tools); err != nil {
		return nil, err
	}
	if r.ParallelToolCalls != nil {
		p.Parallel = *r.ParallelToolCalls
	}
	for k, v := range r.ChatTemplateKwargs {
		switch k {
		case "enable_thinking", "clear_thinking":
			b, ok := v.(bool)
			if !ok {
				return nil, &RequestError{Param: "chat_template_kwargs." + k, Msg: fmt.Sprintf("chat_template_kwargs.%s must be a boolean, got %v", k, v)}
			}
			if k == "enable_thinking" {
				p.Options.EnableThinking = &b
				continue
			}
		}
		if p.Options.Extra == nil {
			p.Options.Extra = map[string]any{}
		}
		p.Options.Extra[k] = v
	}
	switch r.ReasoningEffort {
	case "":
	case "none":
		if e := p.Options.EnableThinking; e != nil && *e {
			return nil, &RequestError{Param: "reasoning_effort", Msg: `reasoning_effort "none" contradicts chat_template_kwargs.enable_thinking true`}
		}
		off := false
		p.Options.EnableThinking = &off
	case "minimal", "low", "medium", "high":
		// The model has one thinking level; the template may still read it.
		if p.Options.Extra == nil {
			p.Options.Extra = map[string]any{}
		}
		p.Options.Extra["reasoning_effort"] = r.ReasoningEffort
	default:
		return nil, &RequestError{Param: "reasoning_effort", Msg: fmt.Sprintf(`reasoning_effort must be "none", "minimal", "low", "medium" or "high", got %q`, r.ReasoningEffort)}
	}
	return p, nil
}

// ParserOptions are the options of the output parser for a prompt
// rendered from p.
func (p *Prepared) ParserOptions(prompt string) ParserOptions {
	opt := ParserOptions{Reasoning: EndsInThinking(prompt)}
	if p.Choice.Mode != ChoiceNone {
		opt.Tools = p.Tools
	}
	return opt
}

func prepareMessage(i int, m tokenizer.Message) (tokenizer.Message, error) {
	field := func(f string) string { return fmt.Sprintf("messages[%d].%s", i, f) }
	switch m.Role {
	case "system", "user", "assistant", "tool":
	case "developer":
		m.Role = "system"
	case "":
		return m, &RequestError{Param: field("role"), Msg: fmt.Sprintf("messages[%d] has no role", i)}
	default:
		return m, &RequestError{Param: field("role"), Msg: fmt.Sprintf("messages[%d]: unknown role %q (want system, developer, user, assistant or tool)", i, m.Role)}
	}
	if raw, ok := m.Extra["reasoning"]; ok {
		var s string
		if !isNull(raw) && json.Unmarshal(raw, &s) != nil {
			return m, &RequestError{Param: field("reasoning"), Msg: field("reasoning") + " must be a string"}
		}
		if m.ReasoningContent == "" {
			m.ReasoningContent = s
		}
		extra := make(map[string]json.RawMessage, len(m.Extra))
		for k, v := range m.Extra {
			if k != "reasoning" {
				extra[k] = v
			}
		}
		m.Extra = extra
	}
	if len(m.ToolCalls) > 0 && m.Role != "assistant" {
		return m, &RequestError{Param: field("tool_calls"), Msg: field("tool_calls") + " is only allowed in assistant messages"}
	}
	calls := make([]tokenizer.ToolCall, len(m.ToolCalls))
	for j, c := range m.ToolCalls {
		f := field(fmt.Sprintf("tool_calls[%d].function", j))
		if c.Function.Name == "" {
			return m, &RequestError{Param: f + ".name", Msg: f + ".name is missing"}
		}
		args, err := argumentsObject(c.Function.Arguments)
		if err != nil {
			return m, &RequestError{Param: f + ".arguments", Msg: fmt.Sprintf("%s.arguments: %v", f, err)}
		}
		c.Function.Arguments = args
		if c.Type == "" {
			c.Type = "function"
		}
		calls[j] = c
	}
	m.ToolCalls = calls
	return m, nil
}

// argumentsObject returns a call's arguments as a JSON object: OpenAI
// sends them as a string holding JSON; templates iterate over the object.
func argumentsObject(raw json.RawMessage) (json.RawMessage, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || isNull(raw) {
		return json.RawMessage(`{}`), nil
	}
	if raw[0] == '"' {
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return nil, err
		}
		raw = bytes.TrimSpace([]byte(s))
		if len(raw) == 0 {
			return json.RawMessage(`{}`), nil
		}
	}
	var obj map[string]json.RawMessage
	if raw[0] != '{' || json.Unmarshal(raw, &obj) != nil {
		return nil, fmt.Errorf("want a JSON object, or a string holding one; got %.40q", raw)
	}
	return json.RawMessage(raw), nil
}

func isNull(raw json.RawMessage) bool { return string(bytes.TrimSpace(raw)) == "null" }

func parseToolChoice(raw json.RawMessage, tools []Tool) (ToolChoice, error) {
	bad := func(format string, args ...any) (ToolChoice, error) {
		return ToolChoice{}, &RequestError{Param: "tool_choice", Msg: fmt.Sprintf(format, args...)}
	}
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || isNull(raw) {
		return ToolChoice{Mode: ChoiceAuto}, nil
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		switch s {
		case "auto":
			return ToolChoice{Mode: ChoiceAuto}, nil
		case "none":
			return ToolChoice{Mode: ChoiceNone}, nil
		case "required":
			if len(tools) == 0 {
				return bad(`tool_choice "required" needs tools`)
			}
			return ToolChoice{Mode: ChoiceRequired}, nil
		}
		return bad(`tool_choice must be "none", "auto", "required" or a named function, got %q`, s)
	}
	var named struct {
		Type     string `json:"type"`
		Name     string `json:"name"`
		Function struct {
			Name string `json:"name"`
		} `json:"function"`
	}
	if json.Unmarshal(raw, &named) != nil || named.Type != "function" {
		return bad(`tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}`)
	}
	name := named.Function.Name
	if name == "" {
		name = named.Name
	}
	for _, t := range tools {
		if t.Name == name {
			return ToolChoice{Mode: ChoiceFunction, Name: name}, nil
		}
	}
	return bad("tool_choice names function %q, which is not among the tools", name)
}
