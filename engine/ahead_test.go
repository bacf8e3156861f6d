package engine

import (
	"context"
	"runtime"
	"slices"
	"sync"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/backend/cpu"
	"github.com/mmfp4/mmfp4/model/glm4moelite"
	"github.com/mmfp4/mmfp4/sample"
)

// aheadBackend is the CPU backend as a backend.AsyncSampler, in the order
// of work a GPU backend queues: a step's ids are chosen as
// sample.Sampler.SampleWith chooses them and kept, and the rows of the next
// batch that name them (Batch.Prev) take them when that batch is set.
type aheadBackend struct {
	*cpu.Backend
	mu      sync.Mutex
	last    []int32
	pending int // SampleRowsAsync calls whose wait has not come
	ahead   int // batches with rows from the step before
	maxPend int
}

func (a *aheadBackend) SetBatch(b *backend.Batch, p backend.CachePool) {
	if len(b.Prev) > 0 {
		c := *b
		c.Tokens = slices.Clone(b.Tokens)
		for r, k := range b.Prev {
			if k >= 0 {
				c.Tokens[r] = a.last[k]
			}
		}
		a.ahead++
		b = &c
	}
	a.Backend.SetBatch(b, p)
}

func (a *aheadBackend) SampleRows(logits backend.Tensor, params []backend.SampleParams) []int32 {
	V, all := logits.Cols(), a.Download(logits)
	ids := make([]int32, len(params))
	for i, p := range params {
		s, err := sample.New(sample.Options{Temperature: p.Temperature, TopK: p.TopK, TopP: p.TopP, MinP: p.MinP})
		id := -1
		if err == nil {
			if id, err = s.SampleWith(all[i*V:(i+1)*V], p.U); err != nil {
				id = -1
			}
		}
		ids[i] = int32(id)
	}
	return ids
}

// SampleRowsLogprobs adds the host's log-probabilities to SampleRows.
func (a *aheadBackend) SampleRowsLogprobs(logits backend.Tensor, params []backend.SampleParams) ([]int32, []backend.RowLogprobs) {
	ids := a.SampleRows(logits, params)
	V, all := logits.Cols(), a.Download(logits)
	lps := make([]backend.RowLogprobs, len(ids))
	for i, p := range params {
		if p.Logprobs && ids[i] >= 0 {
			lps[i].Chosen, lps[i].Top = logprobs(all[i*V:(i+1)*V], int(ids[i]), p.TopLogprobs)
		}
	}
	return ids, lps
}

func (a *aheadBackend) SampleRowsAsync(logits backend.Tensor, params []backend.SampleParams) func() ([]int32, []backend.RowLogprobs, error) {
	ids, lps := a.SampleRowsLogprobs(logits, params)
	a.last = ids
	a.mu.Lock()
	a.pending++
	a.maxPend = max(a.maxPend, a.pending)
	a.mu.Unlock()
	return func() ([]int32, []backend.RowLogprobs, error) {
		a.mu.Lock()
		a.pending--
		a.mu.Unlock()
		return ids, lps, a.Sync()
	}
}

// Steps queued ahead of their ids give every stream the tokens the
// synchronous engine gives it: greedy and seeded sampling, streams of
// different lengths ending at different steps, stop ids, and streams
// joining while others decode.
func TestStepsAheadMatchSync(t *testing.T) {
	ab := &aheadBackend{Backend: cpu.New(cpu.Options{Threads: 1})}
	aheadNet, err := glm4moelite.Load(fixtureDir, ab, glm4moelite.LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !aheadNet.Async() {
		t.Fatal("the test backend is not async")
	}
	syncNet, tok := fixture(t)
	reqs := []Request{
		{Prompt: refPrompt, MaxTokens: 9, StopIDs: []int{}},
		{Prompt: []int{5, 6, 7}, MaxTokens: 14, StopIDs: []int{}, Sampling: sample.Options{Temperature: 0.9, TopP: 0.9, Seed: 7}},
		{Prompt: []int{300, 301, 302, 303, 304, 305, 306, 307, 308}, MaxTokens: 5, StopIDs: []int{}, Sampling: sample.Options{Temperature: 1.3, TopK: 20, Seed: 3}},
		{Prompt: refPrompt, MaxTokens: 20, StopIDs: []int{340}}, // the greedy continuation's third token stops it
		{Prompt: []int{42}, MaxTokens: 11, StopIDs: []int{}, Sampling: sample.Options{Temperature: 0.7, MinP: 0.05, Seed: 11}, Logprobs: true, TopLogprobs: 3},
	}
	outputs := func(net *glm4moelite.Model) []result {
		e, err := New(net, tok, tok.EOSIDs(), Options{BlockSize: 8})
		if err != nil {
			t.Fatal(err)
		}
		defer e.Close()
		got := make([]result, len(reqs))
		var wg sync.WaitGroup
		for i, r := range reqs {
			if i == 3 { // joins while the others decode
				for e.Stats().Steps < 4 {
					runtime.Gosched()
				}
			}
			st, err := e.Submit(context.Background(), r)
			if err != nil {
				t.Fatal(err)
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				got[i] = collect(t, st)
			}()
		}
		wg.Wait()
		waitIdle(t, e)
		return got
	}
	want, got := outputs(syncNet), outputs(aheadNet)
	for i := range reqs {
		if !slices.Equal(got[i].tokens, want[i].tokens) || !slices.EqualFunc(got[i].lps, want[i].lps, sameLogprobs) || got[i].final.Finish != want[i].final.Finish ||
			got[i].final.Usage != want[i].final.Usage {
			t.Errorf("stream %d: %v (%s, %+v) with steps ahead, %v (%s, %+v) without", i,
				got[i].tokens, got[i].final.Finish, got[i].final.Usage, want[i].tokens, want[i].final.Finish, want[i].final.Usage)
		}
	}
	if ab.ahead == 0 {
		t.Error("no step was queued ahead")
	}
	if ab.maxPend != 2 {
		t.Errorf("at most %d steps' ids were outstanding, want 2", ab.maxPend)
	}
	t.Logf("%d of the steps were queued ahead", ab.ahead)

	// A stream cancelled while steps run ahead ends as cancelled, leaves
	// its blocks, and the stream beside it goes on as alone.
	e, err := New(aheadNet, tok, tok.EOSIDs(), Options{BlockSize: 8})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	ctx, cancel := context.WithCancel(context.Background())
	long, err := e.Submit(ctx, Request{Prompt: []int{5, 6, 7}, MaxTokens: 40, StopIDs: []int{}})
	if err != nil {
		t.Fatal(err)
	}
	other, err := e.Submit(context.Background(), reqs[0])
	if err != nil {
		t.Fatal(err)
	}
	ev, err := long.Recv(context.Background())
	for i := 0; err == nil && !ev.Done && i < 3; i++ {
		ev, err = long.Recv(context.Background())
	}
	cancel()
	r := collect(t, long)
	if r.final.Finish != FinishCanceled {
		t.Errorf("cancelled stream ended %q", r.final.Finish)
	}
	if got := collect(t, other); !slices.Equal(got.tokens, want[0].tokens) {
		t.Errorf("beside a cancelled stream: %v, alone %v", got.tokens, want[0].tokens)
	}
	waitIdle(t, e)
}

// sameLogprobs compares two token events' log-probabilities.
func sameLogprobs(a, b Event) bool {
	return a.Logprob == b.Logprob && slices.Equal(a.TopLogprobs, b.TopLogprobs)
}
