package chat

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
)

// ParseFile reads a chat file, the input of `mmfp4 chat-template
// --messages` and `mmfp4 generate --chat`: a JSON array of messages, or an
// object with "messages", optionally "tools", and other keys that are
// template variables (chat_template_kwargs, such as enable_thinking). The
// messages are checked and prepared by Prepare, as a server request's are,
// so a file renders as the same request would.
func ParseFile(data []byte) (*Prepared, error) {
	var r Request
	trimmed := bytes.TrimSpace(data)
	if len(trimmed) > 0 && trimmed[0] == '[' {
		if err := json.Unmarshal(trimmed, &r.Messages); err != nil {
			return nil, fmt.Errorf("bad messages: %w", err)
		}
		return Prepare(r)
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(trimmed, &obj); err != nil {
		return nil, fmt.Errorf("want a JSON array of messages or an object with \"messages\": %w", err)
	}
	raw, ok := obj["messages"]
	if !ok {
		return nil, errors.New("the object has no \"messages\"")
	}
	if err := json.Unmarshal(raw, &r.Messages); err != nil {
		return nil, fmt.Errorf("bad messages: %w", err)
	}
	for k, v := range obj {
		switch k {
		case "messages":
		case "tools":
			if err := json.Unmarshal(v, &r.Tools); err != nil {
				return nil, fmt.Errorf("tools: want a list: %w", err)
			}
		case "add_generation_prompt":
			return nil, errors.New(`the "add_generation_prompt" key is not read from the file: chat-template takes --add-generation-prompt, and generate always adds it`)
		default:
			if r.ChatTemplateKwargs == nil {
				r.ChatTemplateKwargs = map[string]any{}
			}
			// Booleans as such, so that Prepare can check enable_thinking;
			// anything else as written (objects keep their key order).
			var b bool
			if json.Unmarshal(v, &b) == nil {
				r.ChatTemplateKwargs[k] = b
			} else {
				r.ChatTemplateKwargs[k] = v
			}
		}
	}
	return Prepare(r)
}
