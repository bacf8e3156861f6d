package glm4moelite

import (
	"fmt"
	"slices"
	"strings"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/format"
	"github.com/mmfp4/mmfp4/safetensors"
)

// LoadOptions change how weights are loaded.
type LoadOptions struct {
	// Dequantize expands MMFP4 weights to float32 at load, giving the
	// dequantized-weights forward pass that the MMFP4 kernels are compared with.
	Dequantize bool
}

// Load reads a model directory, either a Hugging Face checkpoint
// (bf16/f16/f32 safetensors) or an MMFP4 directory, onto backend b. The
// returned Model keeps the safetensors mapping open: MMFP4 weights are used
// in place. MTP layers (index >= num_hidden_layers) are not loaded.
func Load(dir string, b backend.Backend, opt LoadOptions) (*Model, error) {
	ld, cfg, err := openDir(dir, b, opt)
	if err != nil {
		return nil, err
	}
	m, err := ld.model(cfg)
	if err != nil {
		ld.set.Close()
		return nil, err
	}
	m.files = ld.set
	return m, nil
}

// openDir reads the config and opens the weights of dir.
func openDir(dir string, b backend.Backend, opt LoadOptions) (*loader, *Config, error) {
	cfg, err := LoadConfig(dir)
	if err != nil {
		return nil, nil, err
	}
	set, err := safetensors.OpenDir(dir)
	if err != nil {
		return nil, nil, err
	}
	ld := &loader{b: b, set: set, opt: opt, dir: dir}
	if format.IsMMFP4Dir(dir) {
		h, err := format.ReadHeader(dir)
		if err != nil {
			set.Close()
			return nil, nil, err
		}
		ld.group = h.GroupSize
	} else {
		// Without the header the group size is unknown and packed
		// weights would read as missing ones.
		for _, name := range set.Names() {
			if strings.HasSuffix(name, ".qweight") {
				set.Close()
				return nil, nil, fmt.Errorf("%s: tensor %s is MMFP4-packed, but the format header %s is missing", dir, name, format.HeaderFile)
			}
		}
	}
	return ld, cfg, nil
}

type loader struct {
	b     backend.Backend
	set   *safetensors.Set
	opt   LoadOptions
	dir   string
	group int // MMFP4 group size; 0 for a plain checkpoint
	err   error
}

// matrix loads weight name with shape [n, k], MMFP4-packed or dense.
func (ld *loader) matrix(name string, n, k int) backend.Weight {
	return ld.upload(ld.host(name, n, k))
}

// upload hands host weight data to the backend.
func (ld *loader) upload(hw backend.HostWeight) backend.Weight {
	if ld.err != nil {
		return nil
	}
	w, err := ld.b.NewWeight(hw)
	if err != nil {
		ld.err = err
	}
	return w
}

// host reads weight name with shape [n, k], MMFP4-packed or dense, on the
// host.
func (ld *loader) host(name string, n, k int) backend.HostWeight {
	hw := backend.HostWeight{Name: name, N: n, K: k}
	if ld.err != nil {
		return hw
	}
	qn, sn, rn := format.QuantizedNames(name)
	if ld.group > 0 && ld.set.Has(qn) {
		var ts [3]*safetensors.Tensor
		for i, tn := range []string{qn, sn, rn} {
			if ts[i], ld.err = ld.set.Tensor(tn); ld.err != nil {
				return hw
			}
		}
		q, err := format.MatrixFromTensors(ts[0], ts[1], ts[2], ld.group)
		if err != nil {
			ld.err = err
			return hw
		}
		if q.N != n || q.K != k {
			ld.err = fmt.Errorf("%s: tensor %s: MMFP4 matrix is [%d %d], want [%d %d]", ts[0].File, name, q.N, q.K, n, k)
			return hw
		}
		if ld.opt.Dequantize {
			hw.Dense = q.Dequantize()
		} else {
			hw.Quant = q
		}
	} else {
		hw.Dense = ld.floats(name, n, k)
	}
	return hw
}

