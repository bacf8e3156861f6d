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
	// OnRoute, if set, is called by each MoE layer, in layer order, with the
	// experts chosen for every token of the pass (TopK ids per token); for
	// statistics such as expert usage. It must not keep the slice.
	OnRoute func(experts []int)
}

// Model is a loaded model, ready to generate.
type Model struct {
	net        *glm4moelite.Model
	cpu        *cpu.Backend
	maxContext int
	eos        []int
	// Tokenizer is the model's tokenizer, or nil when the directory has no
	// tokenizer.json (token ids still work).
	Tokenizer *tokenizer.Tokenizer
	// LoadTime is how long Load took.
	LoadTime time.Duration
}

// Load reads a model directory. Tokenizer files are not needed.
func Load(dir string, opts Options) (*Model, error) {
	start := time.Now()
	b := cpu.New(cpu.Options{Threads: opts.Threads, FloatActivations: opts.FloatActivations, OnRoute: opts.OnRoute})
	net, err := glm4moelite.Load(dir, b, glm4moelite.LoadOptions{})
	if err != nil {
		return nil, err
	}
	net.DebugNaN = opts.DebugNaN
	ctxLen := opts.MaxContext
	if mp := net.Config.MaxPositions; ctxLen < 0 || (mp > 0 && ctxLen > mp) {
		net.Close()
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
		net.Close()
		return nil, err
	}
	var tok *tokenizer.Tokenizer
	if _, err := os.Stat(filepath.Join(dir, "tokenizer.json")); err == nil {
		if tok, err = tokenizer.Load(dir); err != nil {
			net.Close()
			return nil, err
		}
		if eos == nil {
			eos = tok.EOSIDs()
		}
	}
	if eos == nil {
		eos = net.Config.EOSTokenIDs
	}
	return &Model{net: net, cpu: b, maxContext: ctxLen, eos: eos, Tokenizer: tok, LoadTime: time.Since(start)}, nil
}

// Close unmaps the weight files. The model must not be used afterwards.
func (m *Model) Close() error { return m.net.Close() }

// BytesRead is the number of bytes of weights and KV cache the model's ops
// have read so far (see cpu.Backend.BytesRead); the difference over a
// decode step is that step's memory traffic, the numerator of the roofline.
func (m *Model) BytesRead() int64 { return m.cpu.BytesRead() }

// ErrNoTokenizer is returned for text input when the model directory has no
// tokenizer files.
var ErrNoTokenizer = errors.New("the model directory has no tokenizer.json: give token ids instead")

// EncodeText turns a plain text prompt into ids the way HF's tokenizer(text)
// does, special tokens of the post-processor included.
func (m *Model) EncodeText(text string) ([]int, error) {
	if m.Tokenizer == nil {
		return nil, ErrNoTokenizer
	}
	return m.Tokenizer.Encode(text, true)
}

// EncodeChat renders messages with the model's chat template (with the
// generation prompt) and encodes the result; the template writes the special
// tokens itself.
func (m *Model) EncodeChat(messages []tokenizer.Message, opt tokenizer.ChatOptions) ([]int, error) {
	if m.Tokenizer == nil {
		return nil, ErrNoTokenizer
	}
	opt.AddGenerationPrompt = true
	text, err := m.Tokenizer.ApplyChatTemplate(messages, opt)
	if err != nil {
		return nil, err
	}
	return m.Tokenizer.Encode(text, false)
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

// EOS are the token ids that end generation by default.
func (m *Model) EOS() []int { return m.eos }

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

// Generate prefills the prompt in one batched pass, then decodes one token
// per step with the KV cache. Cancelling ctx stops it between steps.
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
		stop = m.eos
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
	logits, err := m.net.Forward(state, prompt, false)
	if err != nil {
		return nil, err
	}
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
		case state.Pos >= state.Capacity():
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
