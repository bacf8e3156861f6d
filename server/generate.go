package server

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/mmfp4/mmfp4"
	"github.com/mmfp4/mmfp4/chat"
	"github.com/mmfp4/mmfp4/engine"
	"github.com/mmfp4/mmfp4/sample"
)

// endpoint is what differs between chat and text completions.
type endpoint struct {
	chat bool
}

func (s *Server) chat(w http.ResponseWriter, r *http.Request) {
	s.generate(w, r, endpoint{chat: true})
}

func (s *Server) completions(w http.ResponseWriter, r *http.Request) {
	s.generate(w, r, endpoint{})
}

// choiceEvent is an engine event of choice index.
type choiceEvent struct {
	index int
	ev    engine.Event
}

// choiceState accumulates one choice.
type choiceState struct {
	text      string
	parser    *chat.Parser // chat: reads reasoning, content and tool calls
	parsed    []chat.Event // all of parser's events, for the whole response
	fresh     []chat.Event // parser's events of the latest engine event
	calls     bool         // a tool call was made
	finish    string
	usage     engine.Usage
	logprobs  []tokenLogprob
	lastToken time.Time
}

type tokenLogprob struct {
	id      int
	logprob float32
	top     []engine.TokenLogprob
}

func finishReason(f engine.Finish, calls bool) string {
	switch {
	case f == engine.FinishMaxTokens, f == engine.FinishContext:
		return "length"
	case calls && f == engine.FinishEOS:
		return "tool_calls"
	default:
		return "stop"
	}
}

// eventSource is a request's stream of engine events.
type eventSource interface {
	Recv(ctx context.Context) (engine.Event, error)
}

// replayed is a stream of given events (tests).
type replayed struct{ events []engine.Event }

func (r *replayed) Recv(ctx context.Context) (engine.Event, error) {
	if len(r.events) == 0 {
		return engine.Event{}, io.EOF
	}
	ev := r.events[0]
	r.events = r.events[1:]
	return ev, nil
}

func (s *Server) generate(w http.ResponseWriter, r *http.Request, ep endpoint) {
	arrival := time.Now()
	m, eng, aerr := s.ready()
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	body, aerr := s.readBody(w, r)
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	var p *params
	if ep.chat {
		p, aerr = parseChat(body, s.cfg.MaxN)
	} else {
		p, aerr = parseCompletion(body, s.cfg.MaxN)
	}
	if aerr == nil {
		aerr = s.checkModel(p.model)
	}
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	prompt, promptText, aerr := s.promptIDs(m, p, ep)
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	if s.drain.Load() {
		writeError(w, &apiError{Status: http.StatusServiceUnavailable, Message: "the server is shutting down", Type: "service_unavailable"})
		return
	}

	thinking := ep.chat && chat.EndsInThinking(promptText)
	g, aerr := s.grammar(m, p, thinking)
	if aerr != nil {
		writeError(w, aerr)
		return
	}

	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	streams := make([]eventSource, p.n)
	for i := range streams {
		// Chat output keeps its special tokens: the parser reads the tags.
		req := engine.Request{Prompt: prompt, MaxTokens: p.maxTokens, Stop: p.stop, Text: hasTokenizer(m), SkipSpecial: !ep.chat,
			Logprobs: p.logprobs, TopLogprobs: p.topLogprobs,
			Sampling: sample.Options{Temperature: float32(p.temperature), TopK: p.topK, TopP: float32(p.topP), MinP: float32(p.minP), Seed: seedFor(p.seed, i)}}
		if p.ignoreEOS && (g == nil || p.format == "" && forbidsCall(p)) {
			// (A constrained output ends where its grammar says; the one
			// of tool_choice "none" is any text, so it may run on.)
			req.StopIDs = []int{}
		}
		if g != nil {
			req.Constraint = g.Start()
		}
		if s.replay != nil {
			streams[i] = &replayed{s.replay(req)}
			continue
		}
		st, err := eng.Submit(ctx, req)
		if err != nil {
			writeError(w, submitError(err, ep))
			return // the deferred cancel ends the choices already submitted
		}
		streams[i] = st
	}
	events := make(chan choiceEvent)
	for i, st := range streams {
		go func() {
			for {
				ev, err := st.Recv(ctx)
				if err != nil {
					return
				}
				select {
				case events <- choiceEvent{i, ev}:
				case <-ctx.Done():
					return
				}
			}
		}()
	}
	out := &response{s: s, m: m, ep: ep, p: p, id: newID(map[bool]string{true: "chatcmpl-", false: "cmpl-"}[ep.chat]),
		created: time.Now().Unix(), fingerprint: s.fingerprint(eng), choices: make([]choiceState, p.n)}
	if ep.chat {
		for i := range out.choices {
			out.choices[i].parser = chat.NewParser(p.chat.ParserOptions(promptText))
		}
	}
	if p.stream {
		out.startStream(w)
	}
	for done := 0; done < p.n; {
		var ce choiceEvent
		select {
		case ce = <-events:
		case <-ctx.Done():
			return // the client went away; the engine frees the sequences
		}
		c := &out.choices[ce.index]
		ev := ce.ev
		if !ev.Done {
			s.metrics.token(arrival, &c.lastToken, ev.Time)
			if p.logprobs {
				c.logprobs = append(c.logprobs, tokenLogprob{ev.Token, ev.Logprob, ev.TopLogprobs})
			}
		}
		c.text += ev.Text
		if c.parser != nil {
			c.fresh = c.parser.Feed(ev.Text)
			if ev.Done {
				c.fresh = append(c.fresh, c.parser.Finish()...)
			}
			for _, pe := range c.fresh {
				c.calls = c.calls || pe.Kind == chat.ToolCallStart
			}
			c.parsed = append(c.parsed, c.fresh...)
		}
		if ev.Done {
			done++
			if ev.Finish == engine.FinishError || ev.Finish == engine.FinishCanceled {
				e := &apiError{Status: http.StatusInternalServerError, Message: fmt.Sprintf("generation failed: %v", ev.Err), Type: "server_error"}
				if ev.Finish == engine.FinishCanceled {
					e = &apiError{Status: http.StatusServiceUnavailable, Message: "the request was cancelled: the server is shutting down", Type: "service_unavailable"}
				}
				out.fail(w, e)
				return
			}
			c.finish, c.usage = finishReason(ev.Finish, c.calls), ev.Usage
			s.metrics.finished(arrival, ev.Usage)
		}
		if p.stream {
			if err := out.streamEvent(w, ce.index, ev); err != nil {
				return
			}
		}
	}
	if p.stream {
		out.endStream(w)
	} else {
		writeJSON(w, http.StatusOK, out.full())
	}
}

