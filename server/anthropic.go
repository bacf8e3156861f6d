package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/mmfp4/mmfp4/chat"
	"github.com/mmfp4/mmfp4/engine"
	"github.com/mmfp4/mmfp4/sample"
	"github.com/mmfp4/mmfp4/tokenizer"
)

// The Anthropic Messages API (POST /v1/messages and
// /v1/messages/count_tokens), mapped onto the same chat preparation,
// constraints and output parser as the OpenAI endpoint.

type anthropicRequest struct {
	Model      string             `json:"model"`
	MaxTokens  *int               `json:"max_tokens"`
	System     json.RawMessage    `json:"system"`
	Messages   []anthropicMessage `json:"messages"`
	Tools      []anthropicTool    `json:"tools"`
	ToolChoice *struct {
		Type                   string `json:"type"`
		Name                   string `json:"name"`
		DisableParallelToolUse bool   `json:"disable_parallel_tool_use"`
	} `json:"tool_choice"`
	Stream        bool     `json:"stream"`
	Temperature   *float64 `json:"temperature"`
	TopP          *float64 `json:"top_p"`
	TopK          *int     `json:"top_k"`
	StopSequences []string `json:"stop_sequences"`
	Thinking      *struct {
		Type string `json:"type"`
	} `json:"thinking"`
}

type anthropicMessage struct {
	Role    string          `json:"role"`
	Content json.RawMessage `json:"content"` // a string or a list of blocks
}

type anthropicBlock struct {
	Type      string          `json:"type"`
	Text      string          `json:"text"`
	Thinking  string          `json:"thinking"`
	ID        string          `json:"id"`
	Name      string          `json:"name"`
	Input     json.RawMessage `json:"input"`
	ToolUseID string          `json:"tool_use_id"`
	Content   json.RawMessage `json:"content"` // tool_result: a string or text blocks
}

type anthropicTool struct {
	Name        string          `json:"name"`
	Description string          `json:"description"`
	InputSchema json.RawMessage `json:"input_schema"`
}

// blocks reads content given as a string or as a list of blocks.
func blocks(raw json.RawMessage, param string) ([]anthropicBlock, *apiError) {
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return []anthropicBlock{{Type: "text", Text: s}}, nil
	}
	var bs []anthropicBlock
	if err := json.Unmarshal(raw, &bs); err != nil {
		return nil, badRequest(param, "%s: want a string or a list of content blocks", param)
	}
	return bs, nil
}

// textOf joins the text blocks of content.
func textOf(raw json.RawMessage, param string) (string, *apiError) {
	if len(raw) == 0 {
		return "", nil
	}
	bs, err := blocks(raw, param)
	if err != nil {
		return "", err
	}
	var b strings.Builder
	for _, bl := range bs {
		if bl.Type != "text" {
			return "", badRequest(param, "%s: only text blocks are supported here, got %q", param, bl.Type)
		}
		b.WriteString(bl.Text)
	}
	return b.String(), nil
}

