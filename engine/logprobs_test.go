package engine

import (
	"context"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"sort"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/backend/cpu"
	"github.com/mmfp4/mmfp4/internal/benchmode"
	"github.com/mmfp4/mmfp4/model/glm4moelite"
	"github.com/mmfp4/mmfp4/sample"
)

// refLogprobs is the plain definition: the float64 log-sum-exp with
// math.Exp, and the top k by a stable sort on the logit.
func refLogprobs(logits []float32, id, k int) (float32, []TokenLogprob) {
	m := math.Inf(-1)
	for _, v := range logits {
		m = math.Max(m, float64(v))
	}
	var s float64
	for _, v := range logits {
		s += math.Exp(float64(v) - m)
	}
	lse := m + math.Log(s)
	ids := make([]int, len(logits))
	for i := range ids {
		ids[i] = i
	}
	sort.SliceStable(ids, func(a, b int) bool { return logits[ids[a]] > logits[ids[b]] })
	var top []TokenLogprob
	for _, i := range ids[:min(k, len(ids))] {
		top = append(top, TokenLogprob{ID: i, Logprob: float32(float64(logits[i]) - lse)})
	}
	return float32(float64(logits[id]) - lse), top
}

// expNeg against math.Exp over [-690, 0]: the bound is a small multiple
// of the measured worst case.
func TestExpNeg(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	worst := 0.0
	check := func(x float64) {
		got, want := expNeg(x), math.Exp(x)
		if e := math.Abs(got-want) / want; e > worst {
			worst = e
		}
	}
	for range 200000 {
		check(-r.Float64() * []float64{1, 30, 690}[r.IntN(3)])
	}
	for _, x := range []float64{0, -1e-300, -math.Ln2 / 32, -math.Ln2, -1, -88, -103.9, -692} {
		check(x)
	}
	t.Logf("largest relative error %.2g", worst)
	if worst > 1e-10 {
		t.Errorf("largest relative error %.2g", worst)
	}
	if expNeg(-694) != 0 || expNeg(math.Inf(-1)) != 0 {
		t.Errorf("expNeg(-694) = %g, expNeg(-Inf) = %g, want 0", expNeg(-694), expNeg(math.Inf(-1)))
	}
}

// logprobRows are rows for the logprobs tests: logits of a language model's
// spread, ties everywhere (the maximum included), signed zeros, a flat row
// and a row with one huge logit.
func logprobRows(r *rand.Rand, n int) map[string][]float32 {
	rows := map[string][]float32{}
	lm := make([]float32, n)
	for i := range lm {
		lm[i] = float32(r.NormFloat64() * 3)
	}
	for range min(20, n/4) {
		lm[r.IntN(n)] = float32(12 + r.Float64()*6)
	}
	rows["lm-like"] = lm
	ties := make([]float32, n)
	for i := range ties {
		ties[i] = float32(r.IntN(5)) * 0.75
	}
	rows["ties"] = ties
	zeros := make([]float32, n)
	for i := range zeros {
		switch r.IntN(3) {
		case 0:
			zeros[i] = float32(math.Copysign(0, -1))
		case 1:
			zeros[i] = -1
		}
	}
	rows["signed zeros"] = zeros
	rows["flat"] = make([]float32, n)
	peak := make([]float32, n)
	for i := range peak {
		peak[i] = float32(r.NormFloat64())
	}
	peak[r.IntN(n)] = 300
	rows["peaked"] = peak
	return rows
}

// logprobs gives the plain definition's ids in the same order and
// log-probabilities within float32 rounding, for vocabularies of 1 to
// GLM-4.7-Flash's and k from 0 to the API's 20 (and past n).
func TestLogprobsMatchesReference(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	worst := 0.0
	for _, n := range []int{1, 3, 1000, 154880} {
		for name, row := range logprobRows(r, n) {
			for _, k := range []int{0, 1, 5, 20} {
				id := r.IntN(n)
				got, gotTop := logprobs(row, id, k)
				want, wantTop := refLogprobs(row, id, k)
				d := math.Abs(float64(got - want))
				if len(gotTop) != len(wantTop) {
					t.Fatalf("n=%d %s k=%d: %d top entries, want %d", n, name, k, len(gotTop), len(wantTop))
				}
				for j := range gotTop {
					if gotTop[j].ID != wantTop[j].ID {
						t.Fatalf("n=%d %s k=%d: top %v, want %v", n, name, k, gotTop, wantTop)
					}
					d = max(d, math.Abs(float64(gotTop[j].Logprob-wantTop[j].Logprob)))
				}
				worst = max(worst, d)
			}
		}
	}
	// Equal but for a last-bit difference of float32 values of magnitude
	// up to about 20 (2e-6 apart).
	t.Logf("largest difference %.2g", worst)
	if worst > 4e-6 {
		t.Errorf("largest difference %.2g", worst)
	}
}

// logprobSampler is samplingCPU that computes log-probabilities too, with
// the plain definition: it stands in for a device that does.
type logprobSampler struct {
	*samplingCPU
	logprobRows int
}

func (f *logprobSampler) SampleRowsLogprobs(logits backend.Tensor, params []backend.SampleParams) ([]int32, []backend.RowLogprobs) {
	ids := f.SampleRows(logits, params)
	V := logits.Cols()
	all := f.Download(logits)
	lps := make([]backend.RowLogprobs, len(params))
	for i, p := range params {
		if p.Logprobs && ids[i] >= 0 {
			lps[i].Chosen, lps[i].Top = refLogprobs(all[i*V:(i+1)*V], int(ids[i]), p.TopLogprobs)
			f.mu.Lock()
			f.logprobRows++
			f.mu.Unlock()
		}
	}
	return ids, lps
}

