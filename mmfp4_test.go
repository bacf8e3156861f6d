package mmfp4

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/sample"
	"github.com/mmfp4/mmfp4/tokenizer"
)

const fixture = "testdata/glm4moelite-tiny"

var prompt = []int{248, 475, 240, 439, 34, 19, 502, 29, 502, 22, 169, 295}

func TestGenerateStopsOnEOS(t *testing.T) {
	m, err := Load(fixture, Options{})
	if err != nil {
		t.Fatal(err)
	}
	// The third greedy token (340) is declared a stop token.
	res, err := m.Generate(context.Background(), prompt, GenerateOptions{MaxTokens: 10, StopIDs: []int{340}})
	if err != nil {
		t.Fatal(err)
	}
	if res.StopReason != "eos" || len(res.Tokens) != 2 {
		t.Errorf("got %v (%s), want 2 tokens and an eos stop", res.Tokens, res.StopReason)
	}
}

func TestGenerateSeededSamplingIsReproducible(t *testing.T) {
	m, err := Load(fixture, Options{})
	if err != nil {
		t.Fatal(err)
	}
	run := func(seed uint64) []int {
		res, err := m.Generate(context.Background(), prompt, GenerateOptions{MaxTokens: 12, StopIDs: []int{},
			Sampling: sample.Options{Temperature: 1.5, TopK: 50, Seed: seed}})
		if err != nil {
			t.Fatal(err)
		}
		return res.Tokens
	}
	a, b, c := run(7), run(7), run(8)
	if len(a) != 12 || !slices.Equal(a, b) {
		t.Errorf("same seed gave %v and %v", a, b)
	}
	if slices.Equal(a, c) {
		t.Errorf("seeds 7 and 8 gave the same tokens %v", a)
	}
}

func TestGenerateContextFullAndCancel(t *testing.T) {
	m, err := Load(fixture, Options{MaxContext: 16})
	if err != nil {
		t.Fatal(err)
	}
	res, err := m.Generate(context.Background(), prompt, GenerateOptions{StopIDs: []int{}})
	if err != nil {
		t.Fatal(err)
	}
	if res.StopReason != "context" || len(prompt)+len(res.Tokens) != 16 {
		t.Errorf("got %d tokens (%s) after a %d-token prompt with context 16", len(res.Tokens), res.StopReason, len(prompt))
	}
	if _, err := m.Generate(context.Background(), make([]int, 16), GenerateOptions{}); err == nil {
		t.Error("a prompt filling the whole context was accepted")
	}
	ctx, cancel := context.WithCancel(context.Background())
	res, err = m.Generate(ctx, prompt, GenerateOptions{StopIDs: []int{}, OnToken: func(int) error { cancel(); return nil }})
	if !errors.Is(err, context.Canceled) || len(res.Tokens) != 1 {
		t.Errorf("cancel: err %v, %d tokens", err, len(res.Tokens))
	}
	if _, err := m.Generate(context.Background(), []int{1, 99999}, GenerateOptions{}); err == nil {
		t.Error("an out-of-vocabulary id was accepted")
	}
}

