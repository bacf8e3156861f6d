package perplexity

import (
	"math"
	"slices"
	"strings"
	"testing"
)

// The windows of the HF perplexity guide, as tools/train_default.py's
// window_plan makes them for the transformers reference.
func TestWindows(t *testing.T) {
	for _, c := range []struct {
		n, ctx, stride int
		want           []Window
	}{
		{10, 4, 2, []Window{{0, 4, 1}, {2, 6, 4}, {4, 8, 6}, {6, 10, 8}}},
		{10, 4, 4, []Window{{0, 4, 1}, {4, 8, 5}, {8, 10, 9}}},
		{4, 4, 2, []Window{{0, 4, 1}}},
		{3, 4, 2, []Window{{0, 3, 1}}},
		{9, 4, 3, []Window{{0, 4, 1}, {3, 7, 4}, {6, 9, 7}}},
		{1000, 512, 256, []Window{{0, 512, 1}, {256, 768, 512}, {512, 1000, 768}}},
	} {
		got, err := Windows(c.n, c.ctx, c.stride)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, c.want) {
			t.Errorf("Windows(%d, %d, %d) = %v, want %v", c.n, c.ctx, c.stride, got, c.want)
		}
	}
}

// Every token after the first is scored exactly once when windows overlap,
// and never from outside its window.
func TestWindowsCoverEachTokenOnce(t *testing.T) {
	for n := 2; n < 40; n++ {
		for ctx := 2; ctx < 12; ctx++ {
			for stride := 1; stride < ctx; stride++ {
				ws, err := Windows(n, ctx, stride)
				if err != nil {
					t.Fatal(err)
				}
				var scored []int
				for _, w := range ws {
					if w.First <= w.Begin || w.End-w.Begin > ctx || w.End > n {
						t.Fatalf("n=%d ctx=%d stride=%d: bad window %v", n, ctx, stride, w)
					}
					for i := w.First; i < w.End; i++ {
						scored = append(scored, i)
					}
				}
				if len(scored) != n-1 || scored[0] != 1 || !slices.IsSorted(scored) || scored[n-2] != n-1 {
					t.Fatalf("n=%d ctx=%d stride=%d: scored %v", n, ctx, stride, scored)
				}
			}
		}
	}
}

func TestWindowsErrors(t *testing.T) {
	for _, c := range []struct{ n, ctx, stride int }{{10, 1, 1}, {10, 4, 0}, {10, 4, 5}, {1, 4, 2}, {0, 4, 2}} {
		if _, err := Windows(c.n, c.ctx, c.stride); err == nil {
			t.Errorf("Windows(%d, %d, %d): no error", c.n, c.ctx, c.stride)
		}
	}
}

const vocab = 11

// next is the rule of the toy corpus: each token determines the next one.
func next(id int) int { return (id*7 + 3) % vocab }

func corpus(n int) []int {
	ids := []int{5}
	for len(ids) < n {
		ids = append(ids, next(ids[len(ids)-1]))
	}
	return ids
}

// oracle puts logit L on the token that follows each input token: it scores
// the corpus well only if row j is used to predict token j+1.
func oracle(l float32) LogitsFunc {
	return func(ids []int) ([]float32, error) {
		out := make([]float32, len(ids)*vocab)
		for j, id := range ids {
			out[j*vocab+next(id)] = l
		}
		return out, nil
	}
}

func uniform(ids []int) ([]float32, error) { return make([]float32, len(ids)*vocab), nil }

func TestUniformModel(t *testing.T) {
	r, err := Evaluate(corpus(50), uniform, Options{Ctx: 8, Stride: 4, Vocab: vocab, Ref: uniform})
	if err != nil {
		t.Fatal(err)
	}
	if r.Tokens != 49 || math.Abs(r.PPL-vocab) > 1e-9 || math.Abs(r.MeanNLL-math.Log(vocab)) > 1e-12 {
		t.Errorf("uniform: %+v, want 49 tokens at perplexity %d", r, vocab)
	}
	if r.KL != 0 || r.Top1 != 1 {
		t.Errorf("against itself: KL %g, top-1 %g", r.KL, r.Top1)
	}
}

func TestOracleAndKL(t *testing.T) {
	const l = 3
	ids := corpus(64)
	var calls int
	r, err := Evaluate(ids, oracle(l), Options{Ctx: 16, Stride: 16, Vocab: vocab, Ref: uniform,
		Progress: func(done, total int) {
			calls++
			if done != calls || total != 4 {
				t.Errorf("progress %d/%d at call %d", done, total, calls)
			}
		}})
	if err != nil {
		t.Fatal(err)
	}
	z := math.Exp(l) + vocab - 1
	if r.Windows != 4 || r.Tokens != 60 || calls != 4 {
		t.Errorf("%d windows, %d tokens, %d progress calls; want 4, 60 (no token at a window start), 4", r.Windows, r.Tokens, calls)
	}
	if want := z / math.Exp(l); math.Abs(r.PPL-want) > 1e-9 {
		t.Errorf("oracle perplexity %g, want %g", r.PPL, want)
	}
	// KL(uniform || q) = -log V - (1/V) sum_i log q_i, with log q = l - log z
	// once and -log z V-1 times.
	wantKL := -math.Log(vocab) - float64(l)/vocab + math.Log(z)
	if math.Abs(r.KL-wantKL) > 1e-9 {
		t.Errorf("KL %g, want %g", r.KL, wantKL)
	}
	// The uniform argmax is token 0; the oracle's is next(prev).
	agree := 0
	for _, w := range mustWindows(t, len(ids), 16, 16) {
		for i := w.First; i < w.End; i++ {
			if next(ids[i-1]) == 0 {
				agree++
			}
		}
	}
	if want := float64(agree) / 60; r.Top1 != want {
		t.Errorf("top-1 %g, want %g", r.Top1, want)
	}
}

