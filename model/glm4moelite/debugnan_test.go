package glm4moelite

import (
	"math"
	"strconv"
	"strings"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/backend/cpu"
	"github.com/mmfp4/mmfp4/safetensors"
)

// poisoned returns the fixture's tensor name as a weight of n rows with a
// NaN at element i.
func poisoned(t *testing.T, m *Model, name string, n, i int) backend.Weight {
	t.Helper()
	set, err := safetensors.OpenDir(fixtureDir)
	if err != nil {
		t.Fatal(err)
	}
	defer set.Close()
	tn, err := set.Tensor(name)
	if err != nil {
		t.Fatal(err)
	}
	v, err := tn.Float32()
	if err != nil {
		t.Fatal(err)
	}
	v[i] = float32(math.NaN())
	w, err := m.b.NewWeight(backend.HostWeight{Name: name, N: n, K: len(v) / n, Dense: v})
	if err != nil {
		t.Fatal(err)
	}
	return w
}

// With DebugNaN, a NaN is named where it enters: an embedding row, the final
// norm or lm_head, not the first layer that reads it; and the message does
// not ask for the DebugNaN it was run with.
func TestDebugNaNNamesEmbeddingNormAndHead(t *testing.T) {
	ref := loadReference(t)
	H := 128
	tok := ref.prompt[4]
	for _, tc := range []struct {
		name   string
		poison func(m *Model)
		want   []string
	}{
		{"embedding", func(m *Model) {
			m.Embed = poisoned(t, m, "model.embed_tokens.weight", m.Config.VocabSize, tok*H+7)
		}, []string{"embedding", "model.embed_tokens.weight", "token " + strconv.Itoa(tok), "position 4"}},
		{"final norm", func(m *Model) {
			m.Norm = poisoned(t, m, "model.norm.weight", 1, 9)
		}, []string{"final norm", "position 11"}},
		{"lm_head", func(m *Model) {
			m.LMHead = poisoned(t, m, "lm_head.weight", m.Config.VocabSize, 300*H+2)
		}, []string{"lm_head", "column 300"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := loadModel(t, fixtureDir, cpu.Options{}, LoadOptions{})
			tc.poison(m)
			_, err := m.ForwardSeq(newState(t, m, 16), ref.prompt, false)
			if err == nil || !strings.Contains(err.Error(), "--debug-nan") {
				t.Errorf("without DebugNaN: err = %v, want a pointer to --debug-nan", err)
			}
			m.DebugNaN = true
			_, err = m.ForwardSeq(newState(t, m, 16), ref.prompt, false)
			if err == nil {
				t.Fatal("NaN went unreported with DebugNaN")
			}
			t.Logf("with DebugNaN: %v", err)
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
			if strings.Contains(err.Error(), "layer") || strings.Contains(err.Error(), "--debug-nan") {
				t.Errorf("error %q blames a layer or asks for --debug-nan", err)
			}
		})
	}
}
