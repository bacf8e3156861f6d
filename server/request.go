package server

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"strings"
	"unicode/utf8"

	"github.com/mmfp4/mmfp4/chat"
	"github.com/mmfp4/mmfp4/tokenizer"
)

// apiError is an error in the OpenAI shape:
// {"error": {"message", "type", "param", "code"}}.
type apiError struct {
	Status  int     `json:"-"`
	Message string  `json:"message"`
	Type    string  `json:"type"`
	Param   *string `json:"param"`
	Code    *string `json:"code"`
	// RetryAfter, in seconds, is sent as a header with 429 and 503.
	RetryAfter int `json:"-"`
}

func (e *apiError) Error() string { return e.Message }

func strp(s string) *string {
	if s == "" {
		return nil
	}
	return &s
}

// badRequest is a 400 about param.
func badRequest(param, format string, args ...any) *apiError {
	return &apiError{Status: http.StatusBadRequest, Message: fmt.Sprintf(format, args...), Type: "invalid_request_error", Param: strp(param)}
}

// stringList is "stop": a string or a list of strings.
type stringList []string

func (s *stringList) UnmarshalJSON(data []byte) error {
	var one string
	if err := json.Unmarshal(data, &one); err == nil {
		*s = stringList{one}
		return nil
	}
	var many []string
	if err := json.Unmarshal(data, &many); err != nil {
		return errors.New(`"stop": want a string or a list of strings`)
	}
	*s = many
	return nil
}

// promptInput is a completion prompt: a string, a list of token ids, or a
// list holding one of those.
type promptInput struct {
	text  string
	ids   []int
	isIDs bool
}

func (p *promptInput) UnmarshalJSON(data []byte) error {
	if json.Unmarshal(data, &p.text) == nil {
		return nil
	}
	if json.Unmarshal(data, &p.ids) == nil {
		p.isIDs = true
		return nil
	}
	var texts []string
	if json.Unmarshal(data, &texts) == nil && len(texts) == 1 {
		p.text = texts[0]
		return nil
	}
	var idLists [][]int
	if json.Unmarshal(data, &idLists) == nil && len(idLists) == 1 {
		p.ids, p.isIDs = idLists[0], true
		return nil
	}
	return errors.New(`"prompt": want a string or a list of token ids (one prompt per request)`)
}

// samplingFields are the generation parameters both endpoints share.
type samplingFields struct {
	Model               string          `json:"model"`
	MaxTokens           *int            `json:"max_tokens"`
	MaxCompletionTokens *int            `json:"max_completion_tokens"`
	Temperature         *float64        `json:"temperature"`
	TopP                *float64        `json:"top_p"`
	TopK                *int            `json:"top_k"`
	MinP                *float64        `json:"min_p"`
	Seed                *int64          `json:"seed"`
	Stop                stringList      `json:"stop"`
	N                   *int            `json:"n"`
	Stream              bool            `json:"stream"`
	StreamOptions       *streamOptions  `json:"stream_options"`
	PresencePenalty     *float64        `json:"presence_penalty"`
	FrequencyPenalty    *float64        `json:"frequency_penalty"`
	ResponseFormat      *responseFormat `json:"response_format"`
	User                string          `json:"user"`
	// IgnoreEOS (vLLM's extension) generates through EOS tokens, for
	// benchmarks.
	IgnoreEOS bool `json:"ignore_eos"`
}

type streamOptions struct {
	IncludeUsage bool `json:"include_usage"`
}

// responseFormat is "response_format": text, json_object, or json_schema
// with the schema the output must satisfy.
type responseFormat struct {
	Type       string `json:"type"`
	JSONSchema *struct {
		Name   string          `json:"name"`
		Schema json.RawMessage `json:"schema"`
		Strict *bool           `json:"strict"`
	} `json:"json_schema"`
}

// chatRequest is the body of POST /v1/chat/completions.
type chatRequest struct {
	samplingFields
	Messages           []tokenizer.Message `json:"messages"`
	Logprobs           bool                `json:"logprobs"`
	TopLogprobs        *int                `json:"top_logprobs"`
	Tools              []json.RawMessage   `json:"tools"`
	ToolChoice         json.RawMessage     `json:"tool_choice"`
	ParallelToolCalls  *bool               `json:"parallel_tool_calls"`
	ReasoningEffort    string              `json:"reasoning_effort"`
	ChatTemplateKwargs map[string]any      `json:"chat_template_kwargs"`
}

