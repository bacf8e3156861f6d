// Package engine runs many requests on one model by continuous batching.
// One goroutine owns the backend and runs steps. Between steps, new
// requests join and finished or cancelled ones leave; in each step every
// running sequence advances in the same forward pass: decoding sequences by
// one token, prefilling ones by a chunk of their prompt (at most
// MaxBatchTokens tokens per step in all, so long prompts do not stall the
// streams that are decoding). Cache blocks come from a kvcache.Manager:
// a request is admitted when the blocks for its prompt are free, and when a
// running sequence needs a block that is not there, the sequence admitted
// last is preempted (its blocks are freed and it is recomputed later), so
// a running request never fails for lack of memory.
package engine

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/constrain"
	"github.com/mmfp4/mmfp4/kvcache"
	"github.com/mmfp4/mmfp4/model/glm4moelite"
	"github.com/mmfp4/mmfp4/sample"
	"github.com/mmfp4/mmfp4/tokenizer"
)

// Options bound the engine. Zero values take the defaults.
type Options struct {
	// MaxNumSeqs is the most sequences in one step (default 16).
	MaxNumSeqs int
	// MaxBatchTokens is the most tokens in one step (default 512); prompts
	// longer than what is left are prefilled in chunks.
	MaxBatchTokens int
	// LongPromptAlone, when positive, keeps a prompt chunk that reaches this
	// many positions out of steps with decode rows: while both wait, steps
	// of decode rows and steps of such chunks take turns. A backend whose
	// fast prompt attention needs steps of long chunks alone (the CUDA
	// backend's expanded and flash forms) sets it; a mixed step there runs
	// its chunk on the decode kernels, row by row over every position.
	LongPromptAlone int
	// MaxModelLen is the most tokens of one sequence, prompt and output
	// (default: the model's max_position_embeddings, or what the cache
	// holds if that is less).
	MaxModelLen int
	// MaxQueue is the most requests waiting for admission (default 256);
	// past it Submit returns ErrQueueFull.
	MaxQueue int
	// BlockSize is the tokens per cache block (default 64).
	BlockSize int
	// CacheBlocks is the size of the cache pool; 0 sizes it from
	// CacheBytes.
	CacheBlocks int
	// CacheBytes is the memory for the latent cache when CacheBlocks is 0
	// (default 4 GiB, and never more than MaxNumSeqs full sequences).
	CacheBytes int64
	// CacheDType is the cache precision (zero value bf16).
	CacheDType backend.CacheDType
	// OnStep, if set, is called from the engine goroutine after every step.
	OnStep func(StepInfo)
}

// StepInfo describes one step.
type StepInfo struct {
	Seqs, Tokens    int // sequences and tokens in the batch
	Decode, Prefill int // sequences decoding one token, or prefilling
	Duration        time.Duration
}

// Stats is a snapshot of the engine's state and counters.
type Stats struct {
	Running, Waiting     int
	BlocksUsed, Blocks   int
	PrefixQueries        int64 // prompt tokens looked up in the prefix cache
	PrefixHits           int64 // of those, found
	Preemptions          int64
	Steps                int64
	MaxSeqsInStep        int // the largest batch so far, in sequences
	BlockSize, MaxSeqLen int
}

// Request is one generation.
type Request struct {
	Prompt []int
	// MaxTokens to generate; 0 means until a stop or MaxModelLen.
	MaxTokens int
	Sampling  sample.Options
	// StopIDs end generation without being emitted; nil means the model's
	// EOS ids, an empty non-nil slice none.
	StopIDs []int
	// Stop strings end generation; the text before one is the last.
	// Needs a tokenizer.
	Stop []string
	// Text asks for decoded text in the events (needs a tokenizer);
	// SkipSpecial leaves special tokens out of it.
	Text, SkipSpecial bool
	// Logprobs asks for the chosen token's log-probability, TopLogprobs for
	// that many alternatives too.
	Logprobs    bool
	TopLogprobs int
	// Constraint, if set, restricts every sampled token (stop ids
	// included) to its grammar; the sequence ends as EOS when the
	// grammar's output is complete. One per request: it is not shared.
	Constraint *constrain.Constraint
}

// Errors of Submit.
var (
	ErrQueueFull = errors.New("engine: too many requests waiting")
	ErrClosed    = errors.New("engine: shutting down")
)

