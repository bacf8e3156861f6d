package synth

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mmfp4/mmfp4"
	"github.com/mmfp4/mmfp4/backend/cpu"
	"github.com/mmfp4/mmfp4/format"
	"github.com/mmfp4/mmfp4/safetensors"
)

// tinyConfig is the test fixture's configuration (4 layers, hidden 128):
// a model of a few MB for the tests of the writer itself.
func tinyConfig(t *testing.T) []byte {
	t.Helper()
	b, err := os.ReadFile("../testdata/glm4moelite-tiny/config.json")
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// smallPreset is the glm-4.7-flash preset cut to 2 layers, a 4096-token
// vocabulary and 16 experts (top-4 as in the real model); every matrix has
// its real shape. About 130 MB, so the test stays quick under -race.
func smallPreset(t *testing.T) []byte {
	t.Helper()
	raw, err := PresetConfig("glm-4.7-flash")
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatal(err)
	}
	m["vocab_size"] = 4096
	m["n_routed_experts"] = 16
	out, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// usage runs prompt through the model and counts, per MoE layer, how often
// each expert was chosen. Forward checks that the logits are finite; with
// debugNaN every intermediate tensor is checked too.
func usage(t *testing.T, dir string, prompt []int, debugNaN bool) (*mmfp4.Model, [][]int, []float32) {
	t.Helper()
	var calls [][]int
	b := cpu.New(cpu.Options{OnRoute: func(ex []int) {
		calls = append(calls, append([]int(nil), ex...))
	}})
	m, err := mmfp4.Load(dir, mmfp4.Options{DebugNaN: debugNaN, Backend: b})
	if err != nil {
		t.Fatal(err)
	}
	logits, err := m.Logits(prompt)
	if err != nil {
		t.Fatal(err)
	}
	cfg := m.Config()
	var hist [][]int
	for _, ex := range calls {
		h := make([]int, cfg.NumExperts)
		for _, e := range ex {
			h[e]++
		}
		hist = append(hist, h)
	}
	return m, hist, logits
}

func TestSmallPresetLoadsRunsFiniteAndSpreadsTokens(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "model")
	sum, err := Write(context.Background(), dir, Options{Config: smallPreset(t), Layers: 2, Seed: 1})
	if err != nil {
		t.Fatal(err)
	}
	if sum.Layers != 2 || sum.Shards != 1 {
		t.Errorf("summary %+v", sum)
	}
	m, err := mmfp4.Load(dir, mmfp4.Options{})
	if err != nil {
		t.Fatal(err)
	}
	// Text prompts work through the bundled tokenizer.
	prompt, err := m.EncodeText("The quick brown fox jumps over the lazy dog, again and again, until the sun goes down.")
	if err != nil {
		t.Fatal(err)
	}
	m.Close()
	if len(prompt) < 16 {
		t.Fatalf("prompt of %d tokens", len(prompt))
	}
	m, hist, logits := usage(t, dir, prompt, true)
	defer m.Close()
	if len(hist) != 1 {
		t.Fatalf("%d router calls, want 1 (one MoE layer)", len(hist))
	}
	// Logits of order 1: lm_head rows have std 1/sqrt(K) on a normalised input.
	var ss float64
	for _, v := range logits {
		ss += float64(v) * float64(v)
	}
	if rms := math.Sqrt(ss / float64(len(logits))); rms < 0.3 || rms > 3 {
		t.Errorf("logit RMS %.3f, want about 1", rms)
	}
	used, most := 0, 0
	for _, c := range hist[0] {
		if c > 0 {
			used++
		}
		most = max(most, c)
	}
	picks := 4 * len(prompt)
	t.Logf("%d tokens: %d of 16 experts used, the busiest %d of %d picks; counts %v", len(prompt), used, most, picks, hist[0])
	// Measured (seed 1): all 16 used, the busiest with 17 of 148 picks. A
	// router that sent every token to the same experts would use 4 of them,
	// with a quarter of the picks each.
	if used < 12 || most > picks/5 {
		t.Errorf("router concentrates tokens: %d experts used, the busiest takes %d of %d picks", used, most, picks)
	}
}

// deepNarrow is the preset's 47 layers and 64 experts (top-4) at a small
// width (hidden 128): about 80 MB, to see what depth does to activations
// and routing.
func deepNarrow(t *testing.T) []byte {
	t.Helper()
	raw, err := PresetConfig("glm-4.7-flash")
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatal(err)
	}
	for k, v := range map[string]int{"vocab_size": 1024, "hidden_size": 128, "moe_intermediate_size": 128,
		"intermediate_size": 256, "num_attention_heads": 2, "num_key_value_heads": 2, "q_lora_rank": 128,
		"kv_lora_rank": 128, "v_head_dim": 64} {
		m[k] = v
	}
	out, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Through all 47 layers the logits stay finite and every MoE layer spreads
