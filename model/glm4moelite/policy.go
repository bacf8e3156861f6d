package glm4moelite

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Names of the router's tensors within a MoE layer ("model.layers.N.").
const (
	routerWeight = "mlp.gate.weight"
	routerBias   = "mlp.gate.e_score_correction_bias"
)

// ConvertPolicy is what a checkpoint converter must know about this
// architecture beyond the tensors themselves. It lives next to the loader
// because the loader is what it has to agree with.
type ConvertPolicy struct {
	// NumLayers is num_hidden_layers: the layers from this index on are the
	// multi-token-prediction head, which the engine does not load.
	NumLayers int
}

// ReadConvertPolicy reads the policy of the checkpoint in dir from its
// config.json. It reads only model_type (which must be glm4_moe_lite) and
// num_hidden_layers; the whole config is checked when the model loads.
func ReadConvertPolicy(dir string) (*ConvertPolicy, error) {
	path := filepath.Join(dir, "config.json")
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var cfg struct {
		ModelType       string `json:"model_type"`
		NumHiddenLayers *int   `json:"num_hidden_layers"`
	}
	if err := json.Unmarshal(raw, &cfg); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if cfg.ModelType != "glm4_moe_lite" {
		return nil, fmt.Errorf("%s: field model_type is %q, want \"glm4_moe_lite\"", path, cfg.ModelType)
	}
	if cfg.NumHiddenLayers == nil || *cfg.NumHiddenLayers <= 0 {
		return nil, fmt.Errorf("%s: field num_hidden_layers is missing or not positive", path)
	}
	return &ConvertPolicy{NumLayers: *cfg.NumHiddenLayers}, nil
}

// Skip reports whether the engine never loads tensor name: it belongs to a
// layer at index >= NumLayers (the MTP head).
func (p *ConvertPolicy) Skip(name string) bool {
	rest, ok := strings.CutPrefix(name, "model.layers.")
	if !ok {
		return false
	}
	idx, _, ok := strings.Cut(rest, ".")
	l, err := strconv.Atoi(idx)
	return ok && err == nil && l >= p.NumLayers
}

// KeepF32 reports whether tensor name must be stored exactly, in fp32: the
// router runs in fp32 and picks experts by small score differences, so its
// weight and correction bias are never rounded.
func (p *ConvertPolicy) KeepF32(name string) bool {
	return strings.HasSuffix(name, "."+routerWeight) || strings.HasSuffix(name, "."+routerBias)
}
