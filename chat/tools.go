package chat

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
)

// Tool is a function the model may call.
type Tool struct {
	Name string
	// Parameters is the JSON schema of the arguments object (may be nil:
	// no arguments).
	Parameters json.RawMessage
}

// ParseTools reads OpenAI-style tools, {"type": "function", "function":
// {"name", "description", "parameters"}}. Errors name the field.
func ParseTools(raw []json.RawMessage) ([]Tool, error) {
	var tools []Tool
	seen := map[string]bool{}
	for i, r := range raw {
		var t struct {
			Type     string `json:"type"`
			Function *struct {
				Name       string          `json:"name"`
				Parameters json.RawMessage `json:"parameters"`
			} `json:"function"`
		}
		if err := json.Unmarshal(r, &t); err != nil {
			return nil, &RequestError{Param: fmt.Sprintf("tools[%d]", i), Msg: fmt.Sprintf("tools[%d]: %v", i, err)}
		}
		if t.Type != "function" {
			return nil, &RequestError{Param: fmt.Sprintf("tools[%d].type", i), Msg: fmt.Sprintf("tools[%d].type must be \"function\", got %q", i, t.Type)}
		}
		param := fmt.Sprintf("tools[%d].function", i)
		if t.Function == nil {
			return nil, &RequestError{Param: param, Msg: param + " is missing"}
		}
		f := t.Function
		if !validName(f.Name, false) || len(f.Name) > 64 {
			return nil, &RequestError{Param: param + ".name", Msg: fmt.Sprintf("%s.name %q must be 1 to 64 letters, digits, '_', '-', '.' or ':'", param, f.Name)}
		}
		if seen[f.Name] {
			return nil, &RequestError{Param: param + ".name", Msg: fmt.Sprintf("%s.name: tool %q is listed twice", param, f.Name)}
		}
		seen[f.Name] = true
		if p := bytes.TrimSpace(f.Parameters); len(p) > 0 && !bytes.Equal(p, []byte("null")) {
			var obj map[string]json.RawMessage
			if err := json.Unmarshal(p, &obj); err != nil {
				return nil, &RequestError{Param: param + ".parameters", Msg: fmt.Sprintf("%s.parameters must be a JSON schema object", param)}
			}
		} else {
			f.Parameters = nil
		}
		tools = append(tools, Tool{Name: f.Name, Parameters: f.Parameters})
	}
	return tools, nil
}

// stringArgs says, for each argument of the tool's schema, whether its
// value is a string: such values are written raw in the call text.
func (t Tool) stringArgs() map[string]bool {
	var s struct {
		Properties map[string]json.RawMessage `json:"properties"`
	}
	out := map[string]bool{}
	if json.Unmarshal(t.Parameters, &s) != nil {
		return out
	}
	for k, v := range s.Properties {
		out[k] = StringTyped(v)
	}
	return out
}

// StringTyped reports whether a schema only allows strings (null aside):
// "type": "string" (or ["string", "null"]), a string enum or const, or an
// anyOf/oneOf of such. The chat template writes these values raw, and all
// others as JSON.
func StringTyped(schema json.RawMessage) bool {
	var s struct {
		Type  json.RawMessage   `json:"type"`
		Enum  []json.RawMessage `json:"enum"`
		Const json.RawMessage   `json:"const"`
		AnyOf []json.RawMessage `json:"anyOf"`
		OneOf []json.RawMessage `json:"oneOf"`
	}
	if json.Unmarshal(schema, &s) != nil {
		return false
	}
	if len(s.Type) > 0 {
		var one string
		if json.Unmarshal(s.Type, &one) == nil {
			return one == "string"
		}
		var many []string
		if json.Unmarshal(s.Type, &many) != nil {
			return false
		}
		str := false
		for _, t := range many {
			switch t {
			case "string":
				str = true
			case "null":
			default:
				return false
			}
		}
		return str
	}
	isString := func(v json.RawMessage) bool {
		return strings.HasPrefix(string(bytes.TrimSpace(v)), `"`)
	}
	isNull := func(v json.RawMessage) bool { return string(bytes.TrimSpace(v)) == "null" }
	if len(s.Const) > 0 {
		return isString(s.Const)
	}
	if len(s.Enum) > 0 {
		str := false
		for _, v := range s.Enum {
			switch {
			case isString(v):
				str = true
			case isNull(v):
			default:
				return false
			}
		}
		return str
	}
	branches := append(s.AnyOf, s.OneOf...)
	if len(branches) == 0 {
		return false
	}
	str := false
	for _, b := range branches {
		var t struct {
			Type string `json:"type"`
		}
		switch {
		case StringTyped(b):
			str = true
		case json.Unmarshal(b, &t) == nil && t.Type == "null":
		default:
			return false
		}
	}
	return str
}