// RequestError is a request the engine cannot run as given.
type RequestError struct{ Msg string }

func (e *RequestError) Error() string { return e.Msg }

// Engine schedules requests onto one model. Its methods are safe for
// concurrent use.
type Engine struct {
	net  *glm4moelite.Model
	tok  *tokenizer.Tokenizer
	eos  []int
	opt  Options
	pool backend.CachePool
	kv   *kvcache.Manager

	wake chan struct{} // capacity 1: the inbox has requests
	quit chan struct{} // Close: cancel everything and stop
	done chan struct{} // the loop has returned

	mu      sync.Mutex // guards closed, inbox, stats
	closed  bool
	inbox   []*seq
	stats   Stats
	waiting atomic.Int64 // submitted, not yet admitted (for MaxQueue)

	// Owned by the loop goroutine.
	queue    []*seq // waiting, in order
	running  []*seq // in admission order
	admitSeq uint64
	// promptTurn: the last step was long prompt chunks' (LongPromptAlone).
	promptTurn bool
	ahead      *launched // a step on the device whose tokens are not handed out yet
}

// OneSequenceBatchTokens is the step size for a run of one sequence
// (generate, bench): no other stream waits behind a long prefill step, and
// a longer step shares each routed expert's widened weight tiles among more
// tokens (1024-token steps prefilled a 1024-token prompt of GLM-4.7-Flash's
// shapes 12-20% faster than 512-token steps, with no more memory). On a
// GPU whose prompt steps take the expanded attention, each step expands
// its sequence's cached positions once: 2048-token steps prefilled 8192-
// and 32768-token prompts 19% faster than 1024-token steps on an H200,
// for about twice the step workspace (960 MiB against 448 at 8192).
const OneSequenceBatchTokens = 2048

const (
	defaultMaxNumSeqs     = 16
	defaultMaxBatchTokens = 512
	defaultMaxQueue       = 256
	defaultBlockSize      = 64
	defaultCacheBytes     = 4 << 30
)

// Resolve fills in the defaults of opt for a model of config c and checks
// that the limits fit together, without allocating anything.
func Resolve(c *glm4moelite.Config, opt Options) (Options, error) {
	if opt.MaxNumSeqs < 0 || opt.MaxBatchTokens < 0 || opt.LongPromptAlone < 0 || opt.MaxModelLen < 0 || opt.MaxQueue < 0 || opt.BlockSize < 0 || opt.CacheBlocks < 0 || opt.CacheBytes < 0 {
		return opt, errors.New("engine: negative limit")
	}
	def := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	def(&opt.MaxNumSeqs, defaultMaxNumSeqs)
	def(&opt.MaxBatchTokens, defaultMaxBatchTokens)
	def(&opt.MaxQueue, defaultMaxQueue)
	def(&opt.BlockSize, defaultBlockSize)
	modelMax := c.MaxPositions
	if modelMax <= 0 {
		modelMax = 4096
	}
	if opt.MaxModelLen > modelMax {
		return opt, fmt.Errorf("max model length %d exceeds the model's max_position_embeddings (%d)", opt.MaxModelLen, modelMax)
	}
	seqLen := opt.MaxModelLen
	if seqLen == 0 {
		seqLen = modelMax
	}
	perBlock := int64(backend.CacheBytesPerToken(c.KVLoraRank, c.QKRopeHeadDim, opt.CacheDType)) * int64(c.NumLayers) * int64(opt.BlockSize)
	if opt.CacheBlocks == 0 {
		budget := opt.CacheBytes
		if budget == 0 {
			budget = defaultCacheBytes
		}
		perSeq := (seqLen + opt.BlockSize - 1) / opt.BlockSize
		opt.CacheBlocks = int(min(budget/perBlock, int64(opt.MaxNumSeqs*perSeq)))
	}
	capacity := opt.CacheBlocks * opt.BlockSize
	if opt.MaxModelLen == 0 {
		opt.MaxModelLen = min(seqLen, capacity)
	}
	if opt.MaxModelLen > capacity || opt.MaxModelLen < 2 {
		return opt, fmt.Errorf("a sequence of %d tokens does not fit the KV cache of %d blocks of %d tokens (%d MiB); raise the cache size or lower the max model length",
			opt.MaxModelLen, opt.CacheBlocks, opt.BlockSize, int64(opt.CacheBlocks)*perBlock>>20)
	}
	return opt, nil
}

