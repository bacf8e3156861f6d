// Package glm4moelite is the glm4_moe_lite (GLM-4.7-Flash) forward pass:
// MLA attention with a latent KV cache, a dense first MLP, and mixture-of-
// experts layers with a sigmoid, bias-corrected top-k router. The code follows
// DESIGN.md section 3 line by line and runs on any backend.Backend.
package glm4moelite

import (
	"fmt"
	"io"
	"math"

	"github.com/mmfp4/mmfp4/backend"
)

// loraNormEps is the epsilon of q_a_layernorm and kv_a_layernorm: the
// reference builds them with the RMSNorm default, not rms_norm_eps.
const loraNormEps = 1e-6

// Model holds the weights of a loaded checkpoint on one backend.
type Model struct {
	Config *Config
	b      backend.Backend

	Embed  backend.Weight // model.embed_tokens
	Layers []Layer
	Norm   backend.Weight // model.norm
	LMHead backend.Weight // lm_head (the embedding when tied)

	mla   backend.MLAShape
	route backend.RouterConfig

	// DebugNaN checks every intermediate tensor and reports the first layer
	// and tensor that holds a NaN or Inf.
	DebugNaN bool

	files io.Closer // the memory-mapped weight files
}

// Close unmaps the weight files. The model must not be used afterwards.
func (m *Model) Close() error {
	if m.files == nil {
		return nil
	}
	err := m.files.Close()
	m.files = nil
	return err
}

// Layer is one decoder block.
type Layer struct {
	InputNorm    backend.Weight // input_layernorm
	PostAttnNorm backend.Weight // post_attention_layernorm
	Attn         Attention
	MLP          *MLP // dense layers
	MoE          *MoE // sparse layers
}

// Attention holds the MLA projections of a layer.
type Attention struct {
	QA, QANorm, QB backend.Weight // q_a_proj, q_a_layernorm, q_b_proj (QA nil: Q)
	Q              backend.Weight // q_proj, when q_lora_rank is null
	KVA, KVANorm   backend.Weight // kv_a_proj_with_mqa, kv_a_layernorm
	KVB            backend.Weight // kv_b_proj: per head W_UK[dn] then W_UV[dv] rows
	O              backend.Weight // o_proj
}

// MLP is a SwiGLU feed-forward block.
type MLP struct {
	Gate, Up, Down backend.Weight
}

// MoE is a routed mixture of experts plus the always-on shared expert.
type MoE struct {
	Router  backend.Weight // mlp.gate.weight, fp32
	Bias    backend.Weight // mlp.gate.e_score_correction_bias
	Experts []backend.Expert
	Shared  *MLP // nil when n_shared_experts == 0
}

// State is one sequence: its latent cache and the next position. A Model
// may run many States concurrently; one State is used by one goroutine.
type State struct {
	cache  backend.Cache
	Pos    int
	nanErr error // first non-finite tensor of the current pass (DebugNaN)
}

// NewState allocates the cache of a sequence of up to capacity tokens.
func (m *Model) NewState(capacity int) *State {
	c := m.Config
	return &State{cache: m.b.NewCache(c.NumLayers, capacity, c.KVLoraRank, c.QKRopeHeadDim)}
}

// Capacity is the number of positions the state can hold.
func (s *State) Capacity() int { return s.cache.Capacity() }

// Forward runs ids at positions s.Pos, s.Pos+1, ... through the model,
// appends them to the cache and returns the logits: of every position
// (len(ids) rows of VocabSize) when allLogits, else of the last one only.
func (m *Model) Forward(s *State, ids []int, allLogits bool) ([]float32, error) {
	T := len(ids)
	if T == 0 {
		return nil, fmt.Errorf("forward: no tokens")
	}
	if s.Pos+T > s.cache.Capacity() {
		return nil, fmt.Errorf("context full: %d cached + %d new tokens exceed the context of %d", s.Pos, T, s.cache.Capacity())
	}
	b, c := m.b, m.Config
	s.nanErr = nil

	x := b.NewTensor(T, c.HiddenSize)
	if err := b.Embed(x, m.Embed, ids); err != nil {
		return nil, err
	}
	for i := range m.Layers {
		m.layer(i, x, s)
		if s.nanErr != nil {
			return nil, s.nanErr
		}
	}
	s.Pos += T

	if !allLogits {
		x = b.Rows(x, T-1, T)
	}
	h := b.NewTensor(x.Rows(), c.HiddenSize)
	b.RMSNorm(h, x, m.Norm, c.RMSNormEps)
	logits := b.NewTensor(x.Rows(), c.VocabSize)
	b.MatMul(logits, h, m.LMHead)
	out := b.Download(logits)
	first := s.Pos - x.Rows()
	if err := checkFinite(out, c.VocabSize); err != nil {
		return nil, fmt.Errorf("logits at position %d: %w (run with --debug-nan to find the layer)", first+err.(nonFinite).row, err)
	}
	return out, nil
}

