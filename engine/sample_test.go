package engine

import (
	"context"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/backend/cpu"
	"github.com/mmfp4/mmfp4/model/glm4moelite"
	"github.com/mmfp4/mmfp4/sample"
)

// samplingCPU is the CPU backend with a backend.Sampler that picks with
// package sample: it stands in for a device sampler, to test what the
// engine and the model hand it and do with its answers.
type samplingCPU struct {
	*cpu.Backend
	mu      sync.Mutex
	entries []*backend.SampleParams // Batch.Sample entries of every step
	sampled int                     // rows whose id the engine used
	rows    int                     // rows SampleRows was asked for
}

func (f *samplingCPU) SetBatch(b *backend.Batch, p backend.CachePool) {
	f.mu.Lock()
	f.entries = append(f.entries, b.Sample...)
	f.mu.Unlock()
	f.Backend.SetBatch(b, p)
}

func (f *samplingCPU) SampleRows(logits backend.Tensor, params []backend.SampleParams) []int32 {
	V := logits.Cols()
	all := f.Download(logits)
	ids := make([]int32, len(params))
	for i, p := range params {
		row := all[i*V : (i+1)*V]
		if glm4moelite.CheckLogits(row) != nil {
			ids[i] = -1
			continue
		}
		s, err := sample.New(sample.Options{Temperature: p.Temperature, TopK: p.TopK, TopP: p.TopP, MinP: p.MinP})
		if err != nil {
			panic(err)
		}
		id, err := s.SampleWith(row, p.U)
		if err != nil {
			panic(err)
		}
		ids[i] = int32(id)
	}
	f.mu.Lock()
	f.rows += len(params)
	f.mu.Unlock()
	return ids
}

func samplingFixture(t *testing.T) (*glm4moelite.Model, *samplingCPU) {
	t.Helper()
	f := &samplingCPU{Backend: cpu.New(cpu.Options{Threads: 1})}
	net, err := glm4moelite.Load(fixtureDir, f, glm4moelite.LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return net, f
}

// hostTokens generates n tokens for one sequence without the engine: the
// model's single-sequence forward pass, and a sampler drawing its own
// random numbers (Sample). It is the reference for the engine's streams.
func hostTokens(t *testing.T, net *glm4moelite.Model, prompt []int, n int, o sample.Options) []int {
	t.Helper()
	st, err := net.NewState(len(prompt)+n, backend.CacheBF16)
	if err != nil {
		t.Fatal(err)
	}
	s, err := sample.New(o)
	if err != nil {
		t.Fatal(err)
	}
	var out []int
	in := prompt
	for len(out) < n {
		logits, err := net.ForwardSeq(st, in, false)
		if err != nil {
			t.Fatal(err)
		}
		id, err := s.Sample(logits)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, id)
		in = []int{id}
	}
	return out
}