// seedFor gives choice i its seed: the request's seed plus i, or a random
// one.
func seedFor(seed *int64, i int) uint64 {
	if seed != nil {
		return uint64(*seed) + uint64(i)
	}
	var b [8]byte
	rand.Read(b[:])
	return binary.LittleEndian.Uint64(b[:])
}

// promptIDs renders and encodes the prompt; for chat it also returns the
// rendered text, which tells how the output starts (inside <think> or not).
func (s *Server) promptIDs(m *mmfp4.Model, p *params, ep endpoint) ([]int, string, *apiError) {
	if ep.chat {
		tok, err := m.Tokenizer()
		if err != nil || !tok.HasChatTemplate() {
			return nil, "", badRequest("messages", "this model has no chat template; use /v1/completions")
		}
		opt := p.chat.Options
		opt.AddGenerationPrompt = true
		text, err := tok.ApplyChatTemplate(p.chat.Messages, opt)
		if err != nil {
			return nil, "", badRequest("messages", "rendering the chat template: %v", err)
		}
		ids, err := tok.Encode(text, false)
		if err != nil {
			return nil, "", badRequest("messages", "encoding the rendered chat: %v", err)
		}
		return ids, text, nil
	}
	if p.prompt.isIDs {
		return p.prompt.ids, "", nil
	}
	ids, err := m.EncodeText(p.prompt.text)
	if err != nil {
		return nil, "", badRequest("prompt", "encoding the prompt: %v", err)
	}
	return ids, "", nil
}

// submitError maps the engine's refusals to HTTP.
func submitError(err error, ep endpoint) *apiError {
	var re *engine.RequestError
	switch {
	case errors.As(err, &re):
		param := "prompt"
		if ep.chat {
			param = "messages"
		}
		return badRequest(param, "%s", re.Msg)
	case errors.Is(err, engine.ErrQueueFull):
		return &apiError{Status: http.StatusTooManyRequests, Message: "too many requests are waiting; retry later", Type: "rate_limit_error",
			Code: strp("rate_limit_exceeded"), RetryAfter: 1}
	case errors.Is(err, engine.ErrClosed):
		return &apiError{Status: http.StatusServiceUnavailable, Message: "the server is shutting down", Type: "service_unavailable"}
	default:
		return &apiError{Status: http.StatusInternalServerError, Message: err.Error(), Type: "server_error"}
	}
}

