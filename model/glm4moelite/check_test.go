package glm4moelite

import (
	"strings"
	"testing"

	"github.com/mmfp4/mmfp4/safetensors"
)

// Check accepts what Load accepts and refuses, with Load's message, what it
// refuses.
func TestCheck(t *testing.T) {
	if err := Check(fixtureDir); err != nil {
		t.Fatal(err)
	}
	if err := Check(quantizeFixture(t, false)); err != nil {
		t.Fatalf("MMFP4 fixture: %v", err)
	}
	const victim = "model.layers.3.mlp.experts.7.down_proj.weight"
	dir := rewriteFixture(t, func(info safetensors.TensorInfo, data []byte) (*safetensors.TensorInfo, []byte) {
		if info.Name == victim {
			return nil, nil
		}
		return &info, data
	}, nil)
	if err := Check(dir); err == nil || !strings.Contains(err.Error(), victim) {
		t.Errorf("missing %s: err = %v", victim, err)
	}
}
