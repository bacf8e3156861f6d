package server

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"

	"github.com/mmfp4/mmfp4"
	"github.com/mmfp4/mmfp4/backend/cpu"
	"github.com/mmfp4/mmfp4/engine"
)

const fixtureDir = "../testdata/glm4moelite-tiny"

type testServer struct {
	srv    *Server
	m      *mmfp4.Model
	ts     *httptest.Server
	client openai.Client
	http   *http.Client
}

func startServer(t testing.TB, cfg Config, eo engine.Options) *testServer {
	t.Helper()
	if cfg.ModelName == "" {
		cfg.ModelName = "tiny"
	}
	srv := New(cfg)
	eo.OnStep = srv.OnStep
	m, err := mmfp4.Load(fixtureDir, mmfp4.Options{Backend: cpu.New(cpu.Options{Threads: 1}), Engine: eo})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.SetModel(m); err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(srv.Handler())
	hc := &http.Client{Transport: &http.Transport{}}
	t.Cleanup(func() {
		hc.CloseIdleConnections()
		ts.Close()
		m.Close()
	})
	opts := []option.RequestOption{option.WithBaseURL(ts.URL + "/v1/"), option.WithMaxRetries(0), option.WithHTTPClient(hc)}
	if cfg.APIKey != "" {
		opts = append(opts, option.WithAPIKey(cfg.APIKey))
	} else {
		opts = append(opts, option.WithAPIKey("unused"))
	}
	return &testServer{srv: srv, m: m, ts: ts, client: openai.NewClient(opts...), http: hc}
}