// 96 tokens over the experts about as evenly as chance does. With plain
// 1/sqrt(K) attention scales (qScale = oScale = 1) this test fails in 23 of
// the 46 MoE layers, the busiest expert taking up to 34 of 384 picks.
func TestDeepModelStaysFiniteAndSpreadsTokens(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "model")
	if _, err := Write(context.Background(), dir, Options{Config: deepNarrow(t), Seed: 2}); err != nil {
		t.Fatal(err)
	}
	prompt := make([]int, 96)
	r := &rng{s: 9}
	for i := range prompt {
		prompt[i] = int(r.next() % 1024)
	}
	m, hist, _ := usage(t, dir, prompt, false)
	defer m.Close()
	if len(hist) != 46 {
		t.Fatalf("%d router calls, want 46", len(hist))
	}
	worst := 0
	for l, h := range hist {
		used, most := 0, 0
		for _, c := range h {
			if c > 0 {
				used++
			}
			most = max(most, c)
		}
		worst = max(worst, most)
		// Chance: 384 picks over 64 experts, 6 each; the busiest of 64 gets
		// about 13. Measured with seed 2: at most 20.
		if used < 56 || most > 30 {
			t.Errorf("MoE layer %d: %d of 64 experts used, the busiest takes %d of 384 picks", l, used, most)
		}
	}
	t.Logf("busiest expert over all layers: %d of 384 picks", worst)
}

// The values have the planned spread: each matrix's dequantized weights
// have standard deviation 1/sqrt(K) (the embedding 1), within 10%.
func TestMatrixValueScale(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "model")
	if _, err := Write(context.Background(), dir, Options{Config: tinyConfig(t), Seed: 5}); err != nil {
		t.Fatal(err)
	}
	set, err := safetensors.OpenDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer set.Close()
	for _, name := range []string{"model.embed_tokens.weight", "model.layers.1.mlp.experts.3.down_proj.weight",
		"model.layers.0.self_attn.kv_b_proj.weight", "lm_head.weight"} {
		q, s, r := format.QuantizedNames(name)
		var ts [3]*safetensors.Tensor
		for i, n := range []string{q, s, r} {
			if ts[i], err = set.Tensor(n); err != nil {
				t.Fatal(err)
			}
		}
		mx, err := format.MatrixFromTensors(ts[0], ts[1], ts[2], 128)
		if err != nil {
			t.Fatal(err)
		}
		var ss, sum float64
		w := mx.Dequantize()
		for _, v := range w {
			ss += float64(v) * float64(v)
			sum += float64(v)
		}
		std := math.Sqrt(ss/float64(len(w)) - (sum/float64(len(w)))*(sum/float64(len(w))))
		want := 1 / math.Sqrt(float64(mx.K))
		if name == "model.embed_tokens.weight" {
			want = 1
		}
		if math.Abs(std/want-1) > 0.1 {
			t.Errorf("%s: std %.4f, want %.4f", name, std, want)
		}
	}
}

// The same seed writes the same bytes whatever the number of threads; a
// different seed does not.
func TestDeterministic(t *testing.T) {
	read := func(seed uint64, threads int) []byte {
		dir := filepath.Join(t.TempDir(), "model")
		if _, err := Write(context.Background(), dir, Options{Config: tinyConfig(t), Seed: seed, Threads: threads}); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(filepath.Join(dir, "model.safetensors"))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	a, b, c := read(3, 1), read(3, 3), read(4, 2)
	if !bytes.Equal(a, b) {
		t.Error("seed 3 gave different files with 1 and 3 threads")
	}
	if bytes.Equal(a, c) {
		t.Error("seeds 3 and 4 gave the same file")
	}
}

// Cancelled midway (as SIGINT does through the command's context), Write
// returns the context's error and leaves nothing behind.
func TestCancelLeavesNothing(t *testing.T) {
	parent := t.TempDir()
	dir := filepath.Join(parent, "model")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	opt := Options{Config: tinyConfig(t), ShardBytes: 1 << 20, Progress: func(done, total int64) {
		if done > total/2 {
			cancel()
		}
	}}
	_, err := Write(ctx, dir, opt)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled", err)
	}
	ents, err := os.ReadDir(parent)
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != 0 {
		t.Errorf("left behind: %v", ents)
	}
}

func TestRefusesExistingOutputAndBadOptions(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "x"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Write(context.Background(), dir, Options{Config: tinyConfig(t)}); err == nil || !strings.Contains(err.Error(), "not empty") {
		t.Errorf("non-empty output: %v", err)
	}
	out := filepath.Join(t.TempDir(), "m")
	for _, opt := range []Options{
		{Config: tinyConfig(t), GroupSize: 48},
		{Config: tinyConfig(t), Layers: -1},
		{Config: tinyConfig(t), Layers: 2}, // mlp_layer_types lists 4 layers
		{Config: []byte(`{"model_type": "llama"}`)},
		{Config: tinyConfig(t), GroupSize: 256},
	} {
		if _, err := Write(context.Background(), out, opt); err == nil {
			t.Errorf("options %+v accepted", opt)
		}
	}
	if _, err := PresetConfig("nope"); err == nil || !strings.Contains(err.Error(), "glm-4.7-flash") {
		t.Errorf("unknown preset: %v", err)
	}
}