// completionRequest is the body of POST /v1/completions.
type completionRequest struct {
	samplingFields
	Prompt   *promptInput `json:"prompt"`
	Logprobs *int         `json:"logprobs"`
	Echo     bool         `json:"echo"`
	Suffix   string       `json:"suffix"`
}

// params are the checked generation parameters of a request.
type params struct {
	maxTokens     int // 0: until a stop or the context ends
	temperature   float64
	topP, minP    float64
	topK          int
	seed          *int64
	stop          []string
	n             int
	stream, usage bool
	logprobs      bool
	topLogprobs   int
	ignoreEOS     bool
	model         string
	// format is the response_format: "" (text), "json_object" or
	// "json_schema" with schema.
	format string
	schema json.RawMessage
	chat   *chat.Prepared // chat requests
	prompt *promptInput   // completion requests
}

// decodeJSON reads a request body into v, turning every way it can be
// wrong into a 400 that names the problem.
func decodeJSON(body []byte, v any) *apiError {
	if !utf8.Valid(body) {
		return badRequest("", "the request body is not valid UTF-8")
	}
	if len(bytes.TrimSpace(body)) == 0 {
		return badRequest("", "the request body is empty; want a JSON object")
	}
	err := json.Unmarshal(body, v)
	var syn *json.SyntaxError
	var typ *json.UnmarshalTypeError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &syn):
		return badRequest("", "malformed JSON at byte %d: %v", syn.Offset, syn)
	case errors.As(err, &typ):
		if typ.Field == "" {
			return badRequest("", "the request body must be a JSON object, not %s", typ.Value)
		}
		field := strings.TrimPrefix(typ.Field, "samplingFields.")
		return badRequest(field, "field %q: want %s, got JSON %s", field, jsonKind(typ.Type.Kind().String()), typ.Value)
	default:
		// Errors from the fields' own decoders (stop, prompt, content).
		msg := strings.TrimPrefix(err.Error(), "json: ")
		return badRequest("", "invalid request: %s", msg)
	}
}

func jsonKind(goKind string) string {
	switch {
	case strings.HasPrefix(goKind, "int") || strings.HasPrefix(goKind, "uint"):
		return "an integer"
	case strings.HasPrefix(goKind, "float"):
		return "a number"
	case goKind == "string":
		return "a string"
	case goKind == "bool":
		return "a boolean"
	case goKind == "slice":
		return "a list"
	default:
		return "an object"
	}
}

// check validates the shared fields; maxN bounds n.
func (f *samplingFields) check(maxN int) (*params, *apiError) {
	p := &params{n: 1, temperature: 1, topP: 1, model: f.Model, stream: f.Stream, seed: f.Seed, ignoreEOS: f.IgnoreEOS}
	mt := f.MaxTokens
	name := "max_tokens"
	if f.MaxCompletionTokens != nil {
		mt, name = f.MaxCompletionTokens, "max_completion_tokens"
	}
	if mt != nil {
		if *mt <= 0 {
			return nil, badRequest(name, "%s must be at least 1, got %d", name, *mt)
		}
		p.maxTokens = *mt
	}
	finite := func(v *float64, name string, lo, hi float64) *apiError {
		if v != nil && (math.IsNaN(*v) || *v < lo || *v > hi) {
			return badRequest(name, "%s must be in [%g, %g], got %g", name, lo, hi, *v)
		}
		return nil
	}
	for _, c := range []struct {
		v      *float64
		name   string
		lo, hi float64
		dst    *float64
	}{
		{f.Temperature, "temperature", 0, 2, &p.temperature},
		{f.TopP, "top_p", 0, 1, &p.topP},
		{f.MinP, "min_p", 0, 1, &p.minP},
	} {
		if err := finite(c.v, c.name, c.lo, c.hi); err != nil {
			return nil, err
		}
		if c.v != nil {
			*c.dst = *c.v
		}
	}
	if f.TopP != nil && *f.TopP == 0 {
		return nil, badRequest("top_p", "top_p must be greater than 0")
	}
	if f.TopK != nil {
		if *f.TopK < -1 {
			return nil, badRequest("top_k", "top_k must be -1 (off), 0 (off) or positive, got %d", *f.TopK)
		}
		p.topK = max(*f.TopK, 0)
	}
	for _, pen := range []struct {
		v    *float64
		name string
	}{{f.PresencePenalty, "presence_penalty"}, {f.FrequencyPenalty, "frequency_penalty"}} {
		if pen.v != nil && *pen.v != 0 {
			return nil, badRequest(pen.name, "%s is not supported by this server (only 0)", pen.name)
		}
	}
	if rf := f.ResponseFormat; rf != nil {
		switch rf.Type {
		case "", "text":
		case "json_object":
			p.format = rf.Type
		case "json_schema":
			if rf.JSONSchema == nil || len(bytes.TrimSpace(rf.JSONSchema.Schema)) == 0 || string(bytes.TrimSpace(rf.JSONSchema.Schema)) == "null" {
				return nil, badRequest("response_format.json_schema.schema", `response_format "json_schema" needs json_schema.schema`)
			}
			p.format, p.schema = rf.Type, rf.JSONSchema.Schema
		default:
			return nil, badRequest("response_format.type", `response_format.type must be "text", "json_object" or "json_schema", got %q`, rf.Type)
		}
	}
	if f.N != nil {
		if *f.N < 1 || *f.N > maxN {
			return nil, badRequest("n", "n must be in [1, %d], got %d", maxN, *f.N)
		}
		p.n = *f.N
	}
	if len(f.Stop) > 16 {
		return nil, badRequest("stop", "at most 16 stop strings, got %d", len(f.Stop))
	}
	for _, s := range f.Stop {
		if s == "" {
			return nil, badRequest("stop", "stop strings must not be empty")
		}
	}
	p.stop = f.Stop
	if f.StreamOptions != nil {
		if !f.Stream {
			return nil, badRequest("stream_options", "stream_options is only allowed with stream: true")
		}
		p.usage = f.StreamOptions.IncludeUsage
	}
	return p, nil
}