func (s *testServer) engine(t testing.TB) *engine.Engine {
	e, err := s.m.Engine()
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// post sends a raw request and returns the status and body.
func (s *testServer) post(t testing.TB, path, body string) (int, []byte) {
	t.Helper()
	resp, err := s.http.Post(s.ts.URL+path, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, data
}

// chatParams asks for an answer without thinking (the fixture's template
// would start the output inside <think>, making it reasoning).
func chatParams(content string, maxTokens int64) openai.ChatCompletionNewParams {
	p := openai.ChatCompletionNewParams{
		Model:       "tiny",
		Messages:    []openai.ChatCompletionMessageParamUnion{openai.UserMessage(content)},
		MaxTokens:   openai.Int(maxTokens),
		Temperature: openai.Float(0),
	}
	p.SetExtraFields(map[string]any{"chat_template_kwargs": map[string]any{"enable_thinking": false}})
	return p
}

func streamChat(t testing.TB, s *testServer, p openai.ChatCompletionNewParams) (string, string, openai.CompletionUsage) {
	t.Helper()
	st := s.client.Chat.Completions.NewStreaming(context.Background(), p)
	var text, finish string
	var usage openai.CompletionUsage
	for st.Next() {
		c := st.Current()
		for _, ch := range c.Choices {
			text += ch.Delta.Content
			if ch.FinishReason != "" {
				finish = ch.FinishReason
			}
		}
		if c.Usage.TotalTokens > 0 {
			usage = c.Usage
		}
	}
	if err := st.Err(); err != nil {
		t.Fatal(err)
	}
	return text, finish, usage
}

// The official SDK drives chat and text completions, streamed and not; the
// streamed text equals the whole one, usage adds up, and a stop sequence
// ends the text just before it.
func TestSDKCompletions(t *testing.T) {
	s := startServer(t, Config{}, engine.Options{})
	ctx := context.Background()
	resp, err := s.client.Chat.Completions.New(ctx, chatParams("Hello, how are you?", 12))
	if err != nil {
		t.Fatal(err)
	}
	c := resp.Choices[0]
	if c.FinishReason != "length" || c.Message.Content == "" || resp.Usage.CompletionTokens != 12 ||
		resp.Usage.TotalTokens != resp.Usage.PromptTokens+12 || resp.SystemFingerprint == "" || resp.Model != "tiny" {
		t.Fatalf("chat response %+v", resp)
	}
	p := chatParams("Hello, how are you?", 12)
	p.StreamOptions = openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)}
	text, finish, usage := streamChat(t, s, p)
	if text != c.Message.Content || finish != "length" || usage.CompletionTokens != 12 {
		t.Errorf("streamed %q (%s, %+v), whole %q", text, finish, usage, c.Message.Content)
	}

	// A stop sequence from the middle of the text.
	full := c.Message.Content
	runes := []rune(full)
	stop := string(runes[len(runes)/2 : len(runes)/2+2])
	p = chatParams("Hello, how are you?", 12)
	p.Stop = openai.ChatCompletionNewParamsStopUnion{OfStringArray: []string{"\x00never", stop}}
	resp, err = s.client.Chat.Completions.New(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := resp.Choices[0].Message.Content, full[:strings.Index(full, stop)]; got != want || resp.Choices[0].FinishReason != "stop" {
		t.Errorf("stop %q: %q (%s), want %q", stop, got, resp.Choices[0].FinishReason, want)
	}

	// Text completions, from text and from token ids.
	cp := openai.CompletionNewParams{Model: "tiny", Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("Once upon a time")},
		MaxTokens: openai.Int(8), Temperature: openai.Float(0)}
	cr, err := s.client.Completions.New(ctx, cp)
	if err != nil {
		t.Fatal(err)
	}
	if cr.Choices[0].FinishReason != "length" || cr.Usage.CompletionTokens != 8 {
		t.Fatalf("completion %+v", cr)
	}
	cst := s.client.Completions.NewStreaming(ctx, cp)
	var streamed string
	for cst.Next() {
		for _, ch := range cst.Current().Choices {
			streamed += ch.Text
		}
	}
	if err := cst.Err(); err != nil || streamed != cr.Choices[0].Text {
		t.Errorf("streamed completion %q (%v), whole %q", streamed, err, cr.Choices[0].Text)
	}
	ids, err := s.m.EncodeText("Once upon a time")
	if err != nil {
		t.Fatal(err)
	}
	var ids64 []int64
	for _, id := range ids {
		ids64 = append(ids64, int64(id))
	}
	cp.Prompt = openai.CompletionNewParamsPromptUnion{OfArrayOfTokens: ids64}
	if cr2, err := s.client.Completions.New(ctx, cp); err != nil || cr2.Choices[0].Text != cr.Choices[0].Text {
		t.Errorf("token-id prompt: %v, %q vs %q", err, cr2.Choices[0].Text, cr.Choices[0].Text)
	}
	// n choices, each sampled with its own seed, streamed together.
	p = chatParams("Hello, how are you?", 6)
	p.N, p.Seed, p.Temperature = openai.Int(3), openai.Int(11), openai.Float(1)
	noEOS := option.WithJSONSet("ignore_eos", true)
	resp, err = s.client.Chat.Completions.New(ctx, p, noEOS)
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Choices) != 3 || resp.Usage.CompletionTokens != 18 {
		t.Fatalf("n=3: %d choices, %d completion tokens", len(resp.Choices), resp.Usage.CompletionTokens)
	}
	p.StreamOptions = openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)}
	nst := s.client.Chat.Completions.NewStreaming(ctx, p, noEOS)
	texts := make([]string, 3)
	for nst.Next() {
		for _, ch := range nst.Current().Choices {
			texts[ch.Index] += ch.Delta.Content
		}
	}
	if err := nst.Err(); err != nil {
		t.Fatal(err)
	}
	for i, ch := range resp.Choices {
		if int(ch.Index) != i || texts[i] != ch.Message.Content {
			t.Errorf("choice %d: streamed %q, whole %q (index %d)", i, texts[i], ch.Message.Content, ch.Index)
		}
	}
	models, err := s.client.Models.List(ctx)
	if err != nil || len(models.Data) != 1 || models.Data[0].ID != "tiny" {
		t.Errorf("models: %+v %v", models, err)
	}
}