// New allocates the cache pool and starts the engine. tok may be nil (no
// text, no stop strings); eos are the default stop ids.
func New(net *glm4moelite.Model, tok *tokenizer.Tokenizer, eos []int, opt Options) (*Engine, error) {
	opt, err := Resolve(net.Config, opt)
	if err != nil {
		return nil, err
	}
	pool, err := net.NewCachePool(opt.CacheBlocks, opt.BlockSize, opt.CacheDType)
	if err != nil {
		return nil, err
	}
	e := &Engine{
		net: net, tok: tok, eos: eos, opt: opt, pool: pool,
		kv:   kvcache.New(opt.CacheBlocks, opt.BlockSize),
		wake: make(chan struct{}, 1),
		quit: make(chan struct{}),
		done: make(chan struct{}),
	}
	e.stats.Blocks = opt.CacheBlocks
	e.stats.BlockSize = opt.BlockSize
	e.stats.MaxSeqLen = opt.MaxModelLen
	go e.loop()
	return e, nil
}

// Options are the engine's settings with the defaults filled in.
func (e *Engine) Options() Options { return e.opt }

// Stats returns a snapshot of the engine's state.
func (e *Engine) Stats() Stats {
	e.mu.Lock()
	defer e.mu.Unlock()
	s := e.stats
	s.Waiting = int(e.waiting.Load())
	return s
}

// seq is a request in the engine.
type seq struct {
	req     Request
	ctx     context.Context
	stream  *Stream
	isStop  map[int]bool
	sampler *sample.Sampler
	text    *TextStream

	tokens    []int32 // prompt, then generated tokens
	promptLen int
	kv        kvcache.Seq
	computed  int    // tokens whose latents are in the cache
	cached    int    // prompt tokens from the prefix cache at first admission
	admitted  uint64 // admission order; 0 while waiting
	everRan   bool
	ended     bool // finished: a step queued ahead skips it
}

// Submit queues a request. The returned Stream delivers its tokens; the
// request runs until it finishes or ctx ends. Errors: *RequestError for a
// request that cannot run, ErrQueueFull, ErrClosed.
func (e *Engine) Submit(ctx context.Context, r Request) (*Stream, error) {
	s, err := e.newSeq(r)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	s.ctx = ctx
	s.stream = newStream(cancel)
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		cancel()
		return nil, ErrClosed
	}
	if e.waiting.Add(1) > int64(e.opt.MaxQueue) {
		e.waiting.Add(-1)
		cancel()
		return nil, ErrQueueFull
	}
	e.inbox = append(e.inbox, s)
	select {
	case e.wake <- struct{}{}:
	default:
	}
	return s.stream, nil
}

func (e *Engine) newSeq(r Request) (*seq, error) {
	n, limit, vocab := len(r.Prompt), e.opt.MaxModelLen, e.net.Config.VocabSize
	switch {
	case n == 0:
		return nil, &RequestError{"the prompt is empty"}
	case r.MaxTokens < 0:
		return nil, &RequestError{fmt.Sprintf("max_tokens must be positive, got %d", r.MaxTokens)}
	case n+max(r.MaxTokens, 1) > limit:
		if r.MaxTokens == 0 {
			return nil, &RequestError{fmt.Sprintf("the prompt has %d tokens, which leaves no room in the context of %d tokens", n, limit)}
		}
		return nil, &RequestError{fmt.Sprintf("the prompt (%d tokens) plus max_tokens (%d) is %d tokens, %d more than the context of %d tokens",
			n, r.MaxTokens, n+r.MaxTokens, n+r.MaxTokens-limit, limit)}
	case (len(r.Stop) > 0 || r.Text) && e.tok == nil:
		return nil, &RequestError{"text output and stop strings need the model's tokenizer, and this model directory has none"}
	case r.TopLogprobs < 0 || r.TopLogprobs > 20:
		return nil, &RequestError{fmt.Sprintf("top_logprobs must be in [0, 20], got %d", r.TopLogprobs)}
	}
	for _, st := range r.Stop {
		if st == "" {
			return nil, &RequestError{"stop strings must not be empty"}
		}
	}
	s := &seq{req: r, promptLen: n}
	for i, id := range r.Prompt {
		if id < 0 || id >= vocab {
			return nil, &RequestError{fmt.Sprintf("token id %d at prompt position %d is outside the vocabulary [0, %d)", id, i, vocab)}
		}
		s.tokens = append(s.tokens, int32(id))
	}
	var err error
	if s.sampler, err = sample.New(r.Sampling); err != nil {
		return nil, &RequestError{err.Error()}
	}
	stop := r.StopIDs
	if stop == nil {
		stop = e.eos
	}
	s.isStop = make(map[int]bool, len(stop))
	for _, id := range stop {
		s.isStop[id] = true
	}
	if r.Text || len(r.Stop) > 0 {
		s.text = NewTextStream(e.tok, r.Stop, r.SkipSpecial)
	}
	return s, nil
}

