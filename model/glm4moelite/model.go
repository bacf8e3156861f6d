// Package glm4moelite is the glm4_moe_lite (GLM-4.7-Flash) forward pass:
// MLA attention with a latent KV cache, a dense first MLP, and mixture-of-
// experts layers with a sigmoid, bias-corrected top-k router. The code follows
// docs/design.md section 3 line by line and runs on any backend.Backend.
package glm4moelite

import (
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"sync"

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

	// Inspect, when set, is called with each intermediate tensor that
	// DebugNaN checks (layer, name, tensor), before the check. Tests use it
	// to compare the residual stream with a reference, or to replace it.
	Inspect func(layer int, name string, t backend.Tensor)

	// mu serialises forward passes: a backend runs one step at a time.
	mu     sync.Mutex
	nanErr error // first non-finite tensor of the current pass (DebugNaN)

	files io.Closer // the memory-mapped weight files
}

// Prefault maps every page of the weight files into the process ahead of
// the first forward pass, which then takes no page faults. It does nothing
// for weights that are not memory-mapped, and must not run concurrently with
// Close.
func (m *Model) Prefault() error {
	if p, ok := m.files.(interface{ Prefault() error }); ok {
		return p.Prefault()
	}
	return nil
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

// layerScoped is a backend whose per-step tensors can be freed layer by
// layer (the CPU arena), so a step's memory is one layer's temporaries.
type layerScoped interface {
	Mark() int
	Release(mark int)
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
	// kv_b_proj, split at load into its per-head key rows W_UK [H*dn, r]
	// and value rows W_UV [H*dv, r].
	UK, UV backend.Weight
	O      backend.Weight // o_proj
}

// MLP is a SwiGLU feed-forward block.
type MLP struct {
	Gate, Up, Down backend.Weight
}

// expert is the block as the backend's Expert: the same three weights.
func (p *MLP) expert() backend.Expert { return backend.Expert(*p) }

// MoE is a routed mixture of experts plus the always-on shared expert.
type MoE struct {
	Router  backend.Weight // mlp.gate.weight, fp32
	Bias    backend.Weight // mlp.gate.e_score_correction_bias
	Experts []backend.Expert
	Shared  *MLP // nil when n_shared_experts == 0
}

// Backend is the backend the model's weights live on.
func (m *Model) Backend() backend.Backend { return m.b }

// NewCachePool allocates a latent cache of blocks blocks of blockSize tokens
// for this model's layers and shapes.
func (m *Model) NewCachePool(blocks, blockSize int, dtype backend.CacheDType) (backend.CachePool, error) {
	c := m.Config
	return m.b.NewCachePool(c.NumLayers, blocks, blockSize, c.KVLoraRank, c.QKRopeHeadDim, dtype)
}

// Forward runs one step: every token of the batch goes through the model,
// its latent is written to pool at its sequence's slot, and the logits of
// the batch's Outputs rows are returned (len(Outputs) rows of VocabSize),
// unchecked: see CheckLogits.
// Forward passes are serialised; the backend is used by one at a time.
func (m *Model) Forward(batch *backend.Batch, pool backend.CachePool) ([]float32, error) {
	if err := batch.Validate(m.Config.VocabSize, pool.Blocks(), pool.BlockSize()); err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	logits, err := m.run(batch, pool)
	if logits == nil || err != nil {
		return nil, err
	}
	return m.download(batch, logits)
}

// Output is one output row of a step (ForwardOutputs): the token the
// backend chose for it, or its logits.
type Output struct {
	Logits []float32 // VocabSize values, unchecked (CheckLogits); nil when ID is set
	ID     int
	// Logprobs of the row, with ID, where its Sample entry asked for them
	// (the backend is a backend.LogprobSampler).
	Logprobs *backend.RowLogprobs
}

// ForwardOutputs is Forward for a batch whose Sample entries may ask for
// the token instead of the logits: where the backend implements
// backend.Sampler, an output with a Sample entry gets its token id, and
// the others (or all, on other backends or with DebugNaN) their logits. An
// entry that asks for log-probabilities gets its id only where the backend
// is a backend.LogprobSampler, with them; otherwise its logits. An output
// whose logits are not finite gets its logits, for CheckLogits to report.
func (m *Model) ForwardOutputs(batch *backend.Batch, pool backend.CachePool) ([]Output, error) {
	V := m.Config.VocabSize
	if err := batch.Validate(V, pool.Blocks(), pool.BlockSize()); err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	logits, err := m.run(batch, pool)
	if logits == nil || err != nil {
		return nil, err
	}
	outs := make([]Output, len(batch.Outputs))
	sampler, ok := m.b.(backend.Sampler)
	if !ok || len(batch.Sample) == 0 || m.DebugNaN {
		flat, err := m.download(batch, logits)
		if err != nil {
			return nil, err
		}
		for i := range outs {
			outs[i].Logits = flat[i*V : (i+1)*V]
		}
		return outs, nil
	}
	params := make([]backend.SampleParams, len(outs)) // rows without an entry: argmax, unused
	for i, p := range batch.Sample {
		if p != nil {
			params[i] = *p
		}
	}
	var ids []int32
	var lps []backend.RowLogprobs
	if ls, ok := sampler.(backend.LogprobSampler); ok && slices.ContainsFunc(batch.Sample, wantsLogprobs) {
		ids, lps = ls.SampleRowsLogprobs(logits, params)
	} else {
		ids = sampler.SampleRows(logits, params)
	}
	if err := m.b.Sync(); err != nil {
		return nil, err
	}
	for i := range outs {
		p := batch.Sample[i]
		if p != nil && ids[i] >= 0 && (!p.Logprobs || lps != nil) {
			outs[i].ID = int(ids[i])
			if p.Logprobs {
				outs[i].Logprobs = &lps[i]
			}
		} else {
			outs[i].Logits = m.b.Download(m.b.Rows(logits, i, i+1))
		}
	}
	return outs, m.b.Sync()
}

func wantsLogprobs(p *backend.SampleParams) bool { return p != nil && p.Logprobs }

// Async reports whether LaunchOutputs can queue a step ahead of the ids of
// the one before (the backend is a backend.AsyncSampler, DebugNaN off).
func (m *Model) Async() bool {
	_, ok := m.b.(backend.AsyncSampler)
	return ok && !m.DebugNaN
}

// LaunchOutputs queues a step whose every output has a Sample entry, on a
// model that is Async, and returns before its ids come back: wait returns
// them (an ID of -1 where the row's logits are not finite), with the
// log-probabilities asked for. The next batch may name
// them in Batch.Prev and be launched before this wait. Each wait is called
// once, in order, before the launch of the step after the next.
func (m *Model) LaunchOutputs(batch *backend.Batch, pool backend.CachePool) (wait func() ([]Output, error), err error) {
	as, ok := m.b.(backend.AsyncSampler)
	if !ok || m.DebugNaN {
		return nil, errors.New("model: steps cannot be queued ahead on this backend")
	}
	if len(batch.Outputs) == 0 || len(batch.Sample) != len(batch.Outputs) || slices.Contains(batch.Sample, nil) {
		return nil, errors.New("model: a step queued ahead needs a sampling entry for every output")
	}
	if err := batch.Validate(m.Config.VocabSize, pool.Blocks(), pool.BlockSize()); err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	logits, err := m.run(batch, pool)
	if err != nil {
		return nil, err
	}
	params := make([]backend.SampleParams, len(batch.Sample))
	for i, p := range batch.Sample {
		params[i] = *p
	}
	ids := as.SampleRowsAsync(logits, params)
	return func() ([]Output, error) {
		m.mu.Lock()
		defer m.mu.Unlock()
		got, lps, err := ids()
		if err != nil {
			return nil, err
		}
		outs := make([]Output, len(got))
		for i, id := range got {
			outs[i].ID = int(id) // -1: the row's logits are not finite
			if lps != nil && batch.Sample[i].Logprobs && id >= 0 {
				outs[i].Logprobs = &lps[i]
			}
		}
		return outs, nil
	}, nil
}

// run is the step of Forward up to the logits of the batch's outputs (nil
// when it has none), with m.mu held.
func (m *Model) run(batch *backend.Batch, pool backend.CachePool) (backend.Tensor, error) {
	c := m.Config
	b := m.b
	m.nanErr = nil
	b.SetBatch(batch, pool)
	T := batch.Rows()

	x := backend.NewOutput(b, T, c.HiddenSize)
	b.Embed(x, m.Embed)
	if r, err := m.firstNonFinite(x); err != nil {
		return nil, fmt.Errorf("embedding (model.embed_tokens.weight) row of token %d at position %d: %w", batch.Tokens[r], batch.Positions[r], err)
	}
	scoped, _ := b.(layerScoped)
	for i := range m.Layers {
		if batch.Interrupt != nil {
			if err := batch.Interrupt(); err != nil {
				return nil, err
			}
		}
		if scoped != nil {
			mark := scoped.Mark()
			m.layer(i, x)
			scoped.Release(mark) // x was allocated before the mark
		} else {
			m.layer(i, x)
		}
		if m.nanErr != nil {
			if pe, ok := m.nanErr.(positioned); ok {
				return nil, fmt.Errorf(pe.format, batch.Positions[pe.row])
			}
			return nil, m.nanErr
		}
	}
	if len(batch.Outputs) == 0 {
		return nil, b.Sync()
	}
	sel := backend.NewOutput(b, len(batch.Outputs), c.HiddenSize)
	b.SelectOutputs(sel, x)
	h := backend.NewOutput(b, sel.Rows(), c.HiddenSize)
	b.RMSNorm(h, sel, m.Norm, c.RMSNormEps)
	if r, err := m.firstNonFinite(h); err != nil {
		return nil, fmt.Errorf("final norm (model.norm) at position %d: %w", batch.Positions[batch.Outputs[r]], err)
	}
	logits := backend.NewOutput(b, sel.Rows(), c.VocabSize)
	b.MatMul(logits, h, m.LMHead)
	return logits, nil
}

// download copies the logits of run to the host.
func (m *Model) download(batch *backend.Batch, logits backend.Tensor) ([]float32, error) {
	c, b := m.Config, m.b
	out := b.Download(logits)
	if err := b.Sync(); err != nil {
		return nil, err
	}
	if m.DebugNaN { // every tensor before was finite
		if err := checkFinite(out, c.VocabSize); err != nil {
			return nil, fmt.Errorf("lm_head output at position %d (its input, the final norm, is finite): %w", batch.Positions[batch.Outputs[err.(nonFinite).row]], err)
		}
	}
	// Non-finite logits are left to the caller: one sequence's NaN must
	// not fail the other sequences of the batch.
	return out, nil
}

// layer is h = x + Attn(RMSNorm(x)); x = h + FFN(RMSNorm(h)), in place on x.
func (m *Model) layer(i int, x backend.Tensor) {
	b, c, l := m.b, m.Config, &m.Layers[i]
	h := backend.NewOutput(b, x.Rows(), c.HiddenSize)

	b.RMSNorm(h, x, l.InputNorm, c.RMSNormEps)
	a := m.attention(i, h)
	b.Add(x, x, a)
	m.watch(i, "attention residual", x)

	b.RMSNorm(h, x, l.PostAttnNorm, c.RMSNormEps)
	var f backend.Tensor
	if l.MLP != nil {
		f = m.mlp(l.MLP, h)
	} else {
		f = m.moe(i, l.MoE, h)
	}
	b.Add(x, x, f)
	m.watch(i, "ffn residual", x)
}

// attention is MLA with the absorbed (latent-space) form: only the latent c
// and the shared rotary key k_pe are cached. Positions, cache slots and
// each row's sequence come from the batch the backend was given.
func (m *Model) attention(i int, h backend.Tensor) backend.Tensor {
	b, c, a, sh := m.b, m.Config, &m.Layers[i].Attn, m.mla
	T, dn, dr, r := h.Rows(), sh.NopeDim, sh.RopeDim, sh.Rank
	qk := dn + dr

	// q = q_b_proj(RMSNorm_qa(q_a_proj(x))), per head [q_nope | q_pe];
	// [c | k_pe] = kv_a_proj_with_mqa(x); c = RMSNorm_kva(c). The two
	// products of x are issued back to back (a backend may run them as
	// one).
	q := backend.NewOutput(b, T, sh.Heads*qk)
	kv := backend.NewOutput(b, T, r+dr)
	latent := backend.NewOutput(b, T, r)
	if a.QA != nil {
		qa := backend.NewOutput(b, T, a.QA.Rows())
		b.MatMul(qa, h, a.QA)
		b.MatMul(kv, h, a.KVA)
		// The norm into a tensor of its own, not over qa: a backend may
		// then run it in q_b's launch, whose blocks all read qa.
		qn := backend.NewOutput(b, T, a.QA.Rows())
		b.RMSNorm(qn, qa, a.QANorm, loraNormEps)
		b.MatMul(q, qn, a.QB)
	} else {
		b.MatMul(q, h, a.Q)
		b.MatMul(kv, h, a.KVA)
	}
	m.watch(i, "q", q)
	b.RMSNorm(latent, b.Cols(kv, 0, r), a.KVANorm, loraNormEps)
	kpe := b.Cols(kv, r, r+dr)
	m.watch(i, "kv latent", latent)

	// RoPE on q_pe (every head) and on the shared k_pe.
	b.RoPE(q, sh.Heads, qk, dn, dr, c.RopeTheta, c.RopeInterleave)
	b.RoPE(kpe, 1, dr, 0, dr, c.RopeTheta, c.RopeInterleave)
	b.CacheWrite(i, latent, kpe)

	// score = (q_lat.c + q_pe.k_pe) / sqrt(dn+dr) with q_lat = W_UK^T q_nope;
	// o_lat = sum p c; v = W_UV o_lat; out = o_proj(concat_h v).
	// A backend may take a long prompt's attention in the expanded form
	// instead (the same sums, fewer products).
	scale := float32(1 / math.Sqrt(float64(qk)))
	v := backend.NewOutput(b, T, sh.Heads*sh.VDim)
	if ea, ok := b.(backend.ExpandedAttender); ok && ea.ExpandedFits(sh) {
		ea.ExpandedAttention(v, q, i, a.UK, a.UV, sh, scale)
	} else {
		qlat := backend.NewOutput(b, T, sh.Heads*r)
		b.AbsorbQuery(qlat, q, a.UK, sh)
		olat := backend.NewOutput(b, T, sh.Heads*r)
		b.LatentAttention(olat, qlat, q, i, sh, scale)
		b.ExpandValues(v, olat, a.UV, sh)
	}
	m.watch(i, "attention values", v)
	out := backend.NewOutput(b, T, c.HiddenSize)
	b.MatMul(out, v, a.O)
	m.watch(i, "o_proj", out)
	return out
}

// mlp is down(silu(gate(x)) * up(x)).
func (m *Model) mlp(p *MLP, h backend.Tensor) backend.Tensor {
	return backend.RunExpert(m.b, h, p.expert())
}

// moe is sum_e w_e expert_e(x) + shared_expert(x), with fp32 router logits.
func (m *Model) moe(i int, p *MoE, h backend.Tensor) backend.Tensor {
	b, T := m.b, h.Rows()
	logits := backend.NewOutput(b, T, m.route.NumExperts)
	b.MatMul(logits, h, p.Router)
	m.watch(i, "router logits", logits)
	routing := b.Route(logits, p.Bias, m.route)
	out := b.NewTensor(T, m.Config.HiddenSize)
	if sm, shared := p.sharedBeside(b); shared != nil {
		sm.MoEShared(out, h, routing, p.Experts, shared)
		m.watch(i, "shared expert", out)
		return out
	}
	b.MoE(out, h, routing, p.Experts)
	m.watch(i, "routed experts", out)
	if p.Shared != nil {
		b.Add(out, out, m.mlp(p.Shared, h))
		m.watch(i, "shared expert", out)
	}
	return out
}

// sharedBeside returns b's SharedMoE and the shared expert as it takes it
// beside the routed ones, or a nil slice where b runs the shared expert
// apart (or there is none). The forward pass and the load's
// prepareExperts both follow it.
func (p *MoE) sharedBeside(b backend.Backend) (backend.SharedMoE, []backend.Expert) {
	sm, ok := b.(backend.SharedMoE)
	if !ok || p.Shared == nil {
		return nil, nil
	}
	return sm, []backend.Expert{p.Shared.expert()}
}

// watch hands t to Inspect, and records the first non-finite tensor of a
// layer when DebugNaN is on.
func (m *Model) watch(layer int, name string, t backend.Tensor) {
	if m.Inspect != nil {
		m.Inspect(layer, name, t)
	}
	if m.nanErr != nil {
		return
	}
	if r, err := m.firstNonFinite(t); err != nil {
		m.nanErr = positioned{row: r, format: fmt.Sprintf("layer %d, tensor %q, position %%d: %v", layer, name, err)}
	}
}

// positioned is a non-finite tensor found in a layer; Forward fills in the
// position of its row.
type positioned struct {
	row    int
	format string
}

func (p positioned) Error() string { return fmt.Sprintf(p.format, p.row) }

// firstNonFinite finds the first row of t with a NaN or Inf when DebugNaN
// is on; it costs nothing otherwise.
func (m *Model) firstNonFinite(t backend.Tensor) (row int, err error) {
	if !m.DebugNaN {
		return 0, nil
	}
	if err := checkFinite(m.b.Download(t), t.Cols()); err != nil {
		return err.(nonFinite).row, err
	}
	return 0, nil
}

// CheckLogits reports the first non-finite value of a logits row.
func CheckLogits(row []float32) error { return checkFinite(row, len(row)) }

type nonFinite struct {
	row, col int
	value    float32
}

func (e nonFinite) Error() string {
	return fmt.Sprintf("non-finite value %v at column %d", e.value, e.col)
}

func checkFinite(v []float32, cols int) error {
	// x-x is 0 for finite x and NaN for NaN or ±Inf, and a sum with a NaN
	// term is NaN: blocks of 8 are checked with one comparison of a tree
	// sum (a decode step's 155K logits in tens of microseconds), and only a
	// failing block element by element.
	i := 0
	for ; i+8 <= len(v); i += 8 {
		b := v[i : i+8 : i+8]
		if ((b[0]-b[0])+(b[1]-b[1]))+((b[2]-b[2])+(b[3]-b[3]))+(((b[4]-b[4])+(b[5]-b[5]))+((b[6]-b[6])+(b[7]-b[7]))) != 0 {
			break
		}
	}
	for ; i < len(v); i++ {
		if x := v[i]; x != x || math.IsInf(float64(x), 0) {
			return nonFinite{row: i / cols, col: i % cols, value: x}
		}
	}
	return nil
}
