package chat

import "strings"

// Result is a whole parsed response.
type Result struct {
	Reasoning string
	Content   string
	ToolCalls []ToolCall
}

// ToolCall is one parsed call; Arguments is a JSON object.
type ToolCall struct {
	ID        string
	Name      string
	Arguments string
}

// Parse parses a whole output at once.
func Parse(output string, opt ParserOptions) Result {
	p := NewParser(opt)
	evs := p.Feed(output)
	return Assemble(append(evs, p.Finish()...))
}

// Assemble puts streamed events back together into a Result, as a client
// does with the deltas.
func Assemble(events []Event) Result {
	var r Result
	var reasoning, content strings.Builder
	args := map[int]*strings.Builder{}
	for _, ev := range events {
		switch ev.Kind {
		case ReasoningText:
			reasoning.WriteString(ev.Text)
		case ContentText:
			content.WriteString(ev.Text)
		case ToolCallStart:
			for len(r.ToolCalls) <= ev.Index {
				r.ToolCalls = append(r.ToolCalls, ToolCall{})
			}
			r.ToolCalls[ev.Index].ID = ev.ID
			r.ToolCalls[ev.Index].Name = ev.Name
			args[ev.Index] = &strings.Builder{}
		case ToolCallArgs:
			if b := args[ev.Index]; b != nil {
				b.WriteString(ev.Text)
			}
		}
	}
	for i, b := range args {
		r.ToolCalls[i].Arguments = b.String()
	}
	r.Reasoning, r.Content = reasoning.String(), content.String()
	return r
}

// EndsInThinking reports whether a rendered prompt ends inside <think>, so
// that the model's output starts as reasoning.
func EndsInThinking(prompt string) bool {
	return strings.HasSuffix(strings.TrimRight(prompt, whitespace), ThinkOpen)
}

// RequestError is a request field that cannot be used as given; Param
// names it (OpenAI's error "param").
type RequestError struct {
	Param string
	Msg   string
}

func (e *RequestError) Error() string { return e.Msg }