// StopAdmissions makes every later Submit fail with ErrClosed; running and
// queued requests go on.
func (e *Engine) StopAdmissions() {
	e.mu.Lock()
	e.closed = true
	e.mu.Unlock()
}

// Close stops admissions, cancels every request, and stops the engine.
func (e *Engine) Close() {
	e.StopAdmissions()
	select {
	case <-e.quit:
	default:
		close(e.quit)
	}
	<-e.done
}

// loop is the engine goroutine.
func (e *Engine) loop() {
	defer close(e.done)
	for {
		if len(e.queue) == 0 && len(e.running) == 0 && e.ahead == nil {
			select {
			case <-e.wake:
			case <-e.quit:
			}
		}
		e.mu.Lock()
		e.queue = append(e.queue, e.inbox...)
		clear(e.inbox)
		e.inbox = e.inbox[:0]
		e.mu.Unlock()
		select {
		case <-e.quit:
			if e.ahead != nil {
				_, _ = e.ahead.wait() // the device's work ends before the backend is reused
				e.ahead = nil
			}
			for _, s := range append(e.running, e.queue...) {
				e.finish(s, FinishCanceled, context.Canceled)
			}
			e.running, e.queue = nil, nil
			e.waiting.Store(0)
			e.publish()
			return
		default:
		}
		e.reap()
		e.step()
		e.publish()
	}
}

// reap ends the requests whose context is done.
func (e *Engine) reap() {
	keep := e.running[:0]
	for _, s := range e.running {
		if s.ctx.Err() != nil {
			e.finish(s, FinishCanceled, s.ctx.Err())
		} else {
			keep = append(keep, s)
		}
	}
	clear(e.running[len(keep):])
	e.running = keep
	q := e.queue[:0]
	for _, s := range e.queue {
		if s.ctx.Err() != nil {
			e.waiting.Add(-1)
			e.finish(s, FinishCanceled, s.ctx.Err())
		} else {
			q = append(q, s)
		}
	}
	clear(e.queue[len(q):])
	e.queue = q
}

// publish copies the engine's state for Stats.
func (e *Engine) publish() {
	e.mu.Lock()
	e.stats.Running = len(e.running)
	e.stats.BlocksUsed = e.kv.Used()
	e.stats.PrefixQueries = e.kv.Queries
	e.stats.PrefixHits = e.kv.Hits
	e.mu.Unlock()
}

// chunk is one sequence's rows in a step.
type chunk struct {
	s *seq
	n int
}

// launched is a step handed to the model: its plan, and the wait for its
// outputs.
type launched struct {
	plan  []chunk
	batch *backend.Batch
	info  StepInfo
	start time.Time
	wait  func() ([]glm4moelite.Output, error)
	async bool         // queued ahead of its ids (LaunchOutputs)
	out   map[*seq]int // each sequence's output index
}

// step runs one batch and hands out its results. Where the model can queue
// a step before the ids of the one before come back (Model.Async), a step
// of plain decoding is launched, and the next is queued before the
// engine waits for the first: the device runs the next step while the
// engine hands out the tokens of the last and plans again.
func (e *Engine) step() {
	if cur := e.ahead; cur != nil {
		e.ahead = e.launchAhead(cur)
		outs, err := cur.wait()
		e.finishStep(cur, outs, err)
		return
	}
	plan := e.schedule()
	if len(plan) == 0 {
		return
	}
	l := e.launch(plan, nil)
	if l.async {
		e.ahead = l // handed out at the next step, after the next launch
		return
	}
	outs, err := l.wait()
	e.finishStep(l, outs, err)
}

