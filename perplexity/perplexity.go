// Package perplexity scores a language model on a token sequence with
// sliding windows, and compares it with a reference model on the same
// windows (mean KL divergence, top-1 agreement).
//
// Windows follow the Hugging Face perplexity guide: a window starts every
// Stride tokens and holds at most Ctx tokens; each window scores only the
// tokens that no earlier window scored, so every token is scored once, with
// the longest context the window gives it. A token needs one token before it
// inside its window, so with Stride == Ctx the first token of each window is
// not scored. Counts are exact: Result.Tokens is the number of tokens whose
// log-likelihood went into the mean.
package perplexity

import (
	"errors"
	"fmt"
	"math"
)

// Window is one model call: tokens [Begin, End) are its input, and the
// tokens [First, End) are scored (each predicted from the tokens before it
// in the window).
type Window struct {
	Begin, End, First int
}

// Windows plans the sliding windows over n tokens.
func Windows(n, ctx, stride int) ([]Window, error) {
	switch {
	case ctx < 2:
		return nil, fmt.Errorf("window of %d tokens: need at least 2", ctx)
	case stride < 1 || stride > ctx:
		return nil, fmt.Errorf("stride %d: want 1 to the window size (%d)", stride, ctx)
	case n < 2:
		return nil, fmt.Errorf("%d tokens: need at least 2 to score one", n)
	}
	var ws []Window
	prev := 0
	for begin := 0; ; begin += stride {
		end := min(begin+ctx, n)
		ws = append(ws, Window{Begin: begin, End: end, First: max(prev, begin+1)})
		prev = end
		if end == n {
			return ws, nil
		}
	}
}

// LogitsFunc returns the logits of every position of ids: len(ids) rows of
// the vocabulary size, row j predicting the token after ids[j].
type LogitsFunc func(ids []int) ([]float32, error)

// Options configure Evaluate.
type Options struct {
	Ctx, Stride int
	// Vocab is the number of logits per row.
	Vocab int
	// Ref, if set, is the reference model: Evaluate then also reports the
	// mean KL(ref || model) and the top-1 agreement.
	Ref LogitsFunc
	// Progress, if set, is called after each window.
	Progress func(done, total int)
}

// Result of Evaluate.
type Result struct {
	Windows int
	Tokens  int     // tokens scored
	MeanNLL float64 // nats per token
	PPL     float64 // exp(MeanNLL)
	// With a reference model only:
	KL   float64 // mean KL(ref || model) in nats per scored token
	Top1 float64 // fraction of scored positions where both argmaxes agree
}

// Evaluate scores ids with model over the windows of opt.
func Evaluate(ids []int, model LogitsFunc, opt Options) (*Result, error) {
	rs, err := EvaluateAll(ids, []LogitsFunc{model}, opt)
	if err != nil {
		return nil, err
	}
	return rs[0], nil
}

// EvaluateAll scores several models on the same windows, running the
// reference (if any) once per window for all of them.
func EvaluateAll(ids []int, models []LogitsFunc, opt Options) ([]*Result, error) {
	if opt.Vocab < 1 {
		return nil, errors.New("perplexity: vocabulary size must be positive")
	}
	for t, id := range ids {
		if id < 0 || id >= opt.Vocab {
			return nil, fmt.Errorf("token %d at position %d is outside the vocabulary of %d", id, t, opt.Vocab)
		}
	}
	ws, err := Windows(len(ids), opt.Ctx, opt.Stride)
	if err != nil {
		return nil, err
	}
	acc := make([]sums, len(models))
	for i, w := range ws {
		in := ids[w.Begin:w.End]
		var ref []float32
		if opt.Ref != nil {
			if ref, err = rows(opt.Ref, in, opt.Vocab); err != nil {
				return nil, fmt.Errorf("window %d (tokens %d-%d): reference: %w", i, w.Begin, w.End, err)
			}
		}
		for k, model := range models {
			logits, err := rows(model, in, opt.Vocab)
			if err != nil {
				return nil, fmt.Errorf("window %d (tokens %d-%d): %w", i, w.Begin, w.End, err)
			}
			if err := acc[k].add(ids, w, logits, ref, opt.Vocab); err != nil {
				return nil, fmt.Errorf("window %d: %w", i, err)
			}
		}
		if opt.Progress != nil {
			opt.Progress(i+1, len(ws))
		}
	}
	out := make([]*Result, len(models))
	for k, a := range acc {
		r := &Result{Windows: len(ws), Tokens: a.tokens, MeanNLL: a.nll / float64(a.tokens)}
		r.PPL = math.Exp(r.MeanNLL)
		if opt.Ref != nil {
			r.KL = a.kl / float64(a.tokens)
			r.Top1 = float64(a.agree) / float64(a.tokens)
		}
		out[k] = r
	}
	return out, nil
}

