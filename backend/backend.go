// Package backend is the narrow compute interface that the model code calls.
// A backend owns activation tensors, weights and the latent KV cache; the
// model never touches their memory directly, so the same forward pass runs on
// the CPU backend (backend/cpu) and on a GPU backend.
//
// Work is done in steps. A step starts with SetBatch, which hands the backend
// the batch's metadata (token ids, positions, cache block tables, output
// rows) once, so a GPU backend can upload it as device tensors and capture
// the step as a graph. Tensors made with NewTensor come from a per-step arena
// and stay valid until the next SetBatch. Ops do not return errors: the first
// failure is recorded and Sync returns it.
//
// Every op is specified by its pure-Go implementation in backend/cpu, which is
// the reference that faster kernels are tested against.
package backend

import "github.com/mmfp4/mmfp4/format"

// Tensor is a 2-D float32 activation matrix owned by a backend. Rows are
// tokens. A Tensor may be a column or row view of another (Backend.Cols,
// Backend.Rows).
type Tensor interface {
	Rows() int
	Cols() int
}

// Weight is a matrix W[N,K] in PyTorch Linear layout (N outputs, K inputs),
// held in whatever layout the backend's kernels want. Vectors (norm gains,
// biases) are weights with N = 1.
type Weight interface {
	Rows() int
	Cols() int
}

// HostWeight is weight data on the host, handed to NewWeight. Exactly one of
// Dense, Quant and BF16 is set.
type HostWeight struct {
	Name  string         // checkpoint name, for error messages
	N, K  int            // shape
	Dense []float32      // row-major N*K values
	Quant *format.Matrix // MMFP4 codes and scales (may alias a memory map)
	// BF16 is row-major N*K little-endian bfloat16 values (may alias a
	// memory map). The loader uses it for the embedding table, which only
	// ever has single rows looked up, so it stays in its stored form.
	BF16 []byte
}

// MLAShape gives the head geometry of multi-head latent attention.
type MLAShape struct {
	Heads   int // H
	NopeDim int // dn: per-head key dims without position
	RopeDim int // dr: rotary key dims, one key shared by all heads
	VDim    int // dv: per-head value dims
	Rank    int // r: latent (kv_lora_rank) dims
}

// RouterConfig is the noaux_tc top-k expert selection of a MoE layer.
type RouterConfig struct {
	TopK          int
	Groups        int // n_group
	TopKGroups    int // topk_group
	NormTopKProb  bool
	RoutedScaling float32
	NumExperts    int
}

// Routing is a backend's record of which experts each token uses and with
// what weight; it is produced by Route and consumed by MoE.
type Routing interface {
	Tokens() int
}

// Expert is one SwiGLU feed-forward block: down(silu(gate(x)) * up(x)).
type Expert struct {
	Gate, Up, Down Weight
}

// RunExpert returns down(silu(gate(x)) * up(x)) computed on b, in new
// tensors of the step: a dense layer's feed-forward block, and a shared
// expert wherever a backend's fused MoE does not take it.
func RunExpert(b Backend, x Tensor, e Expert) Tensor {
	g, u := NewOutput(b, x.Rows(), e.Gate.Rows()), NewOutput(b, x.Rows(), e.Up.Rows())
	b.MatMul(g, x, e.Gate)
	b.MatMul(u, x, e.Up)
	b.SwiGLU(g, g, u)
	out := NewOutput(b, x.Rows(), e.Down.Rows())
	b.MatMul(out, g, e.Down)
	return out
}

// Unzeroed is implemented by backends for which clearing a new tensor
// costs real time: a GPU clears with a memset over the allocation, 160 MB
// a layer in a 1024-token prefill of GLM-4.7-Flash.
type Unzeroed interface {
	// NewUnzeroed returns a rows x cols tensor from the step's arena whose
	// values are undefined until an op writes them.
	NewUnzeroed(rows, cols int) Tensor
}

// NewOutput returns a tensor for the destination of an op that writes every
// value of it before anything reads it: b's NewUnzeroed where it has one,
// else NewTensor. An op that adds to its destination (MoE) needs NewTensor.
func NewOutput(b Backend, rows, cols int) Tensor {
	if u, ok := b.(Unzeroed); ok {
		return u.NewUnzeroed(rows, cols)
	}
	return b.NewTensor(rows, cols)
}