// launch builds the batch of plan and hands it to the model, queued ahead
// where it can be (every output sampled by the backend); prev, if set, is the step before it, still on the
// device, whose ids are the tokens of the rows that continue it.
func (e *Engine) launch(plan []chunk, prev *launched) *launched {
	l := &launched{plan: plan, start: time.Now(), out: map[*seq]int{}}
	b := &backend.Batch{}
	l.batch = b
	info := StepInfo{Seqs: len(plan)}
	async := e.net.Async()
	for _, c := range plan {
		s := c.s
		b.Seqs = append(b.Seqs, backend.Seq{Start: len(b.Tokens), Len: c.n, Blocks: s.kv.Blocks})
		if prev != nil { // one row, whose token prev chose
			b.Tokens = append(b.Tokens, 0)
			b.Positions = append(b.Positions, int32(len(s.tokens)))
			b.Prev = append(b.Prev, int32(prev.out[s]))
		} else {
			for p := s.computed; p < s.computed+c.n; p++ {
				b.Tokens = append(b.Tokens, s.tokens[p])
				b.Positions = append(b.Positions, int32(p))
			}
		}
		if prev != nil || s.computed+c.n == len(s.tokens) {
			l.out[s] = len(b.Outputs)
			b.Outputs = append(b.Outputs, int32(len(b.Tokens)-1))
			p := e.sampleParams(s)
			b.Sample = append(b.Sample, p)
			async = async && p != nil
		}
		if prev != nil || (c.n == 1 && len(s.tokens) > s.promptLen) {
			info.Decode++
		} else {
			info.Prefill++
		}
	}
	info.Tokens = len(b.Tokens)
	l.info = info
	// A step whose every request has been cancelled stops between layers:
	// one prefill chunk of a large model on a small CPU takes minutes.
	b.Interrupt = func() error {
		for _, c := range plan {
			if c.s.ctx.Err() == nil {
				return nil
			}
		}
		return context.Canceled
	}
	var err error
	if async && len(b.Outputs) > 0 {
		var wait func() ([]glm4moelite.Output, error)
		if wait, err = e.net.LaunchOutputs(b, e.pool); err == nil {
			l.wait, l.async = wait, true
			return l
		}
	}
	if prev != nil { // its tokens are on the device: no synchronous fallback
		if err == nil { // cannot happen: launchAhead checked the model
			err = errors.New("engine: a step queued ahead on a model that cannot")
		}
		l.wait = func() ([]glm4moelite.Output, error) { return nil, err }
		return l
	}
	l.wait = func() ([]glm4moelite.Output, error) { return e.net.ForwardOutputs(b, e.pool) }
	return l
}

// launchAhead launches the step after cur before cur's ids are back, when
// that step is one token for each running sequence, all of whose tokens
// cur is choosing: no request waits for admission, every running sequence
// has an output in cur sampled by the backend, none needs a cache block
// that is not free, and cur is not a prefill (whose step's bytes the bench
// keeps apart). Sequences that cur's token ends by their length limits are
// left out; one that a stop id or string ends is computed in vain.
func (e *Engine) launchAhead(cur *launched) *launched {
	if !cur.async || cur.info.Prefill > 0 || len(e.queue) > 0 {
		return nil
	}
	e.mu.Lock()
	waiting := len(e.inbox)
	e.mu.Unlock()
	if waiting > 0 {
		return nil
	}
	var plan []chunk
	for _, s := range e.running {
		if _, ok := cur.out[s]; !ok || s.req.Constraint != nil {
			return nil
		}
		n := len(s.tokens) + 1 // with cur's token
		if (s.req.MaxTokens > 0 && n-s.promptLen >= s.req.MaxTokens) || n >= e.opt.MaxModelLen {
			continue
		}
		if e.kv.Grow(&s.kv, n) != nil {
			return nil
		}
		plan = append(plan, chunk{s, 1})
	}
	if len(plan) == 0 {
		return nil
	}
	return e.launch(plan, cur)
}