// rowBlocks copies rows [from+i*stride, from+i*stride+n) of w for each i
// < count into a new count*n x K weight: the per-head pieces of a matrix
// whose rows interleave heads.
func rowBlocks(w backend.HostWeight, name string, count, stride, from, n int) backend.HostWeight {
	out := backend.HostWeight{Name: name, N: count * n, K: w.K}
	for i := 0; i < count; i++ {
		lo := from + i*stride
		if w.Quant != nil {
			q, groups := w.Quant, w.K/w.Quant.GroupSize
			if out.Quant == nil {
				out.Quant = &format.Matrix{N: count * n, K: w.K, GroupSize: q.GroupSize}
			}
			out.Quant.Codes = append(out.Quant.Codes, q.Codes[lo*w.K/2:(lo+n)*w.K/2]...)
			out.Quant.Scales = append(out.Quant.Scales, q.Scales[lo*groups:(lo+n)*groups]...)
			out.Quant.RowScale = append(out.Quant.RowScale, q.RowScale[lo:lo+n]...)
		} else {
			out.Dense = append(out.Dense, w.Dense[lo*w.K:(lo+n)*w.K]...)
		}
	}
	return out
}

// table loads the embedding. A bf16 table stays in its stored form (the
// memory map) and rows are widened on lookup, instead of holding a float32
// copy (1.27 GB at GLM-4.7-Flash's size); other forms load as matrix does.
func (ld *loader) table(name string, n, k int) backend.Weight {
	if ld.err != nil || ld.opt.Dequantize || !ld.set.Has(name) {
		return ld.matrix(name, n, k)
	}
	t, err := ld.set.Tensor(name)
	if err != nil {
		ld.err = err
		return nil
	}
	if t.DType != safetensors.BF16 {
		return ld.matrix(name, n, k)
	}
	if err := t.Check(safetensors.BF16, n, k); err != nil {
		ld.err = err
		return nil
	}
	w, err := ld.b.NewWeight(backend.HostWeight{Name: name, N: n, K: k, BF16: t.Data})
	if err != nil {
		ld.err = err
	}
	return w
}

// vector loads a 1-D tensor of length k as a 1 x k weight.
func (ld *loader) vector(name string, k int) backend.Weight {
	return ld.dense(name, 1, k, k)
}

// dense loads a float tensor stored with the given shape as an n x k weight.
// The router gate goes through here: it is never quantized.
func (ld *loader) dense(name string, n, k int, shape ...int) backend.Weight {
	if ld.err != nil {
		return nil
	}
	v := ld.floats(name, shape...)
	if ld.err != nil {
		return nil
	}
	w, err := ld.b.NewWeight(backend.HostWeight{Name: name, N: n, K: k, Dense: v})
	if err != nil {
		ld.err = err
	}
	return w
}

// floats reads a bf16/f16/f32 tensor of the given shape as float32.
func (ld *loader) floats(name string, shape ...int) []float32 {
	t, err := ld.set.Tensor(name)
	if err != nil {
		ld.err = err
		return nil
	}
	if !slices.Equal(t.Shape, shape) {
		ld.err = fmt.Errorf("%s: tensor %s: shape %v, want %v", t.File, name, t.Shape, shape)
		return nil
	}
	v, err := t.Float32()
	if err != nil {
		ld.err = err
		return nil
	}
	return v
}

func (ld *loader) mlp(prefix string, hidden, inter int) *MLP {
	return &MLP{
		Gate: ld.matrix(prefix+"gate_proj.weight", inter, hidden),
		Up:   ld.matrix(prefix+"up_proj.weight", inter, hidden),
		Down: ld.matrix(prefix+"down_proj.weight", hidden, inter),
	}
}

// prepareExperts hands a MoE layer's experts to a backend that prepares
// them at load, as the layer's forward pass will pass them (the shared
// expert beside the routed ones where the backend takes them together).
func (ld *loader) prepareExperts(prefix string, moe *MoE, topK int) {
	ep, ok := ld.b.(backend.ExpertPreparer)
	if !ok || ld.err != nil {
		return
	}
	_, shared := moe.sharedBeside(ld.b)
	if err := ep.PrepareExperts(moe.Experts, shared, topK); err != nil {
		ld.err = fmt.Errorf("%smlp.experts: %w", prefix, err)
	}
}