func TestSDKSeedsAndCachedTokens(t *testing.T) {
	s := startServer(t, Config{}, engine.Options{BlockSize: 8})
	ctx := context.Background()
	sampled := func(seed int64) string {
		p := chatParams("Tell me a story", 16)
		p.Temperature = openai.Float(1.2)
		p.Seed = openai.Int(seed)
		r, err := s.client.Chat.Completions.New(ctx, p)
		if err != nil {
			t.Fatal(err)
		}
		return r.Choices[0].Message.Content
	}
	a, b, c := sampled(5), sampled(5), sampled(6)
	if a != b || a == c {
		t.Errorf("seed 5 gave %q and %q, seed 6 %q", a, b, c)
	}

	// Second turn of a chat: the first turn's prompt comes from the cache.
	first := "Please summarise the plot of a long novel about the sea, a whale and a captain who will not let go."
	p := chatParams(first, 8)
	r1, err := s.client.Chat.Completions.New(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	p.Messages = append(p.Messages, openai.AssistantMessage(r1.Choices[0].Message.Content), openai.UserMessage("And then?"))
	r2, err := s.client.Chat.Completions.New(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	cached := r2.Usage.PromptTokensDetails.CachedTokens
	t.Logf("turn 1: %d prompt tokens (%d cached); turn 2: %d prompt tokens, %d cached",
		r1.Usage.PromptTokens, r1.Usage.PromptTokensDetails.CachedTokens, r2.Usage.PromptTokens, cached)
	if cached < r1.Usage.PromptTokens-8 || cached%8 != 0 || cached >= r2.Usage.PromptTokens {
		t.Errorf("second turn: %d cached tokens, want whole blocks of 8 covering the first turn's %d-token prompt", cached, r1.Usage.PromptTokens)
	}
}

// Errors come back in the OpenAI shape, readable through the SDK's error
// type.
func TestSDKErrors(t *testing.T) {
	s := startServer(t, Config{}, engine.Options{MaxModelLen: 64})
	ctx := context.Background()
	for _, c := range []struct {
		name   string
		edit   func(p *openai.ChatCompletionNewParams)
		status int
		want   string
	}{
		{"unknown model", func(p *openai.ChatCompletionNewParams) { p.Model = "gpt-9" }, 404, "does not exist"},
		{"max_tokens", func(p *openai.ChatCompletionNewParams) { p.MaxTokens = openai.Int(-3) }, 400, "max_tokens must be at least 1"},
		{"context", func(p *openai.ChatCompletionNewParams) { p.MaxTokens = openai.Int(100) }, 400, "more than the context of 64"},
		{"n", func(p *openai.ChatCompletionNewParams) { p.N = openai.Int(99) }, 400, "n must be in [1, 8]"},
		{"temperature", func(p *openai.ChatCompletionNewParams) { p.Temperature = openai.Float(7) }, 400, "temperature"},
	} {
		p := chatParams("Hi", 4)
		c.edit(&p)
		_, err := s.client.Chat.Completions.New(ctx, p)
		var ae *openai.Error
		if !errors.As(err, &ae) || ae.StatusCode != c.status || !strings.Contains(ae.Message, c.want) {
			t.Errorf("%s: %v, want status %d with %q", c.name, err, c.status, c.want)
			continue
		}
		if ae.Type == "" {
			t.Errorf("%s: error without a type", c.name)
		}
	}
	// The server still serves.
	if _, err := s.client.Chat.Completions.New(ctx, chatParams("Hi", 2)); err != nil {
		t.Fatal(err)
	}
}

func TestAPIKeyAndHealth(t *testing.T) {
	s := startServer(t, Config{APIKey: "sekret"}, engine.Options{})
	if _, err := s.client.Chat.Completions.New(context.Background(), chatParams("Hi", 2)); err != nil {
		t.Fatalf("with the key: %v", err)
	}
	bad := openai.NewClient(option.WithBaseURL(s.ts.URL+"/v1/"), option.WithAPIKey("wrong"), option.WithMaxRetries(0), option.WithHTTPClient(s.http))
	_, err := bad.Chat.Completions.New(context.Background(), chatParams("Hi", 2))
	var ae *openai.Error
	if !errors.As(err, &ae) || ae.StatusCode != 401 {
		t.Errorf("wrong key: %v", err)
	}
	for _, path := range []string{"/metrics", "/v1/models"} {
		resp, err := s.http.Get(s.ts.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 401 {
			t.Errorf("%s without a key: %d", path, resp.StatusCode)
		}
	}
	// Anthropic clients send the key as x-api-key.
	for key, want := range map[string]int{"sekret": 200, "wrong": 401} {
		req, _ := http.NewRequest("POST", s.ts.URL+"/v1/messages/count_tokens", strings.NewReader(`{"messages": [{"role": "user", "content": "Hi"}]}`))
		req.Header.Set("x-api-key", key)
		resp, err := s.http.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("x-api-key %s: %d, want %d", key, resp.StatusCode, want)
		}
	}
	resp, err := s.http.Get(s.ts.URL + "/health")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("/health: %d", resp.StatusCode)
	}
	// A server without a model is not healthy yet, and says so.
	loading := httptest.NewServer(New(Config{}).Handler())
	defer loading.Close()
	for path, want := range map[string]int{"/health": 503, "/v1/models": 503} {
		resp, err := http.Get(loading.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("loading %s: %d, want %d", path, resp.StatusCode, want)
		}
	}
}

func TestTokenizeDetokenize(t *testing.T) {
	s := startServer(t, Config{}, engine.Options{})
	code, body := s.post(t, "/tokenize", `{"prompt": "Hello, world"}`)
	var tr struct {
		Count  int   `json:"count"`
		Tokens []int `json:"tokens"`
		Max    int   `json:"max_model_len"`
	}
	if err := json.Unmarshal(body, &tr); code != 200 || err != nil || tr.Count != len(tr.Tokens) || tr.Count == 0 || tr.Max != 512 {
		t.Fatalf("/tokenize: %d %s", code, body)
	}
	want, _ := s.m.EncodeText("Hello, world")
	if fmt.Sprint(want) != fmt.Sprint(tr.Tokens) {
		t.Errorf("/tokenize %v, EncodeText %v", tr.Tokens, want)
	}
	ids, _ := json.Marshal(tr.Tokens)
	code, body = s.post(t, "/detokenize", `{"tokens": `+string(ids)+`}`)
	var dr struct{ Prompt string }
	if err := json.Unmarshal(body, &dr); code != 200 || err != nil || !strings.HasSuffix(dr.Prompt, "Hello, world") {
		t.Errorf("/detokenize: %d %s", code, body)
	}
	code, body = s.post(t, "/tokenize", `{"messages": [{"role": "user", "content": "Hi"}]}`)
	if code != 200 || !bytes.Contains(body, []byte(`"tokens"`)) {
		t.Errorf("/tokenize of messages: %d %s", code, body)
	}
}

// Every kind of bad input gets a 4xx in the OpenAI error shape, and the
// server keeps serving.
func TestBadInput(t *testing.T) {
	s := startServer(t, Config{MaxBodyBytes: 4096}, engine.Options{MaxModelLen: 64})
	chat, comp := "/v1/chat/completions", "/v1/completions"
	msgs := `"messages": [{"role": "user", "content": "Hi"}]`
	for _, c := range []struct {
		name, path, body string
		status           int
		want             string
	}{
		{"malformed", chat, `{"messages": [`, 400, "malformed JSON"},
		{"not an object", chat, `[1, 2]`, 400, "JSON object"},
		{"empty body", chat, ``, 400, "empty"},
		{"wrong type", chat, `{` + msgs + `, "max_tokens": "ten"}`, 400, `"max_tokens": want an integer`},
		{"wrong type bool", chat, `{` + msgs + `, "stream": 1}`, 400, `"stream": want a boolean`},
		{"messages not a list", chat, `{"messages": "hi"}`, 400, "messages"},
		{"unknown role", chat, `{"messages": [{"role": "wizard", "content": "Hi"}]}`, 400, "unknown role"},
		{"no role", chat, `{"messages": [{"content": "Hi"}]}`, 400, "no role"},
		{"empty messages", chat, `{"messages": []}`, 400, "non-empty"},
		{"no messages", chat, `{"max_tokens": 3}`, 400, "non-empty"},
		{"bad content", chat, `{"messages": [{"role": "user", "content": 5}]}`, 400, "content"},
		{"max_tokens zero", chat, `{` + msgs + `, "max_tokens": 0}`, 400, "at least 1"},
		{"max_tokens negative", comp, `{"prompt": "x", "max_tokens": -1}`, 400, "at least 1"},
		{"max_completion_tokens", chat, `{` + msgs + `, "max_completion_tokens": 0}`, 400, "max_completion_tokens"},
		{"non-UTF-8", chat, "{\"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\"}]}", 400, "UTF-8"},
		{"oversized", chat, `{` + msgs + `, "user": "` + strings.Repeat("a", 5000) + `"}`, 413, "larger than 4096"},
		{"unknown model", chat, `{"model": "other", ` + msgs + `}`, 404, "does not exist"},
		{"n too large", chat, `{` + msgs + `, "n": 9}`, 400, "n must be"},
		{"n zero", chat, `{` + msgs + `, "n": 0}`, 400, "n must be"},
		{"top_p", chat, `{` + msgs + `, "top_p": 1.5}`, 400, "top_p"},
		{"top_k", chat, `{` + msgs + `, "top_k": -2}`, 400, "top_k"},
		{"top_logprobs", chat, `{` + msgs + `, "logprobs": true, "top_logprobs": 30}`, 400, "top_logprobs"},
		{"stop type", chat, `{` + msgs + `, "stop": 3}`, 400, "stop"},
		{"empty stop", chat, `{` + msgs + `, "stop": [""]}`, 400, "stop strings"},
		{"stream_options alone", chat, `{` + msgs + `, "stream_options": {"include_usage": true}}`, 400, "stream_options"},
		{"penalty", chat, `{` + msgs + `, "presence_penalty": 0.5}`, 400, "not supported"},
		{"response_format", chat, `{` + msgs + `, "response_format": {"type": "xml"}}`, 400, "response_format.type"},
		{"json_schema without schema", chat, `{` + msgs + `, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}`, 400, "json_schema.schema"},
		{"tool_choice without tools", chat, `{` + msgs + `, "tool_choice": "required"}`, 400, "needs tools"},
		{"tool_choice unknown", chat, `{` + msgs + `, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}}`, 400, "not among the tools"},
		{"reasoning_effort", chat, `{` + msgs + `, "reasoning_effort": "extreme"}`, 400, "reasoning_effort"},
		{"enable_thinking type", chat, `{` + msgs + `, "chat_template_kwargs": {"enable_thinking": "yes"}}`, 400, "must be a boolean"},
		{"context overflow", chat, `{` + msgs + `, "max_tokens": 200}`, 400, "more than the context of 64"},
		{"prompt missing", comp, `{"max_tokens": 2}`, 400, "prompt is required"},
		{"prompt empty", comp, `{"prompt": ""}`, 400, "must not be empty"},
		{"prompt type", comp, `{"prompt": {"a": 1}}`, 400, "prompt"},
		{"prompt batch", comp, `{"prompt": ["a", "b"]}`, 400, "one prompt per request"},
		{"token outside vocabulary", comp, `{"prompt": [1, 99999], "max_tokens": 2}`, 400, "outside the vocabulary"},
		{"long prompt", comp, `{"prompt": [` + strings.Repeat("1,", 70) + `1]}`, 400, "context of 64"},
		{"no route", "/v1/engines", `{}`, 404, "no route"},
		{"tokenize neither", "/tokenize", `{}`, 400, "exactly one"},
		{"detokenize bad id", "/detokenize", `{"tokens": [99999]}`, 400, "out of range"},
	} {
		code, body := s.post(t, c.path, c.body)
		var e struct {
			Error struct {
				Message string  `json:"message"`
				Type    string  `json:"type"`
				Param   *string `json:"param"`
				Code    *string `json:"code"`
			} `json:"error"`
		}
		if err := json.Unmarshal(body, &e); err != nil || code != c.status || !strings.Contains(e.Error.Message, c.want) || e.Error.Type == "" {
			t.Errorf("%s: %d %s; want %d with %q", c.name, code, body, c.status, c.want)
		}
	}
	if _, err := s.client.Chat.Completions.New(context.Background(), chatParams("Hi", 2)); err != nil {
		t.Fatalf("after the bad requests: %v", err)
	}
	// The response reaches the client in the step that ends it; the
	// sequence's blocks are freed right after, so wait for that.
	if st := engineIdle(s.engine(t)); st.BlocksUsed != 0 || st.Running != 0 {
		t.Errorf("bad requests left state behind: %+v", st)
	}
}

// engineIdle waits up to 10 s for the engine to hold no blocks and run
// nothing, and returns its stats then.
func engineIdle(e *engine.Engine) engine.Stats {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if st := e.Stats(); st.BlocksUsed == 0 && st.Running == 0 && st.Waiting == 0 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	return e.Stats()
}

// metricValue reads one sample from /metrics.
func metricValue(t testing.TB, s *testServer, line string) float64 {
	t.Helper()
	resp, err := s.http.Get(s.ts.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	for _, l := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(l, line+" "); ok {
			var f float64
			fmt.Sscan(v, &f)
			return f
		}
	}
	t.Fatalf("no %s in /metrics", line)
	return 0
}

// Concurrent greedy streams each produce their solo text, and the metrics
// show steps that batched more than one sequence.
func TestConcurrentStreamsMatchSolo(t *testing.T) {
	s := startServer(t, Config{}, engine.Options{})
	prompts := []string{"The quick brown fox", "Hello, world", "1 2 3 4 5 6 7 8", "Why is the sky blue?"}
	solo := make([]string, len(prompts))
	for i, p := range prompts {
		r, err := s.client.Chat.Completions.New(context.Background(), chatParams(p, 10))
		if err != nil {
			t.Fatal(err)
		}
		solo[i] = r.Choices[0].Message.Content
	}
	got := make([]string, len(prompts))
	var wg sync.WaitGroup
	for i, p := range prompts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got[i], _, _ = streamChat(t, s, chatParams(p, 10))
		}()
	}
	wg.Wait()
	for i := range prompts {
		if got[i] != solo[i] {
			t.Errorf("stream %d: %q concurrently, %q alone", i, got[i], solo[i])
		}
	}
	steps := metricValue(t, s, "mmfp4:iteration_sequences_count")
	single := metricValue(t, s, `mmfp4:iteration_sequences_bucket{le="1"}`)
	t.Logf("%v steps, %v of them with one sequence", steps, single)
	if steps-single < 1 {
		t.Error("no step ran more than one sequence")
	}
	if v := metricValue(t, s, "mmfp4:generation_tokens_total"); v != 80 {
		t.Errorf("generation_tokens_total %v, want 80", v)
	}
}