// toChat turns a Messages request into a chat request.
func (r *anthropicRequest) toChat() (chat.Request, *apiError) {
	var cr chat.Request
	if len(r.System) > 0 {
		sys, err := textOf(r.System, "system")
		if err != nil {
			return cr, err
		}
		cr.Messages = append(cr.Messages, tokenizer.Message{Role: "system", Content: sys})
	}
	if len(r.Messages) == 0 {
		return cr, badRequest("messages", "messages must be a non-empty list")
	}
	for i, m := range r.Messages {
		param := fmt.Sprintf("messages[%d].content", i)
		if m.Role != "user" && m.Role != "assistant" {
			return cr, badRequest(fmt.Sprintf("messages[%d].role", i), "messages[%d]: role must be user or assistant, got %q", i, m.Role)
		}
		bs, err := blocks(m.Content, param)
		if err != nil {
			return cr, err
		}
		msg := tokenizer.Message{Role: m.Role}
		flush := func() {
			if msg.Content != "" || msg.ReasoningContent != "" || len(msg.ToolCalls) > 0 {
				if msg.Content == "" && len(msg.ToolCalls) > 0 {
					msg.ContentNull = true
				}
				cr.Messages = append(cr.Messages, msg)
			}
			msg = tokenizer.Message{Role: m.Role}
		}
		for _, b := range bs {
			switch {
			case b.Type == "text":
				msg.Content += b.Text
			case b.Type == "thinking" && m.Role == "assistant":
				msg.ReasoningContent += b.Thinking
			case b.Type == "redacted_thinking" && m.Role == "assistant":
			case b.Type == "tool_use" && m.Role == "assistant":
				input := b.Input
				if len(input) == 0 {
					input = json.RawMessage(`{}`)
				}
				msg.ToolCalls = append(msg.ToolCalls, tokenizer.ToolCall{ID: b.ID, Type: "function", Function: tokenizer.FunctionCall{Name: b.Name, Arguments: input}})
			case b.Type == "tool_result" && m.Role == "user":
				flush()
				text, err := textOf(b.Content, param+".tool_result.content")
				if err != nil {
					return cr, err
				}
				cr.Messages = append(cr.Messages, tokenizer.Message{Role: "tool", ToolCallID: b.ToolUseID, Content: text})
			default:
				return cr, badRequest(param, "%s: content block %q is not supported in a %s message", param, b.Type, m.Role)
			}
		}
		flush()
	}
	for _, t := range r.Tools {
		schema := t.InputSchema
		if len(schema) == 0 {
			schema = json.RawMessage(`{"type": "object", "properties": {}}`)
		}
		raw, err := json.Marshal(map[string]any{"type": "function", "function": map[string]any{"name": t.Name, "description": t.Description, "parameters": schema}})
		if err != nil {
			return cr, badRequest("tools", "tools: %v", err)
		}
		cr.Tools = append(cr.Tools, raw)
	}
	if tc := r.ToolChoice; tc != nil {
		switch tc.Type {
		case "auto":
			cr.ToolChoice = json.RawMessage(`"auto"`)
		case "any":
			cr.ToolChoice = json.RawMessage(`"required"`)
		case "none":
			cr.ToolChoice = json.RawMessage(`"none"`)
		case "tool":
			cr.ToolChoice, _ = json.Marshal(map[string]any{"type": "function", "function": map[string]any{"name": tc.Name}})
		default:
			return cr, badRequest("tool_choice", `tool_choice.type must be "auto", "any", "none" or "tool", got %q`, tc.Type)
		}
		if tc.DisableParallelToolUse {
			no := false
			cr.ParallelToolCalls = &no
		}
	}
	if r.Thinking != nil {
		switch r.Thinking.Type {
		case "enabled":
			cr.ChatTemplateKwargs = map[string]any{"enable_thinking": true}
		case "disabled":
			cr.ChatTemplateKwargs = map[string]any{"enable_thinking": false}
		default:
			return cr, badRequest("thinking", `thinking.type must be "enabled" or "disabled", got %q`, r.Thinking.Type)
		}
	}
	return cr, nil
}

// parseAnthropic decodes and checks a Messages request into params.
func parseAnthropic(body []byte, needMaxTokens bool) (*params, *anthropicRequest, *apiError) {
	var req anthropicRequest
	if err := decodeJSON(body, &req); err != nil {
		return nil, nil, err
	}
	if needMaxTokens && req.MaxTokens == nil {
		return nil, nil, badRequest("max_tokens", "max_tokens is required")
	}
	f := samplingFields{Model: req.Model, MaxTokens: req.MaxTokens, Temperature: req.Temperature, TopP: req.TopP, TopK: req.TopK, Stop: req.StopSequences, Stream: req.Stream}
	p, aerr := f.check(1)
	if aerr != nil {
		return nil, nil, aerr
	}
	cr, aerr := req.toChat()
	if aerr != nil {
		return nil, nil, aerr
	}
	prep, err := chat.Prepare(cr)
	var re *chat.RequestError
	switch {
	case errors.As(err, &re):
		return nil, nil, badRequest(re.Param, "%s", re.Msg)
	case err != nil:
		return nil, nil, badRequest("", "%v", err)
	}
	p.chat = prep
	return p, &req, nil
}

// anthropicError writes an error in Anthropic's shape.
func anthropicError(w http.ResponseWriter, e *apiError) {
	if e.RetryAfter > 0 {
		w.Header().Set("Retry-After", strconv.Itoa(e.RetryAfter))
	}
	writeJSON(w, e.Status, anthropicErrorBody(e))
}

// anthropicErrorBody is e in Anthropic's shape, with its error type.
func anthropicErrorBody(e *apiError) map[string]any {
	typ := "api_error"
	switch e.Status {
	case http.StatusBadRequest, http.StatusRequestEntityTooLarge:
		typ = "invalid_request_error"
	case http.StatusUnauthorized:
		typ = "authentication_error"
	case http.StatusNotFound:
		typ = "not_found_error"
	case http.StatusTooManyRequests:
		typ = "rate_limit_error"
	case http.StatusServiceUnavailable:
		typ = "overloaded_error"
	}
	return map[string]any{"type": "error", "error": map[string]any{"type": typ, "message": e.Message}}
}

