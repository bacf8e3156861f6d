package engine

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/backend/cpu"
	"github.com/mmfp4/mmfp4/model/glm4moelite"
	"github.com/mmfp4/mmfp4/safetensors"
	"github.com/mmfp4/mmfp4/sample"
	"github.com/mmfp4/mmfp4/tokenizer"
)

const fixtureDir = "../testdata/glm4moelite-tiny"

// The prompt of the fixture's reference and the greedy continuation HF
// transformers produced for it.
var (
	refPrompt = []int{248, 475, 240, 439, 34, 19, 502, 29, 502, 22, 169, 295}
	refGreedy = []int{253, 54, 340, 340, 340, 340, 340, 161}
)

var (
	fixtureOnce sync.Once
	fixtureNet  *glm4moelite.Model
	fixtureTok  *tokenizer.Tokenizer
	fixtureErr  error
)

func fixture(t testing.TB) (*glm4moelite.Model, *tokenizer.Tokenizer) {
	t.Helper()
	fixtureOnce.Do(func() {
		fixtureNet, fixtureErr = glm4moelite.Load(fixtureDir, cpu.New(cpu.Options{Threads: 1}), glm4moelite.LoadOptions{})
		if fixtureErr == nil {
			fixtureTok, fixtureErr = tokenizer.Load(fixtureDir)
		}
	})
	if fixtureErr != nil {
		t.Fatal(fixtureErr)
	}
	return fixtureNet, fixtureTok
}