// response builds the JSON of one request, streamed or whole.
type response struct {
	s           *Server
	m           *mmfp4.Model
	ep          endpoint
	p           *params
	id          string
	created     int64
	fingerprint string
	choices     []choiceState
	streaming   bool
	rc          *http.ResponseController
}

func (o *response) object() string {
	switch {
	case o.ep.chat && o.streaming:
		return "chat.completion.chunk"
	case o.ep.chat:
		return "chat.completion"
	default:
		return "text_completion"
	}
}

func (o *response) envelope(choices []map[string]any) map[string]any {
	return map[string]any{"id": o.id, "object": o.object(), "created": o.created, "model": o.s.cfg.ModelName,
		"system_fingerprint": o.fingerprint, "choices": choices}
}

func (o *response) usage() map[string]any {
	var u engine.Usage
	for i, c := range o.choices {
		if i == 0 {
			u.PromptTokens, u.CachedTokens = c.usage.PromptTokens, c.usage.CachedTokens
		}
		u.CompletionTokens += c.usage.CompletionTokens
	}
	return map[string]any{"prompt_tokens": u.PromptTokens, "completion_tokens": u.CompletionTokens,
		"total_tokens":          u.PromptTokens + u.CompletionTokens,
		"prompt_tokens_details": map[string]any{"cached_tokens": u.CachedTokens}}
}

func (o *response) tokenText(id int) string {
	tok, err := o.m.Tokenizer()
	if err != nil || id >= tok.VocabSize() {
		return fmt.Sprintf("token_id:%d", id)
	}
	t, err := tok.Decode([]int{id})
	if err != nil {
		return fmt.Sprintf("token_id:%d", id)
	}
	return t
}

// logprobsJSON renders logprobs in the chat or the legacy completion form.
func (o *response) logprobsJSON(lps []tokenLogprob) any {
	if !o.p.logprobs {
		return nil
	}
	if o.ep.chat {
		content := []map[string]any{}
		for _, lp := range lps {
			top := []map[string]any{}
			for _, t := range lp.top {
				s := o.tokenText(t.ID)
				top = append(top, map[string]any{"token": s, "logprob": t.Logprob, "bytes": bytesOf(s)})
			}
			s := o.tokenText(lp.id)
			content = append(content, map[string]any{"token": s, "logprob": lp.logprob, "bytes": bytesOf(s), "top_logprobs": top})
		}
		return map[string]any{"content": content}
	}
	var tokens []string
	var tokenLPs []float32
	var tops []map[string]float32
	var offsets []int
	off := 0
	for _, lp := range lps {
		s := o.tokenText(lp.id)
		tokens = append(tokens, s)
		tokenLPs = append(tokenLPs, lp.logprob)
		top := map[string]float32{}
		for _, t := range lp.top {
			top[o.tokenText(t.ID)] = t.Logprob
		}
		tops = append(tops, top)
		offsets = append(offsets, off)
		off += len(s)
	}
	return map[string]any{"tokens": tokens, "token_logprobs": tokenLPs, "top_logprobs": tops, "text_offset": offsets}
}

// bytesOf lists a string's bytes as JSON numbers (a []byte would be
// base64).
func bytesOf(s string) []int {
	out := make([]int, len(s))
	for i := range len(s) {
		out[i] = int(s[i])
	}
	return out
}

// full is the non-streaming response.
func (o *response) full() map[string]any {
	var choices []map[string]any
	for i, c := range o.choices {
		ch := map[string]any{"index": i, "finish_reason": c.finish, "logprobs": o.logprobsJSON(c.logprobs)}
		if o.ep.chat {
			ch["message"] = chatMessage(chat.Assemble(c.parsed))
		} else {
			ch["text"] = c.text
		}
		choices = append(choices, ch)
	}
	env := o.envelope(choices)
	env["usage"] = o.usage()
	return env
}

func (o *response) startStream(w http.ResponseWriter) {
	o.streaming = true
	o.rc = http.NewResponseController(w)
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	if o.ep.chat {
		for i := range o.choices {
			o.send(w, o.envelope([]map[string]any{{"index": i, "delta": map[string]any{"role": "assistant", "content": ""}, "logprobs": nil, "finish_reason": nil}}))
		}
	}
}