// finishStep records the step and hands out its tokens and errors.
// Sequences that ended while it ran (a step queued ahead) are skipped.
func (e *Engine) finishStep(l *launched, outs []glm4moelite.Output, err error) {
	now := time.Now()
	plan, b, info := l.plan, l.batch, l.info
	var picks []pick
	if err == nil {
		picks = e.pickAll(plan, outs, b.Sample)
	}
	// The step is recorded (OnStep) before its tokens and errors reach
	// the streams, so a caller that sees its last token also sees the
	// step that made it.
	var done []*seq // sequences with an output this step, in output order
	var doneOut []int
	if err == nil {
		for _, c := range plan {
			s := c.s
			if s.ended {
				continue
			}
			s.computed += c.n
			if s.computed > len(s.tokens) { // cannot happen: the token before is handed out first
				err = fmt.Errorf("engine: step ahead of its sequence (%d computed, %d tokens)", s.computed, len(s.tokens))
				break
			}
			e.kv.Commit(&s.kv, s.tokens, s.computed)
			if i, ok := l.out[s]; ok {
				done = append(done, s)
				doneOut = append(doneOut, i)
			}
		}
	}
	info.Duration = time.Since(l.start)
	e.mu.Lock()
	e.stats.Steps++
	e.stats.MaxSeqsInStep = max(e.stats.MaxSeqsInStep, info.Seqs)
	e.mu.Unlock()
	if e.opt.OnStep != nil {
		e.opt.OnStep(info)
	}
	if err != nil {
		for _, c := range plan {
			s := c.s
			if s.ended {
				continue
			}
			e.remove(s)
			if cerr := s.ctx.Err(); cerr != nil && errors.Is(err, context.Canceled) {
				e.finish(s, FinishCanceled, cerr)
			} else {
				e.finish(s, FinishError, fmt.Errorf("forward pass: %w", err))
			}
		}
		return
	}
	for k, s := range done {
		i := doneOut[k]
		e.emit(s, outs[i], b.Sample[i], &picks[i], now)
	}
}

// schedule picks the rows of the next step: first a token for every
// decoding sequence, then prompt chunks of the prefilling ones, then newly
// admitted requests, within MaxBatchTokens. Sequences that need a cache
// block that is not free preempt the sequence admitted last.
func (e *Engine) schedule() []chunk {
	budget := e.opt.MaxBatchTokens
	var plan []chunk
	planned := func(s *seq) int {
		for i, c := range plan {
			if c.s == s {
				return i
			}
		}
		return -1
	}
	decodeTurn, promptTurn := e.turns()
	for _, decode := range []bool{true, false} {
		if decode && !decodeTurn {
			continue
		}
		for i := 0; i < len(e.running) && budget > 0; i++ {
			s := e.running[i]
			rest := len(s.tokens) - s.computed
			if (rest == 1) != decode || planned(s) >= 0 {
				continue
			}
			n := min(rest, budget)
			if !decode && !promptTurn && e.long(s.computed+n) {
				continue
			}
			for e.kv.Grow(&s.kv, s.computed+n) != nil {
				victim := e.running[len(e.running)-1]
				if j := planned(victim); j >= 0 {
					budget += plan[j].n
					plan = append(plan[:j], plan[j+1:]...)
				}
				e.preempt(victim)
				if victim == s {
					break
				}
			}
			if i >= len(e.running) || e.running[i] != s {
				break // s itself was preempted
			}
			plan = append(plan, chunk{s, n})
			budget -= n
		}
	}
	for len(e.queue) > 0 && budget > 0 && len(e.running) < e.opt.MaxNumSeqs {
		s := e.queue[0]
		hit := e.kv.Reuse(&s.kv, s.tokens, len(s.tokens)-1)
		if e.kv.Grow(&s.kv, len(s.tokens)) != nil {
			e.kv.Release(&s.kv)
			break
		}
		e.queue = e.queue[1:]
		e.waiting.Add(-1)
		s.computed = hit
		if !s.everRan {
			s.cached = hit
			s.everRan = true
		}
		e.admitSeq++
		s.admitted = e.admitSeq
		e.running = append(e.running, s)
		n := min(len(s.tokens)-s.computed, budget)
		if !promptTurn && e.long(s.computed+n) {
			continue // admitted; its chunk waits for the next step
		}
		plan = append(plan, chunk{s, n})
		budget -= n
	}
	return plan
}

// long reports whether a prompt chunk reaching n positions runs apart from
// decode rows (LongPromptAlone).
func (e *Engine) long(n int) bool {
	return e.opt.LongPromptAlone > 0 && n >= e.opt.LongPromptAlone
}

