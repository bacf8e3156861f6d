//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"context"
	"encoding/json"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/synth"
)

// smallHeadsModel writes a random model with GLM-4.7-Flash's attention
// head shapes (dn 192, dr 64, dv 256, rank 512: the expanded form's) and
// everything else small: 4 heads, hidden 256, 8 experts, 2 layers, a
// vocabulary of 1024.
func smallHeadsModel(t *testing.T) string {
	t.Helper()
	raw, err := synth.PresetConfig("glm-4.7-flash")
	if err != nil {
		t.Fatal(err)
	}
	var cfg map[string]any
	if err := json.Unmarshal(raw, &cfg); err != nil {
		t.Fatal(err)
	}
	for k, v := range map[string]any{
		"vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
		"num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 128, "n_routed_experts": 8,
		"num_experts_per_tok": 2,
	} {
		cfg[k] = v
	}
	if raw, err = json.Marshal(cfg); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "model")
	if _, err := synth.Write(context.Background(), dir, synth.Options{Config: raw, Layers: 2, Seed: 9}); err != nil {
		t.Fatal(err)
	}
	return dir
}

// TestModelExpandedMatchesCPUOnGPU runs a prompt in two steps through a
// small model whose steps take the expanded attention (its first step in
// one split, its second, with fewer rows than half its keys, in splits)
// and compares every row's logits with the CPU backend's (the latent
// form): within 1e-2 of the largest, for the bf16 and fp8 caches. The
// GPU's latent form on the same prompt is logged beside it.
func TestModelExpandedMatchesCPUOnGPU(t *testing.T) {
	testDevice(t)
	dir := smallHeadsModel(t)
	ids := randomIDs(rand.New(rand.NewPCG(12, 5)), 800, 1024)
	run := func(b backend.Backend, dt backend.CacheDType) []float32 {
		m := loadOn(t, dir, b)
		s, err := m.NewState(len(ids), dt)
		if err != nil {
			t.Fatal(err)
		}
		first, err := m.ForwardSeq(s, ids[:500], true)
		if err != nil {
			t.Fatal(err)
		}
		second, err := m.ForwardSeq(s, ids[500:], true)
		if err != nil {
			t.Fatal(err)
		}
		return append(append([]float32(nil), first...), second...)
	}
	for _, dt := range []backend.CacheDType{backend.CacheBF16, backend.CacheFP8} {
		g, c := testBackends(t, Options{})
		want := run(c, dt)
		g.expandedMin = 256
		got := run(g, dt)
		if g.expandedSteps == 0 {
			t.Fatalf("%v cache: no step took the expanded form", dt)
		}
		g.expandedMin = 0
		latent := run(g, dt)
		e := maxRelErr(want, got)
		t.Logf("%v cache: expanded form max rel err %.2e over %d rows (%d layer steps); GPU latent form %.2e", dt, e, len(ids), g.expandedSteps, maxRelErr(want, latent))
		if !(e <= 1e-2) {
			t.Errorf("%v cache: expanded form max relative error %.3e above 1e-2", dt, e)
		}
	}
}
