package server

import (
	"encoding/json"
	"errors"
	"net/http"

	"github.com/mmfp4/mmfp4/chat"
	"github.com/mmfp4/mmfp4/tokenizer"
)

// tokenizeRequest is vLLM's: a prompt, or chat messages to render.
type tokenizeRequest struct {
	Model               string              `json:"model"`
	Prompt              *string             `json:"prompt"`
	AddSpecialTokens    *bool               `json:"add_special_tokens"`
	Messages            []tokenizer.Message `json:"messages"`
	Tools               []json.RawMessage   `json:"tools"`
	AddGenerationPrompt *bool               `json:"add_generation_prompt"`
	ChatTemplateKwargs  map[string]any      `json:"chat_template_kwargs"`
}

func (s *Server) tokenize(w http.ResponseWriter, r *http.Request) {
	m, _, aerr := s.ready()
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	body, aerr := s.readBody(w, r)
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	var req tokenizeRequest
	if aerr := decodeJSON(body, &req); aerr != nil {
		writeError(w, aerr)
		return
	}
	if aerr := s.checkModel(req.Model); aerr != nil {
		writeError(w, aerr)
		return
	}
	tok, err := m.Tokenizer()
	if err != nil {
		writeError(w, badRequest("", "%v", err))
		return
	}
	var ids []int
	switch {
	case req.Prompt != nil && req.Messages == nil:
		ids, err = tok.Encode(*req.Prompt, req.AddSpecialTokens == nil || *req.AddSpecialTokens)
	case req.Messages != nil && req.Prompt == nil:
		// The messages are prepared as a chat completion's are, so the
		// count is that of the same request's prompt.
		p, perr := chat.Prepare(chat.Request{Messages: req.Messages, Tools: req.Tools, ChatTemplateKwargs: req.ChatTemplateKwargs})
		var re *chat.RequestError
		switch {
		case errors.As(perr, &re):
			writeError(w, badRequest(re.Param, "%s", re.Msg))
			return
		case perr != nil:
			writeError(w, badRequest("messages", "%v", perr))
			return
		}
		p.Options.AddGenerationPrompt = req.AddGenerationPrompt == nil || *req.AddGenerationPrompt
		var text string
		if text, err = tok.ApplyChatTemplate(p.Messages, p.Options); err == nil {
			ids, err = tok.Encode(text, false)
		}
	default:
		writeError(w, badRequest("prompt", "give exactly one of prompt and messages"))
		return
	}
	if err != nil {
		writeError(w, badRequest("", "%v", err))
		return
	}
	if ids == nil {
		ids = []int{}
	}
	writeJSON(w, http.StatusOK, map[string]any{"count": len(ids), "max_model_len": m.MaxContext(), "tokens": ids})
}

func (s *Server) detokenize(w http.ResponseWriter, r *http.Request) {
	m, _, aerr := s.ready()
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	body, aerr := s.readBody(w, r)
	if aerr != nil {
		writeError(w, aerr)
		return
	}
	var req struct {
		Model  string `json:"model"`
		Tokens []int  `json:"tokens"`
	}
	if aerr := decodeJSON(body, &req); aerr != nil {
		writeError(w, aerr)
		return
	}
	if aerr := s.checkModel(req.Model); aerr != nil {
		writeError(w, aerr)
		return
	}
	tok, err := m.Tokenizer()
	if err != nil {
		writeError(w, badRequest("", "%v", err))
		return
	}
	text, err := tok.Decode(req.Tokens)
	if err != nil {
		writeError(w, badRequest("tokens", "%v", err))
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"prompt": text})
}
