// Package mmfp4 is the public Go API of the engine: load a GLM-4.7-Flash-class
// model (a Hugging Face checkpoint or an MMFP4 directory) and generate tokens.
//
//	m, err := mmfp4.Load("model-dir", mmfp4.Options{})
//	res, err := m.Generate(ctx, promptIDs, mmfp4.GenerateOptions{MaxTokens: 64,
//		OnToken: func(id int) error { ...; return nil }})
package mmfp4

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/backend/cpu"
	"github.com/mmfp4/mmfp4/engine"
	"github.com/mmfp4/mmfp4/model/glm4moelite"
	"github.com/mmfp4/mmfp4/sample"
	"github.com/mmfp4/mmfp4/tokenizer"
)

// Options configure loading.
type Options struct {
	// Backend runs the model; nil means the CPU backend with its defaults
	// (cpu.New(cpu.Options{})). Backend-specific settings, such as the CPU
	// threads, are that backend's options.
	Backend backend.Backend
	// MaxContext caps the tokens of one sequence (prompt + output); 0 means
	// the model's max_position_embeddings, or what the KV cache holds if
	// that is less. It sets Engine.MaxModelLen.
	MaxContext int
	// Engine sets the batching engine that Generate runs on: KV cache size
	// and precision, batch and queue bounds (zero values: its defaults).
	Engine engine.Options
	// DebugNaN checks every intermediate tensor and names the first layer and
	// tensor that produce a NaN or Inf.
	DebugNaN bool
}

// DeviceCacheReserve is the device memory left free for step tensors,
// graphs and kernels when the cache is sized from a GPU's free memory.
const DeviceCacheReserve = 4 << 30

// DeviceBatchTokens is the default step size on a device of its own. A
// GPU's prompt steps expand their sequence's cached positions once a step,
// so longer steps pay less per row: on an H200, an 8192-token prompt
// served in steps of 2048 tokens reached its first token in 393 ms against
// 654 in steps of 512 (engine's default, kept for the CPU, where a step of
// 2048 prompt tokens would stall the decoding streams for seconds).
const DeviceBatchTokens = 2048

// DeviceMaxNumSeqs is the default of engine.Options.MaxNumSeqs on a device
// of its own (the engine's 16 is for the CPU). On an H200 with 16-token
// prompts, 64 streams decoded 6,214 tok/s together against 4,228 for 32.
const DeviceMaxNumSeqs = 64

// DeviceLongPromptAlone is engine.Options.LongPromptAlone on a device of its
// own: the positions from which a prompt step takes the CUDA backend's
// expanded form (512; the form needs a step of prompt chunks alone). On an
// H200, four 8192-token prompts served together in steps that mixed their
// chunks with the first streams' decode rows reached their first tokens
// after 27-39 s (steps of 512 tokens).
const DeviceLongPromptAlone = 512

// Model is a loaded model, ready to generate.
type Model struct {
	net     *glm4moelite.Model
	engOpts engine.Options // resolved
	eos     []int          // tokenizer.StopIDs without the tokenizer; nil: ask the tokenizer
	dir     string

	tokOnce sync.Once
	tok     *tokenizer.Tokenizer
	tokErr  error

	engOnce sync.Once
	eng     *engine.Engine
	engErr  error

	// scratch is the state LogitsWithCache reuses (a cache pool is not
	// freed before the backend is, so a state per call would pile up
	// device memory over a perplexity run's windows).
	scratchMu sync.Mutex
	scratch   *glm4moelite.State
	scratchDT backend.CacheDType

	// LoadTime is how long Load took.
	LoadTime time.Duration
}

