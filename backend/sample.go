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