// With a backend that computes log-probabilities, requests that ask for
// them have their tokens and log-probabilities from it, and the events are
// those of the host path: the same tokens, and log-probabilities within
// float32 rounding. Constrained requests stay on the host.
func TestBackendLogprobsMatchHost(t *testing.T) {
	f := &logprobSampler{samplingCPU: &samplingCPU{Backend: cpu.New(cpu.Options{Threads: 1})}}
	net, err := glm4moelite.Load(fixtureDir, f, glm4moelite.LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	hostNet, _ := fixture(t)
	reqs := []Request{
		{Logprobs: true},
		{Logprobs: true, TopLogprobs: 5, Sampling: sample.Options{Temperature: 1.2, TopK: 40, Seed: 7}},
		{TopLogprobs: 20, Sampling: sample.Options{Temperature: 0.8, TopP: 0.9, Seed: 3}},
		{TopLogprobs: 1},
		{},
	}
	events := func(net *glm4moelite.Model) [][]Event {
		e, err := New(net, nil, nil, Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer e.Close()
		var streams []*Stream
		for _, r := range reqs {
			r.Prompt, r.MaxTokens, r.StopIDs = refPrompt, 10, []int{}
			st, err := e.Submit(context.Background(), r)
			if err != nil {
				t.Fatal(err)
			}
			streams = append(streams, st)
		}
		var out [][]Event
		for _, st := range streams {
			var evs []Event
			for {
				ev, err := st.Recv(context.Background())
				if err == io.EOF {
					break
				}
				if err != nil {
					t.Fatal(err)
				}
				if !ev.Done {
					evs = append(evs, ev)
				}
			}
			out = append(out, evs)
		}
		return out
	}
	got, want := events(net), events(hostNet)
	worst := 0.0
	for i := range reqs {
		if len(got[i]) != 10 || len(got[i]) != len(want[i]) {
			t.Fatalf("request %d: %d events, host path %d", i, len(got[i]), len(want[i]))
		}
		for j, g := range got[i] {
			w := want[i][j]
			same := g.Token == w.Token && len(g.TopLogprobs) == len(w.TopLogprobs) && (g.TopLogprobs == nil) == (w.TopLogprobs == nil)
			d := math.Abs(float64(g.Logprob - w.Logprob))
			for k := range g.TopLogprobs {
				if !same {
					break
				}
				same = g.TopLogprobs[k].ID == w.TopLogprobs[k].ID
				d = max(d, math.Abs(float64(g.TopLogprobs[k].Logprob-w.TopLogprobs[k].Logprob)))
			}
			if !same {
				t.Fatalf("request %d event %d: token %d top %v, host path token %d top %v", i, j, g.Token, g.TopLogprobs, w.Token, w.TopLogprobs)
			}
			worst = max(worst, d)
		}
	}
	t.Logf("largest logprob difference %.2g", worst)
	if worst > 1e-6 {
		t.Errorf("largest logprob difference %.2g", worst)
	}
	// Every output of the four logprobs requests went to the backend.
	if f.logprobRows != 4*10 {
		t.Errorf("the backend computed log-probabilities for %d rows, want %d", f.logprobRows, 4*10)
	}
}

// BenchmarkLogprobs times one row of GLM-4.7-Flash's vocabulary with the
// 20 alternatives of the API's limit: logprobs, and the engine's function
// before it (math.Exp).
func BenchmarkLogprobs(b *testing.B) {
	benchmode.Check(b)
	row := logprobRows(rand.New(rand.NewPCG(7, 8)), 154880)["lm-like"]
	for _, c := range []struct {
		name string
		fn   func([]float32, int, int) (float32, []TokenLogprob)
	}{{"expNeg", logprobs}, {"math.Exp", mathExpLogprobs}} {
		b.Run(fmt.Sprintf("%s/k=20", c.name), func(b *testing.B) {
			for b.Loop() {
				c.fn(row, 5, 20)
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(len(row)), "ns/entry")
		})
	}
}

// mathExpLogprobs is the engine's function before expNeg: math.Exp in the
// sum, and its top sorted by log-probability.
func mathExpLogprobs(logits []float32, id, k int) (float32, []TokenLogprob) {
	m := float32(math.Inf(-1))
	for _, v := range logits {
		if v > m {
			m = v
		}
	}
	mx := float64(m)
	var sum float64
	for _, v := range logits {
		sum += math.Exp(float64(v) - mx)
	}
	lse := mx + math.Log(sum)
	lp := func(i int) float32 { return float32(float64(logits[i]) - lse) }
	var top []TokenLogprob
	for i := range logits {
		if len(top) < k {
			top = append(top, TokenLogprob{ID: i, Logprob: lp(i)})
		} else if k > 0 && logits[i] > logits[top[k-1].ID] {
			top[k-1] = TokenLogprob{ID: i, Logprob: lp(i)}
		} else {
			continue
		}
		for j := len(top) - 1; j > 0 && top[j].Logprob > top[j-1].Logprob; j-- {
			top[j], top[j-1] = top[j-1], top[j]
		}
	}
	return lp(id), top
}