// A model that sees its context: logit 0 rises with the position in the
// window, so the result depends on which window scores each token.
func TestContextDependence(t *testing.T) {
	pos := func(ids []int) ([]float32, error) {
		out := make([]float32, len(ids)*vocab)
		for j := range ids {
			out[j*vocab] = float32(j)
		}
		return out, nil
	}
	ids := corpus(30)
	r, err := Evaluate(ids, pos, Options{Ctx: 8, Stride: 3, Vocab: vocab})
	if err != nil {
		t.Fatal(err)
	}
	var nll float64
	n := 0
	for _, w := range mustWindows(t, len(ids), 8, 3) {
		for i := w.First; i < w.End; i++ {
			j := float64(i - 1 - w.Begin)
			lse := math.Log(math.Exp(j) + vocab - 1)
			lp := -lse
			if ids[i] == 0 {
				lp = j - lse
			}
			nll -= lp
			n++
		}
	}
	if r.Tokens != n || math.Abs(r.MeanNLL-nll/float64(n)) > 1e-12 {
		t.Errorf("got %d tokens, mean NLL %g; want %d, %g", r.Tokens, r.MeanNLL, n, nll/float64(n))
	}
}

func TestBadLogits(t *testing.T) {
	nan := func(ids []int) ([]float32, error) {
		out := make([]float32, len(ids)*vocab)
		out[5] = float32(math.NaN()) // row 0 predicts the second token of every window
		return out, nil
	}
	short := func(ids []int) ([]float32, error) { return make([]float32, len(ids)), nil }
	for name, f := range map[string]LogitsFunc{"nan": nan, "short": short} {
		r, err := Evaluate(corpus(20), f, Options{Ctx: 8, Stride: 4, Vocab: vocab})
		if err == nil {
			t.Errorf("%s: no error, result %+v", name, r)
		}
	}
	_, err := Evaluate(corpus(20), uniform, Options{Ctx: 8, Stride: 4, Vocab: vocab, Ref: nan})
	if err == nil || !strings.Contains(err.Error(), "reference") {
		t.Errorf("NaN in the reference: %v", err)
	}
	if _, err := Evaluate([]int{1, 2, 99}, uniform, Options{Ctx: 8, Stride: 4, Vocab: vocab}); err == nil {
		t.Error("a token outside the vocabulary was accepted")
	}
}

func mustWindows(t *testing.T, n, ctx, stride int) []Window {
	t.Helper()
	ws, err := Windows(n, ctx, stride)
	if err != nil {
		t.Fatal(err)
	}
	return ws
}

// EvaluateAll gives each model the result Evaluate gives it alone, and runs
// the reference once per window.
func TestEvaluateAll(t *testing.T) {
	ids := corpus(70)
	refCalls := 0
	ref := func(ids []int) ([]float32, error) {
		refCalls++
		return oracle(1)(ids)
	}
	opt := Options{Ctx: 16, Stride: 8, Vocab: vocab, Ref: ref}
	all, err := EvaluateAll(ids, []LogitsFunc{uniform, oracle(3)}, opt)
	if err != nil {
		t.Fatal(err)
	}
	if refCalls != all[0].Windows || refCalls != 8 {
		t.Errorf("reference ran %d times for %d windows", refCalls, all[0].Windows)
	}
	for i, m := range []LogitsFunc{uniform, oracle(3)} {
		one, err := Evaluate(ids, m, opt)
		if err != nil {
			t.Fatal(err)
		}
		if *one != *all[i] {
			t.Errorf("model %d: EvaluateAll %+v, Evaluate %+v", i, all[i], one)
		}
	}
}

// RowKL of a row against itself is 0; of uniform logits against a row with
// one logit raised by l it is log z - log V - l/V (z = e^l + V - 1), as
// TestOracleAndKL's mean; bad rows are errors.
func TestRowKL(t *testing.T) {
	const l = 3
	flat, peak := make([]float32, vocab), make([]float32, vocab)
	peak[5] = l
	if kl, err := RowKL(peak, peak); err != nil || kl != 0 {
		t.Errorf("a row against itself: KL %g, %v", kl, err)
	}
	z := math.Exp(l) + vocab - 1
	want := math.Log(z) - math.Log(vocab) - float64(l)/vocab
	if kl, err := RowKL(flat, peak); err != nil || math.Abs(kl-want) > 1e-12 {
		t.Errorf("uniform against the peaked row: KL %g, %v; want %g", kl, err, want)
	}
	if _, err := RowKL(flat, peak[:vocab-1]); err == nil {
		t.Error("rows of different lengths gave no error")
	}
	peak[2] = float32(math.NaN())
	if _, err := RowKL(flat, peak); err == nil {
		t.Error("a NaN logit gave no error")
	}
}
