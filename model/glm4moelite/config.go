package glm4moelite

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Config is the part of a glm4_moe_lite config.json that the forward pass
// needs, with defaults resolved and the dense/MoE layer pattern expanded.
type Config struct {
	VocabSize           int
	HiddenSize          int
	IntermediateSize    int // dense MLP
	MoEIntermediateSize int // each routed and shared expert
	NumLayers           int
	NumHeads            int
	QLoraRank           int // 0: a single q_proj instead of q_a/q_b
	KVLoraRank          int
	QKNopeHeadDim       int
	QKRopeHeadDim       int
	VHeadDim            int
	NumExperts          int
	NumSharedExperts    int
	ExpertsPerToken     int
	NumGroups           int
	TopKGroups          int
	NormTopKProb        bool
	RoutedScaling       float32
	RMSNormEps          float32
	RopeTheta           float64
	RopeInterleave      bool
	TieEmbeddings       bool
	MaxPositions        int
	Dense               []bool // per layer: dense MLP (true) or MoE (false)
	BOSTokenID          int    // -1 when absent (the end ids: tokenizer.StopIDs)
}

// rawConfig mirrors config.json; pointers tell a missing field from a zero.
type rawConfig struct {
	ModelType             *string        `json:"model_type"`
	VocabSize             *int           `json:"vocab_size"`
	HiddenSize            *int           `json:"hidden_size"`
	IntermediateSize      *int           `json:"intermediate_size"`
	MoEIntermediateSize   *int           `json:"moe_intermediate_size"`
	NumHiddenLayers       *int           `json:"num_hidden_layers"`
	NumAttentionHeads     *int           `json:"num_attention_heads"`
	NumKeyValueHeads      *int           `json:"num_key_value_heads"`
	QLoraRank             *int           `json:"q_lora_rank"`
	KVLoraRank            *int           `json:"kv_lora_rank"`
	QKNopeHeadDim         *int           `json:"qk_nope_head_dim"`
	QKRopeHeadDim         *int           `json:"qk_rope_head_dim"`
	VHeadDim              *int           `json:"v_head_dim"`
	NRoutedExperts        *int           `json:"n_routed_experts"`
	NSharedExperts        *int           `json:"n_shared_experts"`
	NumExpertsPerTok      *int           `json:"num_experts_per_tok"`
	NGroup                *int           `json:"n_group"`
	TopKGroup             *int           `json:"topk_group"`
	TopKMethod            *string        `json:"topk_method"`
	ScoringFunc           *string        `json:"scoring_func"`
	NormTopKProb          *bool          `json:"norm_topk_prob"`
	RoutedScalingFactor   *float64       `json:"routed_scaling_factor"`
	FirstKDenseReplace    *int           `json:"first_k_dense_replace"`
	MLPLayerTypes         []string       `json:"mlp_layer_types"`
	HiddenAct             *string        `json:"hidden_act"`
	RMSNormEps            *float64       `json:"rms_norm_eps"`
	RopeTheta             *float64       `json:"rope_theta"`
	RopeScaling           map[string]any `json:"rope_scaling"`
	RopeParameters        map[string]any `json:"rope_parameters"`
	RopeInterleave        *bool          `json:"rope_interleave"`
	PartialRotaryFactor   *float64       `json:"partial_rotary_factor"`
	AttentionBias         *bool          `json:"attention_bias"`
	TieWordEmbeddings     *bool          `json:"tie_word_embeddings"`
	MaxPositionEmbeddings *int           `json:"max_position_embeddings"`
	BOSTokenID            *int           `json:"bos_token_id"`
}

// LoadConfig reads and validates DIR/config.json.
func LoadConfig(dir string) (*Config, error) {
	path := filepath.Join(dir, "config.json")
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading model config: %w", err)
	}
	cfg, err := ParseConfig(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return cfg, nil
}