// turns reports whether the next step may take decode rows and long prompt
// chunks: both, unless both wait, when they take turns.
func (e *Engine) turns() (decode, prompt bool) {
	if e.opt.LongPromptAlone <= 0 {
		return true, true
	}
	decoding, longPrompt := false, false
	for _, s := range e.running {
		rest := len(s.tokens) - s.computed
		decoding = decoding || rest == 1
		longPrompt = longPrompt || (rest > 1 && e.long(s.computed+min(rest, e.opt.MaxBatchTokens)))
	}
	if len(e.queue) > 0 && len(e.running) < e.opt.MaxNumSeqs {
		longPrompt = longPrompt || e.long(min(len(e.queue[0].tokens), e.opt.MaxBatchTokens))
	}
	if !decoding || !longPrompt {
		return true, true
	}
	e.promptTurn = !e.promptTurn
	return !e.promptTurn, e.promptTurn
}

// preempt frees s's cache blocks and puts it first in the queue, to be
// recomputed from its tokens (prompt and output so far) when blocks free up.
func (e *Engine) preempt(s *seq) {
	e.remove(s)
	e.kv.Release(&s.kv)
	s.computed = 0
	s.admitted = 0
	e.queue = append([]*seq{s}, e.queue...)
	e.waiting.Add(1)
	e.mu.Lock()
	e.stats.Preemptions++
	e.mu.Unlock()
}

// remove takes s off the running list.
func (e *Engine) remove(s *seq) {
	for i, r := range e.running {
		if r == s {
			e.running = append(e.running[:i], e.running[i+1:]...)
			return
		}
	}
}

// sampleParams returns the settings with which a backend may choose s's
// next token itself, having drawn its random number from s's sampler, or
// nil where the engine needs the logits (a grammar constraint;
// log-probabilities, unless the backend computes them too).
func (e *Engine) sampleParams(s *seq) *backend.SampleParams {
	lp := s.req.Logprobs || s.req.TopLogprobs > 0
	if s.req.Constraint != nil {
		return nil
	}
	if _, ok := e.net.Backend().(backend.LogprobSampler); lp && !ok {
		return nil
	}
	o := s.sampler.Options()
	p := &backend.SampleParams{Temperature: o.Temperature, TopK: o.TopK, TopP: o.TopP, MinP: o.MinP, Logprobs: lp, TopLogprobs: s.req.TopLogprobs}
	if s.sampler.NeedsUniform(e.net.Config.VocabSize) {
		p.U = s.sampler.Uniform()
	}
	return p
}

// pick is what emit needs from a sequence's logits row that depends on
// nothing else: the row's check, the sampled token and the logprobs.
type pick struct {
	ready       bool // computed by pickAll (else emit computes it)
	checkErr    error
	id          int
	err         error
	logprob     float32
	topLogprobs []TokenLogprob
}

// pickAll computes the picks of the step's output rows that came back as
// logits (in plan order) on several goroutines: over a large vocabulary
// the check, the argmax and above all the logprobs (an exp per vocabulary
// entry) take milliseconds a sequence, which the engine's one goroutine
// paid in series (at 32 sequences and 154,880 entries, most of a GPU
// decode step). Each sequence's sampler is used by one goroutine only;
// constrained sequences are left to emit, in order, and rows whose token
// the backend chose need nothing.
func (e *Engine) pickAll(plan []chunk, outs []glm4moelite.Output, params []*backend.SampleParams) []pick {
	type job struct {
		s   *seq
		row []float32
		sp  *backend.SampleParams
		p   *pick
	}
	var jobs []job
	picks := make([]pick, len(outs))
	out := 0
	for _, c := range plan {
		if c.s.computed+c.n != len(c.s.tokens) {
			continue
		}
		if c.s.req.Constraint == nil && outs[out].Logits != nil {
			jobs = append(jobs, job{c.s, outs[out].Logits, params[out], &picks[out]})
		}
		out++
	}
	work := func(j job) {
		p := j.p
		p.ready = true
		if p.checkErr = glm4moelite.CheckLogits(j.row); p.checkErr != nil {
			return
		}
		if j.sp != nil {
			p.id, p.err = j.s.sampler.SampleWith(j.row, j.sp.U)
		} else {
			p.id, p.err = j.s.sampler.Sample(j.row)
		}
		if p.err != nil {
			return
		}
		if j.s.req.Logprobs || j.s.req.TopLogprobs > 0 {
			p.logprob, p.topLogprobs = logprobs(j.row, p.id, j.s.req.TopLogprobs)
		}
	}
	if len(jobs) < 2 {
		for _, j := range jobs {
			work(j)
		}
		return picks
	}
	var wg sync.WaitGroup
	for _, j := range jobs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			work(j)
		}()
	}
	wg.Wait()
	return picks
}