// sums accumulates one model's scores.
type sums struct {
	nll, kl       float64
	tokens, agree int
}

// add scores the tokens of window w from its logits (and compares them with
// the reference logits ref, if not nil).
func (a *sums) add(ids []int, w Window, logits, ref []float32, vocab int) error {
	for t := w.First; t < w.End; t++ {
		j := t - 1 - w.Begin // the row that predicts token t
		row := logits[j*vocab : (j+1)*vocab]
		lse, best, err := logSumExp(row)
		if err != nil {
			return fmt.Errorf("position %d: %w", t, err)
		}
		a.nll += lse - float64(row[ids[t]])
		a.tokens++
		if ref != nil {
			rrow := ref[j*vocab : (j+1)*vocab]
			rlse, rbest, err := logSumExp(rrow)
			if err != nil {
				return fmt.Errorf("position %d: reference: %w", t, err)
			}
			a.kl += klDiv(rrow, rlse, row, lse)
			if best == rbest {
				a.agree++
			}
		}
	}
	return nil
}

// rows calls f and checks the shape of what it returns.
func rows(f LogitsFunc, ids []int, vocab int) ([]float32, error) {
	l, err := f(ids)
	if err != nil {
		return nil, err
	}
	if len(l) != len(ids)*vocab {
		return nil, fmt.Errorf("got %d logits for %d tokens, want %d per token", len(l), len(ids), vocab)
	}
	return l, nil
}

// logSumExp returns log(sum(exp(row))) in float64 and the argmax (the first
// on ties). A NaN or infinite logit is an error: it would make the result
// NaN or meaningless.
func logSumExp(row []float32) (float64, int, error) {
	best := 0
	for i, v := range row {
		if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
			return 0, 0, fmt.Errorf("logit %d is %v", i, v)
		}
		if v > row[best] {
			best = i
		}
	}
	m := float64(row[best])
	var s float64
	for _, v := range row {
		s += math.Exp(float64(v) - m)
	}
	return m + math.Log(s), best, nil
}

// RowKL is KL(softmax(ref) || softmax(got)) of two logit rows of one
// position, as Evaluate compares a model with its reference. A NaN or
// infinite logit, or rows of different lengths, is an error.
func RowKL(ref, got []float32) (float64, error) {
	if len(ref) != len(got) {
		return 0, fmt.Errorf("rows of %d and %d logits", len(ref), len(got))
	}
	rlse, _, err := logSumExp(ref)
	if err != nil {
		return 0, fmt.Errorf("reference: %w", err)
	}
	lse, _, err := logSumExp(got)
	if err != nil {
		return 0, err
	}
	return klDiv(ref, rlse, got, lse), nil
}

// klDiv is KL(p || q) = sum p (log p - log q) for p = softmax(pr), q =
// softmax(qr), given their log-sum-exps.
func klDiv(pr []float32, plse float64, qr []float32, qlse float64) float64 {
	var d float64
	for i, v := range pr {
		lp := float64(v) - plse
		d += math.Exp(lp) * (lp - (float64(qr[i]) - qlse))
	}
	return max(d, 0) // rounding can leave a tiny negative for equal rows
}