func newEngine(t testing.TB, opt Options) *Engine {
	t.Helper()
	net, tok := fixture(t)
	e, err := New(net, tok, tok.EOSIDs(), opt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	return e
}

type result struct {
	tokens []int
	lps    []Event // the token events, for their log-probabilities
	text   string
	final  Event
}

// collect reads a stream to its end.
func collect(t testing.TB, st *Stream) result {
	t.Helper()
	var r result
	for {
		ev, err := st.Recv(context.Background())
		if err == io.EOF {
			return r
		}
		if err != nil {
			t.Fatal(err)
		}
		r.text += ev.Text
		if ev.Done {
			r.final = ev
		} else {
			r.tokens = append(r.tokens, ev.Token)
			r.lps = append(r.lps, ev)
		}
	}
}

func run(t testing.TB, e *Engine, r Request) result {
	t.Helper()
	st, err := e.Submit(context.Background(), r)
	if err != nil {
		t.Fatal(err)
	}
	return collect(t, st)
}

// waitIdle waits until the engine holds no blocks and runs nothing.
func waitIdle(t testing.TB, e *Engine) Stats {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		s := e.Stats()
		if s.Running == 0 && s.Waiting == 0 && s.BlocksUsed == 0 {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("engine not idle: %+v", s)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestGreedyMatchesReference(t *testing.T) {
	e := newEngine(t, Options{})
	r := run(t, e, Request{Prompt: refPrompt, MaxTokens: len(refGreedy), StopIDs: []int{}})
	if !slices.Equal(r.tokens, refGreedy) {
		t.Fatalf("greedy tokens %v, reference %v", r.tokens, refGreedy)
	}
	u := r.final.Usage
	if r.final.Finish != FinishMaxTokens || u.PromptTokens != len(refPrompt) || u.CompletionTokens != len(refGreedy) {
		t.Errorf("final event %+v", r.final)
	}
	waitIdle(t, e)
}

// Several greedy streams at once each produce what they produce alone, and
// they really share steps.
func TestConcurrentStreamsMatchSolo(t *testing.T) {
	var maxSeqs atomic.Int64
	e := newEngine(t, Options{BlockSize: 8, OnStep: func(s StepInfo) {
		if int64(s.Seqs) > maxSeqs.Load() {
			maxSeqs.Store(int64(s.Seqs))
		}
	}})
	prompts := [][]int{refPrompt, {5, 6, 7}, {300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310, 311, 312, 313, 314, 315, 316, 317, 318, 319}, {42}}
	var solo [][]int
	for i, p := range prompts {
		solo = append(solo, run(t, e, Request{Prompt: p, MaxTokens: 6 + 2*i, StopIDs: []int{}}).tokens)
	}
	maxSeqs.Store(0)
	var wg sync.WaitGroup
	got := make([][]int, len(prompts))
	streams := make([]*Stream, len(prompts))
	for i, p := range prompts {
		st, err := e.Submit(context.Background(), Request{Prompt: p, MaxTokens: 6 + 2*i, StopIDs: []int{}})
		if err != nil {
			t.Fatal(err)
		}
		streams[i] = st
	}
	for i := range prompts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got[i] = collect(t, streams[i]).tokens
		}()
	}
	wg.Wait()
	for i := range prompts {
		if !slices.Equal(got[i], solo[i]) {
			t.Errorf("stream %d: %v concurrently, %v alone", i, got[i], solo[i])
		}
	}
	if maxSeqs.Load() < 2 {
		t.Errorf("the largest step had %d sequences: requests were not batched", maxSeqs.Load())
	}
	t.Logf("largest step: %d sequences", maxSeqs.Load())
	waitIdle(t, e)
}

// A long prompt is prefilled in chunks of MaxBatchTokens while another
// stream keeps decoding in the same steps.
func TestChunkedPrefillInterleavesDecode(t *testing.T) {
	var mixed atomic.Int64
	var maxTokens atomic.Int64
	e := newEngine(t, Options{MaxBatchTokens: 6, BlockSize: 4, OnStep: func(s StepInfo) {
		if s.Decode > 0 && s.Prefill > 0 {
			mixed.Add(1)
		}
		if int64(s.Tokens) > maxTokens.Load() {
			maxTokens.Store(int64(s.Tokens))
		}
	}})
	long := make([]int, 60)
	for i := range long {
		long[i] = (i*37 + 11) % 512
	}
	soloLong := run(t, e, Request{Prompt: long, MaxTokens: 4, StopIDs: []int{}}).tokens
	soloShort := run(t, e, Request{Prompt: refPrompt, MaxTokens: 30, StopIDs: []int{}}).tokens
	a, err := e.Submit(context.Background(), Request{Prompt: refPrompt, MaxTokens: 30, StopIDs: []int{}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Recv(context.Background()); err != nil { // decoding has started
		t.Fatal(err)
	}
	b, err := e.Submit(context.Background(), Request{Prompt: long, MaxTokens: 4, StopIDs: []int{}})
	if err != nil {
		t.Fatal(err)
	}
	ra, rb := collect(t, a), collect(t, b)
	if !slices.Equal(ra.tokens, soloShort[1:]) || !slices.Equal(rb.tokens, soloLong) {
		t.Errorf("interleaved results differ from solo runs:\n%v\n%v\n%v\n%v", ra.tokens, soloShort[1:], rb.tokens, soloLong)
	}
	if maxTokens.Load() > 6 {
		t.Errorf("a step ran %d tokens, more than MaxBatchTokens 6", maxTokens.Load())
	}
	if mixed.Load() == 0 {
		t.Error("no step mixed decode and prefill")
	}
	// The long prompt's repeat reuses the cached prefix.
	if c := run(t, e, Request{Prompt: long, MaxTokens: 1, StopIDs: []int{}}).final.Usage.CachedTokens; c != 56 {
		t.Errorf("cached tokens of a repeated 60-token prompt: %d, want 56 (whole blocks of 4, leaving the last token)", c)
	}
	waitIdle(t, e)
}

// With LongPromptAlone, a prompt chunk reaching that many positions never
// shares a step with decode rows: while both wait, they take turns, so the
// decoding stream still advances between the long prompt's chunks, and
// both streams give their solo outputs.
func TestLongPromptsRunApartFromDecode(t *testing.T) {
	var mu sync.Mutex
	var kinds []string // after the long prompt's submission: "mixed", "prompt" or "decode"
	var watching atomic.Bool
	e := newEngine(t, Options{MaxBatchTokens: 6, BlockSize: 4, LongPromptAlone: 12, OnStep: func(s StepInfo) {
		if !watching.Load() {
			return
		}
		kind := "decode"
		switch {
		case s.Decode > 0 && s.Prefill > 0:
			kind = "mixed"
		case s.Prefill > 0:
			kind = "prompt"
		}
		mu.Lock()
		kinds = append(kinds, kind)
		mu.Unlock()
	}})
	long := make([]int, 60)
	for i := range long {
		long[i] = (i*37 + 11) % 512
	}
	// The solo runs on an engine of their own: their prompts would
	// otherwise come from the prefix cache.
	solo := newEngine(t, Options{BlockSize: 4})
	soloLong := run(t, solo, Request{Prompt: long, MaxTokens: 4, StopIDs: []int{}}).tokens
	soloShort := run(t, solo, Request{Prompt: refPrompt, MaxTokens: 40, StopIDs: []int{}}).tokens
	a, err := e.Submit(context.Background(), Request{Prompt: refPrompt, MaxTokens: 40, StopIDs: []int{}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Recv(context.Background()); err != nil { // decoding has started
		t.Fatal(err)
	}
	watching.Store(true)
	b, err := e.Submit(context.Background(), Request{Prompt: long, MaxTokens: 4, StopIDs: []int{}})
	if err != nil {
		t.Fatal(err)
	}
	ra, rb := collect(t, a), collect(t, b)
	if !slices.Equal(ra.tokens, soloShort[1:]) || !slices.Equal(rb.tokens, soloLong) {
		t.Errorf("results differ from solo runs:\n%v\n%v\n%v\n%v", ra.tokens, soloShort[1:], rb.tokens, soloLong)
	}
	mu.Lock()
	defer mu.Unlock()
	// The chunks that end below 12 positions may join the decode rows (the
	// first ones, of 5: the decode row takes one of the 6 tokens); from
	// the first that reaches 12 on, prompt steps and decode steps alternate.
	steps := strings.Join(kinds, " ")
	alone := strings.Index(steps, "prompt")
	last := strings.LastIndex(steps, "prompt")
	if alone < 0 || strings.Contains(steps[alone:], "mixed") ||
		strings.Count(steps[alone:last], "prompt") != strings.Count(steps[alone:last], "decode") {
		t.Errorf("steps after the long prompt's submission: %s; want its long chunks alone, one decode step between two", steps)
	}
	if n := strings.Count(steps, "prompt"); n < 8 {
		t.Errorf("%d steps of long chunks alone, want 8 or more", n)
	}
	waitIdle(t, e)
	waitIdle(t, solo)
}

// With too few cache blocks for every stream, sequences are preempted and
// recomputed; every request still completes with its solo output.
func TestPreemptionByRecomputation(t *testing.T) {
	var peak atomic.Int64
	e := newEngine(t, Options{BlockSize: 4, CacheBlocks: 16, MaxModelLen: 64, OnStep: func(s StepInfo) {
		if int64(s.Seqs) > peak.Load() {
			peak.Store(int64(s.Seqs))
		}
	}})
	var prompts [][]int
	var solo [][]int
	for i := 0; i < 5; i++ {
		p := []int{10 + i, 20 + i, 30 + i, 40 + i, 50 + i, 60 + i}
		prompts = append(prompts, p)
		solo = append(solo, run(t, e, Request{Prompt: p, MaxTokens: 20, StopIDs: []int{}}).tokens)
	}
	var streams []*Stream
	for _, p := range prompts {
		st, err := e.Submit(context.Background(), Request{Prompt: p, MaxTokens: 20, StopIDs: []int{}})
		if err != nil {
			t.Fatal(err)
		}
		streams = append(streams, st)
	}
	for i, st := range streams {
		r := collect(t, st)
		if r.final.Finish != FinishMaxTokens || !slices.Equal(r.tokens, solo[i]) {
			t.Errorf("request %d: %v (%s), alone %v", i, r.tokens, r.final.Finish, solo[i])
		}
	}
	s := waitIdle(t, e)
	t.Logf("%d preemptions, largest step %d sequences", s.Preemptions, peak.Load())
	if s.Preemptions == 0 {
		t.Error("5 sequences of 26 tokens in 16 blocks of 4 never preempted")
	}
}

func TestCancellationFreesBlocks(t *testing.T) {
	e := newEngine(t, Options{BlockSize: 4})
	base := runtime.NumGoroutine()
	ctx, cancel := context.WithCancel(context.Background())
	st, err := e.Submit(ctx, Request{Prompt: refPrompt, StopIDs: []int{}})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if _, err := st.Recv(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	cancel()
	r := collect(t, st)
	if r.final.Finish != FinishCanceled || !errors.Is(r.final.Err, context.Canceled) {
		t.Errorf("final event %+v", r.final)
	}
	waitIdle(t, e)
	// Cancelled while waiting: a queue behind a running request.
	e2 := newEngine(t, Options{MaxNumSeqs: 1})
	first, _ := e2.Submit(context.Background(), Request{Prompt: refPrompt, MaxTokens: 50, StopIDs: []int{}})
	second, _ := e2.Submit(context.Background(), Request{Prompt: refPrompt, MaxTokens: 50, StopIDs: []int{}})
	second.Cancel()
	if r := collect(t, second); r.final.Finish != FinishCanceled || len(r.tokens) != 0 {
		t.Errorf("cancelled while queued: %d tokens, %s", len(r.tokens), r.final.Finish)
	}
	first.Cancel()
	collect(t, first)
	waitIdle(t, e2)
	waitGoroutines(t, base+1) // e2's loop
}

// waitGoroutines waits for the goroutine count to come down to want (the
// backend's workers exit just after they report done).
func waitGoroutines(t testing.TB, want int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > want && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > want {
		t.Errorf("%d goroutines, want at most %d", n, want)
	}
}

func TestQueueLimitAndClose(t *testing.T) {
	e := newEngine(t, Options{MaxNumSeqs: 1, MaxQueue: 2})
	first, err := e.Submit(context.Background(), Request{Prompt: refPrompt, StopIDs: []int{}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := first.Recv(context.Background()); err != nil { // running now
		t.Fatal(err)
	}
	var queued []*Stream
	for i := 0; i < 2; i++ {
		st, err := e.Submit(context.Background(), Request{Prompt: refPrompt, MaxTokens: 2})
		if err != nil {
			t.Fatalf("request %d within the queue limit: %v", i, err)
		}
		queued = append(queued, st)
	}
	if _, err := e.Submit(context.Background(), Request{Prompt: refPrompt, MaxTokens: 2}); !errors.Is(err, ErrQueueFull) {
		t.Fatalf("third waiting request: %v, want ErrQueueFull", err)
	}
	e.Close()
	for _, st := range append(queued, first) {
		if r := collect(t, st); r.final.Finish != FinishCanceled {
			t.Errorf("after Close: %s", r.final.Finish)
		}
	}
	if _, err := e.Submit(context.Background(), Request{Prompt: refPrompt}); !errors.Is(err, ErrClosed) {
		t.Errorf("Submit after Close: %v", err)
	}
}

func TestBadRequests(t *testing.T) {
	e := newEngine(t, Options{MaxModelLen: 40})
	for _, c := range []struct {
		r    Request
		want string
	}{
		{Request{}, "empty"},
		{Request{Prompt: []int{1, 512}}, "outside the vocabulary"},
		{Request{Prompt: refPrompt, MaxTokens: 30}, "42 tokens, 2 more than the context of 40"},
		{Request{Prompt: make([]int, 40)}, "leaves no room"},
		{Request{Prompt: refPrompt, MaxTokens: -1}, "max_tokens"},
		{Request{Prompt: refPrompt, Sampling: sample.Options{TopP: 2}}, "TopP"},
		{Request{Prompt: refPrompt, Stop: []string{""}}, "stop strings"},
		{Request{Prompt: refPrompt, TopLogprobs: 21}, "top_logprobs"},
	} {
		_, err := e.Submit(context.Background(), c.r)
		var re *RequestError
		if !errors.As(err, &re) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: error %v, want a RequestError containing %q", c.r, err, c.want)
		}
	}
	if _, err := New(fixtureNet, nil, nil, Options{MaxModelLen: 100, CacheBlocks: 1, BlockSize: 64}); err == nil {
		t.Error("a cache smaller than one sequence was accepted")
	}
}

// Text streams: the pieces concatenate to the decoded tokens, a stop string
// ends the text just before it, and EOS ids end generation unemitted.
func TestTextStopsAndEOS(t *testing.T) {
	e := newEngine(t, Options{})
	_, tok := fixture(t)
	prompt, err := tok.Encode("Hello, world", true)
	if err != nil {
		t.Fatal(err)
	}
	full := run(t, e, Request{Prompt: prompt, MaxTokens: 24, StopIDs: []int{}, Text: true})
	want, err := tok.Decode(full.tokens)
	if err != nil {
		t.Fatal(err)
	}
	if full.text != want {
		t.Fatalf("streamed text %q, decoded %q", full.text, want)
	}
	if len(want) < 8 {
		t.Fatalf("text %q too short to test stop strings", want)
	}
	stop := want[len(want)/2 : len(want)/2+3]
	cut := strings.Index(want, stop)
	r := run(t, e, Request{Prompt: prompt, MaxTokens: 24, StopIDs: []int{}, Text: true, Stop: []string{"never appears", stop}})
	if r.text != want[:cut] || r.final.Finish != FinishStop {
		t.Errorf("stop %q: text %q (%s), want %q", stop, r.text, r.final.Finish, want[:cut])
	}
	// EOS: declare the third generated token a stop id.
	eos := full.tokens[2]
	r = run(t, e, Request{Prompt: prompt, MaxTokens: 24, StopIDs: []int{eos}})
	if r.final.Finish != FinishEOS || !slices.Equal(r.tokens, full.tokens[:slices.Index(full.tokens, eos)]) {
		t.Errorf("stop id %d: %v (%s)", eos, r.tokens, r.final.Finish)
	}
}

func TestSeedsAndLogprobs(t *testing.T) {
	e := newEngine(t, Options{})
	so := sample.Options{Temperature: 1.5, TopK: 50, Seed: 7}
	req := Request{Prompt: refPrompt, MaxTokens: 12, StopIDs: []int{}, Sampling: so, Logprobs: true, TopLogprobs: 3}
	// Two same-seed requests at once, and one alone.
	a, _ := e.Submit(context.Background(), req)
	b, _ := e.Submit(context.Background(), req)
	ra, rb := collect(t, a), collect(t, b)
	rc := run(t, e, req)
	req.Sampling.Seed = 8
	rd := run(t, e, req)
	if !slices.Equal(ra.tokens, rb.tokens) || !slices.Equal(ra.tokens, rc.tokens) || len(ra.tokens) != 12 {
		t.Errorf("seed 7 gave %v, %v and %v", ra.tokens, rb.tokens, rc.tokens)
	}
	if slices.Equal(ra.tokens, rd.tokens) {
		t.Errorf("seeds 7 and 8 both gave %v", ra.tokens)
	}
	// Greedy logprobs: the chosen token is the top alternative.
	st, _ := e.Submit(context.Background(), Request{Prompt: refPrompt, MaxTokens: 3, StopIDs: []int{}, Logprobs: true, TopLogprobs: 2})
	for {
		ev, err := st.Recv(context.Background())
		if err != nil || ev.Done {
			break
		}
		if len(ev.TopLogprobs) != 2 || ev.TopLogprobs[0].ID != ev.Token || ev.Logprob != ev.TopLogprobs[0].Logprob ||
			ev.Logprob > 0 || ev.TopLogprobs[1].Logprob > ev.Logprob {
			t.Errorf("greedy token %d: logprob %v, top %v", ev.Token, ev.Logprob, ev.TopLogprobs)
		}
	}
}

// Many requests with random lengths, some cancelled at random points:
// every other request completes with its solo output, and the blocks and
// goroutines return to their baseline.
func TestLoadWithCancellations(t *testing.T) {
	e := newEngine(t, Options{BlockSize: 8, MaxNumSeqs: 8, MaxBatchTokens: 64, CacheBlocks: 20, MaxModelLen: 64})
	waitIdle(t, e)
	base := runtime.NumGoroutine()
	r := rand.New(rand.NewPCG(21, 22))
	type job struct {
		prompt    []int
		n         int
		cancelAt  int // -1: never
		solo      []int
		gotTokens []int
		final     Event
	}
	jobs := make([]*job, 24)
	for i := range jobs {
		p := make([]int, 1+r.IntN(24))
		for k := range p {
			p[k] = r.IntN(512)
		}
		j := &job{prompt: p, n: 1 + r.IntN(12), cancelAt: -1}
		if r.IntN(3) == 0 {
			j.cancelAt = r.IntN(j.n + 1)
		}
		j.solo = run(t, e, Request{Prompt: p, MaxTokens: j.n, StopIDs: []int{}}).tokens
		jobs[i] = j
	}
	var wg sync.WaitGroup
	for _, j := range jobs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			st, err := e.Submit(ctx, Request{Prompt: j.prompt, MaxTokens: j.n, StopIDs: []int{}})
			if err != nil {
				j.final = Event{Err: err}
				return
			}
			if j.cancelAt == 0 {
				cancel()
			}
			for {
				ev, err := st.Recv(context.Background())
				if err != nil {
					return
				}
				if ev.Done {
					j.final = ev
					continue
				}
				j.gotTokens = append(j.gotTokens, ev.Token)
				if len(j.gotTokens) == j.cancelAt {
					cancel()
				}
			}
		}()
	}
	wg.Wait()
	for i, j := range jobs {
		if j.cancelAt >= 0 && j.cancelAt < j.n {
			if j.final.Finish != FinishCanceled && j.final.Finish != FinishMaxTokens {
				t.Errorf("job %d (cancelled): %s %v", i, j.final.Finish, j.final.Err)
			}
			continue
		}
		if j.final.Finish != FinishMaxTokens || !slices.Equal(j.gotTokens, j.solo) {
			t.Errorf("job %d: %v (%s, %v), alone %v", i, j.gotTokens, j.final.Finish, j.final.Err, j.solo)
		}
	}
	s := waitIdle(t, e)
	t.Logf("after load: %+v", s)
	waitGoroutines(t, base)
}

func ExampleEngine() {
	net, _ := glm4moelite.Load(fixtureDir, cpu.New(cpu.Options{}), glm4moelite.LoadOptions{})
	e, _ := New(net, nil, nil, Options{CacheDType: backend.CacheBF16})
	defer e.Close()
	st, _ := e.Submit(context.Background(), Request{Prompt: refPrompt, MaxTokens: 4})
	for {
		ev, err := st.Recv(context.Background())
		if err != nil {
			break
		}
		if ev.Done {
			fmt.Println(ev.Finish, ev.Usage.CompletionTokens)
		} else {
			fmt.Print(ev.Token, " ")
		}
	}
	// Output: 253 54 340 340 max_tokens 4
}

// poisonEmbedding gives token id a NaN embedding row in net, so that the
// logits of every sequence holding it turn NaN.
func poisonEmbedding(t *testing.T, net *glm4moelite.Model, id int) {
	t.Helper()
	set, err := safetensors.OpenDir(fixtureDir)
	if err != nil {
		t.Fatal(err)
	}
	defer set.Close()
	tn, err := set.Tensor("model.embed_tokens.weight")
	if err != nil {
		t.Fatal(err)
	}
	table, err := tn.Float32()
	if err != nil {
		t.Fatal(err)
	}
	H := net.Config.HiddenSize
	for i := id * H; i < (id+1)*H; i++ {
		table[i] = float32(math.NaN())
	}
	if net.Embed, err = net.Backend().NewWeight(backend.HostWeight{Name: "embed", N: net.Config.VocabSize, K: H, Dense: table}); err != nil {
		t.Fatal(err)
	}
}

// A sequence whose logits turn NaN fails alone; the sequence that shares
// its steps completes as it would alone.
func TestNaNFailsOnlyItsSequence(t *testing.T) {
	net, err := glm4moelite.Load(fixtureDir, cpu.New(cpu.Options{Threads: 1}), glm4moelite.LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	const poisoned = 7
	poisonEmbedding(t, net, poisoned)
	e, err := New(net, nil, nil, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	want := run(t, e, Request{Prompt: refPrompt, MaxTokens: 6, StopIDs: []int{}}).tokens
	good, _ := e.Submit(context.Background(), Request{Prompt: refPrompt, MaxTokens: 6, StopIDs: []int{}})
	bad, _ := e.Submit(context.Background(), Request{Prompt: []int{1, 2, poisoned, 3}, MaxTokens: 6, StopIDs: []int{}})
	rg, rb := collect(t, good), collect(t, bad)
	if rb.final.Finish != FinishError || rb.final.Err == nil || !strings.Contains(rb.final.Err.Error(), "NaN") {
		t.Errorf("poisoned sequence: %s %v", rb.final.Finish, rb.final.Err)
	}
	if rg.final.Finish != FinishMaxTokens || !slices.Equal(rg.tokens, want) {
		t.Errorf("healthy sequence: %v (%s %v), alone %v", rg.tokens, rg.final.Finish, rg.final.Err, want)
	}
	waitIdle(t, e)
}

// A request cancelled in the middle of a step stops it between layers: a
// long prefill chunk does not run to its end first.
func TestCancelStopsStepBetweenLayers(t *testing.T) {
	_, tok := fixture(t)
	net, err := glm4moelite.Load(fixtureDir, cpu.New(cpu.Options{Threads: 1}), glm4moelite.LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	canceled := false
	var after []int // layers that ran after the cancellation
	net.Inspect = func(layer int, name string, _ backend.Tensor) {
		if name != "ffn residual" {
			return
		}
		if canceled {
			after = append(after, layer)
		}
		if layer == 0 {
			cancel()
			canceled = true
		}
	}
	e, err := New(net, tok, tok.EOSIDs(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	st, err := e.Submit(ctx, Request{Prompt: refPrompt, StopIDs: []int{}})
	if err != nil {
		t.Fatal(err)
	}
	r := collect(t, st)
	if r.final.Finish != FinishCanceled || len(r.tokens) != 0 {
		t.Errorf("cancelled during prefill: %d tokens, %s (%v)", len(r.tokens), r.final.Finish, r.final.Err)
	}
	if !canceled || len(after) != 0 {
		t.Errorf("cancelled %v; layers %v ran after the cancellation", canceled, after)
	}
	waitIdle(t, e)
}