// Requests without a constraint or log-probabilities have their tokens
// chosen by the backend's sampler, from the random numbers their own seeded
// samplers draw: several such streams at once give the tokens of the host
// sampler run alone; the others get logits and sample on the host.
func TestBackendSamplerMatchesHost(t *testing.T) {
	net, f := samplingFixture(t)
	e, err := New(net, nil, nil, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	opts := []sample.Options{
		{},
		{Temperature: 1.5, TopK: 50, Seed: 7},
		{Temperature: 0.8, TopP: 0.9, MinP: 0.05, Seed: 3},
		{Temperature: 1, Seed: 11},
		{Temperature: 1.2, TopK: 3, TopP: 0.5, Seed: 5},
	}
	const n = 12
	var streams []*Stream
	for _, o := range opts {
		st, err := e.Submit(context.Background(), Request{Prompt: refPrompt, MaxTokens: n, StopIDs: []int{}, Sampling: o})
		if err != nil {
			t.Fatal(err)
		}
		streams = append(streams, st)
	}
	// The same sampling with log-probabilities: logits come back, and the
	// host's sampler continues the same random stream.
	lp, err := e.Submit(context.Background(), Request{Prompt: refPrompt, MaxTokens: n, StopIDs: []int{}, Sampling: opts[1], Logprobs: true})
	if err != nil {
		t.Fatal(err)
	}
	for i, st := range streams {
		got := collect(t, st)
		if want := hostTokens(t, net, refPrompt, n, opts[i]); !slices.Equal(got.tokens, want) {
			t.Errorf("%+v: engine with a backend sampler gave %v, host sampler %v", opts[i], got.tokens, want)
		}
	}
	if got, want := collect(t, lp), hostTokens(t, net, refPrompt, n, opts[1]); !slices.Equal(got.tokens, want) {
		t.Errorf("with logprobs: %v, host sampler %v", got.tokens, want)
	}
	waitIdle(t, e)

	f.mu.Lock()
	defer f.mu.Unlock()
	var withParams, without int
	for _, p := range f.entries {
		if p == nil {
			without++
			continue
		}
		withParams++
		if p.U < 0 || p.U >= 1 {
			t.Errorf("U = %g outside [0, 1)", p.U)
		}
	}
	// Every output of the five plain requests goes to the backend, every
	// one of the logprobs request stays on the host.
	if withParams != len(opts)*n || without != n {
		t.Errorf("%d outputs had sampling parameters and %d none, want %d and %d", withParams, without, len(opts)*n, n)
	}
	if f.rows == 0 {
		t.Error("SampleRows was never called")
	}
}

// Params carry the request's options, and U only where the sampler needs a
// random number.
func TestSampleParams(t *testing.T) {
	net, _ := fixture(t)
	e := &Engine{net: net}
	for _, c := range []struct {
		req   Request
		nilP  bool
		withU bool
	}{
		{Request{}, false, false},
		{Request{Sampling: sample.Options{Temperature: 0.7, TopK: 40, TopP: 0.9, MinP: 0.05, Seed: 1}}, false, true},
		{Request{Logprobs: true}, true, false},
		{Request{TopLogprobs: 2}, true, false},
	} {
		s, err := sample.New(c.req.Sampling)
		if err != nil {
			t.Fatal(err)
		}
		ref, _ := sample.New(c.req.Sampling)
		p := e.sampleParams(&seq{req: c.req, sampler: s})
		if (p == nil) != c.nilP {
			t.Fatalf("%+v: params %+v", c.req, p)
		}
		if p == nil {
			continue
		}
		o := c.req.Sampling
		if p.Temperature != o.Temperature || p.TopK != o.TopK || p.TopP != o.TopP || p.MinP != o.MinP {
			t.Errorf("%+v: params %+v", o, p)
		}
		want := 0.0
		if c.withU {
			want = ref.Uniform()
		}
		if p.U != want {
			t.Errorf("%+v: U = %g, want %g (the sampler's next number)", o, p.U, want)
		}
	}
}

// A row the backend reports as non-finite fails its request with the error
// the host path gives, and the other requests go on.
func TestBackendSamplerNonFiniteRow(t *testing.T) {
	errorOf := func(net *glm4moelite.Model) (string, []int) {
		// A NaN embedding row makes its sequence's logits NaN.
		const poisoned = 7
		poisonEmbedding(t, net, poisoned)
		e, err := New(net, nil, nil, Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer e.Close()
		good, _ := e.Submit(context.Background(), Request{Prompt: refPrompt, MaxTokens: 4, StopIDs: []int{}, Sampling: sample.Options{Temperature: 1, Seed: 2}})
		bad, _ := e.Submit(context.Background(), Request{Prompt: []int{1, 2, poisoned, 3}, MaxTokens: 4, StopIDs: []int{}})
		rg, rb := collect(t, good), collect(t, bad)
		if rb.final.Finish != FinishError || rb.final.Err == nil {
			t.Fatalf("poisoned sequence: %s %v", rb.final.Finish, rb.final.Err)
		}
		if rg.final.Finish != FinishMaxTokens {
			t.Errorf("healthy sequence: %s %v", rg.final.Finish, rg.final.Err)
		}
		return rb.final.Err.Error(), rg.tokens
	}
	cpuNet, err := glm4moelite.Load(fixtureDir, cpu.New(cpu.Options{Threads: 1}), glm4moelite.LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	net, f := samplingFixture(t)
	wantErr, wantTokens := errorOf(cpuNet)
	gotErr, gotTokens := errorOf(net)
	if gotErr != wantErr || !strings.Contains(gotErr, "non-finite") {
		t.Errorf("backend sampler: error %q, host path %q", gotErr, wantErr)
	}
	if !slices.Equal(gotTokens, wantTokens) {
		t.Errorf("healthy sequence: %v with the backend sampler, %v without", gotTokens, wantTokens)
	}
	if f.rows == 0 {
		t.Error("SampleRows was never called")
	}
}
