package glm4moelite

import (
	"encoding/json"
	"os"
	"strings"
	"testing"
)

// publishedConfig is GLM-4.7-Flash's config.json as published, kept in the
// repository's testdata.
func publishedConfig(t *testing.T) map[string]any {
	t.Helper()
	data, err := os.ReadFile("../../testdata/glm-4.7-flash.config.json")
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(data, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

func parse(t *testing.T, m map[string]any) (*Config, error) {
	t.Helper()
	data, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return ParseConfig(data)
}

func TestParsePublishedConfig(t *testing.T) {
	c, err := parse(t, publishedConfig(t))
	if err != nil {
		t.Fatal(err)
	}
	if c.NumLayers != 47 || c.NumExperts != 64 || c.KVLoraRank != 512 || c.RopeTheta != 1e6 || !c.RopeInterleave {
		t.Errorf("unexpected config %+v", c)
	}
	if !c.Dense[0] || c.Dense[1] || c.Dense[46] {
		t.Errorf("first_k_dense_replace=1 should make only layer 0 dense, got %v", c.Dense[:3])
	}
	if c.RoutedScaling != 1.8 || c.ExpertsPerToken != 4 || c.QLoraRank != 768 {
		t.Errorf("router fields wrong: %+v", c)
	}
}

// The transformers 5 form: mlp_layer_types and rope_parameters.
func TestParseTransformers5Form(t *testing.T) {
	m := publishedConfig(t)
	delete(m, "first_k_dense_replace")
	delete(m, "rope_theta")
	delete(m, "rope_scaling")
	types := make([]any, 47)
	for i := range types {
		types[i] = "sparse"
	}
	types[0], types[5] = "dense", "dense"
	m["mlp_layer_types"] = types
	m["rope_parameters"] = map[string]any{"rope_type": "default", "rope_theta": 5000.0}
	c, err := parse(t, m)
	if err != nil {
		t.Fatal(err)
	}
	if !c.Dense[0] || !c.Dense[5] || c.Dense[1] || c.RopeTheta != 5000 {
		t.Errorf("got dense %v theta %v", c.Dense[:6], c.RopeTheta)
	}
}

func TestParseFixtureConfig(t *testing.T) {
	c, err := LoadConfig(fixtureDir)
	if err != nil {
		t.Fatal(err)
	}
	if c.NumGroups != 4 || c.TopKGroups != 2 || c.RopeTheta != 10000 {
		t.Errorf("fixture config parsed wrong: %+v", c)
	}
}

func TestRejectBadConfigs(t *testing.T) {
	cases := []struct {
		name   string
		change func(m map[string]any)
		want   string
	}{
		{"model type", func(m map[string]any) { m["model_type"] = "llama" }, `"model_type" is "llama"`},
		{"no model type", func(m map[string]any) { delete(m, "model_type") }, `"model_type" is missing`},
		{"missing field", func(m map[string]any) { delete(m, "kv_lora_rank"); delete(m, "v_head_dim") }, "kv_lora_rank, v_head_dim"},
		{"yarn", func(m map[string]any) { m["rope_scaling"] = map[string]any{"type": "yarn", "factor": 4.0} }, `rope type "yarn"`},
		{"rope parameters", func(m map[string]any) {
			m["rope_parameters"] = map[string]any{"rope_type": "llama3", "rope_theta": 1.0}
		}, `rope type "llama3"`},
		{"no theta", func(m map[string]any) { delete(m, "rope_theta") }, `"rope_theta"`},
		{"topk method", func(m map[string]any) { m["topk_method"] = "greedy" }, `"topk_method"`},
		{"negative", func(m map[string]any) { m["hidden_size"] = -1 }, `"hidden_size" is -1`},
		{"groups", func(m map[string]any) { m["n_group"] = 3 }, `not a multiple of "n_group"`},
		{"kv heads", func(m map[string]any) { m["num_key_value_heads"] = 4 }, `"num_key_value_heads"`},
		{"layer types", func(m map[string]any) { m["mlp_layer_types"] = []any{"dense"} }, `"mlp_layer_types" has 1 entries`},
		{"act", func(m map[string]any) { m["hidden_act"] = "gelu" }, `"hidden_act"`},
		{"bias", func(m map[string]any) { m["attention_bias"] = true }, `"attention_bias"`},
		{"type", func(m map[string]any) { m["hidden_size"] = "big" }, "not valid JSON"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m := publishedConfig(t)
			tc.change(m)
			_, err := parse(t, m)
			if err == nil {
				t.Fatal("accepted")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not mention %q", err, tc.want)
			}
		})
	}
}

func FuzzParseConfig(f *testing.F) {
	data, err := os.ReadFile(fixtureDir + "/config.json")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(data)
	f.Add([]byte(`{"model_type":"glm4_moe_lite"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := ParseConfig(data)
		if err == nil && (len(c.Dense) != c.NumLayers || c.NumExperts%c.NumGroups != 0) {
			t.Fatalf("accepted an inconsistent config: %+v", c)
		}
	})
}