// 64 concurrent requests of random kinds and lengths, a third of them
// cancelled at random points: the others all succeed, and cache blocks and
// goroutines return to their baseline.
func TestLoad(t *testing.T) {
	s := startServer(t, Config{}, engine.Options{BlockSize: 16, MaxNumSeqs: 16, MaxBatchTokens: 128, CacheBlocks: 40, MaxModelLen: 128})
	if _, err := s.client.Chat.Completions.New(context.Background(), chatParams("warm up", 2)); err != nil {
		t.Fatal(err)
	}
	s.http.CloseIdleConnections()
	time.Sleep(10 * time.Millisecond)
	base := runtime.NumGoroutine()
	words := strings.Fields("the of and a to in is you that it he was for on are as with his they I at be this have from")
	r := rand.New(rand.NewPCG(31, 32))
	type job struct {
		prompt       string
		maxTokens    int64
		chat, stream bool
		cancelAfter  time.Duration // 0: never
	}
	jobs := make([]job, 64)
	for i := range jobs {
		var sb strings.Builder
		for k := 0; k < 1+r.IntN(40); k++ {
			sb.WriteString(words[r.IntN(len(words))] + " ")
		}
		jobs[i] = job{prompt: sb.String(), maxTokens: int64(1 + r.IntN(24)), chat: r.IntN(2) == 0, stream: r.IntN(2) == 0}
		if r.IntN(3) == 0 {
			jobs[i].cancelAfter = time.Duration(1+r.IntN(50)) * time.Millisecond
		}
	}
	errs := make([]error, len(jobs))
	var wg sync.WaitGroup
	for i, j := range jobs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			if j.cancelAfter > 0 {
				time.AfterFunc(j.cancelAfter, cancel)
			}
			var n int64
			switch {
			case j.chat && j.stream:
				st := s.client.Chat.Completions.NewStreaming(ctx, chatParams(j.prompt, j.maxTokens))
				for st.Next() {
				}
				errs[i] = st.Err()
				n = -1
			case j.chat:
				var resp *openai.ChatCompletion
				if resp, errs[i] = s.client.Chat.Completions.New(ctx, chatParams(j.prompt, j.maxTokens)); errs[i] == nil {
					n = resp.Usage.CompletionTokens
				}
			default:
				p := openai.CompletionNewParams{Model: "tiny", Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String(j.prompt)},
					MaxTokens: openai.Int(j.maxTokens), Temperature: openai.Float(0.7)}
				if j.stream {
					st := s.client.Completions.NewStreaming(ctx, p)
					for st.Next() {
					}
					errs[i] = st.Err()
					n = -1
				} else {
					var resp *openai.Completion
					if resp, errs[i] = s.client.Completions.New(ctx, p); errs[i] == nil {
						n = resp.Usage.CompletionTokens
					}
				}
			}
			if errs[i] == nil && n >= 0 && n > j.maxTokens {
				errs[i] = fmt.Errorf("%d tokens for max_tokens %d", n, j.maxTokens)
			}
		}()
	}
	wg.Wait()
	cancelled := 0
	for i, j := range jobs {
		if j.cancelAfter > 0 {
			cancelled++
			continue
		}
		if errs[i] != nil {
			t.Errorf("request %d (chat %v, stream %v): %v", i, j.chat, j.stream, errs[i])
		}
	}
	st := engineIdle(s.engine(t))
	deadline := time.Now().Add(10 * time.Second)
	t.Logf("64 requests, %d cancelled; engine after: %+v", cancelled, st)
	if st.BlocksUsed != 0 || st.Running != 0 || st.Waiting != 0 {
		t.Errorf("engine did not return to idle: %+v", st)
	}
	s.http.CloseIdleConnections()
	for time.Now().Before(deadline) && runtime.NumGoroutine() > base {
		time.Sleep(time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > base {
		buf := make([]byte, 1<<16)
		t.Errorf("%d goroutines after the load, %d before:\n%s", n, base, buf[:runtime.Stack(buf, true)])
	}
}

// Drain (SIGTERM) stops new requests with 503 and unhealthy /health, while
// a running stream finishes.
func TestDrain(t *testing.T) {
	s := startServer(t, Config{}, engine.Options{})
	st := s.client.Chat.Completions.NewStreaming(context.Background(), chatParams("Hello", 20))
	if !st.Next() {
		t.Fatal(st.Err())
	}
	s.srv.Drain()
	_, err := s.client.Chat.Completions.New(context.Background(), chatParams("Hi", 2))
	var ae *openai.Error
	if !errors.As(err, &ae) || ae.StatusCode != 503 {
		t.Errorf("request while draining: %v", err)
	}
	n := 1
	for st.Next() {
		n++
	}
	if err := st.Err(); err != nil || n < 2 {
		t.Errorf("running stream while draining: %d chunks, %v", n, err)
	}
	resp, err := s.http.Get(s.ts.URL + "/health")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 503 {
		t.Errorf("/health while draining: %d", resp.StatusCode)
	}
}
