package chat

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"

	"github.com/mmfp4/mmfp4/constrain"
)

// OutputExpr is the whole output when its answer must be body: with
// thinking (the prompt ends inside <think>), free reasoning up to </think>
// comes first, and the constraint starts after it.
func OutputExpr(thinking bool, body constrain.Expr) constrain.Expr {
	if !thinking {
		return body
	}
	return constrain.Seq(constrain.TextWithout(ThinkClose), constrain.Lit(ThinkClose), constrain.Opt(constrain.Lit("\n")), body)
}

// NoToolCallsExpr is any text without a <tool_call>: compiled with
// constrain.Options{AllowSpecial: true}, it keeps a model from calling
// tools under tool_choice "none" while the tools stay in the prompt.
func NoToolCallsExpr() constrain.Expr { return constrain.TextWithout(CallOpen) }

// ToolCallExpr is the language of the tool calls that tool_choice forces,
// in the GLM-4.7 format: for ChoiceRequired one call of any tool, or one
// or more when parallel; for ChoiceFunction one call of that function.
// Arguments come in the order of the tool's schema, required ones always,
// and their values follow the schema: strings raw (any text without
// </arg_value>; string lengths are not enforced), other values as JSON of
// the schema where the constrain package supports it, and any JSON of the
// declared type where it does not.
func ToolCallExpr(tools []Tool, choice ToolChoice, parallel bool, opt constrain.SchemaOptions) (constrain.Expr, error) {
	var calls []constrain.Expr
	for _, t := range tools {
		if choice.Mode == ChoiceFunction && t.Name != choice.Name {
			continue
		}
		e, err := callExpr(t, opt)
		if err != nil {
			return nil, err
		}
		calls = append(calls, e)
	}
	call := constrain.Alt(calls...)
	switch choice.Mode {
	case ChoiceRequired:
		if parallel {
			return constrain.Seq(call, constrain.Rep(constrain.Seq(constrain.Opt(constrain.Lit("\n")), call), 0, -1)), nil
		}
		return call, nil
	case ChoiceFunction:
		if len(calls) == 0 {
			return nil, fmt.Errorf("tool_choice names function %q, which is not among the tools", choice.Name)
		}
		return call, nil
	}
	return nil, fmt.Errorf("tool_choice %d does not force a call", choice.Mode)
}

// callExpr is one call of t.
func callExpr(t Tool, opt constrain.SchemaOptions) (constrain.Expr, error) {
	parts := []constrain.Expr{constrain.Lit(CallOpen + t.Name)}
	props, err := orderedProperties(t.Parameters)
	if err != nil {
		return nil, fmt.Errorf("tool %s: parameters: %w", t.Name, err)
	}
	for _, p := range props {
		value, err := argValueExpr(t.Parameters, p, opt)
		if err != nil {
			return nil, fmt.Errorf("tool %s: argument %s: %w", t.Name, p.name, err)
		}
		arg := constrain.Seq(constrain.Lit(KeyOpen+p.name+KeyClose+ValueOpen), value, constrain.Lit(ValueClose))
		if !p.required {
			arg = constrain.Opt(arg)
		}
		parts = append(parts, arg)
	}
	parts = append(parts, constrain.Lit(CallClose))
	return constrain.Seq(parts...), nil
}

type property struct {
	name     string
	schema   json.RawMessage
	required bool
}

// orderedProperties lists a parameters schema's properties in the order
// written.
func orderedProperties(params json.RawMessage) ([]property, error) {
	if len(bytes.TrimSpace(params)) == 0 {
		return nil, nil
	}
	var s struct {
		Properties json.RawMessage `json:"properties"`
		Required   []string        `json:"required"`
	}
	if err := json.Unmarshal(params, &s); err != nil {
		return nil, err
	}
	var props []property
	if len(s.Properties) > 0 && string(s.Properties) != "null" {
		dec := json.NewDecoder(bytes.NewReader(s.Properties))
		if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
			return nil, fmt.Errorf("properties must be an object")
		}
		for dec.More() {
			k, err := dec.Token()
			if err != nil {
				return nil, err
			}
			var v json.RawMessage
			if err := dec.Decode(&v); err != nil {
				return nil, err
			}
			props = append(props, property{name: k.(string), schema: v})
		}
	}
	for _, r := range s.Required {
		found := false
		for i := range props {
			if props[i].name == r {
				props[i].required, found = true, true
			}
		}
		if !found {
			props = append(props, property{name: r, schema: json.RawMessage(`{}`), required: true})
		}
	}
	return props, nil
}

// argValueExpr is the text of one argument value.
func argValueExpr(params json.RawMessage, p property, opt constrain.SchemaOptions) (constrain.Expr, error) {
	if StringTyped(p.schema) {
		var s struct {
			Enum  []json.RawMessage `json:"enum"`
			Const json.RawMessage   `json:"const"`
		}
		_ = json.Unmarshal(p.schema, &s)
		values := s.Enum
		if len(s.Const) > 0 {
			values = []json.RawMessage{s.Const}
		}
		var alts []constrain.Expr
		for _, v := range values {
			var str string
			if json.Unmarshal(v, &str) == nil && !strings.Contains(str, ValueClose) {
				alts = append(alts, constrain.Lit(str))
			}
		}
		if len(alts) > 0 {
			return constrain.Alt(alts...), nil
		}
		return constrain.TextWithout(ValueClose), nil
	}
	pointer := "#/properties/" + strings.ReplaceAll(strings.ReplaceAll(p.name, "~", "~0"), "/", "~1")
	e, err := constrain.JSONSchemaAt(params, pointer, opt)
	if err == nil {
		return e, nil
	}
	// Schema parts the compiler does not support: any JSON of the
	// declared type rather than a refused request.
	var typed struct {
		Type string `json:"type"`
	}
	_ = json.Unmarshal(p.schema, &typed)
	switch typed.Type {
	case "null", "boolean", "integer", "number", "array", "object":
	default:
		typed.Type = ""
	}
	return constrain.AnyJSON(typed.Type, opt)
}