// ParseConfig validates a config.json document. It accepts both published
// forms: first_k_dense_replace and rope_theta at the top level, or
// mlp_layer_types and rope_parameters (transformers 5).
func ParseConfig(data []byte) (*Config, error) {
	var r rawConfig
	if err := json.Unmarshal(data, &r); err != nil {
		return nil, fmt.Errorf("not valid JSON: %w", err)
	}
	if r.ModelType == nil {
		return nil, errors.New(`field "model_type" is missing`)
	}
	if *r.ModelType != "glm4_moe_lite" {
		return nil, fmt.Errorf(`field "model_type" is %q: this engine runs glm4_moe_lite only`, *r.ModelType)
	}
	var missing []string
	need := func(name string, v *int) int {
		if v == nil {
			missing = append(missing, name)
			return 0
		}
		return *v
	}
	c := &Config{
		VocabSize:           need("vocab_size", r.VocabSize),
		HiddenSize:          need("hidden_size", r.HiddenSize),
		IntermediateSize:    need("intermediate_size", r.IntermediateSize),
		MoEIntermediateSize: need("moe_intermediate_size", r.MoEIntermediateSize),
		NumLayers:           need("num_hidden_layers", r.NumHiddenLayers),
		NumHeads:            need("num_attention_heads", r.NumAttentionHeads),
		KVLoraRank:          need("kv_lora_rank", r.KVLoraRank),
		QKNopeHeadDim:       need("qk_nope_head_dim", r.QKNopeHeadDim),
		QKRopeHeadDim:       need("qk_rope_head_dim", r.QKRopeHeadDim),
		VHeadDim:            need("v_head_dim", r.VHeadDim),
		NumExperts:          need("n_routed_experts", r.NRoutedExperts),
		ExpertsPerToken:     need("num_experts_per_tok", r.NumExpertsPerTok),
		NumSharedExperts:    intOr(r.NSharedExperts, 1),
		NumGroups:           intOr(r.NGroup, 1),
		TopKGroups:          intOr(r.TopKGroup, 1),
		NormTopKProb:        boolOr(r.NormTopKProb, true),
		RoutedScaling:       float32(floatOr(r.RoutedScalingFactor, 1)),
		RMSNormEps:          float32(floatOr(r.RMSNormEps, 1e-5)),
		RopeInterleave:      boolOr(r.RopeInterleave, true),
		TieEmbeddings:       boolOr(r.TieWordEmbeddings, false),
		MaxPositions:        intOr(r.MaxPositionEmbeddings, 0),
		QLoraRank:           intOr(r.QLoraRank, 0),
		BOSTokenID:          intOr(r.BOSTokenID, -1),
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("required fields missing: %s", strings.Join(missing, ", "))
	}
	for _, f := range []struct {
		name string
		v    int
	}{
		{"vocab_size", c.VocabSize}, {"hidden_size", c.HiddenSize}, {"intermediate_size", c.IntermediateSize},
		{"moe_intermediate_size", c.MoEIntermediateSize}, {"num_hidden_layers", c.NumLayers},
		{"num_attention_heads", c.NumHeads}, {"kv_lora_rank", c.KVLoraRank}, {"qk_nope_head_dim", c.QKNopeHeadDim},
		{"qk_rope_head_dim", c.QKRopeHeadDim}, {"v_head_dim", c.VHeadDim}, {"n_routed_experts", c.NumExperts},
		{"num_experts_per_tok", c.ExpertsPerToken}, {"n_group", c.NumGroups}, {"topk_group", c.TopKGroups},
	} {
		if f.v <= 0 {
			return nil, fmt.Errorf("field %q is %d, want a positive integer", f.name, f.v)
		}
	}
	// A missing max_position_embeddings means "unknown" (0); an explicit
	// value must leave room for at least one token.
	if r.MaxPositionEmbeddings != nil && *r.MaxPositionEmbeddings <= 0 {
		return nil, fmt.Errorf(`field "max_position_embeddings" is %d, want a positive integer`, *r.MaxPositionEmbeddings)
	}
	// RMSNorm divides by sqrt(mean(x^2) + eps): eps <= 0 gives Inf or NaN on
	// an all-zero row (and a float32 of 0 for a tiny positive eps).
	if r.RMSNormEps != nil && !(*r.RMSNormEps > 0 && c.RMSNormEps > 0) {
		return nil, fmt.Errorf(`field "rms_norm_eps" is %v, want a positive number`, *r.RMSNormEps)
	}
	if c.QKRopeHeadDim%2 != 0 {
		return nil, fmt.Errorf(`field "qk_rope_head_dim" is %d, want an even number`, c.QKRopeHeadDim)
	}
	if r.NumKeyValueHeads != nil && *r.NumKeyValueHeads != c.NumHeads {
		return nil, fmt.Errorf(`field "num_key_value_heads" is %d: MLA needs it equal to num_attention_heads (%d)`, *r.NumKeyValueHeads, c.NumHeads)
	}
	if r.TopKMethod != nil && *r.TopKMethod != "noaux_tc" {
		return nil, fmt.Errorf(`field "topk_method" is %q: only noaux_tc is supported`, *r.TopKMethod)
	}
	if r.ScoringFunc != nil && *r.ScoringFunc != "sigmoid" {
		return nil, fmt.Errorf(`field "scoring_func" is %q: only sigmoid is supported`, *r.ScoringFunc)
	}
	if r.HiddenAct != nil && *r.HiddenAct != "silu" {
		return nil, fmt.Errorf(`field "hidden_act" is %q: only silu is supported`, *r.HiddenAct)
	}
	if r.AttentionBias != nil && *r.AttentionBias {
		return nil, errors.New(`field "attention_bias" is true: attention projections with bias are not supported`)
	}
	if r.PartialRotaryFactor != nil && *r.PartialRotaryFactor != 1 {
		return nil, fmt.Errorf(`field "partial_rotary_factor" is %v: only 1.0 is supported`, *r.PartialRotaryFactor)
	}
	if c.NumExperts%c.NumGroups != 0 {
		return nil, fmt.Errorf(`field "n_routed_experts" (%d) is not a multiple of "n_group" (%d)`, c.NumExperts, c.NumGroups)
	}
	if c.NumGroups > 1 && c.NumExperts/c.NumGroups < 2 {
		return nil, fmt.Errorf(`field "n_group" (%d) leaves fewer than 2 experts per group`, c.NumGroups)
	}
	if c.TopKGroups > c.NumGroups {
		return nil, fmt.Errorf(`field "topk_group" (%d) exceeds "n_group" (%d)`, c.TopKGroups, c.NumGroups)
	}
	if c.ExpertsPerToken > c.TopKGroups*(c.NumExperts/c.NumGroups) {
		return nil, fmt.Errorf(`field "num_experts_per_tok" (%d) exceeds the experts in the chosen groups (%d)`,
			c.ExpertsPerToken, c.TopKGroups*(c.NumExperts/c.NumGroups))
	}
	if c.NumSharedExperts < 0 {
		return nil, fmt.Errorf(`field "n_shared_experts" is %d`, c.NumSharedExperts)
	}

	theta, err := ropeTheta(&r)
	if err != nil {
		return nil, err
	}
	c.RopeTheta = theta

	c.Dense = make([]bool, c.NumLayers)
	switch {
	case r.MLPLayerTypes != nil:
		if len(r.MLPLayerTypes) != c.NumLayers {
			return nil, fmt.Errorf(`field "mlp_layer_types" has %d entries, want num_hidden_layers = %d`, len(r.MLPLayerTypes), c.NumLayers)
		}
		for i, t := range r.MLPLayerTypes {
			switch t {
			case "dense":
				c.Dense[i] = true
			case "sparse":
			default:
				return nil, fmt.Errorf(`field "mlp_layer_types"[%d] is %q, want "dense" or "sparse"`, i, t)
			}
		}
	default:
		k := intOr(r.FirstKDenseReplace, 1)
		if k < 0 || k > c.NumLayers {
			return nil, fmt.Errorf(`field "first_k_dense_replace" is %d, want 0..%d`, k, c.NumLayers)
		}
		for i := 0; i < k; i++ {
			c.Dense[i] = true
		}
	}

	return c, nil
}