// layer is h = x + Attn(RMSNorm(x)); x = h + FFN(RMSNorm(h)), in place on x.
func (m *Model) layer(i int, x backend.Tensor, s *State) {
	b, c, l := m.b, m.Config, &m.Layers[i]
	h := b.NewTensor(x.Rows(), c.HiddenSize)

	b.RMSNorm(h, x, l.InputNorm, c.RMSNormEps)
	a := m.attention(i, h, s)
	b.Add(x, x, a)
	m.watch(s, i, "attention residual", x)

	b.RMSNorm(h, x, l.PostAttnNorm, c.RMSNormEps)
	var f backend.Tensor
	if l.MLP != nil {
		f = m.mlp(l.MLP, h)
	} else {
		f = m.moe(s, i, l.MoE, h)
	}
	b.Add(x, x, f)
	m.watch(s, i, "ffn residual", x)
}

// attention is MLA with the absorbed (latent-space) form: only the latent c
// and the shared rotary key k_pe are cached.
func (m *Model) attention(i int, h backend.Tensor, s *State) backend.Tensor {
	b, c, a, sh := m.b, m.Config, &m.Layers[i].Attn, m.mla
	T, dn, dr, r := h.Rows(), sh.NopeDim, sh.RopeDim, sh.Rank
	qk := dn + dr

	// q = q_b_proj(RMSNorm_qa(q_a_proj(x))), per head [q_nope | q_pe].
	q := b.NewTensor(T, sh.Heads*qk)
	if a.QA != nil {
		qa := b.NewTensor(T, a.QA.Rows())
		b.MatMul(qa, h, a.QA)
		b.RMSNorm(qa, qa, a.QANorm, loraNormEps)
		b.MatMul(q, qa, a.QB)
	} else {
		b.MatMul(q, h, a.Q)
	}
	m.watch(s, i, "q", q)

	// [c | k_pe] = kv_a_proj_with_mqa(x); c = RMSNorm_kva(c).
	kv := b.NewTensor(T, r+dr)
	b.MatMul(kv, h, a.KVA)
	latent := b.NewTensor(T, r)
	b.RMSNorm(latent, b.Cols(kv, 0, r), a.KVANorm, loraNormEps)
	kpe := b.Cols(kv, r, r+dr)
	m.watch(s, i, "kv latent", latent)

	// RoPE on q_pe (every head) and on the shared k_pe.
	b.RoPE(q, sh.Heads, qk, dn, dr, s.Pos, c.RopeTheta, c.RopeInterleave)
	b.RoPE(kpe, 1, dr, 0, dr, s.Pos, c.RopeTheta, c.RopeInterleave)
	b.CacheWrite(s.cache, i, s.Pos, latent, kpe)

	// score = (q_lat.c + q_pe.k_pe) / sqrt(dn+dr) with q_lat = W_UK^T q_nope;
	// o_lat = sum p c; v = W_UV o_lat; out = o_proj(concat_h v).
	qlat := b.NewTensor(T, sh.Heads*r)
	b.AbsorbQuery(qlat, q, a.KVB, sh)
	olat := b.NewTensor(T, sh.Heads*r)
	b.LatentAttention(olat, qlat, q, s.cache, i, s.Pos, sh, float32(1/math.Sqrt(float64(qk))))
	v := b.NewTensor(T, sh.Heads*sh.VDim)
	b.ExpandValues(v, olat, a.KVB, sh)
	m.watch(s, i, "attention values", v)
	out := b.NewTensor(T, c.HiddenSize)
	b.MatMul(out, v, a.O)
	m.watch(s, i, "o_proj", out)
	return out
}

// mlp is down(silu(gate(x)) * up(x)).
func (m *Model) mlp(p *MLP, h backend.Tensor) backend.Tensor {
	b, T := m.b, h.Rows()
	g := b.NewTensor(T, p.Gate.Rows())
	u := b.NewTensor(T, p.Up.Rows())
	b.MatMul(g, h, p.Gate)
	b.MatMul(u, h, p.Up)
	b.SwiGLU(g, g, u)
	out := b.NewTensor(T, p.Down.Rows())
	b.MatMul(out, g, p.Down)
	return out
}

// moe is sum_e w_e expert_e(x) + shared_expert(x), with fp32 router logits.
func (m *Model) moe(s *State, i int, p *MoE, h backend.Tensor) backend.Tensor {
	b, T := m.b, h.Rows()
	logits := b.NewTensor(T, m.route.NumExperts)
	b.MatMul(logits, h, p.Router)
	m.watch(s, i, "router logits", logits)
	routing := b.Route(logits, p.Bias, m.route)
	out := b.NewTensor(T, m.Config.HiddenSize)
	b.MoE(out, h, routing, p.Experts)
	m.watch(s, i, "routed experts", out)
	if p.Shared != nil {
		b.Add(out, out, m.mlp(p.Shared, h))
		m.watch(s, i, "shared expert", out)
	}
	return out
}

// watch records the first non-finite tensor when DebugNaN is on.
func (m *Model) watch(s *State, layer int, name string, t backend.Tensor) {
	if !m.DebugNaN || s.nanErr != nil {
		return
	}
	if err := checkFinite(m.b.Download(t), t.Cols()); err != nil {
		s.nanErr = fmt.Errorf("layer %d, tensor %q, row %d: %w", layer, name, err.(nonFinite).row, err)
	}
}

type nonFinite struct {
	row, col int
	value    float32
}

func (e nonFinite) Error() string {
	return fmt.Sprintf("non-finite value %v at column %d", e.value, e.col)
}

func checkFinite(v []float32, cols int) error {
	for i, x := range v {
		if x != x || math.IsInf(float64(x), 0) {
			return nonFinite{row: i / cols, col: i % cols, value: x}
		}
	}
	return nil
}