func (s *Server) countTokens(w http.ResponseWriter, r *http.Request) {
	m, _, aerr := s.ready()
	if aerr == nil {
		var body []byte
		if body, aerr = s.readBody(w, r); aerr == nil {
			var p *params
			if p, _, aerr = parseAnthropic(body, false); aerr == nil {
				var ids []int
				if ids, _, aerr = s.promptIDs(m, p, endpoint{chat: true}); aerr == nil {
					writeJSON(w, http.StatusOK, map[string]any{"input_tokens": len(ids)})
					return
				}
			}
		}
	}
	anthropicError(w, aerr)
}

func (s *Server) messages(w http.ResponseWriter, r *http.Request) {
	arrival := time.Now()
	m, eng, aerr := s.ready()
	var p *params
	var prompt []int
	var promptText string
	if aerr == nil {
		var body []byte
		if body, aerr = s.readBody(w, r); aerr == nil {
			if p, _, aerr = parseAnthropic(body, true); aerr == nil {
				if aerr = s.checkModel(p.model); aerr == nil {
					prompt, promptText, aerr = s.promptIDs(m, p, endpoint{chat: true})
				}
			}
		}
	}
	if aerr == nil && s.drain.Load() {
		aerr = &apiError{Status: http.StatusServiceUnavailable, Message: "the server is shutting down"}
	}
	if aerr != nil {
		anthropicError(w, aerr)
		return
	}
	g, aerr := s.grammar(m, p, chat.EndsInThinking(promptText))
	if aerr != nil {
		anthropicError(w, aerr)
		return
	}
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	req := engine.Request{Prompt: prompt, MaxTokens: p.maxTokens, Stop: p.stop, Text: true,
		Sampling: sample.Options{Temperature: float32(p.temperature), TopK: p.topK, TopP: float32(p.topP), Seed: seedFor(p.seed, 0)}}
	if g != nil {
		req.Constraint = g.Start()
	}
	var st eventSource
	if s.replay != nil {
		st = &replayed{s.replay(req)}
	} else {
		es, err := eng.Submit(ctx, req)
		if err != nil {
			anthropicError(w, submitError(err, endpoint{chat: true}))
			return
		}
		st = es
	}
	out := &anthropicOutput{s: s, w: w, id: newID("msg_"), stream: p.stream, inputTokens: len(prompt)}
	parser := chat.NewParser(p.chat.ParserOptions(promptText))
	if p.stream {
		out.start()
	}
	var all []chat.Event
	calls := false
	var lastToken time.Time
	for {
		ev, err := st.Recv(ctx)
		if err != nil {
			return // the client went away
		}
		if !ev.Done {
			s.metrics.token(arrival, &lastToken, ev.Time)
		}
		evs := parser.Feed(ev.Text)
		if ev.Done {
			evs = append(evs, parser.Finish()...)
		}
		for _, pe := range evs {
			calls = calls || pe.Kind == chat.ToolCallStart
		}
		all = append(all, evs...)
		if p.stream {
			out.events(evs)
		}
		if !ev.Done {
			continue
		}
		if ev.Finish == engine.FinishError || ev.Finish == engine.FinishCanceled {
			e := &apiError{Status: http.StatusInternalServerError, Message: fmt.Sprintf("generation failed: %v", ev.Err)}
			if ev.Finish == engine.FinishCanceled {
				e = &apiError{Status: http.StatusServiceUnavailable, Message: "the request was cancelled: the server is shutting down"}
			}
			if p.stream {
				out.send("error", anthropicErrorBody(e))
			} else {
				anthropicError(w, e)
			}
			return
		}
		s.metrics.finished(arrival, ev.Usage)
		stop, seq := anthropicStop(ev.Finish, calls, p.stop, ev)
		if p.stream {
			out.end(stop, seq, ev.Usage.CompletionTokens)
		} else {
			writeJSON(w, http.StatusOK, out.whole(chat.Assemble(all), stop, seq, ev.Usage.CompletionTokens))
		}
		return
	}
}

// anthropicStop is the stop_reason (and stop_sequence) of a finish.
func anthropicStop(f engine.Finish, calls bool, stops []string, ev engine.Event) (string, any) {
	switch {
	case f == engine.FinishMaxTokens || f == engine.FinishContext:
		return "max_tokens", nil
	case calls && f == engine.FinishEOS:
		return "tool_use", nil
	case f == engine.FinishStop:
		// The engine does not say which stop string matched; with one
		// there is no doubt.
		if len(stops) == 1 {
			return "stop_sequence", stops[0]
		}
		return "stop_sequence", nil
	}
	return "end_turn", nil
}