// Backend is the set of ops the glm4_moe_lite forward pass needs.
type Backend interface {
	Name() string

	// NewWeight takes host weight data; the backend may keep a reference.
	NewWeight(w HostWeight) (Weight, error)
	// NewCachePool allocates the paged latent cache: blocks of blockSize
	// token slots, each holding, for every layer, the normalised latent c
	// (rank values) and the rotated shared key k_pe (ropeDim values), stored
	// in dtype.
	NewCachePool(layers, blocks, blockSize, rank, ropeDim int, dtype CacheDType) (CachePool, error)

	// SetBatch starts a step: it resets the tensor arena and binds the step
	// to the batch (which must be valid, see Batch.Validate, and stay
	// unchanged until the next SetBatch) and to the cache pool that
	// CacheWrite and LatentAttention use.
	SetBatch(b *Batch, pool CachePool)
	// NewTensor returns a zeroed rows x cols tensor from the step's arena,
	// valid until the next SetBatch.
	NewTensor(rows, cols int) Tensor
	Upload(dst Tensor, src []float32)
	// Download returns a row-major host copy of src (it waits for the
	// ops before it).
	Download(src Tensor) []float32
	// Cols is a view of columns [from, to) of t that shares its memory.
	Cols(t Tensor, from, to int) Tensor
	// Rows is a view of rows [from, to) of t that shares its memory.
	Rows(t Tensor, from, to int) Tensor
	// Sync waits for the queued ops and returns the first error any op
	// recorded since the last Sync (a shape mismatch, a bad token id, a
	// device fault), clearing it.
	Sync() error

	// Embed copies row Tokens[i] of table into row i of dst, for the batch's
	// tokens.
	Embed(dst Tensor, table Weight)
	// MatMul computes dst = x W^T: dst[t,n] = sum_k x[t,k] W[n,k].
	MatMul(dst, x Tensor, w Weight)
	// RMSNorm computes dst = gain * x / sqrt(mean(x^2) + eps) row by row.
	RMSNorm(dst, x Tensor, gain Weight, eps float32)
	// RoPE rotates, in place, dims [offset, offset+dim) of each of the heads
	// (headStride columns apart) of row t by the batch position
	// Positions[t]. Interleaved rotates pairs (x[2i], x[2i+1]); otherwise
	// pairs (x[i], x[i+dim/2]).
	RoPE(x Tensor, heads, headStride, offset, dim int, theta float64, interleaved bool)
	// Add computes dst = a + b.
	Add(dst, a, b Tensor)
	// SwiGLU computes dst = silu(gate) * up.
	SwiGLU(dst, gate, up Tensor)
	// SelectOutputs copies the rows of x listed in the batch's Outputs, in
	// that order, into dst.
	SelectOutputs(dst, x Tensor)

	// CacheWrite stores row t of latent and kpe in layer of the bound pool,
	// at the slot of position Positions[t] of row t's sequence.
	CacheWrite(layer int, latent, kpe Tensor)
	// AbsorbQuery folds the key up-projection into the query:
	// qlat[t,h] = W_UK[h]^T q_nope[t,h], where W_UK[h] are rows
	// [h*dn, (h+1)*dn) of wUK (H*dn x Rank) and q_nope[t,h] are columns
	// [h(dn+dr), h(dn+dr)+dn) of q. qlat has H*Rank columns.
	AbsorbQuery(qlat, q Tensor, wUK Weight, s MLAShape)
	// LatentAttention is causal attention over the bound pool in latent
	// space: for row t of sequence s at position p = Positions[t] and head
	// h, score_j = scale * (qlat[t,h].c_j + q_pe[t,h].kpe_j) over positions
	// j <= p of s (read in place through its block table), and
	// olat[t,h] = sum_j softmax(score)_j c_j.
	LatentAttention(olat, qlat, q Tensor, layer int, s MLAShape, scale float32)
	// ExpandValues applies the value up-projection:
	// out[t,h] = W_UV[h] olat[t,h], W_UV[h] = rows [h*dv, (h+1)*dv) of wUV.
	ExpandValues(out, olat Tensor, wUV Weight, s MLAShape)

	// Route picks experts from router logits (fp32) with the bias-corrected
	// noaux_tc rule of DESIGN.md section 3.
	Route(logits Tensor, bias Weight, cfg RouterConfig) Routing
	// MoE adds to dst, for each token, sum_e w_e * expert_e(x).
	MoE(dst, x Tensor, r Routing, experts []Expert)
}

// ExpandedAttender is implemented by backends that can run a step's
// attention in the expanded form (DESIGN.md section 3: prefill may
// decompress): each head's keys [W_UK[h] c_j | k_pe_j] and values
// W_UV[h] c_j made from the cached rows, then ordinary causal attention,
// fewer products a pair of positions than the latent form for long
// prompts.
type ExpandedAttender interface {
	// ExpandedFits reports whether the bound step's attention of shape s
	// takes the expanded form (where it is the faster one).
	ExpandedFits(s MLAShape) bool
	// ExpandedAttention writes out[t,h] = W_UV[h] olat[t,h] for the olat
	// of LatentAttention over the same q and layer (the score uses
	// q_nope[t,h] with W_UK[h] as AbsorbQuery does).
	ExpandedAttention(out, q Tensor, layer int, wUK, wUV Weight, s MLAShape, scale float32)
}

// ExpertPreparer is implemented by backends that lay a MoE layer's expert
// weights out for their kernels once (a device table, a repacking). The
// model calls PrepareExperts for each MoE layer at load, with the experts
// and shared experts that its MoE or MoEShared calls will pass, so that
// this work is part of the load rather than of the first forward pass.
type ExpertPreparer interface {
	PrepareExperts(experts, shared []Expert, topK int) error
}

// SharedMoE is implemented by backends that run a MoE layer's shared
// experts together with the routed ones (one pass over all their weights).
// MoEShared adds to dst, for each token, sum_e w_e * expert_e(x) plus
// sum_s shared_s(x): what MoE, then each shared expert's SwiGLU block
// added to dst, computes.
type SharedMoE interface {
	MoEShared(dst, x Tensor, r Routing, experts, shared []Expert)
}