// Load reads a model directory. Tokenizer files are not needed.
func Load(dir string, opts Options) (*Model, error) {
	start := time.Now()
	b := opts.Backend
	if b == nil {
		b = cpu.New(cpu.Options{})
	}
	net, err := glm4moelite.Load(dir, b, glm4moelite.LoadOptions{})
	if err != nil {
		return nil, err
	}
	net.DebugNaN = opts.DebugNaN
	if opts.MaxContext < 0 {
		return nil, fmt.Errorf("context of %d tokens: want 0 (default) or more", opts.MaxContext)
	}
	if opts.MaxContext > 0 {
		opts.Engine.MaxModelLen = opts.MaxContext
	}
	// On a device of its own, the step and sequence bounds default to the
	// device's, and the cache takes what the weights left, less
	// DeviceCacheReserve (and, as always, no more than MaxNumSeqs full
	// sequences).
	if mr, ok := b.(backend.MemoryReporter); ok {
		if opts.Engine.MaxBatchTokens == 0 {
			opts.Engine.MaxBatchTokens = DeviceBatchTokens
		}
		if opts.Engine.MaxNumSeqs == 0 {
			opts.Engine.MaxNumSeqs = DeviceMaxNumSeqs
		}
		if opts.Engine.LongPromptAlone == 0 {
			opts.Engine.LongPromptAlone = DeviceLongPromptAlone
		}
		if opts.Engine.CacheBlocks == 0 && opts.Engine.CacheBytes == 0 {
			mem, err := mr.DeviceMemory()
			if err != nil {
				net.Close()
				return nil, fmt.Errorf("device memory: %w", err)
			}
			if left := mem.FreeBytes - DeviceCacheReserve; left > 0 {
				opts.Engine.CacheBytes = left
			}
		}
	}
	engOpts, err := engine.Resolve(net.Config, opts.Engine)
	if err != nil {
		net.Close()
		return nil, err
	}
	eos, err := tokenizer.StopIDs(dir, nil)
	if err != nil {
		net.Close()
		return nil, err
	}
	return &Model{net: net, engOpts: engOpts, eos: eos, dir: dir, LoadTime: time.Since(start)}, nil
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

// Engine returns the model's batching engine, starting it (and allocating
// its KV cache) on first use. Servers submit requests to it directly.
func (m *Model) Engine() (*engine.Engine, error) {
	m.engOnce.Do(func() {
		eos, err := m.defaultStops()
		if err != nil {
			m.engErr = err
			return
		}
		// Without a usable tokenizer the engine still runs id requests;
		// text requests are refused by the callers that need text.
		tok, _ := m.Tokenizer()
		m.eng, m.engErr = engine.New(m.net, tok, eos, m.engOpts)
	})
	return m.eng, m.engErr
}

// Close stops the engine, cancelling what it runs, and unmaps the weight
// files. The model must not be used afterwards.
func (m *Model) Close() error {
	m.engOnce.Do(func() { m.engErr = errors.New("the model is closed") })
	if m.eng != nil {
		m.eng.Close()
	}
	return m.net.Close()
}

// Prefault maps every page of the weight files into the process, so that
// the first prefill does not pay a page fault per page of weights: worth its
// time on the CPU backend, which reads the weights in place (on a GPU they
// were copied at load, and it returns at once). It must not run
// concurrently with Close.
func (m *Model) Prefault() error {
	if _, ok := m.net.Backend().(*cpu.Backend); !ok {
		return nil
	}
	return m.net.Prefault()
}

// BytesRead is the number of bytes of weights and KV cache the model's ops
// have read so far (see cpu.Backend.BytesRead); the difference over a
// decode step is that step's memory traffic, the numerator of the roofline.
// It is 0 on backends that do not count.
func (m *Model) BytesRead() int64 {
	if c, ok := m.net.Backend().(interface{ BytesRead() int64 }); ok {
		return c.BytesRead()
	}
	return 0
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

// Config is the model's parsed configuration.
func (m *Model) Config() *glm4moelite.Config { return m.net.Config }

// EOS are the token ids that end generation by default, as
// tokenizer.StopIDs resolves them: eos_token_id of generation_config.json,
// else of config.json, else the tokenizer's eos_token (nil if the tokenizer
// cannot be loaded).
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
func (m *Model) MaxContext() int { return m.engOpts.MaxModelLen }

// GenerateOptions control one generation.
type GenerateOptions struct {
	// MaxTokens to generate; 0 means until a stop or the context is full.
	MaxTokens int
	// Sampling: zero value is greedy.
	Sampling sample.Options
	// StopIDs end generation (the stop token is not returned); nil means the
	// model's EOS ids. An empty non-nil slice disables stopping.
	StopIDs []int
	// Stop strings end generation; the text stops before the first one
	// (needs the tokenizer).
	Stop []string
	// OnToken, if set, is called with each new token as soon as it is
	// chosen; an error from it stops generation and is returned.
	OnToken func(id int) error
	// OnText, if set, is called with text as it becomes final: never part
	// of a UTF-8 character, never part of a stop string (needs the
	// tokenizer). An error from it stops generation and is returned.
	OnText func(text string) error
}

// Result describes a finished generation.
type Result struct {
	Tokens       []int  // generated ids, without the stop token
	Text         string // their text, when OnText or Stop was given
	PromptTokens int
	CachedTokens int    // prompt tokens that came from the prefix cache
	StopReason   string // "eos", "stop" (a stop string), "max_tokens", "context" or "canceled"
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

// Generate runs one request on the model's engine: the prompt is prefilled
// in chunks, then tokens are decoded one per step, sharing steps with any
// other requests the engine is running. Cancelling ctx stops it within a
// step.
func (m *Model) Generate(ctx context.Context, prompt []int, opts GenerateOptions) (*Result, error) {
	eng, err := m.Engine()
	if err != nil {
		return nil, err
	}
	wantText := opts.OnText != nil || len(opts.Stop) > 0
	if wantText {
		if _, err := m.Tokenizer(); err != nil {
			return nil, err
		}
	}
	// A generation that would run past the context stops there ("context")
	// rather than being refused; only a prompt that fills it is refused.
	room := m.MaxContext() - len(prompt)
	if room <= 0 {
		return nil, fmt.Errorf("generate: prompt of %d tokens leaves no room in the context of %d", len(prompt), m.MaxContext())
	}
	maxTokens, clamped := opts.MaxTokens, false
	if maxTokens <= 0 || maxTokens > room {
		maxTokens, clamped = room, true
	}
	run, cancel := context.WithCancel(ctx)
	defer cancel()
	start := time.Now()
	st, err := eng.Submit(run, engine.Request{Prompt: prompt, MaxTokens: maxTokens, Sampling: opts.Sampling,
		StopIDs: opts.StopIDs, Stop: opts.Stop, Text: wantText})
	if err != nil {
		return nil, fmt.Errorf("generate: %w", err)
	}
	res := &Result{PromptTokens: len(prompt)}
	var first time.Time
	defer func() {
		if !first.IsZero() {
			res.DecodeTime = time.Since(first)
		}
	}()
	for {
		ev, err := st.Recv(context.Background())
		if err != nil { // io.EOF cannot come before the Done event
			return res, err
		}
		if first.IsZero() {
			first = time.Now()
			res.PrefillTime = first.Sub(start)
		}
		res.Text += ev.Text
		if ev.Text != "" && opts.OnText != nil {
			if err := opts.OnText(ev.Text); err != nil {
				return res, err
			}
		}
		if ev.Done {
			res.CachedTokens = ev.Usage.CachedTokens
			res.StopReason = string(ev.Finish)
			if ev.Finish == engine.FinishMaxTokens && clamped {
				res.StopReason = string(engine.FinishContext)
			}
			switch ev.Finish {
			case engine.FinishError:
				return res, ev.Err
			case engine.FinishCanceled:
				return res, ctx.Err()
			}
			return res, nil
		}
		res.Tokens = append(res.Tokens, ev.Token)
		if opts.OnToken != nil {
			if err := opts.OnToken(ev.Token); err != nil {
				return res, err
			}
		}
		if ctx.Err() != nil {
			res.StopReason = string(engine.FinishCanceled)
			return res, ctx.Err()
		}
	}
}

// Logits runs ids through a fresh sequence and returns the float32 logits of
// every position, len(ids) rows of the vocabulary size. The cache lives for
// this one pass only, so it is kept exact (float32).
func (m *Model) Logits(ids []int) ([]float32, error) {
	return m.LogitsWithCache(ids, backend.CacheF32)
}

// LogitsWithCache is Logits with the sequence's latent cache stored in
// dtype, in the paged blocks serving uses: every position attends to the
// rounded cache, as in serving, so the logits carry the cache's error.
func (m *Model) LogitsWithCache(ids []int, dtype backend.CacheDType) ([]float32, error) {
	if len(ids) == 0 {
		return nil, errors.New("logits: no tokens")
	}
	if len(ids) > m.MaxContext() {
		return nil, fmt.Errorf("logits: %d tokens exceed the context of %d", len(ids), m.MaxContext())
	}
	m.scratchMu.Lock()
	defer m.scratchMu.Unlock()
	if m.scratch == nil || m.scratchDT != dtype || m.scratch.Capacity() < len(ids) {
		state, err := m.net.NewState(len(ids), dtype)
		if err != nil {
			return nil, err
		}
		m.scratch, m.scratchDT = state, dtype
	}
	m.scratch.Pos = 0 // earlier calls' positions are overwritten before they are read
	return m.net.ForwardSeq(m.scratch, ids, true)
}
