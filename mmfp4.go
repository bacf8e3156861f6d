// Package mmfp4 is the public Go API of the engine: load a GLM-4.7-Flash-class
// model (a Hugging Face checkpoint or an MMFP4 directory) and generate tokens.
//
//	m, err := mmfp4.Load("model-dir", mmfp4.Options{})
//	res, err := m.Generate(ctx, promptIDs, mmfp4.GenerateOptions{MaxTokens: 64,
//		OnToken: func(id int) error { ...; return nil }})
package mmfp4

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/mmfp4/mmfp4/backend/cpu"
	"github.com/mmfp4/mmfp4/model/glm4moelite"
	"github.com/mmfp4/mmfp4/sample"
	"github.com/mmfp4/mmfp4/tokenizer"
)

// Options configure loading.
type Options struct {
	// Threads for the CPU backend; 0 uses every core.
	Threads int
	// MaxContext caps the tokens of one sequence (prompt + output); 0 means
	// the model's max_position_embeddings, limited to 4096.
	MaxContext int
	// FloatActivations runs MMFP4 products on float32 activations instead of
	// int8 (slower; for accuracy comparison).
	FloatActivations bool
	// DebugNaN checks every intermediate tensor and names the first layer and
	// tensor that produce a NaN or Inf.
	DebugNaN bool
}

// Model is a loaded model, ready to generate.
type Model struct {
	net        *glm4moelite.Model
	maxContext int
	eos        []int // from generation_config.json or config.json; nil: ask the tokenizer
	dir        string

	tokOnce sync.Once
	tok     *tokenizer.Tokenizer
	tokErr  error

	// LoadTime is how long Load took.
	LoadTime time.Duration
}

// Load reads a model directory. Tokenizer files are not needed.
func Load(dir string, opts Options) (*Model, error) {
	start := time.Now()
	b := cpu.New(cpu.Options{Threads: opts.Threads, FloatActivations: opts.FloatActivations})
	net, err := glm4moelite.Load(dir, b, glm4moelite.LoadOptions{})
	if err != nil {
		return nil, err
	}
	net.DebugNaN = opts.DebugNaN
	ctxLen := opts.MaxContext
	if mp := net.Config.MaxPositions; ctxLen < 0 || (mp > 0 && ctxLen > mp) {
		return nil, fmt.Errorf("context of %d tokens: want 0 (default) to max_position_embeddings (%d)", ctxLen, mp)
	}
	if ctxLen == 0 {
		ctxLen = 4096
		if mp := net.Config.MaxPositions; mp > 0 && mp < ctxLen {
			ctxLen = mp
		}
	}
	eos, err := generationEOS(dir)
	if err != nil {
		return nil, err
	}
	if eos == nil {
		eos = net.Config.EOSTokenIDs
	}
	return &Model{net: net, maxContext: ctxLen, eos: eos, dir: dir, LoadTime: time.Since(start)}, nil
}

// Tokenizer loads the model's tokenizer on first use and keeps it. Token
// ids need no tokenizer, so a missing or broken tokenizer.json fails only
// text input (ErrNoTokenizer when the directory has none).
func (m *Model) Tokenizer() (*tokenizer.Tokenizer, error) {
	m.tokOnce.Do(func() {
		if _, err := os.Stat(filepath.Join(m.dir, "tokenizer.json")); errors.Is(err, os.ErrNotExist) {
			m.tokErr = ErrNoTokenizer
			return
		}
		m.tok, m.tokErr = tokenizer.Load(m.dir)
	})
	return m.tok, m.tokErr
}

// ErrNoTokenizer is returned for text input when the model directory has no
// tokenizer files.
var ErrNoTokenizer = errors.New("the model directory has no tokenizer.json: give token ids instead")

// EncodeText turns a plain text prompt into ids the way HF's tokenizer(text)
// does, special tokens of the post-processor included.
func (m *Model) EncodeText(text string) ([]int, error) {
	tok, err := m.Tokenizer()
	if err != nil {
		return nil, err
	}
	return tok.Encode(text, true)
}

// EncodeChat renders messages with the model's chat template (with the
// generation prompt) and encodes the result; the template writes the special
// tokens itself.
func (m *Model) EncodeChat(messages []tokenizer.Message, opt tokenizer.ChatOptions) ([]int, error) {
	tok, err := m.Tokenizer()
	if err != nil {
		return nil, err
	}
	opt.AddGenerationPrompt = true
	text, err := tok.ApplyChatTemplate(messages, opt)
	if err != nil {
		return nil, err
	}
	return tok.Encode(text, false)
}

// generationEOS reads eos_token_id from generation_config.json, if present.
func generationEOS(dir string) ([]int, error) {
	path := filepath.Join(dir, "generation_config.json")
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var g struct {
		EOS json.RawMessage `json:"eos_token_id"`
	}
	if err := json.Unmarshal(data, &g); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if g.EOS == nil {
		return nil, nil
	}
	ids, err := glm4moelite.ParseTokenIDs(g.EOS)
	if err != nil {
		return nil, fmt.Errorf("%s: field \"eos_token_id\": %w", path, err)
	}
	return ids, nil
}

// Config is the model's parsed configuration.
func (m *Model) Config() *glm4moelite.Config { return m.net.Config }

// EOS are the token ids that end generation by default: eos_token_id of
// generation_config.json, else of config.json, else the tokenizer's
// eos_token (nil if the tokenizer cannot be loaded).
func (m *Model) EOS() []int {
	eos, _ := m.defaultStops()
	return eos
}

