package glm4moelite

import (
	"encoding/binary"
	"fmt"
	"path/filepath"
	"slices"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/backend/cpu"
	"github.com/mmfp4/mmfp4/safetensors"
)

// hiddenRef is the residual stream that tools/make_fixtures.py recorded from
// transformers (float32, eager attention) on the reference sequence.
type hiddenRef struct {
	ids []int
	// "embed", "layers.L.attn_residual", "layers.L.output", "norm" (positions
	// x hidden) and "logits" (positions x vocab), all of one run.
	states map[string][]float32
}

func loadHidden(t testing.TB) *hiddenRef {
	t.Helper()
	f, err := safetensors.Open(filepath.Join(refDir, "hidden.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := &hiddenRef{states: map[string][]float32{}}
	for _, name := range f.Names() {
		tn, err := f.Tensor(name)
		if err != nil {
			t.Fatal(err)
		}
		if name == "ids" {
			for i := 0; i < tn.NumElements(); i++ {
				h.ids = append(h.ids, int(int64(binary.LittleEndian.Uint64(tn.Data[8*i:]))))
			}
			continue
		}
		if h.states[name], err = tn.Float32(); err != nil {
			t.Fatal(err)
		}
	}
	if !slices.Equal(h.ids, loadReference(t).sequence()) {
		t.Fatalf("hidden.safetensors holds ids %v, not the reference sequence", h.ids)
	}
	return h
}

// stage is a point of the residual stream: the model's watch name, and the
// reference's name for layer L.
type stage struct{ watch, ref, what string }

var stages = []stage{
	{"attention residual", "attn_residual", "attention"},
	{"ffn residual", "output", "feed-forward"},
}

func (s stage) key(layer int) string { return fmt.Sprintf("layers.%d.%s", layer, s.ref) }

// Bounds on max|ours - transformers| / max|transformers| of a state, about
// twice the errors measured on the fixture: both sides round in float32, in
// different orders. A real mistake moves a state by more: an RMSNorm eps off
// by 10x gives 1.3e-6 (input_layernorm, seen after layer 0's attention) to
// 4.7e-6 (post_attention_layernorm), and 1e-6 (the final norm).
const (
	// stepBound: one half-layer, or lm_head, run on the reference's own input
	// (measured 1.6e-7 to 4.3e-7).
	stepBound = 8e-7
	// normBound: the final norm on the reference's last state, compared
	// through our lm_head (measured 1.6e-7).
	normBound = 4e-7
)

// streamBound[L] bounds layer L's states when the whole stack runs on its
// own outputs, where earlier layers' rounding carries forward (measured
// 4.4e-7, 6.2e-7, 7.8e-7 and 9.7e-7).
var streamBound = []float64{1e-6, 1.3e-6, 1.6e-6, 2e-6}

// TestLayersMatchReference runs the whole forward pass and compares the
// residual stream after each layer's attention and after each layer with
// transformers', naming the first that is off.
func TestLayersMatchReference(t *testing.T) {
	ref := loadHidden(t)
	m := loadModel(t, fixtureDir, cpu.Options{}, LoadOptions{})
	if len(streamBound) != len(m.Layers) {
		t.Fatalf("streamBound has %d layers, the fixture %d", len(streamBound), len(m.Layers))
	}
	got := map[string][]float32{}
	m.Inspect = func(layer int, name string, x backend.Tensor) {
		for _, s := range stages {
			if name == s.watch {
				got[s.key(layer)] = m.b.Download(x)
			}
		}
	}
	logits := allLogits(t, m, ref.ids)
	for l := range m.Layers {
		for _, s := range stages {
			e := relMaxErr(ref.states[s.key(l)], got[s.key(l)])
			t.Logf("layer %d after %s: %.2e", l, s.what, e)
			if e > streamBound[l] {
				t.Fatalf("layer %d after %s is the first state off: relative error %.2e > %.1e", l, s.what, e, streamBound[l])
			}
		}
	}
	e := relMaxErr(ref.states["logits"], logits)
	t.Logf("logits: %.2e", e)
	if e > logitsBound {
		t.Errorf("logits: relative error %.2e > %.1e, though every layer is within its bound", e, logitsBound)
	}
}

// TestEachStepMatchesReference runs every half-layer on transformers' own
// input to it (the reference state is put into the residual stream after each
// step), so each error is that step's alone and the bound stays tight: a
// mistake in one norm, projection or expert is seen at its own step.
func TestEachStepMatchesReference(t *testing.T) {
	ref := loadHidden(t)
	m := loadModel(t, fixtureDir, cpu.Options{}, LoadOptions{})
	b, c := m.b, m.Config
	T := len(ref.ids)

	check := func(what string, want, got []float32, bound float64) {
		t.Helper()
		e := relMaxErr(want, got)
		t.Logf("%s: %.2e", what, e)
		if e > bound {
			t.Errorf("%s: relative error %.2e > %.1e", what, e, bound)
		}
	}

	batch := &backend.Batch{Seqs: []backend.Seq{{Len: T}}}
	for i, id := range ref.ids {
		batch.Tokens = append(batch.Tokens, int32(id))
		batch.Positions = append(batch.Positions, int32(i))
	}
	b.SetBatch(batch, nil)
	emb := b.NewTensor(T, c.HiddenSize)
	b.Embed(emb, m.Embed)
	if err := b.Sync(); err != nil {
		t.Fatal(err)
	}
	check("embedding", ref.states["embed"], b.Download(emb), 0) // a copy of bf16 values

	m.Inspect = func(layer int, name string, x backend.Tensor) {
		for _, s := range stages {
			if name == s.watch {
				want := ref.states[s.key(layer)]
				check(fmt.Sprintf("layer %d %s", layer, s.what), want, b.Download(x), stepBound)
				b.Upload(x, want)
			}
		}
	}
	logits := allLogits(t, m, ref.ids)

	// The last layer's output was replaced by the reference's, so the logits
	// differ only by the final norm and lm_head. lm_head alone, on the
	// reference's normed state, tells the two apart; our logits against that
	// product isolate the final norm.
	normed := b.NewTensor(T, c.HiddenSize)
	b.Upload(normed, ref.states["norm"])
	head := b.NewTensor(T, c.VocabSize)
	b.MatMul(head, normed, m.LMHead)
	check("lm_head on the reference's final norm", ref.states["logits"], b.Download(head), stepBound)
	check("final norm (seen through lm_head)", b.Download(head), logits, normBound)
	check("final norm and lm_head", ref.states["logits"], logits, stepBound)
}
