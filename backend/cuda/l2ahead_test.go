//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"testing"

	"github.com/mmfp4/mmfp4/backend"
)

// Launches asking L2 for the next launch's weights (l2ahead.go) leave a
// decode's logits as they were, bit for bit, on a random model of
// GLM-4.7-Flash's shapes cut to three layers (the shapes the single-token
// launches take); and with the requests on, every step asked for the
// weights each kind should.
func TestL2AheadKeepsLogitsOnGPU(t *testing.T) {
	testDevice(t)
	dir := synthGLM47(t, 3, 7)
	prompt := []int{11, 4096, 77, 150000, 9, 31337, 2}
	const steps = 8
	decode := func(off bool) ([]float32, [2]int) {
		defer func(v bool) { l2AheadOff = v }(l2AheadOff)
		l2AheadOff = off
		g, _ := testBackends(t, Options{})
		logits := greedyLogits(t, loadOn(t, dir, g), prompt, steps, backend.CacheBF16)
		return logits, g.aheads
	}
	want, n0 := decode(true)
	got, n := decode(false)
	// Each step of one token: the MoE of layer 1 asks for layer 2's q_a
	// and kv_a (layer 0 is dense; the last layer's MoE has no next layer);
	// layers 1 and 2 (those whose input norm adds a residual) ask for
	// q_b and W_UK.
	if w := [2]int{2 * steps, 4 * steps}; n0 != [2]int{} || n != w {
		t.Errorf("weights asked for (by MoE, by norm): %v with the requests on, %v off; want %v, none", n, n0, w)
	}
	if i := sameBits(want, got); i >= 0 {
		t.Fatalf("logit %d: %v with the requests, %v without", i, got[i], want[i])
	}
}