// parseChat decodes and checks a chat completion request.
func parseChat(body []byte, maxN int) (*params, *apiError) {
	var req chatRequest
	if err := decodeJSON(body, &req); err != nil {
		return nil, err
	}
	p, err := req.check(maxN)
	if err != nil {
		return nil, err
	}
	prep, perr := chat.Prepare(chat.Request{Messages: req.Messages, Tools: req.Tools, ToolChoice: req.ToolChoice,
		ParallelToolCalls: req.ParallelToolCalls, ChatTemplateKwargs: req.ChatTemplateKwargs, ReasoningEffort: req.ReasoningEffort})
	var re *chat.RequestError
	switch {
	case errors.As(perr, &re):
		return nil, badRequest(re.Param, "%s", re.Msg)
	case perr != nil:
		return nil, badRequest("", "%v", perr)
	}
	if p.format != "" && prep.Choice.Mode >= chat.ChoiceRequired {
		return nil, badRequest("response_format", "response_format %q cannot be combined with tool_choice forcing a call", p.format)
	}
	p.chat = prep
	p.logprobs = req.Logprobs
	if req.TopLogprobs != nil {
		if *req.TopLogprobs < 0 || *req.TopLogprobs > 20 {
			return nil, badRequest("top_logprobs", "top_logprobs must be in [0, 20], got %d", *req.TopLogprobs)
		}
		if !req.Logprobs && *req.TopLogprobs > 0 {
			return nil, badRequest("top_logprobs", "top_logprobs needs logprobs: true")
		}
		p.topLogprobs = *req.TopLogprobs
	}
	return p, nil
}

// parseCompletion decodes and checks a completion request.
func parseCompletion(body []byte, maxN int) (*params, *apiError) {
	var req completionRequest
	if err := decodeJSON(body, &req); err != nil {
		return nil, err
	}
	p, err := req.check(maxN)
	if err != nil {
		return nil, err
	}
	switch {
	case req.Prompt == nil:
		return nil, badRequest("prompt", "prompt is required")
	case req.Prompt.isIDs && len(req.Prompt.ids) == 0, !req.Prompt.isIDs && req.Prompt.text == "":
		return nil, badRequest("prompt", "prompt must not be empty")
	case req.Echo:
		return nil, badRequest("echo", "echo is not supported by this server")
	case req.Suffix != "":
		return nil, badRequest("suffix", "suffix is not supported by this server")
	}
	p.prompt = req.Prompt
	if req.Logprobs != nil {
		if *req.Logprobs < 0 || *req.Logprobs > 20 {
			return nil, badRequest("logprobs", "logprobs must be in [0, 20], got %d", *req.Logprobs)
		}
		p.logprobs, p.topLogprobs = true, *req.Logprobs
	}
	return p, nil
}
