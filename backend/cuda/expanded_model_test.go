//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/synth"
)

// smallHeadsModel writes a random model with GLM-4.7-Flash's attention
// head shapes (dn 192, dr 64, dv 256, rank 512: the expanded form's) and
// everything else small: 4 heads, hidden 256, 2 layers, a vocabulary of
// 1024, and 4 experts all routed to, so that no rounding can change a
// token's choice of experts (with 8 experts, 2 routed to, both GPU forms
// were 0.4 of the largest logit from the CPU's on an H200, and 2.3e-2 to
// 2.8e-2 with all 4 routed to).
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
		"num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 128, "n_routed_experts": 4,
		"num_experts_per_tok": 4,
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
// form), for the bf16 and fp8 caches. The bound is not the fixture's 1e-2:
// through this model's int8 activations and MMFP4 weights a last-bit
// difference moves a code by a step, and on an H200 the GPU's own latent
// form was 2.3e-2 and 2.8e-2 of the largest logit from the CPU's, the
// expanded form 2.3e-2 and 2.5e-2. 3e-2 holds the expanded form to what
// the latent form achieves; the latent form's figure is logged beside it.
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
	defer func(v bool) { expandWGMMA = v }(expandWGMMA)
	for _, dt := range []backend.CacheDType{backend.CacheBF16, backend.CacheFP8} {
		g, c := testBackends(t, Options{})
		want := run(c, dt)
		g.expandedMin = 0
		msg := fmt.Sprintf("GPU latent form %.2e", maxRelErr(want, run(g, dt)))
		for _, wg := range expandedForms(t, g.dev) {
			expandWGMMA, g.expandedMin, g.expandedSteps = wg, 256, 0
			got := run(g, dt)
			if g.expandedSteps == 0 {
				t.Fatalf("%v cache: no step took the expanded form", dt)
			}
			e := maxRelErr(want, got)
			msg += fmt.Sprintf(", wgmma %v %.2e (%d layer steps)", wg, e, g.expandedSteps)
			if !(e <= 3e-2) {
				t.Errorf("%v cache, wgmma %v: expanded form max relative error %.3e above 3e-2", dt, wg, e)
			}
		}
		t.Logf("%v cache, logits of %d rows against the CPU's: %s", dt, len(ids), msg)
	}
}
