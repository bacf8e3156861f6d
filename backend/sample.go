package backend

// SampleParams is one output row's sampling for a Sampler: the options of
// package sample, and the number U in [0, 1) that the row's sample.Sampler
// drew for this step (Sampler.Uniform; unused when Temperature is 0).
type SampleParams struct {
	Temperature float32 // 0: argmax, ties to the lowest id
	TopK        int     // 0: off
	TopP        float32 // 0 or 1: off
	MinP        float32 // 0: off
	U           float64
	// Logprobs asks a LogprobSampler for the row's log-probabilities: the
	// chosen token's, and those of the TopLogprobs (0 to MaxTopLogprobs)
	// most likely tokens. A plain Sampler ignores them.
	Logprobs    bool
	TopLogprobs int
}

// MaxTopLogprobs is the most alternatives a row's log-probabilities list.
const MaxTopLogprobs = 20

// TokenLogprob is a token and its log-probability.
type TokenLogprob struct {
	ID      int
	Logprob float32
}

// RowLogprobs are one row's log-probabilities: the log-softmax of the
// logits as they are (no temperature) at the chosen token, and the most
// likely tokens in rank order (higher logit first, the lower id first among
// equal logits), each within 1e-5 of the value computed in float64.
type RowLogprobs struct {
	Chosen float32
	Top    []TokenLogprob
}

// Sampler is implemented by backends that choose tokens where the logits
// are, so that a step hands back one id per row instead of a row of the
// vocabulary's size.
type Sampler interface {
	// SampleRows returns, for each row of logits, the token that
	// sample.Sampler.SampleWith picks from that row with params[i] and
	// params[i].U (it waits for the ops before it). A row holding a NaN
	// or an infinity gets -1.
	SampleRows(logits Tensor, params []SampleParams) []int32
}

// LogprobSampler is a Sampler that also computes log-probabilities where the
// logits are, so that a row that reports them still hands back a few words
// instead of the vocabulary's row.
type LogprobSampler interface {
	Sampler
	// SampleRowsLogprobs is SampleRows that also returns, for each row
	// whose params ask for them (Logprobs), its log-probabilities under the
	// chosen token, in the same wait. Rows that do not ask, and rows whose
	// id is -1, get none (a zero RowLogprobs).
	SampleRowsLogprobs(logits Tensor, params []SampleParams) ([]int32, []RowLogprobs)
}

// AsyncSampler is a LogprobSampler that can leave a step's ids where they
// were chosen, so that the next step is queued before they come back:
// that step's rows name them in Batch.Prev.
type AsyncSampler interface {
	LogprobSampler
	// SampleRowsAsync queues what SampleRowsLogprobs does and returns at
	// once; wait returns the ids, and the log-probabilities where asked
	// (else nil), once this step's have come back, without waiting for
	// steps queued after it. The next batch given to SetBatch may take
	// its tokens from these ids (Batch.Prev). The waits are called in
	// order, each before the SampleRowsAsync of the step after next (at
	// most two steps' ids are outstanding).
	SampleRowsAsync(logits Tensor, params []SampleParams) (wait func() ([]int32, []RowLogprobs, error))
}
