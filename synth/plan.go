package synth

import (
	"fmt"
	"math"

	"github.com/mmfp4/mmfp4/format"
	"github.com/mmfp4/mmfp4/model/glm4moelite"
	"github.com/mmfp4/mmfp4/safetensors"
)

// kind is how a logical tensor is stored and filled.
type kind int

const (
	matrixMMFP4 kind = iota // codes, E4M3 group scales and a row scale
	normBF16                // RMSNorm gain, about 1
	routerF32               // router gate, Gaussian
	biasF32                 // e_score_correction_bias, small Gaussian
)

// tensor is one logical tensor of the model: a weight [n, k] or a vector
// (n = 1) of k values.
type tensor struct {
	name string
	kind kind
	n, k int
	std  float64 // standard deviation of the values
}

// outputs are the stored tensors it becomes, in the order they are written.
func (t *tensor) outputs(g int) []safetensors.TensorInfo {
	switch t.kind {
	case matrixMMFP4:
		q, s, r := format.QuantizedNames(t.name)
		return []safetensors.TensorInfo{
			{Name: q, DType: safetensors.U8, Shape: []int{t.n, t.k / 2}},
			{Name: s, DType: safetensors.F8E4M3, Shape: []int{t.n, t.k / g}},
			{Name: r, DType: safetensors.F32, Shape: []int{t.n}},
		}
	case normBF16:
		return []safetensors.TensorInfo{{Name: t.name, DType: safetensors.BF16, Shape: []int{t.k}}}
	case routerF32:
		return []safetensors.TensorInfo{{Name: t.name, DType: safetensors.F32, Shape: []int{t.n, t.k}}}
	default:
		return []safetensors.TensorInfo{{Name: t.name, DType: safetensors.F32, Shape: []int{t.k}}}
	}
}

// bytes is the stored size of the tensor.
func (t *tensor) bytes(g int) int64 {
	n, k := int64(t.n), int64(t.k)
	switch t.kind {
	case matrixMMFP4:
		return n*k/2 + n*(k/int64(g)) + 4*n
	case normBF16:
		return 2 * k
	case routerF32:
		return 4 * n * k
	default:
		return 4 * k
	}
}

// headerEntry is the tensor's line in mmfp4.json.
func (t *tensor) headerEntry() format.HeaderTensor {
	switch t.kind {
	case matrixMMFP4:
		return format.HeaderTensor{Name: t.name, Shape: []int{t.n, t.k}, Quantized: true, DType: format.QuantizedDType}
	case normBF16:
		return format.HeaderTensor{Name: t.name, Shape: []int{t.k}, DType: string(safetensors.BF16)}
	case routerF32:
		return format.HeaderTensor{Name: t.name, Shape: []int{t.n, t.k}, DType: string(safetensors.F32)}
	default:
		return format.HeaderTensor{Name: t.name, Shape: []int{t.k}, DType: string(safetensors.F32)}
	}
}

// plan lists the tensors of a glm4_moe_lite model with configuration c, in
// the order they are written, with the policy of `mmfp4 quantize`: every
// matrix MMFP4 (the embedding too), norms bf16, the router and its bias F32.
//
// The scales keep activations of order 1 through any depth: a matrix with K
// inputs gets values of standard deviation 1/sqrt(K), so a normalised input
// of RMS 1 gives outputs of RMS about 1, and the residual stream grows only
// as the square root of the number of layers. The router's logits then have
// a standard deviation of about 1, which spreads tokens over the experts.
// Attention is the exception (qScale, oScale).
// Random attention with scores of standard deviation 1 is nearly flat: it
// averages the values of the whole context and adds about the same vector to
// every token. Through 47 layers that shared part grows until most tokens
// pick the same experts (measured: the busiest expert of a deep layer took 7
// times its share). Sharper scores (queries 3x) and a smaller attention
// output (0.3x) keep tokens apart, as the selective attention of a trained
// model does; the busiest expert then takes no more than chance gives.
const (
	qScale = 3
	oScale = 0.3
)