// streamEvent sends one event of choice i as a chunk.
func (o *response) streamEvent(w http.ResponseWriter, i int, ev engine.Event) error {
	c := &o.choices[i]
	var lps []tokenLogprob
	if !ev.Done && o.p.logprobs {
		lps = c.logprobs[len(c.logprobs)-1:]
	}
	if o.ep.chat {
		return o.streamChat(w, i, ev, lps)
	}
	if ev.Text == "" && !ev.Done && lps == nil {
		return nil // a token with no text yet (part of a character or stop string)
	}
	ch := map[string]any{"index": i, "logprobs": nil, "finish_reason": nil, "text": ev.Text}
	if lps != nil {
		ch["logprobs"] = o.logprobsJSON(lps)
	}
	if ev.Done {
		ch["finish_reason"] = c.finish
	}
	return o.send(w, o.envelope([]map[string]any{ch}))
}

// streamChat sends the parsed output of choice i's latest engine event:
// a chunk per piece of reasoning, content or tool call, then one with the
// finish reason at the end. Logprobs ride on the first chunk of a token.
func (o *response) streamChat(w http.ResponseWriter, i int, ev engine.Event, lps []tokenLogprob) error {
	c := &o.choices[i]
	var deltas []map[string]any
	for _, pe := range c.fresh {
		if d := chatDelta(pe); d != nil {
			deltas = append(deltas, d)
		}
	}
	if len(deltas) == 0 && lps != nil {
		deltas = append(deltas, map[string]any{})
	}
	if ev.Done {
		deltas = append(deltas, nil)
	}
	for k, d := range deltas {
		ch := map[string]any{"index": i, "logprobs": nil, "finish_reason": nil, "delta": d}
		if d == nil {
			ch["delta"] = map[string]any{}
			ch["finish_reason"] = c.finish
		}
		if k == 0 && lps != nil {
			ch["logprobs"] = o.logprobsJSON(lps)
		}
		if err := o.send(w, o.envelope([]map[string]any{ch})); err != nil {
			return err
		}
	}
	return nil
}

// chatDelta is the streamed delta of one parser event, or nil for none.
// Reasoning goes out under both names clients read: reasoning_content
// and reasoning.
func chatDelta(pe chat.Event) map[string]any {
	switch pe.Kind {
	case chat.ReasoningText:
		return map[string]any{"reasoning_content": pe.Text, "reasoning": pe.Text}
	case chat.ContentText:
		return map[string]any{"content": pe.Text}
	case chat.ToolCallStart:
		return map[string]any{"tool_calls": []map[string]any{{"index": pe.Index, "id": pe.ID, "type": "function",
			"function": map[string]any{"name": pe.Name, "arguments": ""}}}}
	case chat.ToolCallArgs:
		return map[string]any{"tool_calls": []map[string]any{{"index": pe.Index, "function": map[string]any{"arguments": pe.Text}}}}
	}
	return nil
}

// chatMessage is the whole response's message: content is null when the
// answer is only tool calls.
func chatMessage(r chat.Result) map[string]any {
	msg := map[string]any{"role": "assistant", "content": r.Content}
	if r.Reasoning != "" {
		msg["reasoning_content"], msg["reasoning"] = r.Reasoning, r.Reasoning
	}
	if len(r.ToolCalls) > 0 {
		if r.Content == "" {
			msg["content"] = nil
		}
		calls := make([]map[string]any, len(r.ToolCalls))
		for i, tc := range r.ToolCalls {
			calls[i] = map[string]any{"id": tc.ID, "type": "function", "function": map[string]any{"name": tc.Name, "arguments": tc.Arguments}}
		}
		msg["tool_calls"] = calls
	}
	return msg
}

func (o *response) endStream(w http.ResponseWriter) {
	if o.p.usage {
		env := o.envelope([]map[string]any{})
		env["usage"] = o.usage()
		o.send(w, env)
	}
	fmt.Fprint(w, "data: [DONE]\n\n")
	o.rc.Flush()
}

// fail reports an error: as the response before streaming starts, as an
// SSE error event after.
func (o *response) fail(w http.ResponseWriter, e *apiError) {
	if !o.streaming {
		writeError(w, e)
		return
	}
	o.send(w, map[string]*apiError{"error": e})
	fmt.Fprint(w, "data: [DONE]\n\n")
	o.rc.Flush()
}

func (o *response) send(w http.ResponseWriter, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if _, err := fmt.Fprintf(w, "data: %s\n\n", data); err != nil {
		return err
	}
	return o.rc.Flush()
}

// hasTokenizer tells whether the model's tokenizer loads, so that results
// can carry text.
func hasTokenizer(m *mmfp4.Model) bool {
	_, err := m.Tokenizer()
	return err == nil
}
