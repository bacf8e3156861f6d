package glm4moelite

import (
	"strings"
	"testing"

	"github.com/mmfp4/mmfp4/backend/cpu"
)

// TestGoldenLogitsOnEveryKernel runs the reference-logit tests once per CPU
// kernel family this machine supports (AVX-512, AVX-VNNI, AVX2, pure Go)
// other than the default (fastest) one, which the tests themselves use.
func TestGoldenLogitsOnEveryKernel(t *testing.T) {
	for _, k := range cpu.Kernels()[1:] {
		t.Run(k, func(t *testing.T) {
			t.Setenv("MMFP4_CPU_KERNEL", k)
			if got := cpu.New(cpu.Options{}).Name(); !strings.Contains(got, " "+k+" kernels") {
				t.Fatalf("backend %q does not run the %s kernels", got, k)
			}
			t.Run("bf16", TestBF16LogitsMatchReference)
			t.Run("layers", TestLayersMatchReference)
			t.Run("each-step", TestEachStepMatchesReference)
			t.Run("greedy", TestGreedyContinuationMatchesReference)
			t.Run("cached", TestCachedDecodeMatchesRecompute)
			t.Run("mmfp4-vs-dequantized", TestMMFP4MatchesItsDequantizedWeights)
			t.Run("mmfp4-kl", TestMMFP4KLNoWorseThanRTN)
		})
	}
}