func (ld *loader) model(c *Config) (*Model, error) {
	H, heads := c.HiddenSize, c.NumHeads
	qk := c.QKNopeHeadDim + c.QKRopeHeadDim
	m := &Model{
		Config: c,
		b:      ld.b,
		mla: backend.MLAShape{Heads: heads, NopeDim: c.QKNopeHeadDim, RopeDim: c.QKRopeHeadDim,
			VDim: c.VHeadDim, Rank: c.KVLoraRank},
		route: backend.RouterConfig{TopK: c.ExpertsPerToken, Groups: c.NumGroups, TopKGroups: c.TopKGroups,
			NormTopKProb: c.NormTopKProb, RoutedScaling: c.RoutedScaling, NumExperts: c.NumExperts},
	}
	m.Embed = ld.table("model.embed_tokens.weight", c.VocabSize, H)
	for i := 0; i < c.NumLayers; i++ {
		p := fmt.Sprintf("model.layers.%d.", i)
		l := Layer{
			InputNorm:    ld.vector(p+"input_layernorm.weight", H),
			PostAttnNorm: ld.vector(p+"post_attention_layernorm.weight", H),
		}
		a := &l.Attn
		if c.QLoraRank > 0 {
			a.QA = ld.matrix(p+"self_attn.q_a_proj.weight", c.QLoraRank, H)
			a.QANorm = ld.vector(p+"self_attn.q_a_layernorm.weight", c.QLoraRank)
			a.QB = ld.matrix(p+"self_attn.q_b_proj.weight", heads*qk, c.QLoraRank)
		} else {
			a.Q = ld.matrix(p+"self_attn.q_proj.weight", heads*qk, H)
		}
		a.KVA = ld.matrix(p+"self_attn.kv_a_proj_with_mqa.weight", c.KVLoraRank+c.QKRopeHeadDim, H)
		a.KVANorm = ld.vector(p+"self_attn.kv_a_layernorm.weight", c.KVLoraRank)
		// kv_b_proj rows are, per head, dn key rows then dv value rows.
		dn, dv := c.QKNopeHeadDim, c.VHeadDim
		name := p + "self_attn.kv_b_proj.weight"
		kvb := ld.host(name, heads*(dn+dv), c.KVLoraRank)
		if ld.err == nil {
			a.UK = ld.upload(rowBlocks(kvb, name+" (W_UK)", heads, dn+dv, 0, dn))
			a.UV = ld.upload(rowBlocks(kvb, name+" (W_UV)", heads, dn+dv, dn, dv))
		}
		a.O = ld.matrix(p+"self_attn.o_proj.weight", H, heads*c.VHeadDim)

		if c.Dense[i] {
			l.MLP = ld.mlp(p+"mlp.", H, c.IntermediateSize)
		} else {
			moe := &MoE{
				Router: ld.dense(p+routerWeight, c.NumExperts, H, c.NumExperts, H),
				Bias:   ld.vector(p+routerBias, c.NumExperts),
			}
			for e := 0; e < c.NumExperts; e++ {
				ex := ld.mlp(fmt.Sprintf("%smlp.experts.%d.", p, e), H, c.MoEIntermediateSize)
				moe.Experts = append(moe.Experts, ex.expert())
			}
			if c.NumSharedExperts > 0 {
				moe.Shared = ld.mlp(p+"mlp.shared_experts.", H, c.MoEIntermediateSize*c.NumSharedExperts)
			}
			l.MoE = moe
			ld.prepareExperts(p, moe, c.ExpertsPerToken)
		}
		m.Layers = append(m.Layers, l)
		if ld.err != nil {
			return nil, ld.err
		}
	}
	m.Norm = ld.vector("model.norm.weight", H)
	if c.TieEmbeddings && !ld.set.Has("lm_head.weight") && !ld.set.Has("lm_head.weight.qweight") {
		m.LMHead = m.Embed
	} else {
		m.LMHead = ld.matrix("lm_head.weight", c.VocabSize, H)
	}
	if ld.err != nil {
		return nil, ld.err
	}
	return m, nil
}