// emit sends s's next token, which the backend chose (out.ID) or s's
// sampler chooses from the logits (in p, computed by pickAll, or here, with
// the random number drawn for sp if set), or ends s.
func (e *Engine) emit(s *seq, out glm4moelite.Output, sp *backend.SampleParams, p *pick, now time.Time) {
	logits := out.Logits
	if logits != nil && !p.ready {
		p.checkErr = glm4moelite.CheckLogits(logits)
	}
	if logits == nil && out.ID < 0 {
		p.checkErr = errors.New("not finite")
	}
	if err := p.checkErr; err != nil {
		e.remove(s)
		e.finish(s, FinishError, fmt.Errorf("logits at position %d: %w (run with --debug-nan to find the layer)", len(s.tokens)-1, err))
		return
	}
	id := out.ID
	var err error
	switch c := s.req.Constraint; {
	case logits == nil:
	case p.ready:
		id, err = p.id, p.err
	case c != nil:
		if id, err = c.Sample(s.sampler, logits); err == nil {
			err = c.Advance(id)
		}
	case sp != nil:
		id, err = s.sampler.SampleWith(logits, sp.U)
	default:
		id, err = s.sampler.Sample(logits)
	}
	if err != nil {
		e.remove(s)
		e.finish(s, FinishError, fmt.Errorf("sampling at position %d: %w", len(s.tokens), err))
		return
	}
	if s.isStop[id] {
		e.remove(s)
		e.finish(s, FinishEOS, nil)
		return
	}
	s.tokens = append(s.tokens, int32(id))
	ev := Event{Token: id, Time: now}
	switch {
	case p.ready:
		ev.Logprob, ev.TopLogprobs = p.logprob, p.topLogprobs
	case out.Logprobs != nil: // the backend's, with its id
		ev.Logprob, ev.TopLogprobs = out.Logprobs.Chosen, out.Logprobs.Top
	case s.req.Logprobs || s.req.TopLogprobs > 0:
		ev.Logprob, ev.TopLogprobs = logprobs(logits, id, s.req.TopLogprobs)
	}
	var stopped bool
	if s.text != nil {
		if ev.Text, stopped, err = s.text.Add(id); err != nil {
			e.remove(s)
			e.finish(s, FinishError, err)
			return
		}
		if !s.req.Text {
			ev.Text = ""
		}
	}
	s.stream.push(ev)
	generated := len(s.tokens) - s.promptLen
	switch {
	case s.req.Constraint != nil && s.req.Constraint.Done():
		e.remove(s)
		e.finish(s, FinishEOS, nil)
	case stopped:
		s.text = nil // the text after the stop string is dropped
		e.remove(s)
		e.finish(s, FinishStop, nil)
	case s.req.MaxTokens > 0 && generated >= s.req.MaxTokens:
		e.remove(s)
		e.finish(s, FinishMaxTokens, nil)
	case len(s.tokens) >= e.opt.MaxModelLen:
		e.remove(s)
		e.finish(s, FinishContext, nil)
	}
}

// finish releases s's blocks and sends its Done event. The caller has
// taken s off the running list or the queue.
func (e *Engine) finish(s *seq, why Finish, err error) {
	s.ended = true
	e.kv.Release(&s.kv)
	ev := Event{Done: true, Finish: why, Time: time.Now(), Usage: Usage{
		PromptTokens: s.promptLen, CachedTokens: s.cached, CompletionTokens: len(s.tokens) - s.promptLen}}
	if why == FinishError || why == FinishCanceled {
		ev.Err = err
	}
	if s.text != nil && s.req.Text && why != FinishError {
		ev.Text = s.text.Flush()
	}
	s.stream.push(ev)
	s.stream.cancel() // release the context's resources
}