// biasStd is the spread of e_score_correction_bias. A trained model's bias
// evens out its router's preferences; a random one can only add a
// preference, so it is kept small (about 0.04 standard deviations of the
// router logits at the selection threshold) but not zero.
const biasStd = 0.005

func plan(c *glm4moelite.Config, g int) ([]*tensor, error) {
	H := c.HiddenSize
	for _, d := range []struct {
		name string
		k    int
	}{
		{"hidden_size", H}, {"intermediate_size", c.IntermediateSize}, {"moe_intermediate_size", c.MoEIntermediateSize},
		{"kv_lora_rank", c.KVLoraRank}, {"q_lora_rank", c.QLoraRank},
		{"num_attention_heads * v_head_dim", c.NumHeads * c.VHeadDim},
	} {
		if d.k%g != 0 {
			return nil, fmt.Errorf("%s = %d is not a multiple of the group size %d", d.name, d.k, g)
		}
	}
	var ts []*tensor
	mat := func(name string, n, k int) {
		ts = append(ts, &tensor{name: name, kind: matrixMMFP4, n: n, k: k, std: 1 / math.Sqrt(float64(k))})
	}
	norm := func(name string, k int) {
		ts = append(ts, &tensor{name: name, kind: normBF16, n: 1, k: k})
	}
	mlp := func(p string, inter int) {
		mat(p+"gate_proj.weight", inter, H)
		mat(p+"up_proj.weight", inter, H)
		mat(p+"down_proj.weight", H, inter)
	}

	ts = append(ts, &tensor{name: "model.embed_tokens.weight", kind: matrixMMFP4, n: c.VocabSize, k: H, std: 1})
	qk := c.QKNopeHeadDim + c.QKRopeHeadDim
	for i := 0; i < c.NumLayers; i++ {
		p := fmt.Sprintf("model.layers.%d.", i)
		norm(p+"input_layernorm.weight", H)
		if c.QLoraRank > 0 {
			mat(p+"self_attn.q_a_proj.weight", c.QLoraRank, H)
			norm(p+"self_attn.q_a_layernorm.weight", c.QLoraRank)
			mat(p+"self_attn.q_b_proj.weight", c.NumHeads*qk, c.QLoraRank)
			ts[len(ts)-1].std *= qScale
		} else {
			mat(p+"self_attn.q_proj.weight", c.NumHeads*qk, H)
			ts[len(ts)-1].std *= qScale
		}
		mat(p+"self_attn.kv_a_proj_with_mqa.weight", c.KVLoraRank+c.QKRopeHeadDim, H)
		norm(p+"self_attn.kv_a_layernorm.weight", c.KVLoraRank)
		mat(p+"self_attn.kv_b_proj.weight", c.NumHeads*(c.QKNopeHeadDim+c.VHeadDim), c.KVLoraRank)
		mat(p+"self_attn.o_proj.weight", H, c.NumHeads*c.VHeadDim)
		ts[len(ts)-1].std *= oScale
		norm(p+"post_attention_layernorm.weight", H)
		if c.Dense[i] {
			mlp(p+"mlp.", c.IntermediateSize)
			continue
		}
		ts = append(ts,
			&tensor{name: p + "mlp.gate.weight", kind: routerF32, n: c.NumExperts, k: H, std: 1 / math.Sqrt(float64(H))},
			&tensor{name: p + "mlp.gate.e_score_correction_bias", kind: biasF32, n: 1, k: c.NumExperts, std: biasStd})
		for e := 0; e < c.NumExperts; e++ {
			mlp(fmt.Sprintf("%smlp.experts.%d.", p, e), c.MoEIntermediateSize)
		}
		if c.NumSharedExperts > 0 {
			mlp(p+"mlp.shared_experts.", c.MoEIntermediateSize*c.NumSharedExperts)
		}
	}
	norm("model.norm.weight", H)
	if !c.TieEmbeddings {
		mat("lm_head.weight", c.VocabSize, H)
	}
	return ts, nil
}