// anthropicOutput writes a Messages response, whole or as events.
type anthropicOutput struct {
	s           *Server
	w           http.ResponseWriter
	rc          *http.ResponseController
	id          string
	stream      bool
	inputTokens int
	// streaming: the open content block
	index int    // of the open block; -1 before the first
	open  string // its type, "" when none is open
	call  int    // the tool call index of an open tool_use block
}

func (o *anthropicOutput) message(content []map[string]any, stop, seq any, outTokens int) map[string]any {
	return map[string]any{"id": o.id, "type": "message", "role": "assistant", "model": o.s.cfg.ModelName, "content": content,
		"stop_reason": stop, "stop_sequence": seq, "usage": map[string]any{"input_tokens": o.inputTokens, "output_tokens": outTokens}}
}

func (o *anthropicOutput) whole(r chat.Result, stop string, seq any, outTokens int) map[string]any {
	content := []map[string]any{}
	if r.Reasoning != "" {
		content = append(content, map[string]any{"type": "thinking", "thinking": r.Reasoning, "signature": ""})
	}
	if r.Content != "" {
		content = append(content, map[string]any{"type": "text", "text": r.Content})
	}
	for _, c := range r.ToolCalls {
		content = append(content, map[string]any{"type": "tool_use", "id": c.ID, "name": c.Name, "input": json.RawMessage(c.Arguments)})
	}
	return o.message(content, stop, seq, outTokens)
}

func (o *anthropicOutput) send(event string, v any) {
	data, err := json.Marshal(v)
	if err != nil {
		return
	}
	fmt.Fprintf(o.w, "event: %s\ndata: %s\n\n", event, data)
	o.rc.Flush()
}

func (o *anthropicOutput) start() {
	o.rc = http.NewResponseController(o.w)
	h := o.w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	o.w.WriteHeader(http.StatusOK)
	o.index = -1
	o.send("message_start", map[string]any{"type": "message_start", "message": o.message([]map[string]any{}, nil, nil, 0)})
}

// block makes sure a block of type typ is open, closing the one before.
func (o *anthropicOutput) block(typ string, start map[string]any) {
	if o.open == typ && typ != "tool_use" {
		return
	}
	o.closeBlock()
	o.index++
	o.open = typ
	o.send("content_block_start", map[string]any{"type": "content_block_start", "index": o.index, "content_block": start})
}

func (o *anthropicOutput) closeBlock() {
	if o.open == "" {
		return
	}
	if o.open == "thinking" {
		o.send("content_block_delta", map[string]any{"type": "content_block_delta", "index": o.index, "delta": map[string]any{"type": "signature_delta", "signature": ""}})
	}
	o.send("content_block_stop", map[string]any{"type": "content_block_stop", "index": o.index})
	o.open = ""
}

// events streams parsed output: reasoning as thinking blocks, content as
// text blocks, each call as a tool_use block with its input in pieces.
func (o *anthropicOutput) events(evs []chat.Event) {
	delta := func(d map[string]any) {
		o.send("content_block_delta", map[string]any{"type": "content_block_delta", "index": o.index, "delta": d})
	}
	for _, pe := range evs {
		switch pe.Kind {
		case chat.ReasoningText:
			o.block("thinking", map[string]any{"type": "thinking", "thinking": "", "signature": ""})
			delta(map[string]any{"type": "thinking_delta", "thinking": pe.Text})
		case chat.ContentText:
			o.block("text", map[string]any{"type": "text", "text": ""})
			delta(map[string]any{"type": "text_delta", "text": pe.Text})
		case chat.ToolCallStart:
			o.block("tool_use", map[string]any{"type": "tool_use", "id": pe.ID, "name": pe.Name, "input": map[string]any{}})
			o.call = pe.Index
		case chat.ToolCallArgs:
			if o.open == "tool_use" && o.call == pe.Index {
				delta(map[string]any{"type": "input_json_delta", "partial_json": pe.Text})
			}
		case chat.ToolCallEnd:
			if o.open == "tool_use" && o.call == pe.Index {
				o.closeBlock()
			}
		}
	}
}

func (o *anthropicOutput) end(stop string, seq any, outTokens int) {
	o.closeBlock()
	o.send("message_delta", map[string]any{"type": "message_delta", "delta": map[string]any{"stop_reason": stop, "stop_sequence": seq},
		"usage": map[string]any{"output_tokens": outTokens}})
	o.send("message_stop", map[string]any{"type": "message_stop"})
}
