package glm4moelite

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/mmfp4/mmfp4/safetensors"
)

func TestReadConvertPolicy(t *testing.T) {
	p, err := ReadConvertPolicy(fixtureDir)
	if err != nil {
		t.Fatal(err)
	}
	if p.NumLayers != 4 {
		t.Errorf("NumLayers %d, want the fixture's 4", p.NumLayers)
	}
	bad := map[string]string{
		"model_type":        `{"model_type": "llama", "num_hidden_layers": 1}`,
		"num_hidden_layers": `{"model_type": "glm4_moe_lite", "num_hidden_layers": 0}`,
		"config.json":       `{"model_type": `,
	}
	for field, content := range bad {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		_, err := ReadConvertPolicy(dir)
		if err == nil || !strings.Contains(err.Error(), "config.json") || !strings.Contains(err.Error(), field) {
			t.Errorf("%s: err = %v, want one naming config.json and %s", content, err, field)
		}
	}
	if _, err := ReadConvertPolicy(t.TempDir()); err == nil {
		t.Error("a directory without config.json accepted")
	}
}

// The policy agrees with the loader: on the fixture, the tensors kept in
// fp32 are exactly the routers of its three MoE layers, and nothing the
// model loads is skipped.
func TestConvertPolicyOnFixture(t *testing.T) {
	p, err := ReadConvertPolicy(fixtureDir)
	if err != nil {
		t.Fatal(err)
	}
	set, err := safetensors.OpenDir(fixtureDir)
	if err != nil {
		t.Fatal(err)
	}
	defer set.Close()
	var kept []string
	for _, name := range set.Names() {
		if p.Skip(name) {
			t.Errorf("%s skipped", name)
		}
		if p.KeepF32(name) {
			kept = append(kept, name)
		}
	}
	var want []string
	for _, l := range []string{"1", "2", "3"} {
		want = append(want, "model.layers."+l+".mlp.gate.e_score_correction_bias", "model.layers."+l+".mlp.gate.weight")
	}
	if !slices.Equal(kept, want) {
		t.Errorf("kept in fp32: %v, want %v", kept, want)
	}
	for name, skip := range map[string]bool{
		"model.layers.4.self_attn.q_a_proj.weight":    true, // the MTP layer of a 4-layer model
		"model.layers.47.eh_proj.weight":              true,
		"model.layers.3.mlp.experts.0.up_proj.weight": false,
		"model.layers.x.weight":                       false,
		"lm_head.weight":                              false,
	} {
		if p.Skip(name) != skip {
			t.Errorf("Skip(%s) = %v, want %v", name, !skip, skip)
		}
	}
}
