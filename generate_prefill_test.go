package mmfp4

import (
	"context"
	"errors"
	"slices"
	"testing"

	"github.com/mmfp4/mmfp4/engine"
)

// longPrompt is n fixed in-vocabulary ids.
func longPrompt(n int) []int {
	ids := make([]int, n)
	for i := range ids {
		ids[i] = (i*37 + 11) % 480
	}
	return ids
}

// A cancelled context stops a long prefill: no token is produced.
func TestGenerateCancelStopsPrefill(t *testing.T) {
	m, err := Load(fixture, Options{Engine: engine.Options{MaxBatchTokens: 16}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	onToken := func(id int) error {
		t.Errorf("token %d produced after the cancellation", id)
		return nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	res, err := m.Generate(ctx, longPrompt(200), GenerateOptions{OnToken: onToken})
	if !errors.Is(err, context.Canceled) || res == nil || res.StopReason != "canceled" || len(res.Tokens) != 0 {
		t.Errorf("cancelled before the start: err %v, result %+v", err, res)
	}
}

// Chunked prefill gives the same greedy continuation as a single pass.
func TestChunkedPrefillMatchesOnePass(t *testing.T) {
	prompt := longPrompt(75)
	greedy := func(chunk int) []int {
		m, err := Load(fixture, Options{Engine: engine.Options{MaxBatchTokens: chunk}})
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		res, err := m.Generate(context.Background(), prompt, GenerateOptions{MaxTokens: 8, StopIDs: []int{}})
		if err != nil {
			t.Fatal(err)
		}
		return res.Tokens
	}
	one := greedy(1000)
	for _, chunk := range []int{7, 16, 32} {
		if got := greedy(chunk); !slices.Equal(got, one) {
			t.Errorf("chunks of %d gave %v, one pass %v", chunk, got, one)
		}
	}
}

// The prompt and the generated tokens together fit the context: with a
// context of 16, a 15-token prompt gets one token and a 16-token prompt is
// refused.
func TestContextHoldsPromptAndOutput(t *testing.T) {
	m, err := Load(fixture, Options{MaxContext: 16})
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []int{1, 12, 15} {
		res, err := m.Generate(context.Background(), longPrompt(n), GenerateOptions{MaxTokens: 100, StopIDs: []int{}})
		if err != nil {
			t.Fatal(err)
		}
		if res.StopReason != "context" || n+len(res.Tokens) != 16 {
			t.Errorf("%d-token prompt: %d tokens (%s), want %d and a context stop", n, len(res.Tokens), res.StopReason, 16-n)
		}
	}
	if _, err := m.Generate(context.Background(), longPrompt(16), GenerateOptions{}); err == nil {
		t.Error("a 16-token prompt was accepted with a context of 16")
	}
	if _, err := m.Logits(longPrompt(16)); err != nil {
		t.Errorf("logits of 16 tokens with a context of 16: %v", err)
	}
}