// defaultStops is EOS with the tokenizer's load error, if the tokenizer
// was needed; a directory without tokenizer.json just has no stop ids.
func (m *Model) defaultStops() ([]int, error) {
	if m.eos != nil {
		return m.eos, nil
	}
	tok, err := m.Tokenizer()
	switch {
	case errors.Is(err, ErrNoTokenizer):
		return nil, nil
	case err != nil:
		return nil, fmt.Errorf("no eos_token_id in generation_config.json or config.json, and the tokenizer for eos_token failed: %w", err)
	}
	return tok.EOSIDs(), nil
}

// MaxContext is the most tokens one sequence may hold.
func (m *Model) MaxContext() int { return m.maxContext }

// GenerateOptions control one generation.
type GenerateOptions struct {
	// MaxTokens to generate; 0 means until EOS or the context is full.
	MaxTokens int
	// Sampling: zero value is greedy.
	Sampling sample.Options
	// StopIDs end generation (the stop token is returned but not passed on);
	// nil means the model's EOS ids. An empty non-nil slice disables stopping.
	StopIDs []int
	// OnToken, if set, is called with each new token as soon as it is
	// chosen; an error from it stops generation and is returned.
	OnToken func(id int) error
}

// Result describes a finished generation.
type Result struct {
	Tokens       []int // generated ids, without the stop token
	PromptTokens int
	StopReason   string // "eos", "max_tokens", "context" or "canceled"
	PrefillTime  time.Duration
	DecodeTime   time.Duration
}

// PrefillTokensPerSecond is the prompt processing speed.
func (r *Result) PrefillTokensPerSecond() float64 {
	return float64(r.PromptTokens) / r.PrefillTime.Seconds()
}

// DecodeTokensPerSecond is the speed of the token-by-token phase: tokens
// produced by decode steps over their time (the first token comes from
// prefill).
func (r *Result) DecodeTokensPerSecond() float64 {
	steps := len(r.Tokens) - 1
	if steps <= 0 || r.DecodeTime <= 0 {
		return 0
	}
	return float64(steps) / r.DecodeTime.Seconds()
}

// prefillChunk is the most prompt tokens run in one forward pass: it bounds
// the activation memory of a long prompt, while each chunk still reads every
// weight once for all of its tokens.
var prefillChunk = 256

// Generate prefills the prompt in batched passes of up to prefillChunk
// tokens, then decodes one token per step with the KV cache. Cancelling ctx
// stops the prefill between layers and the decode between steps. The prompt
// and the generated tokens together hold at most MaxContext tokens.
func (m *Model) Generate(ctx context.Context, prompt []int, opts GenerateOptions) (*Result, error) {
	if len(prompt) == 0 {
		return nil, errors.New("generate: empty prompt")
	}
	if len(prompt) >= m.maxContext {
		return nil, fmt.Errorf("generate: prompt of %d tokens leaves no room in the context of %d", len(prompt), m.maxContext)
	}
	sampler, err := sample.New(opts.Sampling)
	if err != nil {
		return nil, err
	}
	stop := opts.StopIDs
	if stop == nil {
		if stop, err = m.defaultStops(); err != nil {
			return nil, err
		}
	}
	isStop := make(map[int]bool, len(stop))
	for _, id := range stop {
		isStop[id] = true
	}
	capacity := m.maxContext
	if opts.MaxTokens > 0 {
		capacity = min(capacity, len(prompt)+opts.MaxTokens)
	}
	state := m.net.NewState(capacity)
	res := &Result{PromptTokens: len(prompt)}

	start := time.Now()
	var logits []float32
	state.Interrupt = ctx.Err // a chunk of a long prompt can take many seconds
	for done := 0; done < len(prompt); {
		n := min(prefillChunk, len(prompt)-done)
		logits, err = m.net.Forward(state, prompt[done:done+n], false)
		if cerr := ctx.Err(); cerr != nil {
			res.StopReason = "canceled"
			res.PrefillTime = time.Since(start)
			return res, cerr
		}
		if err != nil {
			return nil, err
		}
		done += n
	}
	state.Interrupt = nil // a decode step is short: ctx is checked between steps
	res.PrefillTime = time.Since(start)
	start = time.Now()
	defer func() { res.DecodeTime = time.Since(start) }()
	for {
		id, err := sampler.Sample(logits)
		if err != nil {
			return res, fmt.Errorf("sampling at position %d: %w", state.Pos, err)
		}
		if isStop[id] {
			res.StopReason = "eos"
			return res, nil
		}
		res.Tokens = append(res.Tokens, id)
		if opts.OnToken != nil {
			if err := opts.OnToken(id); err != nil {
				return res, err
			}
		}
		switch {
		case opts.MaxTokens > 0 && len(res.Tokens) >= opts.MaxTokens:
			res.StopReason = "max_tokens"
			return res, nil
		case len(prompt)+len(res.Tokens) >= m.maxContext:
			res.StopReason = "context"
			return res, nil
		case ctx.Err() != nil:
			res.StopReason = "canceled"
			return res, ctx.Err()
		}
		if logits, err = m.net.Forward(state, []int{id}, false); err != nil {
			return res, err
		}
	}
}

// Logits runs ids through a fresh sequence and returns the float32 logits of
// every position, len(ids) rows of the vocabulary size.
func (m *Model) Logits(ids []int) ([]float32, error) {
	if len(ids) > m.maxContext {
		return nil, fmt.Errorf("logits: %d tokens exceed the context of %d", len(ids), m.maxContext)
	}
	return m.net.Forward(m.net.NewState(len(ids)), ids, true)
}
