package server

import (
	"context"
	"encoding/json"
	"errors"
	"testing"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/shared"

	"github.com/mmfp4/mmfp4/engine"
)

func weatherTool() openai.ChatCompletionToolUnionParam {
	return openai.ChatCompletionFunctionTool(shared.FunctionDefinitionParam{Name: "get_weather", Parameters: shared.FunctionParameters{
		"type": "object", "properties": map[string]any{"city": map[string]any{"type": "string", "maxLength": 12}, "days": map[string]any{"type": "integer"}},
		"required": []string{"city"}}})
}

// extraString reads a string field the SDK does not know (reasoning).
func extraString(t *testing.T, raw string) string {
	if raw == "" {
		return ""
	}
	var s string
	if err := json.Unmarshal([]byte(raw), &s); err != nil {
		t.Fatalf("extra field %s: %v", raw, err)
	}
	return s
}

// The official SDK reads a replayed tool call with its reasoning, whole and
// streamed (through its accumulator).
func TestSDKToolCallsAndReasoning(t *testing.T) {
	s := startServer(t, Config{}, engine.Options{})
	ctx := context.Background()
	output := "I need the weather.</think>" +
		"<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value><arg_key>days</arg_key><arg_value>3</arg_value></tool_call>"
	s.srv.replay = replayer(t, s, output, engine.FinishEOS, randomMerges(1).split)
	defer func() { s.srv.replay = nil }()
	p := openai.ChatCompletionNewParams{Model: "tiny", Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Weather in Paris?")},
		Tools: []openai.ChatCompletionToolUnionParam{weatherTool()}}
	resp, err := s.client.Chat.Completions.New(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	m := resp.Choices[0].Message
	if resp.Choices[0].FinishReason != "tool_calls" || len(m.ToolCalls) != 1 || m.ToolCalls[0].Function.Name != "get_weather" ||
		m.ToolCalls[0].Function.Arguments != `{"city":"Paris","days":3}` || m.ToolCalls[0].ID == "" || m.Content != "" {
		t.Errorf("whole response %s", resp.RawJSON())
	}
	if r := extraString(t, m.JSON.ExtraFields["reasoning_content"].Raw()); r != "I need the weather." {
		t.Errorf("reasoning_content %q", r)
	}

	st := s.client.Chat.Completions.NewStreaming(ctx, p)
	var acc openai.ChatCompletionAccumulator
	var reasoning string
	finished := 0
	for st.Next() {
		chunk := st.Current()
		acc.AddChunk(chunk)
		for _, ch := range chunk.Choices {
			reasoning += extraString(t, ch.Delta.JSON.ExtraFields["reasoning"].Raw())
		}
		if _, ok := acc.JustFinishedToolCall(); ok {
			finished++
		}
	}
	if err := st.Err(); err != nil {
		t.Fatal(err)
	}
	calls := acc.Choices[0].Message.ToolCalls
	if len(calls) != 1 || calls[0].Function.Name != "get_weather" || calls[0].Function.Arguments != `{"city":"Paris","days":3}` ||
		acc.Choices[0].FinishReason != "tool_calls" || reasoning != "I need the weather." || finished != 1 {
		t.Errorf("streamed: calls %+v, finish %q, reasoning %q, %d finished calls", calls, acc.Choices[0].FinishReason, reasoning, finished)
	}
}

// tool_choice naming a function makes the built-in test model call it,
// with arguments that follow the schema, at any temperature. (The
// arguments are bounded: string lengths are not enforced in calls, and a
// random model's strings run on to max_tokens.)
func TestForcedToolCall(t *testing.T) {
	s := startServer(t, Config{}, engine.Options{})
	forecast := openai.ChatCompletionFunctionTool(shared.FunctionDefinitionParam{Name: "forecast", Parameters: shared.FunctionParameters{
		"type": "object", "properties": map[string]any{"days": map[string]any{"enum": []int{1, 2, 3}}, "metric": map[string]any{"type": "boolean"}},
		"required": []string{"days", "metric"}}})
	for i, temp := range []float64{0, 0.8, 1.3} {
		p := openai.ChatCompletionNewParams{Model: "tiny", Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Weather?")},
			Tools:       []openai.ChatCompletionToolUnionParam{forecast},
			ToolChoice:  openai.ToolChoiceOptionFunctionToolChoice(openai.ChatCompletionNamedToolChoiceFunctionParam{Name: "forecast"}),
			Temperature: openai.Float(temp), Seed: openai.Int(int64(i)), MaxTokens: openai.Int(150)}
		p.SetExtraFields(map[string]any{"chat_template_kwargs": map[string]any{"enable_thinking": false}, "parallel_tool_calls": false})
		resp, err := s.client.Chat.Completions.New(context.Background(), p)
		var apiErr *openai.Error
		if errors.As(err, &apiErr) {
			t.Fatalf("%v: %s", err, apiErr.RawJSON())
		}
		if err != nil {
			t.Fatal(err)
		}
		c := resp.Choices[0]
		if c.FinishReason != "tool_calls" || len(c.Message.ToolCalls) != 1 || c.Message.ToolCalls[0].Function.Name != "forecast" {
			t.Errorf("temperature %g: %s", temp, resp.RawJSON())
			continue
		}
		var args struct {
			Days   *int  `json:"days"`
			Metric *bool `json:"metric"`
		}
		if err := json.Unmarshal([]byte(c.Message.ToolCalls[0].Function.Arguments), &args); err != nil || args.Days == nil || *args.Days < 1 || *args.Days > 3 || args.Metric == nil {
			t.Errorf("temperature %g: arguments %s: %v", temp, c.Message.ToolCalls[0].Function.Arguments, err)
		}
	}
}
