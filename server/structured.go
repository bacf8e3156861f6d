package server

import (
	"encoding/json"
	"fmt"
	"net/http"

	"github.com/mmfp4/mmfp4"
	"github.com/mmfp4/mmfp4/chat"
	"github.com/mmfp4/mmfp4/constrain"
)

// forcesCall reports whether tool_choice forces a tool call.
func forcesCall(p *params) bool {
	return p.chat != nil && (p.chat.Choice.Mode == chat.ChoiceRequired || p.chat.Choice.Mode == chat.ChoiceFunction)
}

// forbidsCall reports whether tool_choice "none" rules out the calls of
// tools the prompt lists.
func forbidsCall(p *params) bool {
	return p.chat != nil && p.chat.Choice.Mode == chat.ChoiceNone && len(p.chat.Tools) > 0
}

// grammar returns the grammar that the output of p must follow, or nil
// when it is free: response_format json_object or json_schema, or the
// tool-call format when tool_choice forces a call. With thinking (the
// prompt ends inside <think>) the reasoning runs free and the constraint
// starts after </think>. Grammars are shared through the server's cache.
//
// Under tool_choice "none" the tools stay in the prompt (the model is
// told about them, and a long conversation keeps its cached prefix), so
// the output is constrained never to start a <tool_call>, in the
// reasoning or the answer: the client gets an answer rather than a call
// it did not allow, or a call's tags as text. The parser, given no tools,
// would read any call as text anyway.
func (s *Server) grammar(m *mmfp4.Model, p *params, thinking bool) (*constrain.Grammar, *apiError) {
	noCalls := p.format == "" && forbidsCall(p)
	if p.format == "" && !forcesCall(p) && !noCalls {
		return nil, nil
	}
	param := "response_format"
	if p.format == "json_schema" {
		param = "response_format.json_schema.schema"
	} else if p.format == "" {
		param = "tools"
	}
	tok, err := m.Tokenizer()
	if err != nil {
		return nil, badRequest(param, "constrained output needs the model's tokenizer: %v", err)
	}
	eos := m.EOS()
	if noCalls && p.ignoreEOS {
		// No end ids: the output runs to max_tokens as ignore_eos asks,
		// the end tokens being ordinary special tokens here.
		eos = []int{}
	}
	v, err := constrain.VocabOf(tok, eos)
	if err != nil {
		return nil, &apiError{Status: http.StatusInternalServerError, Message: fmt.Sprintf("the vocabulary for constrained output: %v", err), Type: "server_error"}
	}
	var key struct {
		Vocab    string
		Format   string
		Schema   json.RawMessage `json:",omitempty"`
		Thinking bool
		Tools    []chat.Tool `json:",omitempty"`
		Choice   chat.ToolChoice
		Parallel bool
	}
	key.Vocab, key.Format, key.Schema, key.Thinking = fmt.Sprintf("%p", v), p.format, p.schema, thinking
	opt := constrain.Options{}
	switch {
	case noCalls:
		// The same text for any tools and either way of starting; special
		// tokens (</think> above all) stay allowed as their text.
		key.Format, key.Thinking = "no tool calls", false
		opt.AllowSpecial = true
	case forcesCall(p):
		key.Tools, key.Choice, key.Parallel = p.chat.Tools, p.chat.Choice, p.chat.Parallel
	}
	keyText, err := json.Marshal(key)
	if err != nil {
		return nil, badRequest(param, "%v", err)
	}
	g, err := s.grammars.Get(string(keyText), v, opt, func() (constrain.Expr, error) {
		if noCalls {
			return chat.NoToolCallsExpr(), nil
		}
		var body constrain.Expr
		var err error
		switch p.format {
		case "json_object":
			body, err = constrain.AnyJSON("object", constrain.SchemaOptions{})
		case "json_schema":
			body, err = constrain.JSONSchema(p.schema, constrain.SchemaOptions{})
		default:
			body, err = chat.ToolCallExpr(p.chat.Tools, p.chat.Choice, p.chat.Parallel, constrain.SchemaOptions{})
		}
		if err != nil {
			return nil, err
		}
		return chat.OutputExpr(thinking, body), nil
	})
	if err != nil {
		return nil, badRequest(param, "%s: %v", param, err)
	}
	return g, nil
}
