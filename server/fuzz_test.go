package server

import "testing"

// FuzzParseRequest feeds arbitrary bodies to both request decoders: they
// must never panic, every refusal is a 4xx with a message, and what they
// accept is within the limits.
func FuzzParseRequest(f *testing.F) {
	for _, seed := range []string{
		`{"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": true, "stream_options": {"include_usage": true}}`,
		`{"messages": [{"role": "assistant", "content": null, "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}], "n": 2, "stop": ["a", "b"]}`,
		`{"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}], "logprobs": true, "top_logprobs": 3, "chat_template_kwargs": {"enable_thinking": false}}`,
		`{"prompt": "Once", "max_tokens": 3, "temperature": 0.5, "top_p": 0.9, "top_k": 40, "min_p": 0.1, "seed": 7, "logprobs": 2}`,
		`{"prompt": [1, 2, 3], "stop": "x"}`,
		`{"prompt": [[4, 5]]}`,
		`{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}], "tool_choice": "required", "parallel_tool_calls": false}`,
		`{"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "none", "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "integer"}}}}`,
		`{"max_tokens": 4, "system": [{"type": "text", "text": "s"}], "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a", "content": "r"}]}], "tools": [{"name": "f", "input_schema": {}}], "tool_choice": {"type": "tool", "name": "f"}, "thinking": {"type": "enabled"}}`,
		`{"messages": [`, `[]`, `null`, `"x"`, "\xff", `{"max_tokens": 1e400}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		anthropic := func(body []byte, _ int) (*params, *apiError) {
			p, _, err := parseAnthropic(body, true)
			return p, err
		}
		for _, parse := range []func([]byte, int) (*params, *apiError){parseChat, parseCompletion, anthropic} {
			p, err := parse(body, 4)
			if err != nil {
				if err.Status < 400 || err.Status >= 500 || err.Message == "" || err.Type == "" {
					t.Fatalf("refusal %+v", err)
				}
				if p != nil {
					t.Fatal("params with an error")
				}
				continue
			}
			switch {
			case p.n < 1 || p.n > 4:
				t.Fatalf("n = %d accepted", p.n)
			case p.maxTokens < 0:
				t.Fatalf("max_tokens %d accepted", p.maxTokens)
			case p.temperature < 0 || p.temperature > 2 || p.topP <= 0 || p.topP > 1 || p.minP < 0 || p.minP > 1 || p.topK < 0:
				t.Fatalf("sampling %+v accepted", p)
			case p.topLogprobs < 0 || p.topLogprobs > 20:
				t.Fatalf("top_logprobs %d accepted", p.topLogprobs)
			case p.chat == nil && p.prompt == nil:
				t.Fatal("no prompt and no messages accepted")
			}
			for _, st := range p.stop {
				if st == "" {
					t.Fatal("empty stop string accepted")
				}
			}
		}
	})
}