// One Model serves several sequences at once (run with -race).
func TestConcurrentGenerate(t *testing.T) {
	m, err := Load(fixture, Options{DebugNaN: true})
	if err != nil {
		t.Fatal(err)
	}
	want, err := m.Generate(context.Background(), prompt, GenerateOptions{MaxTokens: 6, StopIDs: []int{}})
	if err != nil {
		t.Fatal(err)
	}
	errs := make(chan error, 4)
	for i := 0; i < 4; i++ {
		go func() {
			res, err := m.Generate(context.Background(), prompt, GenerateOptions{MaxTokens: 6, StopIDs: []int{}})
			if err == nil && !slices.Equal(res.Tokens, want.Tokens) {
				err = fmt.Errorf("concurrent run gave %v, want %v", res.Tokens, want.Tokens)
			}
			errs <- err
		}()
	}
	for i := 0; i < 4; i++ {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
}

func TestLoadRejectsBadContext(t *testing.T) {
	for _, n := range []int{-1, 513} { // the fixture's max_position_embeddings is 512
		if _, err := Load(fixture, Options{MaxContext: n}); err == nil {
			t.Errorf("MaxContext %d accepted", n)
		}
	}
}

// TestBrokenTokenizerOnlyFailsText: a hostile tokenizer.json does not stop
// Load, id prompts or logits; text input gets the error naming the file.
func TestBrokenTokenizerOnlyFailsText(t *testing.T) {
	dir := t.TempDir()
	for _, f := range []string{"config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"} {
		abs, err := filepath.Abs(filepath.Join(fixture, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(abs, filepath.Join(dir, f)); err != nil {
			t.Fatal(err)
		}
	}
	bad := `{"model":{"type":"BPE","vocab":{"a":0,"b":9223372036854775807},"merges":[]}}`
	if err := os.WriteFile(filepath.Join(dir, "tokenizer.json"), []byte(bad), 0o644); err != nil {
		t.Fatal(err)
	}
	m, err := Load(dir, Options{})
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	good, err := Load(fixture, Options{})
	if err != nil {
		t.Fatal(err)
	}
	res, err := m.Generate(context.Background(), prompt, GenerateOptions{MaxTokens: 3})
	if err != nil {
		t.Fatalf("Generate with ids: %v", err)
	}
	want, err := good.Generate(context.Background(), prompt, GenerateOptions{MaxTokens: 3})
	if err != nil || !slices.Equal(res.Tokens, want.Tokens) {
		t.Errorf("Generate = %v, want %v (%v)", res.Tokens, want.Tokens, err)
	}
	if !slices.Equal(m.EOS(), good.EOS()) {
		t.Errorf("EOS = %v, want %v from generation_config.json", m.EOS(), good.EOS())
	}
	if _, err := m.Logits(prompt[:2]); err != nil {
		t.Errorf("Logits: %v", err)
	}
	for name, encode := range map[string]func() error{
		"EncodeText": func() error { _, err := m.EncodeText("hi"); return err },
		"EncodeChat": func() error {
			_, err := m.EncodeChat([]tokenizer.Message{{Role: "user", Content: "hi"}}, tokenizer.ChatOptions{})
			return err
		},
	} {
		if err := encode(); err == nil || !strings.Contains(err.Error(), "tokenizer.json") || !strings.Contains(err.Error(), "vocab") {
			t.Errorf("%s: error %v, want one naming tokenizer.json and the vocab", name, err)
		}
	}
}

// Text streaming through the engine: the pieces are the decoded tokens, and
// a stop string cuts the text before it.
func TestGenerateText(t *testing.T) {
	m, err := Load(fixture, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	ids, err := m.EncodeText("Hello, world")
	if err != nil {
		t.Fatal(err)
	}
	var streamed string
	res, err := m.Generate(context.Background(), ids, GenerateOptions{MaxTokens: 16, StopIDs: []int{},
		OnText: func(s string) error { streamed += s; return nil }})
	if err != nil {
		t.Fatal(err)
	}
	tok, err := m.Tokenizer()
	if err != nil {
		t.Fatal(err)
	}
	want, err := tok.Decode(res.Tokens)
	if err != nil {
		t.Fatal(err)
	}
	if streamed != want || res.Text != want {
		t.Fatalf("streamed %q, result %q, decoded %q", streamed, res.Text, want)
	}
	stop := want[len(want)/2 : len(want)/2+2]
	res, err = m.Generate(context.Background(), ids, GenerateOptions{MaxTokens: 16, StopIDs: []int{}, Stop: []string{stop}})
	if err != nil {
		t.Fatal(err)
	}
	if res.StopReason != "stop" || res.Text != want[:strings.Index(want, stop)] {
		t.Errorf("stop %q: %q (%s)", stop, res.Text, res.StopReason)
	}
	if res.CachedTokens != 0 {
		t.Errorf("a %d-token prompt reported %d cached tokens (blocks are 64 tokens)", len(ids), res.CachedTokens)
	}
}

// Logits reuses one cache between calls: each call must give the logits of
// a fresh model whatever ran before, longer, shorter or in another dtype.
func TestLogitsReuseMatchesFresh(t *testing.T) {
	m, err := Load(fixture, Options{})
	if err != nil {
		t.Fatal(err)
	}
	other := []int{7, 300, 12, 99, 5, 431, 250, 18, 77, 1, 64, 2, 3, 404}
	calls := []struct {
		ids []int
		dt  backend.CacheDType
	}{{prompt, backend.CacheF32}, {other[:5], backend.CacheF32}, {other, backend.CacheF32}, {prompt[:7], backend.CacheBF16}, {prompt, backend.CacheF32}}
	for i, c := range calls {
		got, err := m.LogitsWithCache(c.ids, c.dt)
		if err != nil {
			t.Fatal(err)
		}
		fresh, err := Load(fixture, Options{})
		if err != nil {
			t.Fatal(err)
		}
		want, err := fresh.LogitsWithCache(c.ids, c.dt)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, want) {
			t.Errorf("call %d (%d tokens, %v cache): logits differ from a fresh model's", i, len(c.ids), c.dt)
		}
	}
}