// ropeTheta reads the rotary base from either form and rejects scaling
// types this engine does not implement.
func ropeTheta(r *rawConfig) (float64, error) {
	check := func(field string, m map[string]any) error {
		t, _ := m["rope_type"].(string)
		if t == "" {
			t, _ = m["type"].(string)
		}
		if t != "" && t != "default" {
			return fmt.Errorf("field %q has rope type %q: only default RoPE is supported", field, t)
		}
		return nil
	}
	if r.RopeScaling != nil {
		if err := check("rope_scaling", r.RopeScaling); err != nil {
			return 0, err
		}
	}
	if r.RopeParameters != nil {
		if err := check("rope_parameters", r.RopeParameters); err != nil {
			return 0, err
		}
		if v, ok := r.RopeParameters["rope_theta"].(float64); ok {
			if v <= 0 {
				return 0, fmt.Errorf(`field "rope_parameters.rope_theta" is %v, want > 0`, v)
			}
			return v, nil
		}
	}
	if r.RopeTheta != nil {
		if *r.RopeTheta <= 0 {
			return 0, fmt.Errorf(`field "rope_theta" is %v, want > 0`, *r.RopeTheta)
		}
		return *r.RopeTheta, nil
	}
	return 0, errors.New(`field "rope_theta" (or "rope_parameters.rope_theta") is missing`)
}

func intOr(v *int, d int) int {
	if v == nil {
		return d
	}
	return *v
}

func boolOr(v *bool, d bool) bool {
	if v == nil {
		return d
	}
	return *v
}

func floatOr(v *float64, d float64) float64 {
	if v == nil {
		return d
	}
	return *v
}
