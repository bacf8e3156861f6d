package mmfp4

import (
	"context"
	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/engine"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mmfp4/mmfp4/convert"
	"github.com/mmfp4/mmfp4/model/glm4moelite"
	"github.com/mmfp4/mmfp4/safetensors"
)

// expectedDecodeBytes works out, from the files alone, what one decode step
// at position pos must read: every tensor of the model once, except that the
// embedding gives one row, each MoE layer runs TopK of its routed experts
// (all the same size), and each layer reads pos+1 cached positions of
// rank+rope float32 values. Tensors held as float32 in memory count 4 bytes
// per value whatever their stored dtype; MMFP4 matrices and a bf16
// embedding count their stored bytes.
func expectedDecodeBytes(t *testing.T, dir string, pos int) int64 {
	t.Helper()
	cfg, err := glm4moelite.LoadConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	set, err := safetensors.OpenDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer set.Close()
	// Memory bytes per logical tensor name.
	size := map[string]int64{}
	rows := map[string]int64{}
	for _, name := range set.Names() {
		tn, err := set.Tensor(name)
		if err != nil {
			t.Fatal(err)
		}
		logical := name
		for _, suffix := range []string{".qweight", ".scales", ".row_scale"} {
			if base, ok := strings.CutSuffix(name, suffix); ok {
				logical = base
			}
		}
		switch {
		case logical != name: // part of an MMFP4 matrix: stored bytes
			size[logical] += int64(len(tn.Data))
			if strings.HasSuffix(name, ".row_scale") {
				rows[logical] = int64(tn.Shape[0])
			}
		case name == "model.embed_tokens.weight" && tn.DType == safetensors.BF16:
			size[name] = int64(len(tn.Data))
			rows[name] = int64(tn.Shape[0])
		default: // widened to float32 at load
			size[name] = 4 * int64(tn.NumElements())
			if len(tn.Shape) > 0 {
				rows[name] = int64(tn.Shape[0])
			}
		}
	}
	var total int64
	for name, n := range size {
		switch {
		case name == "model.embed_tokens.weight":
			total += n / rows[name]
		case strings.Contains(name, ".mlp.experts."):
			if strings.Contains(name, ".mlp.experts.0.") {
				total += int64(cfg.ExpertsPerToken) * n
			}
		default:
			total += n
		}
	}
	// The engine's cache is bf16 by default.
	total += int64(cfg.NumLayers*(pos+1)) * int64(backend.CacheBytesPerToken(cfg.KVLoraRank, cfg.QKRopeHeadDim, backend.CacheBF16))
	return total
}

// The byte counter of one decode step equals the sum of the tensors the
// step touches, computed independently from the files: on the bf16 fixture
// (float32 weights in memory, bf16 embedding) and on its MMFP4 conversion.
func TestDecodeBytesReadMatchesTensorSizes(t *testing.T) {
	mm := filepath.Join(t.TempDir(), "mmfp4")
	policy, err := glm4moelite.ReadConvertPolicy(fixture)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := convert.Dir(fixture, mm, convert.Options{Policy: policy}); err != nil {
		t.Fatal(err)
	}
	for _, dir := range []string{fixture, mm} {
		// The counter is read after every engine step, on the engine's
		// goroutine, so no later step's reads can slip in.
		var m *Model
		afterStep := make(chan int64, 16)
		m, err := Load(dir, Options{Engine: engine.Options{OnStep: func(engine.StepInfo) {
			afterStep <- m.BytesRead()
		}}})
		if err != nil {
			t.Fatal(err)
		}
		res, err := m.Generate(context.Background(), prompt, GenerateOptions{MaxTokens: 2, StopIDs: []int{}})
		if err != nil {
			t.Fatal(err)
		}
		if len(res.Tokens) != 2 {
			t.Fatalf("%s: %d tokens", dir, len(res.Tokens))
		}
		// Two steps: the prefill (which gives the first token) and one
		// decode step. OnStep runs after a step's tokens are sent, so wait.
		atFirst, afterDecode := <-afterStep, <-afterStep
		// One decode step ran, for the token at position len(prompt).
		got := afterDecode - atFirst
		want := expectedDecodeBytes(t, dir, len(prompt))
		if got != want {
			t.Errorf("%s: decode step read %d bytes, want %d from the tensor sizes", dir, got, want)
		}
		if err := m.Close(); err != nil {
			t.Error(err)
		}
		if n := len(afterStep); n != 0 {
			t.Errorf("%s: %d more steps than prefill and one decode", dir, n)
		}
	}
}
