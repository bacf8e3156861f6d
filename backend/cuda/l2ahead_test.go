package cuda

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/synth"
)

// The MoE down launches asking L2 for the next layer's q_a and kv_a
// weights (l2ahead.go) leave a decode's logits as they were, bit for bit,
// on a random model of GLM-4.7-Flash's shapes cut to three layers (the
// shapes the single-token launches take); and with it on they asked for
// both matrices of each later layer, every step.
func TestMoEAheadKeepsLogitsOnGPU(t *testing.T) {
	testDevice(t)
	cfg, err := synth.PresetConfig("glm-4.7-flash")
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "model")
	if _, err := synth.Write(context.Background(), dir, synth.Options{Config: cfg, Layers: 3, Seed: 7}); err != nil {
		t.Fatal(err)
	}
	prompt := []int{11, 4096, 77, 150000, 9, 31337, 2}
	const steps = 8
	decode := func(off bool) ([]float32, int) {
		defer func(v bool) { moeAheadOff = v }(moeAheadOff)
		moeAheadOff = off
		g, _ := testBackends(t, Options{})
		logits := greedyLogits(t, loadOn(t, dir, g), prompt, steps, backend.CacheBF16)
		return logits, g.moeAheads
	}
	want, n0 := decode(true)
	got, n := decode(false)
	// Layer 0 is dense; the MoE of layer 1 asks for layer 2's weights,
	// that of layer 2 (the last) for none: one MoE each step of one token.
	if n0 != 0 || n != 2*steps {
		t.Errorf("weights asked for: %d with the requests on, %d off; want %d, 0", n, n0, 2*steps)
	}
	if i := sameBits(want, got); i >= 0 {
		t.Fatalf("logit %d: %v with the requests, %v without", i, got[i], want[i])
	}
}
