//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"math"
	"os"
	"slices"
	"sync/atomic"
	"time"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/safetensors"
)

// Options configure the CUDA backend.
type Options struct {
	// Ordinal is the GPU to use.
	Ordinal int
	// NoFusedMoE routes single-token MoE through the grouped path (one
	// product per expert) instead of the fused MoE kernels.
	NoFusedMoE bool
	// NoGraphs issues every op as its own launch instead of replaying
	// repeated steps as CUDA graphs (also MMFP4_CUDA_GRAPHS=0).
	NoGraphs bool
	// Fewer launches per decode layer (fused.go), each bit for bit the
	// separate launches, and each off by default: on an H200 none made
	// decode faster (docs/perf.md, 2026-11-28 (2)). FusedGEMV runs a
	// single-token product's input preparation (the norm before it, the
	// residual add before that, or the int8 quantization) in the
	// product's blocks, and q_a with kv_a in one launch; FusedRouter the
	// norm before a single-row router in the router's launch; FusedLatent
	// the latent's norm in the RoPE and cache write launch.
	FusedGEMV, FusedRouter, FusedLatent bool
	// SeparateChain keeps apart the ops that a single-token decode layer
	// otherwise runs in shared launches (chain.go: q_a with kv_a, the
	// value expansion with its output's quantization, the q_a norm with the
	// latent's norm, the RoPEs and cache write with the absorbed query).
	SeparateChain bool
	// NoPieces hands a step to the device whole at its first read-back
	// instead of in pieces of a few layers.
	NoPieces bool
	// WaitFlushes makes each flush wait until the device thread has
	// recorded and launched its ops, instead of handing them over and
	// queuing the next meanwhile (tests compare the two).
	WaitFlushes bool
}

// Backend implements backend.Backend on one GPU. Every op is queued on the
// device's stream through Device.Do; the first error is kept for Sync.
type Backend struct {
	dev   *Device
	owned bool // Close closes dev
	opts  Options
	err   error

	weights slab  // weight memory, never freed before Close
	arena   arena // per-step tensors and metadata

	uploadTime time.Duration // spent copying weights in (DeviceMemory)
	cacheBytes int64         // cache pools allocated (DeviceMemory)

	batch *backend.Batch
	pool  *cachePool
	meta  batchMeta

	pending []queuedOp // ops queued since the last flush

	// splitFloats bounds the split attention kernel's partial sums
	// (maxSplitFloats; tests set 0 to cover the other kernel).
	splitFloats int
	// flashMin is the smallest step whose attention takes the flash
	// kernel (flashMinRows; 0: never); flashAlways sends every step that
	// fits it there (tests).
	flashMin    int
	flashAlways bool
	// expandedMin is the fewest positions of every sequence from which a
	// prompt step's attention takes the expanded form (expanded.go; 0:
	// never); expandedSteps counts the attentions that took it (tests).
	expandedMin, expandedSteps int
	// noHeadsAttention leaves out the all-heads split kernel, and
	// noRouteLogits the one-warp router (tests).
	noHeadsAttention, noRouteLogits bool
	// decodeAttn takes few-row attention through the single-launch
	// kernel (attention.go), its splits aimed at decodeBlocks percent of
	// the multiprocessors (decodeOneHead: one head a warp);
	// attnCounters are its tickets (zero between launches).
	decodeAttn, decodeOneHead bool
	decodeBlocks              int
	// decodeMMA takes decode attention over a bf16, fp8 or fp4 cache
	// through the tensor-core kernel (decodemma.go), its splits merged as decodeMerge
	// says (mergeAuto, mergeInKernel or mergeLaunch); decodeMMATile, when
	// not 0, fixes its tile (16 or 32 positions).
	decodeMMA     bool
	decodeMerge   int
	decodeMMATile int
	attnCounters  Buffer
	// decodeAhead lets the tensor-core kernel copy earlier steps' cache
	// rows before it waits for the kernel before (programmatic dependent
	// launch); combineQuant lets it (or its merge launch) write the int8
	// form of its output that the value expansion's quantization asks for
	// right after (lastDecodeAttn, quantize).
	decodeAhead, combineQuant bool
	lastDecodeAttn            *decodeAttnOp
	// decodeStamps, when set, receives the kernel's per-block timer
	// stamps (BenchmarkAttention); decodeStampBlocks is the last grid's
	// block count.
	decodeStamps      uint64
	decodeStampBlocks int
	// noScope keeps every tensor of a step to its end; releases counts
	// Release calls that freed memory (tests).
	noScope  bool
	releases int

	moe       map[*QMatrix]*moeLayer
	moeShared map[*QMatrix]*moeLayer // tables with the shared experts
	identity  map[int]uint64         // E -> E x E identity, for routing from logits

	read atomic.Int64 // BytesRead

	sampledRows int // rows whose token SampleRows chose (tests)
	async       asyncIDs
	logprobRows int // rows whose log-probabilities SampleRowsLogprobs computed (tests)

	prof   *profiler   // MMFP4_CUDA_PROFILE=1
	graphs *graphCache // nil: no graphs

	// zero is the open range of new tensors that one memset clears
	// (NewTensor); nil after a flush or SetBatch. fresh is the tensor the
	// last NewTensor cleared (serve.go).
	zero  *zeroRange
	fresh *freshZero
	// lastNormRows is the norm of several rows queued last, which a second
	// norm of the same rows may join; serveMerges counts serve.go's joins
	// by kind (tests).
	lastNormRows *normRowsOp
	lastProduct  *rowsProductOp
	lastCombine  *combineOp
	lastAddRows  *addNormRowsOp
	serveMerges  [serveKinds]int
	// ropeTables are this step's RoPE cos/sin tables by (dim, theta), in
	// ropeBufs: outside the arena, so that a prefill freeing each layer's
	// memory (Release) does not compute and upload them in every layer (a
	// 1024-token prefill spent 50 ms of host time on the angles, and each
	// upload from pageable memory waited for the GPU to reach it).
	ropeTables map[ropeKey]uint64
	ropeBufs   map[ropeKey]Buffer
	// quantized are int8 forms of tensors made this step (by RMSNorm, or by
	// a product's quantization), for later products of the same tensor;
	// an op that writes over a tensor drops its entry (wrote).
	quantized []quantEntry
	// lastAdd is the Add queued last (flushes counts the flushes, so that a
	// flushed op is not mistaken for it): a RMSNorm of its result right
	// after it replaces it with one fused launch.
	lastAdd *addOp
	flushes int
	// lastDense is the dense product queued last: Route on its output
	// right after it replaces it with the fused router kernel.
	lastDense *denseOp
	// lastRouter is the single-row router launch queued last: the MoE's
	// quantization of the same input right after it goes into its launch.
	lastRouter *routerOp
	// routeCounters are the router launch's per-token counters (zero
	// between launches; RouterRoute).
	routeCounters Buffer
	// streamCounters are MatMulStream's per-row-block counters.
	streamCounters Buffer
	// lastStream is the MatMulStream queued last, which a product of the
	// same rows may join; streamPairs counts the pairs made.
	lastStream  *streamOp
	streamPairs int
	// ropes are the last two RoPEs queued: a cache write right after two
	// RoPEs of one table, the second of its key, takes them into its launch.
	ropes [2]*ropeOp
	// lastNorm is the single-row RMSNorm queued last and lastFused the
	// fused product queued last (fused.go); counter is their block count.
	lastNorm  *normOp
	lastFused *fusedOp
	counter   Buffer
	// fusedLaunches counts the fused products queued by prologue mode, and
	// fusedPairs those that took a second product (tests).
	fusedLaunches [3]int
	fusedPairs    int
	fusedRouters  int
	fusedLatent   int
	// lastGEMV, lastValues and lastNorm8 are the single-token product,
	// value expansion and single-row norm queued last, which the op after
	// may join (chain.go); chainMerges counts the joins by kind (tests).
	lastGEMV   *gemvOp
	lastGEMM   *gemmOp // and gemmPairs counts its joins (gemm.go)
	gemmPairs  int
	lastValues *valuesOp
	lastNorm8  *norm8Op
	// lastNormGEMV is the norm and product launch queued last (chain.go).
	lastNormGEMV *normGEMVOp
	// lastAddNorm is the add, norm and product launch queued last.
	lastAddNorm *addNormGEMVOp
	// lastRopeCache is the RoPE + cache write launch queued last;
	// ropeCaches counts the cache writes that took both RoPEs (tests).
	lastRopeCache *ropeCacheOp
	ropeCaches    int
	chainMerges   [8]int
	// moeAhead and normAhead are the L2 requests of the MoE launch and
	// the add, norm and products launch queued last, which the launch
	// after each fills with its weights (l2ahead.go); aheads counts the
	// weights added by kind (tests).
	moeAhead, normAhead *aheadSlot
	aheads              [2]int
	// prefillMerges counts a prefill's merged launches by kind
	// (prefillValues, prefillNorms, prefillCombine, prefillRopeRows; tests).
	prefillMerges [4]int

	steps *stepTimer // MMFP4_CUDA_STEPTIME=1
	// pieces counts the pieces this step has gone to the device in.
	pieces int

	// Flushes handed over without waiting (flush): handed counts those
	// since the last call that waited for the device thread; lateErr is
	// the first error of one, set on the device thread and read here after
	// a Do (settle); spareOps are queues the device thread has finished
	// with, for reuse.
	handed   int
	lateErr  error
	spareOps chan []queuedOp
	// stepNo counts SetBatch calls (the step timer's steps).
	stepNo int
}

type ropeOp struct {
	idx, flush                         int
	m                                  tensor
	heads, headStride, offset, dim, il int
	table                              uint64
}

type denseOp struct {
	idx, flush int
	d, x       tensor
	w          *weight
}

// routerOp is a router launch queued as b.pending[idx], reading x; call
// launches it, with q also writing x's int8 form.
type routerOp struct {
	idx, flush int
	x          tensor
	call       func(c *Ctx, q *QActs) error
}

type addOp struct {
	idx, flush int
	d, a, c    tensor
	comb       *combineOp // the MoE combine that wrote c, queued just before (serve.go)
}

type zeroRange struct {
	ptr   uint64
	n     int
	chunk int
}

type ropeKey struct {
	dim   int
	theta float64
}

type quantEntry struct {
	src tensor
	a   *QActs
}

// BytesRead is the number of bytes of weights and latent cache the ops have
// read, counted as the CPU backend counts them (cpu.Backend.BytesRead): a
// product its whole weight, an embedding lookup its rows, RMSNorm its gain,
// Route its bias, attention the cached positions of each row, MoE each
// chosen expert's three matrices.
func (b *Backend) BytesRead() int64 { return b.read.Load() }

func (b *Backend) count(n int64) { b.read.Add(n) }

var _ backend.Backend = (*Backend)(nil)

// New opens GPU o.Ordinal and returns a backend on it. The error wraps
// ErrNoDriver, ErrNoDevice or ErrNoNVRTC where CUDA cannot be used.
func New(o Options) (*Backend, error) {
	if _, _, _, err := NVRTCVersion(); err != nil {
		return nil, err
	}
	d, err := Open(o.Ordinal)
	if err != nil {
		return nil, err
	}
	b := NewOnDevice(d, o)
	b.owned = true
	if err := d.Do(func(c *Ctx) error { return c.Precompile() }); err != nil {
		b.Close()
		return nil, err
	}
	return b, nil
}

// NewBackend is New for callers that pick a backend: it also refuses a GPU
// older than compute capability minCC (10*major + minor).
func NewBackend(o Options, minCC int) (backend.Backend, error) {
	b, err := New(o)
	if err != nil {
		return nil, err
	}
	if cc := b.dev.Info().CC; cc < minCC {
		b.Close()
		return nil, fmt.Errorf("%w: GPU of compute capability %d.%d; the kernels need %d.%d or newer", ErrNoDevice, cc/10, cc%10, minCC/10, minCC%10)
	}
	return b, nil
}

// NewOnDevice returns a backend on an opened device, which the caller keeps
// and closes.
func NewOnDevice(d *Device, o Options) *Backend {
	b := &Backend{dev: d, opts: o, moe: map[*QMatrix]*moeLayer{}, moeShared: map[*QMatrix]*moeLayer{}, identity: map[int]uint64{}, splitFloats: maxSplitFloats, flashMin: flashMinRows, expandedMin: expandedMinKeys(), prof: newProfiler(), steps: newStepTimer(d),
		ropeTables: map[ropeKey]uint64{}, ropeBufs: map[ropeKey]Buffer{}}
	if !o.NoGraphs && os.Getenv("MMFP4_CUDA_GRAPHS") != "0" {
		b.graphs = &graphCache{}
	}
	b.decodeAttnConfig()
	return b
}

// Close frees the backend's device memory and, when New opened the device,
// closes it.
func (b *Backend) Close() error {
	b.flush()
	err := b.dev.Do(func(c *Ctx) error {
		errs := []error{c.Sync(), b.weights.free(c), b.arena.free(c), b.async.free(c)}
		errs = append(errs, b.steps.report(c, os.Stderr, b.graphs))
		if b.prof != nil {
			b.prof.report(os.Stderr)
			errs = append(errs, b.prof.free(c))
		}
		if b.graphs != nil {
			errs = append(errs, b.graphs.free(c))
		}
		for _, buf := range b.ropeBufs {
			errs = append(errs, c.Free(buf))
		}
		errs = append(errs, c.Free(b.routeCounters), c.Free(b.streamCounters), c.Free(b.counter), c.Free(b.attnCounters))
		if b.pool != nil {
			errs = append(errs, c.Free(b.pool.buf))
		}
		for _, l := range append(slices.Collect(maps.Values(b.moe)), slices.Collect(maps.Values(b.moeShared))...) {
			errs = append(errs, c.FreeExpertTable(l.table))
			for _, s := range l.scratch {
				errs = append(errs, c.FreeMoEScratch(s))
			}
		}
		return errors.Join(errs...)
	})
	if b.owned {
		err = errors.Join(err, b.dev.Close())
	}
	return err
}

// Name names the GPU.
func (b *Backend) Name() string {
	i := b.dev.Info()
	return fmt.Sprintf("cuda (%s, %s, %d SMs)", i.Name, i.Arch(), i.SMs)
}

// Device is the GPU the backend runs on.
func (b *Backend) Device() *Device { return b.dev }

func (b *Backend) fail(format string, args ...any) {
	if b.err == nil {
		b.err = fmt.Errorf("cuda backend: "+format, args...)
	}
}

// queuedOp is an op's device work, run later on the device thread.
type queuedOp struct {
	op string
	fn func(c *Ctx) error
}

// maxQueued bounds the ops held before they are handed to the device
// thread together: a decode step of a large model fits, so that it is one
// graph.
const maxQueued = 16384

// do queues fn for the device thread. Handing each op over on its own costs
// a thread switch (tens of microseconds); queued ops go over in one. Their
// arguments are fixed when queued: device addresses come from the arena,
// which is bookkept on the host.
func (b *Backend) do(op string, fn func(c *Ctx) error) {
	if b.err != nil {
		return // the step has failed (Sync reports it); its addresses may be 0
	}
	b.pending = append(b.pending, queuedOp{op, fn})
	if len(b.pending) >= maxQueued {
		b.flush()
	}
}

// flush hands the queued ops to the device thread, which records and
// launches them (as a graph where the same ops were seen before), stopping
// at the first error. It does not wait: the model queues the next piece
// while the device thread works. The device thread runs what it is given
// in order, so a later Do finds these ops launched; their first error is
// kept for the next Sync (settle), and the device thread skips the ops
// handed over after it until then.
func (b *Backend) flush() {
	if len(b.pending) == 0 {
		return
	}
	ops := b.pending
	b.zero = nil // its memset is in this flush
	b.flushes++
	t0, w0 := b.steps.flushStart()
	defer b.steps.flushEnd(t0, w0)
	id, rows := b.stepNo, b.batchRows()
	if b.opts.WaitFlushes {
		err := b.dev.Do(func(c *Ctx) error { return b.runOps(c, ops, id, rows) })
		clear(ops)
		b.pending = ops[:0]
		b.settle()
		if err != nil && b.err == nil {
			b.err = fmt.Errorf("cuda backend: %w", err)
		}
		return
	}
	if b.spareOps == nil {
		b.spareOps = make(chan []queuedOp, 4)
	}
	select {
	case q := <-b.spareOps:
		b.pending = q
	default:
		b.pending = make([]queuedOp, 0, max(cap(ops), pieceOps))
	}
	b.handed++
	spare := b.spareOps
	b.dev.Go(func(c *Ctx) {
		if b.lateErr == nil {
			if err := b.runOps(c, ops, id, rows); err != nil {
				b.lateErr = fmt.Errorf("cuda backend: %w", err)
			}
		}
		clear(ops)
		select {
		case spare <- ops[:0]:
		default:
		}
	})
}

// runOps runs a flush's ops on the device thread: recorded and launched
// as a graph, or one by one where graphs are off or the profile times
// them. rows is the step's row count, id its number (SetBatch calls).
func (b *Backend) runOps(c *Ctx, ops []queuedOp, id, rows int) error {
	if err := c.traceFlush(id, rows); err != nil {
		return err
	}
	if b.prof != nil && (rows == 1 || b.prof.all) {
		return b.prof.run(c, ops)
	}
	var ft *flushTimes
	if b.steps != nil {
		ft = &flushTimes{}
		defer b.steps.note(rows, ft)
	}
	if b.graphs == nil {
		return b.steps.around(c, id, rows, func() error {
			if ft != nil {
				t0 := time.Now()
				defer func() { ft.launch = time.Since(t0) }()
			}
			for _, q := range ops {
				if err := q.fn(c); err != nil {
					return fmt.Errorf("%s: %w", q.op, err)
				}
			}
			return nil
		})
	}
	t0 := time.Now()
	gc := b.graphs
	gc.rec.reset()
	c.rec = &gc.rec
	for _, q := range ops {
		if err := q.fn(c); err != nil {
			c.rec = nil
			return fmt.Errorf("%s: %w", q.op, err)
		}
	}
	c.rec = nil
	if ft != nil {
		ft.record = time.Since(t0)
	}
	once := rows >= bigStepRows // a prefill's pieces do not repeat
	return b.steps.around(c, id, rows, func() error { return gc.run(c, once, ft) })
}

// settle takes the error of a flush that was handed over without waiting,
// after a Do (which ran after it).
func (b *Backend) settle() {
	b.handed = 0
	if b.lateErr != nil {
		if b.err == nil {
			b.err = b.lateErr
		}
		b.lateErr = nil
	}
}

// handOver runs fn on the device thread after the queued ops without
// waiting for it (as flush hands over ops); its error, under op's name,
// surfaces as a flush's does.
func (b *Backend) handOver(op string, fn func(c *Ctx) error) {
	b.flush()
	if b.opts.WaitFlushes {
		err := b.dev.Do(fn)
		b.settle()
		if err != nil && b.err == nil {
			b.err = fmt.Errorf("cuda backend: %s: %w", op, err)
		}
		return
	}
	b.handed++
	b.dev.Go(func(c *Ctx) {
		if b.lateErr == nil {
			if err := fn(c); err != nil {
				b.lateErr = fmt.Errorf("cuda backend: %s: %w", op, err)
			}
		}
	})
}

// drain waits until the device thread has run the flushes handed over,
// and takes their error.
func (b *Backend) drain() {
	if b.handed > 0 {
		b.dev.Do(func(c *Ctx) error { return nil })
		b.settle()
	}
}

// pieceOps is the size of the pieces a step goes to the device in.
// Queued whole, a step's ops wait for the model's host code of every layer
// (about 30 us a layer, recording included, on an H200's host) before the
// GPU starts (about 100 us a layer at batch 1); in pieces, the GPU runs the
// first layers while the host queues the rest. Each piece of a decode step
// is its own graph, replayed from the second step on.
const pieceOps = 96

// flushPiece hands the queued ops to the device when the step has queued
// a piece's worth, or at its first attention op (a short first piece: the
// GPU starts after the host has queued one layer, not seven). It is called
// before an attention op, where no fusion of the ops before with the ops
// after is lost.
func (b *Backend) flushPiece() {
	if b.opts.NoPieces {
		return
	}
	if len(b.pending) >= pieceOps || b.pieces == 0 {
		b.pieces++
		b.flush()
	}
}

// bigStepRows is the fewest rows of a step (a prompt's prefill) whose
// pieces are not kept as graphs: they do not repeat.
const bigStepRows = 128

// now runs fn on the device thread after the queued ops, recording its
// error under op's name.
func (b *Backend) now(op string, fn func(c *Ctx) error) {
	b.flush()
	err := b.dev.Do(fn)
	b.settle()
	if err != nil && b.err == nil {
		b.err = fmt.Errorf("cuda backend: %s: %w", op, err)
	}
}

// Sync waits for the queued work and returns the first error since the
// last Sync.
func (b *Backend) Sync() error {
	b.now("sync", func(c *Ctx) error { return c.Sync() })
	err := b.err
	b.err = nil
	return err
}

// slab sub-allocates weight memory from a few large allocations, so that
// thousands of small matrices do not each round up to the pool's block.
type slab struct {
	chunks []Buffer
	off    int // first free byte of the last chunk
	used   int // bytes handed out
}

const slabChunk = 256 << 20

func (s *slab) alloc(c *Ctx, n int) (uint64, error) {
	n = align(n, 256)
	if len(s.chunks) == 0 || s.off+n > s.chunks[len(s.chunks)-1].Size {
		buf, err := c.Alloc(max(n, slabChunk))
		if err != nil {
			return 0, err
		}
		s.chunks = append(s.chunks, buf)
		s.off = 0
	}
	p := s.chunks[len(s.chunks)-1].At(s.off)
	s.off += n
	s.used += n
	return p, nil
}

func (s *slab) free(c *Ctx) error {
	var errs []error
	for _, b := range s.chunks {
		errs = append(errs, c.Free(b))
	}
	s.chunks, s.off, s.used = nil, 0, 0
	return errors.Join(errs...)
}

// arena hands out step-lifetime device memory; reset makes it all free and
// merges the chunks a step outgrew into one. Reuse is safe because every op
// runs in order on one stream.
type arena struct {
	chunks []Buffer
	cur    int
	off    int
}

const minArena = 64 << 20

// take returns n bytes from the chunks already allocated, or false.
func (a *arena) take(n int) (uint64, bool) {
	n = align(max(n, 1), 256)
	for a.cur < len(a.chunks) {
		if a.off+n <= a.chunks[a.cur].Size {
			p := a.chunks[a.cur].At(a.off)
			a.off += n
			return p, true
		}
		a.cur++
		a.off = 0
	}
	return 0, false
}

// grow adds a chunk for n bytes and takes them from it.
func (a *arena) grow(c *Ctx, n int) (uint64, error) {
	n = align(max(n, 1), 256)
	size := max(n, minArena)
	if len(a.chunks) > 0 {
		size = max(size, 2*a.chunks[len(a.chunks)-1].Size)
	}
	buf, err := c.Alloc(size)
	if err != nil {
		return 0, err
	}
	a.chunks = append(a.chunks, buf)
	a.cur, a.off = len(a.chunks)-1, n
	return buf.Ptr, nil
}

// merge replaces several chunks by one of their total size.
func (a *arena) merge(c *Ctx) error {
	total := 0
	for _, b := range a.chunks {
		total += b.Size
	}
	if err := a.free(c); err != nil {
		return err
	}
	buf, err := c.Alloc(total)
	if err != nil {
		return err
	}
	a.chunks = []Buffer{buf}
	return nil
}

func (a *arena) free(c *Ctx) error {
	var errs []error
	for _, b := range a.chunks {
		errs = append(errs, c.Free(b))
	}
	a.chunks, a.cur, a.off = nil, 0, 0
	return errors.Join(errs...)
}

// alloc returns n bytes of step memory (0 after a failure, recorded).
// Growing the arena waits for the queued ops.
func (b *Backend) alloc(n int) uint64 {
	if p, ok := b.arena.take(n); ok {
		return p
	}
	var p uint64
	b.now("arena", func(c *Ctx) error {
		var err error
		p, err = b.arena.grow(c, n)
		return err
	})
	return p
}

// scopedRows is the fewest rows a step needs for Mark and Release to free
// a layer's tensors for the next (the model calls them around each layer):
// a 1024-token prefill at GLM-4.7-Flash's shapes otherwise holds 17 GB of
// temporaries to its end. A decode step's are small.
const scopedRows = 64

// Mark returns the arena's position, for Release; -1 where the step is
// too small to scope.
func (b *Backend) Mark() int {
	if b.noScope || b.batchRows() < scopedRows || len(b.arena.chunks) == 0 {
		return -1
	}
	return b.arena.cur<<32 | b.arena.off
}

// Release makes the memory taken since mark free again, and forgets what
// lived there: int8 forms, the open zeroing range. Ops run in
// stream order, so every op queued before, reader of that memory or not,
// finishes before any later op writes it.
func (b *Backend) Release(mark int) {
	if mark < 0 {
		return
	}
	cur, off := mark>>32, mark&(1<<32-1)
	released := func(p uint64) bool {
		for i := cur; i < len(b.arena.chunks); i++ {
			ch := b.arena.chunks[i]
			lo := ch.Ptr
			if i == cur {
				lo = ch.At(off)
			}
			if p >= lo && p < ch.Ptr+uint64(ch.Size) {
				return true
			}
		}
		return false
	}
	b.quantized = slices.DeleteFunc(b.quantized, func(e quantEntry) bool {
		return released(e.src.ptr) || released(e.a.Q)
	})
	// A new tensor must get its own memset, queued after the ops that used
	// its memory before.
	b.zero = nil
	b.arena.cur, b.arena.off = cur, off
	b.releases++
}

// tensor is a row-major float32 matrix in device memory; row t starts ld
// floats after row t-1.
type tensor struct {
	rows, cols, ld int
	ptr            uint64
}

func (t *tensor) Rows() int { return t.rows }
func (t *tensor) Cols() int { return t.cols }

// row is the address of row r.
func (t *tensor) row(r int) uint64 { return t.ptr + 4*uint64(r*t.ld) }

func asTensor(t backend.Tensor) *tensor {
	m, ok := t.(*tensor)
	if !ok {
		panic(fmt.Sprintf("cuda backend: tensor of type %T from another backend", t))
	}
	return m
}

// weight is a matrix on the device: dense fp32 (dense != 0) or MMFP4 (q).
// host is the caller's data, kept by reference for Embed's row lookups.
type weight struct {
	n, k  int
	dense uint64
	q     *QMatrix
	host  backend.HostWeight
}

func (w *weight) Rows() int { return w.n }
func (w *weight) Cols() int { return w.k }

func asWeight(w backend.Weight) *weight {
	m, ok := w.(*weight)
	if !ok {
		panic(fmt.Sprintf("cuda backend: weight of type %T from another backend", w))
	}
	return m
}

// NewWeight uploads w: MMFP4 codes, scales and row scales as they are in
// the file, dense data as fp32.
func (b *Backend) NewWeight(hw backend.HostWeight) (backend.Weight, error) {
	w := &weight{n: hw.N, k: hw.K, host: hw}
	start := time.Now()
	defer func() { b.uploadTime += time.Since(start) }()
	switch {
	case hw.Quant != nil && hw.Dense == nil:
		m := hw.Quant
		if err := m.Validate(); err != nil {
			return nil, fmt.Errorf("%s: %w", hw.Name, err)
		}
		if m.N != hw.N || m.K != hw.K {
			return nil, fmt.Errorf("%s: MMFP4 matrix is %dx%d, want %dx%d", hw.Name, m.N, m.K, hw.N, hw.K)
		}
		if m.K%32 != 0 {
			return nil, fmt.Errorf("%s: MMFP4 matrix [%d,%d]: K must be a multiple of 32 on the GPU", hw.Name, m.N, m.K)
		}
		b.flush()
		err := b.dev.Do(func(c *Ctx) error {
			scalesOff := align(len(m.Codes), 256)
			rowOff := align(scalesOff+len(m.Scales), 256)
			p, err := b.weights.alloc(c, rowOff+4*m.N)
			if err != nil {
				return err
			}
			w.q = &QMatrix{N: m.N, K: m.K, G: m.GroupSize, Codes: p, Scales: p + uint64(scalesOff), RowScale: p + uint64(rowOff)}
			return errors.Join(CopyIn(c, w.q.Codes, m.Codes), CopyIn(c, w.q.Scales, m.Scales), CopyIn(c, w.q.RowScale, m.RowScale))
		})
		if err != nil {
			return nil, fmt.Errorf("%s: upload: %w", hw.Name, err)
		}
	case hw.Dense != nil && hw.Quant == nil:
		if len(hw.Dense) != hw.N*hw.K {
			return nil, fmt.Errorf("%s: %d values, want %dx%d", hw.Name, len(hw.Dense), hw.N, hw.K)
		}
		b.flush()
		err := b.dev.Do(func(c *Ctx) error {
			p, err := b.weights.alloc(c, 4*len(hw.Dense))
			if err != nil {
				return err
			}
			w.dense = p
			return CopyIn(c, p, hw.Dense)
		})
		if err != nil {
			return nil, fmt.Errorf("%s: upload: %w", hw.Name, err)
		}
	case hw.BF16 != nil && hw.Dense == nil && hw.Quant == nil:
		// The embedding table: rows are looked up on the host (Embed), so
		// it stays there; a product over it uploads it then (deviceDense).
		if len(hw.BF16) != 2*hw.N*hw.K {
			return nil, fmt.Errorf("%s: %d bf16 bytes, want 2x%dx%d", hw.Name, len(hw.BF16), hw.N, hw.K)
		}
	default:
		return nil, fmt.Errorf("%s: exactly one of dense, MMFP4 or bf16 data must be given", hw.Name)
	}
	return w, nil
}

// deviceDense uploads a host-only (bf16) weight as fp32 on first use in a
// product, so that a tied lm_head works too.
func (b *Backend) deviceDense(w *weight) bool {
	if w.q != nil || w.dense != 0 {
		return true
	}
	if w.host.BF16 == nil {
		b.fail("weight %s has no device data", w.host.Name)
		return false
	}
	vals := make([]float32, w.n*w.k)
	for i := range vals {
		vals[i] = safetensors.BF16ToFloat32(binary.LittleEndian.Uint16(w.host.BF16[2*i:]))
	}
	start := time.Now()
	defer func() { b.uploadTime += time.Since(start) }()
	b.now("upload "+w.host.Name, func(c *Ctx) error {
		p, err := b.weights.alloc(c, 4*len(vals))
		if err != nil {
			return err
		}
		w.dense = p
		return CopyIn(c, p, vals)
	})
	return w.dense != 0
}

// weightBytes is what a full pass over w reads, as the CPU backend counts
// it (BytesRead).
func weightBytes(w *weight) int64 {
	if w.q != nil {
		return int64(w.q.Bytes())
	}
	return 4 * int64(w.n) * int64(w.k)
}

// weightRows is a view of rows [from, from+n) of w.
func weightRows(w *weight, from, n int) *weight {
	v := &weight{n: n, k: w.k}
	if w.q != nil {
		q := *w.q
		q.N = n
		q.Codes += uint64(from * q.K / 2)
		q.Scales += uint64(from * q.K / q.G)
		q.RowScale += uint64(4 * from)
		q.buf = Buffer{}
		v.q = &q
	} else {
		v.dense = w.dense + uint64(4*from*w.k)
	}
	return v
}

// batchMeta is the step's batch on the device (int32 arrays).
type batchMeta struct {
	pos, rowSeq, slots, seqBlocks, blocks, outputs, tokens uint64
	from                                                   uint64 // Batch.Prev, or 0
	maxN                                                   int
}

// SetBatch resets the arena and uploads the batch's positions, each row's
// sequence and cache slot, the block tables and the output rows.
func (b *Backend) SetBatch(batch *backend.Batch, p backend.CachePool) {
	b.drain() // the ops handed over may still read b.meta
	b.fusedCounter()
	b.stepNo++
	b.steps.begin(batch.Rows())
	b.pieces = 0
	b.batch = batch
	b.pool = nil
	if p != nil {
		cp, ok := p.(*cachePool)
		if !ok {
			panic(fmt.Sprintf("cuda backend: cache pool of type %T from another backend", p))
		}
		b.pool = cp
	}
	T := batch.Rows()
	rowSeq := make([]int32, T)
	slots := make([]int32, T)
	seqBlocks := make([]int32, len(batch.Seqs))
	var blocks []int32
	maxN := 1
	for i := range batch.Seqs {
		s := &batch.Seqs[i]
		seqBlocks[i] = int32(len(blocks))
		blocks = append(blocks, s.Blocks...)
		for t := s.Start; t < s.Start+s.Len && t < T; t++ {
			rowSeq[t] = int32(i)
			maxN = max(maxN, int(batch.Positions[t])+1)
			if b.pool != nil {
				slots[t] = int32(s.Slot(int(batch.Positions[t]), b.pool.blockSize))
			}
		}
	}
	b.meta.maxN = maxN
	b.arena.cur, b.arena.off = 0, 0
	b.zero = nil
	clear(b.ropeTables)
	b.quantized = b.quantized[:0]
	if len(b.arena.chunks) > 1 {
		b.now("set batch", b.arena.merge)
	}
	// One upload for all seven arrays, each starting at a 256-byte boundary;
	// the block tables padded so that the upload keeps its size (and a
	// decode step its graph) while sequences grow by a block.
	arrays := [][]int32{batch.Positions, rowSeq, slots, seqBlocks, blocks, batch.Outputs, batch.Tokens}
	dsts := []*uint64{&b.meta.pos, &b.meta.rowSeq, &b.meta.slots, &b.meta.seqBlocks, &b.meta.blocks, &b.meta.outputs, &b.meta.tokens}
	b.meta.from = 0
	if len(batch.Prev) > 0 {
		arrays, dsts = append(arrays, batch.Prev), append(dsts, &b.meta.from)
	}
	var all []int32
	offs := make([]int, len(arrays))
	for i, v := range arrays {
		offs[i] = len(all)
		all = append(all, v...)
		all = append(all, make([]int32, (64-len(all)%64)%64)...)
	}
	meta := b.alloc(4 * len(all))
	for i, d := range dsts {
		*d = meta + uint64(4*offs[i])
	}
	b.do("set batch", func(c *Ctx) error { return CopyIn(c, meta, all) })
}

// NewTensor returns a zeroed tensor from the step's arena.
func (b *Backend) NewTensor(rows, cols int) backend.Tensor {
	t := b.newTensor(rows, cols)
	if t.ptr != 0 && t.rows*t.cols > 0 {
		b.zeroFill(t.ptr, 4*t.rows*t.cols)
	}
	return t
}

// newTensor takes a rows x cols tensor from the step's arena, uncleared.
func (b *Backend) newTensor(rows, cols int) *tensor {
	if rows < 0 || cols < 0 {
		b.fail("tensor of %dx%d", rows, cols)
		rows, cols = 0, 0
	}
	return &tensor{rows: rows, cols: cols, ld: cols, ptr: b.alloc(4 * rows * cols)}
}

// NewUnzeroed returns a tensor from the step's arena without clearing it.
// In a step of scopedRows or more it closes the open zeroing range, so that
// the next zeroed tensor's memset does not sweep this one too.
func (b *Backend) NewUnzeroed(rows, cols int) backend.Tensor {
	if b.batchRows() >= scopedRows {
		b.zero = nil
	}
	return b.newTensor(rows, cols)
}

// zeroFill clears n bytes at p, a new allocation of the arena. Consecutive
// new tensors share one memset: the open range's memset is queued before
// any op that uses memory allocated after the range began, so extending it
// over later allocations (other scratch included, which its users write
// before reading) clears them in time.
func (b *Backend) zeroFill(p uint64, n int) {
	if z := b.zero; z != nil && z.chunk == b.arena.cur && p >= z.ptr {
		b.noteFresh(p, n, z, z.n)
		z.n = max(z.n, int(p-z.ptr)+n)
		return
	}
	z := &zeroRange{ptr: p, n: n, chunk: b.arena.cur}
	b.zero = z // before do: a flush there closes the range
	f := b.flushes
	b.do("zero", func(c *Ctx) error {
		if z.n == 0 {
			return nil // its one tensor is written whole by its op (takeFresh)
		}
		return c.Memset(z.ptr, 0, z.n)
	})
	if f == b.flushes {
		b.noteFresh(p, n, z, 0)
	}
}

// Upload copies src (row-major) into dst.
func (b *Backend) Upload(dst backend.Tensor, src []float32) {
	d := asTensor(dst)
	if len(src) != d.rows*d.cols {
		b.fail("upload of %d values into %dx%d tensor", len(src), d.rows, d.cols)
		return
	}
	src = append([]float32(nil), src...) // the caller may reuse src
	b.wrote(d)
	b.do("upload", func(c *Ctx) error {
		if d.ld == d.cols {
			return CopyIn(c, d.ptr, src)
		}
		for t := 0; t < d.rows; t++ {
			if err := CopyIn(c, d.row(t), src[t*d.cols:(t+1)*d.cols]); err != nil {
				return err
			}
		}
		return nil
	})
}

// Download returns a row-major host copy of src.
func (b *Backend) Download(src backend.Tensor) []float32 {
	s := asTensor(src)
	out := make([]float32, s.rows*s.cols)
	if s.rows == 0 || s.cols == 0 {
		return out
	}
	b.now("download", func(c *Ctx) error {
		if s.ld == s.cols {
			return CopyOut(c, out, s.ptr)
		}
		buf := make([]float32, (s.rows-1)*s.ld+s.cols)
		if err := CopyOut(c, buf, s.ptr); err != nil {
			return err
		}
		for t := 0; t < s.rows; t++ {
			copy(out[t*s.cols:(t+1)*s.cols], buf[t*s.ld:])
		}
		return nil
	})
	return out
}

// Cols is a view of columns [from, to).
func (b *Backend) Cols(t backend.Tensor, from, to int) backend.Tensor {
	m := asTensor(t)
	if from < 0 || to > m.cols || from > to {
		b.fail("column view [%d,%d) of %d columns", from, to, m.cols)
		from, to = 0, 0
	}
	return &tensor{rows: m.rows, cols: to - from, ld: m.ld, ptr: m.ptr + 4*uint64(from)}
}

// Rows is a view of rows [from, to).
func (b *Backend) Rows(t backend.Tensor, from, to int) backend.Tensor {
	m := asTensor(t)
	if from < 0 || to > m.rows || from > to {
		b.fail("row view [%d,%d) of %d rows", from, to, m.rows)
		from, to = 0, 0
	}
	return &tensor{rows: to - from, cols: m.cols, ld: m.ld, ptr: m.row(from)}
}

func (b *Backend) badShape(op string, got, want [2]int) bool {
	if got != want {
		b.fail("%s: shape %v, want %v", op, got, want)
		return true
	}
	return false
}

func (b *Backend) batchRows() int {
	if b.batch == nil {
		return 0
	}
	return b.batch.Rows()
}

// launch queues kernel mod.name.
func (b *Backend) launch(op, mod, name string, grid, block Dim, args ...any) {
	b.do(op, func(c *Ctx) error {
		k, err := c.Kernel(mod, name)
		if err != nil {
			return err
		}
		return c.Launch(k, grid, block, 0, args...)
	})
}

// Embed gathers the batch's token rows of an MMFP4 table on the device;
// other tables' rows are looked up in the host copy and uploaded.
func (b *Backend) Embed(dst backend.Tensor, table backend.Weight) {
	d, w := asTensor(dst), asWeight(table)
	if b.batch == nil || b.badShape("embed", [2]int{d.rows, d.cols}, [2]int{b.batch.Rows(), w.k}) {
		return
	}
	tokens := b.batch.Tokens
	if len(b.batch.Prev) > 0 && w.q == nil {
		// Embedded on the host: the ids the step before chose are needed
		// there first.
		var err error
		if tokens, err = b.async.resolve(b, b.batch); err != nil {
			b.fail("embed: %v", err)
			return
		}
	}
	for t, id := range tokens {
		if b.batch.FromPrev(t) && w.q != nil {
			continue // chosen on the device, within the vocabulary
		}
		if id < 0 || int(id) >= w.n {
			b.fail("token id %d at row %d is outside the vocabulary [0, %d)", id, t, w.n)
			return
		}
	}
	rowBytes := int64(4 * w.k)
	switch {
	case w.host.Quant != nil:
		q := w.host.Quant
		rowBytes = int64(len(q.Codes)+len(q.Scales)+4*len(q.RowScale)) / int64(w.n)
	case w.host.BF16 != nil:
		rowBytes = int64(2 * w.k)
	}
	b.count(int64(len(b.batch.Tokens)) * rowBytes)
	if q := w.q; q != nil {
		// From the uploaded table: no host work or upload a row (a
		// 1024-token prefill spent 15 ms of host time dequantizing here).
		b.wrote(d)
		prev := uint64(0)
		if b.meta.from != 0 {
			prev = b.async.dev.Ptr
		}
		b.launch("embed", "ops", "embed_rows_q", D1(d.rows), D1(256), d.ptr, d.ld, b.meta.tokens, prev, b.meta.from, q.Codes, q.Scales, q.RowScale, q.K, q.G, w.n)
		return
	}
	host := make([]float32, d.rows*d.cols)
	for t, id := range tokens {
		row := host[t*w.k : (t+1)*w.k]
		if q := w.host.Quant; q != nil {
			q.DequantizeRow(int(id), row)
		} else if w.host.BF16 != nil {
			src := w.host.BF16[2*int(id)*w.k:]
			for i := range row {
				row[i] = safetensors.BF16ToFloat32(binary.LittleEndian.Uint16(src[2*i:]))
			}
		} else {
			copy(row, w.host.Dense[int(id)*w.k:(int(id)+1)*w.k])
		}
	}
	b.Upload(dst, host)
}

// quantize queues the quantization of x's rows to int8 groups of G (as the
// CPU backend's activations) into arena memory.
func (b *Backend) quantize(x *tensor, G int) *QActs {
	for _, e := range b.quantized {
		if e.src == *x && e.a.G == G {
			return e.a
		}
	}
	lc := b.lastDecodeAttn
	fold := lc != nil && lc.flush == b.flushes && lc.idx == len(b.pending)-1 && lc.om == *x && 128%G == 0
	a := b.quantizeInto(x, G)
	if fold && lc.flush == b.flushes && lc.idx == len(b.pending)-1 {
		// The decode attention queued just before writes x: it writes the
		// int8 form too (quantizeInto queues nothing unless the arena
		// grew, which flushes and is caught by the second check).
		lc.a = a
		b.lastDecodeAttn = nil
	} else {
		b.do("quantize", func(c *Ctx) error { return c.RMSNormQuant(x.ptr, x.ld, 0, 0, 0, 0, x.rows, x.cols, G, a) })
	}
	b.rememberQuant(quantEntry{*x, a})
	return a
}

// span is the byte range t covers.
func (t *tensor) span() (lo, hi uint64) {
	if t.rows == 0 || t.cols == 0 {
		return t.ptr, t.ptr
	}
	return t.ptr, t.ptr + 4*uint64((t.rows-1)*t.ld+t.cols)
}

// wrote drops the int8 forms of tensors that overlap t, which an op is
// about to write.
func (b *Backend) wrote(t *tensor) {
	lo, hi := t.span()
	b.quantized = slices.DeleteFunc(b.quantized, func(e quantEntry) bool {
		l, h := e.src.span()
		return l < hi && lo < h
	})
}

// maxQuantized bounds the int8 forms remembered: products of one tensor
// follow it closely, and every op that writes scans the list (with a
// decode step's hundreds of entries, that scanning was a tenth of the
// step's host time).
const maxQuantized = 16

// rememberQuant records an int8 form for later products, forgetting the
// oldest beyond maxQuantized.
func (b *Backend) rememberQuant(e quantEntry) {
	if len(b.quantized) >= maxQuantized {
		b.quantized = slices.Delete(b.quantized, 0, len(b.quantized)-maxQuantized+1)
	}
	b.quantized = append(b.quantized, e)
}

// quantizeInto allocates the int8 form of x's rows in groups of G.
func (b *Backend) quantizeInto(x *tensor, G int) *QActs {
	T, K := x.rows, x.cols
	sOff := align(T*K, 256)
	sumOff := align(sOff+4*T*K/G, 256)
	p := b.alloc(sumOff + 4*T*K/32)
	return &QActs{T: T, K: K, G: G, Q: p, Scales: p + uint64(sOff), Sums: p + uint64(sumOff)}
}

// actRows is a view of rows [from, from+n) of a.
func actRows(a *QActs, from, n int) *QActs {
	return &QActs{T: n, K: a.K, G: a.G, Q: a.Q + uint64(from*a.K), Scales: a.Scales + uint64(4*from*a.K/a.G), Sums: a.Sums + uint64(4*from*a.K/32)}
}

// MatMul computes dst = x W^T: MMFP4 through the tensor-core GEMM from
// gemmMinTokens rows on, else the int8 GEMV kernels, eight rows at a time;
// dense through a simple fp32 kernel.
func (b *Backend) MatMul(dst, x backend.Tensor, wt backend.Weight) {
	d, xm, w := asTensor(dst), asTensor(x), asWeight(wt)
	if w.q != nil && w.q.TileMajor {
		b.fail("matmul of %s: its codes are tile-major, for the MoE kernels only", w.host.Name)
		return
	}
	if b.badShape("matmul out", [2]int{d.rows, d.cols}, [2]int{xm.rows, w.n}) ||
		b.badShape("matmul in", [2]int{xm.rows, xm.cols}, [2]int{xm.rows, w.k}) || d.rows == 0 {
		return
	}
	if !b.deviceDense(w) {
		return
	}
	b.count(weightBytes(w))
	b.wrote(d)
	if b.fusedProduct(d, xm, w) {
		return
	}
	if w.q == nil {
		b.launch(b.opName("matmul", w), "ops", "dense_matmul", Dim{uint32((w.n + 7) / 8), uint32(d.rows), 1}, D1(256),
			w.dense, w.n, w.k, xm.ptr, xm.ld, d.ptr, d.ld)
		if b.err == nil {
			b.lastDense = &denseOp{idx: len(b.pending) - 1, flush: b.flushes, d: *d, x: *xm, w: w}
		}
		return
	}
	b.valuesQuant(xm, w)
	a := b.quantize(xm, w.q.G)
	if b.streamProduct(d, a, w) {
		return
	}
	if d.rows >= gemmMinTokens && GEMMFits(w.q.K, w.q.G) {
		if b.gemmPair(d, a, w) {
			return
		}
		b.do(b.opName("matmul", w), func(c *Ctx) error { return c.GEMM(d.ptr, d.ld, w.q, a, GEMMTileAuto) })
		b.noteGEMM(d, a, w)
		return
	}
	if b.pairProduct(d, a, w) || b.normProduct(d, a, w) || b.addNormProduct(d, a, w) {
		return
	}
	b.do(b.opName("matmul", w), func(c *Ctx) error { return c.GEMVRows(d.ptr, d.ld, w.q, a) })
	b.noteGEMV(d, a, w)
	b.noteRowsProduct(d)
}

// opName is op, with the weight's shape when profiling.
func (b *Backend) opName(op string, w *weight) string {
	if b.prof == nil {
		return op
	}
	kind := "dense"
	if w.q != nil {
		kind = "mmfp4"
	}
	return fmt.Sprintf("%s %s %dx%d", op, kind, w.n, w.k)
}

// vector returns a dense 1 x K weight.
func (b *Backend) vector(what string, wt backend.Weight) (*weight, bool) {
	w := asWeight(wt)
	if w.q != nil || w.n != 1 {
		b.fail("%s: want a dense vector, got %dx%d", what, w.n, w.k)
		return nil, false
	}
	return w, true
}

// groupFor is the largest activation group the quantization kernel takes
// that divides K (RMSNorm without quantization only needs one).
func groupFor(K int) int {
	for _, g := range []int{128, 64, 32} {
		if K%g == 0 {
			return g
		}
	}
	return 0
}

// RMSNorm normalises each row by its root mean square, then applies gain.
func (b *Backend) RMSNorm(dst, x backend.Tensor, gain backend.Weight, eps float32) {
	d, xm := asTensor(dst), asTensor(x)
	g, ok := b.vector("rmsnorm gain", gain)
	if !ok || b.badShape("rmsnorm", [2]int{d.rows, d.cols}, [2]int{xm.rows, g.k}) ||
		b.badShape("rmsnorm in", [2]int{xm.rows, xm.cols}, [2]int{d.rows, d.cols}) || d.rows == 0 {
		return
	}
	G := groupFor(d.cols)
	if G == 0 {
		b.fail("rmsnorm: %d columns, want a multiple of 32", d.cols)
		return
	}
	b.count(4 * int64(g.k))
	// The int8 form comes in the same pass, for the products that follow
	// (a norm's output is what the projections read).
	la := b.lastAdd
	fuse := la != nil && la.flush == b.flushes && la.idx == len(b.pending)-1 && la.d == *xm
	a := b.quantizeInto(d, G)
	b.wrote(d)
	if fuse && la.flush == b.flushes && la.idx == len(b.pending)-1 {
		// The Add just queued computed this norm's input: one launch for
		// both (quantizeInto above queues nothing unless the arena grew,
		// which flushes and is caught by the second check).
		fast := rowNorm8(d.cols, G, []uint64{la.d.ptr, la.a.ptr, la.c.ptr, g.dense, d.ptr}, []int{la.d.ld, la.a.ld, la.c.ld, d.ld})
		if fast && (b.combineNorm(la, g.dense, eps, d, a) || b.combineNormReleased(la, g.dense, eps, d, a)) {
			// The MoE's combine, the add and the norm in one launch (serve.go).
			b.lastAdd = nil
			b.rememberQuant(quantEntry{*d, a})
			return
		}
		b.pending[la.idx] = queuedOp{"add+rmsnorm", func(c *Ctx) error {
			if fast {
				return c.RMSNormQuant8(0, 0, la.d.ptr, la.d.ld, la.a.ptr, la.a.ld, la.c.ptr, la.c.ld, g.dense, eps, d.ptr, d.ld, d.rows, d.cols, G, a)
			}
			return c.AddRMSNormQuant(la.d.ptr, la.d.ld, la.a.ptr, la.a.ld, la.c.ptr, la.c.ld, g.dense, eps, d.ptr, d.ld, d.rows, d.cols, G, a)
		}}
		b.lastAdd = nil
		b.noteAddNormRows(la, d, g.dense, eps, a, fast)
		if d.rows == 1 {
			b.lastNorm = &normOp{idx: la.idx, flush: b.flushes, out: *d, touched: []tensor{la.d, la.a, la.c, *d},
				in: FusedIn{Mode: fuseAddNorm, D: la.d.ptr, A: la.a.ptr, C: la.c.ptr, Gain: g.dense, Eps: eps, Out: d.ptr, Q: a, Layout8: fast, Counter: b.counter.Ptr}}
		}
	} else {
		fast := rowNorm8(d.cols, G, []uint64{xm.ptr, g.dense, d.ptr}, []int{xm.ld, d.ld})
		n := norm8{x: xm.ptr, out: d.ptr, gain: g.dense, eps: eps, q: a}
		if fast && d.rows == 1 && (b.normBeside(n, xm, d) || b.pairNorm(n, xm, d)) {
			// In the launch of the norm queued before (chain.go).
			b.rememberQuant(quantEntry{*d, a})
			return
		}
		nr := normRows{x: xm.ptr, out: d.ptr, gain: g.dense, ldx: xm.ld, ldo: d.ld, eps: eps, q: a}
		if fast && d.rows > 1 && (b.pairNormRows(nr, xm, d) || b.pairNormGEMM(nr, xm, d)) {
			// In the launch of the norm queued before (serve.go).
			b.rememberQuant(quantEntry{*d, a})
			return
		}
		b.do("rmsnorm", func(c *Ctx) error {
			if fast {
				return c.RMSNormQuant8(xm.ptr, xm.ld, 0, 0, 0, 0, 0, 0, g.dense, eps, d.ptr, d.ld, d.rows, d.cols, G, a)
			}
			return c.RMSNormQuant(xm.ptr, xm.ld, g.dense, eps, d.ptr, d.ld, d.rows, d.cols, G, a)
		})
		if fast && d.rows == 1 {
			b.noteNorm8(n, xm, d)
		}
		if fast && d.rows > 1 {
			b.noteNormRows(nr, xm, d)
		}
		if d.rows == 1 && b.counter.Ptr != 0 && b.err == nil {
			b.lastNorm = &normOp{idx: len(b.pending) - 1, flush: b.flushes, out: *d, touched: []tensor{*xm, *d},
				in: FusedIn{Mode: fuseNorm, X: xm.ptr, Gain: g.dense, Eps: eps, Out: d.ptr, Q: a, Layout8: fast, Counter: b.counter.Ptr}}
		}
	}
	b.rememberQuant(quantEntry{*d, a})
}

// RoPE rotates the rotary dims of each head in place. The angles are
// computed on the host exactly as the CPU backend computes them.
func (b *Backend) RoPE(x backend.Tensor, heads, headStride, offset, dim int, theta float64, interleaved bool) {
	m := asTensor(x)
	if b.batch == nil || m.rows != b.batch.Rows() {
		b.fail("rope: %d rows, batch of %d", m.rows, b.batchRows())
		return
	}
	if offset < 0 || dim%2 != 0 || heads < 1 || (heads-1)*headStride+offset+dim > m.cols {
		b.fail("rope: %d heads of stride %d, dims [%d,%d) in %d columns", heads, headStride, offset, offset+dim, m.cols)
		return
	}
	T, half := m.rows, dim/2
	if T == 0 || half == 0 {
		return
	}
	b.wrote(m)
	// One table per step and (dim, theta): every layer rotates by the same
	// positions.
	key := ropeKey{dim, theta}
	p, ok := b.ropeTables[key]
	if !ok {
		// As the CPU backend: frequencies and angles in float64 (float32
		// holds pos * inv_freq only to about 1e-2 rad at long positions).
		freq := make([]float64, half)
		for i := range freq {
			freq[i] = math.Pow(theta, -float64(2*i)/float64(dim))
		}
		cs := make([]float32, 2*T*half)
		for t := 0; t < T; t++ {
			pos := float64(b.batch.Positions[t])
			for i := 0; i < half; i++ {
				angle := pos * freq[i]
				cs[t*half+i] = float32(math.Cos(angle))
				cs[T*half+t*half+i] = float32(math.Sin(angle))
			}
		}
		if buf := b.ropeBufs[key]; buf.Size < 4*len(cs) {
			b.now("rope table", func(c *Ctx) error {
				nb, err := c.Alloc(4 * len(cs))
				if err != nil {
					return err
				}
				b.ropeBufs[key] = nb
				if buf.Ptr != 0 {
					return c.Free(buf) // later ops reuse it in stream order
				}
				return nil
			})
			if b.err != nil {
				return
			}
		}
		p = b.ropeBufs[key].Ptr
		b.do(ropeTableOp, func(c *Ctx) error { return CopyIn(c, p, cs) })
		b.ropeTables[key] = p
	}
	il := 0
	if interleaved {
		il = 1
	}
	b.launch("rope", "ops", "rope_rows", D1(T), D1(256), m.ptr, m.ld, heads, headStride, offset, dim, il, p, T)
	if b.err == nil {
		b.ropes = [2]*ropeOp{b.ropes[1], {idx: len(b.pending) - 1, flush: b.flushes, m: *m, heads: heads, headStride: headStride, offset: offset, dim: dim, il: il, table: p}}
	}
}

// Add computes dst = a + b.
func (b *Backend) Add(dst, a, c backend.Tensor) {
	d, am, cm := asTensor(dst), asTensor(a), asTensor(c)
	if b.badShape("add", [2]int{am.rows, am.cols}, [2]int{d.rows, d.cols}) ||
		b.badShape("add", [2]int{cm.rows, cm.cols}, [2]int{d.rows, d.cols}) || d.rows == 0 {
		return
	}
	b.wrote(d)
	b.launch("add", "ops", "add_rows", D1(d.rows), D1(256), d.ptr, d.ld, am.ptr, am.ld, cm.ptr, cm.ld, d.cols)
	if b.err == nil {
		b.lastAdd = &addOp{idx: len(b.pending) - 1, flush: b.flushes, d: *d, a: *am, c: *cm}
		b.lastAdd.comb = b.combineBefore(b.lastAdd)
	}
}

// swigluCols is SWIGLU_COLS in ops.cu: the columns of one block.
const swigluCols = 1024

// SwiGLU computes dst = silu(gate) * up.
func (b *Backend) SwiGLU(dst, gate, up backend.Tensor) {
	d, gm, um := asTensor(dst), asTensor(gate), asTensor(up)
	if b.badShape("swiglu", [2]int{gm.rows, gm.cols}, [2]int{d.rows, d.cols}) ||
		b.badShape("swiglu", [2]int{um.rows, um.cols}, [2]int{d.rows, d.cols}) || d.rows == 0 {
		return
	}
	b.wrote(d)
	b.launch("swiglu", "ops", "swiglu_rows", Dim{uint32((d.cols + swigluCols - 1) / swigluCols), uint32(d.rows), 1}, D1(256), d.ptr, d.ld, gm.ptr, gm.ld, um.ptr, um.ld, d.cols)
}

// SelectOutputs gathers the batch's output rows of x into dst.
func (b *Backend) SelectOutputs(dst, x backend.Tensor) {
	d, xm := asTensor(dst), asTensor(x)
	if b.batch == nil || xm.rows != b.batch.Rows() {
		b.fail("select outputs: %d rows, batch of %d", xm.rows, b.batchRows())
		return
	}
	if b.badShape("select outputs", [2]int{d.rows, d.cols}, [2]int{len(b.batch.Outputs), xm.cols}) || d.rows == 0 {
		return
	}
	b.wrote(d)
	b.launch("select outputs", "ops", "gather_rows", D1(d.rows), D1(256), d.ptr, d.ld, xm.ptr, xm.ld, b.meta.outputs, d.cols)
}

// cachePool is the paged latent cache in one device allocation: layer l's
// slots follow layer l-1's, each slot rank+ropeDim values.
type cachePool struct {
	layers, blocks, blockSize, rank, ropeDim int
	dtype                                    backend.CacheDType
	buf                                      Buffer
	layerBytes                               int
}

func (p *cachePool) Layers() int               { return p.layers }
func (p *cachePool) Blocks() int               { return p.blocks }
func (p *cachePool) BlockSize() int            { return p.blockSize }
func (p *cachePool) DType() backend.CacheDType { return p.dtype }

// kernelDType is the cache kernels' dtype code.
func (p *cachePool) kernelDType() int {
	switch p.dtype {
	case backend.CacheF32:
		return 1
	case backend.CacheFP8:
		return 2
	case backend.CacheFP4:
		return 3
	}
	return 0
}

// NewCachePool allocates a zeroed paged latent cache in f32, bf16, fp8
// (each slot: rank+ropeDim E4M3 codes, then the float32 scales of c and
// k_pe) or fp4 (fp4SlotBytes).
func (b *Backend) NewCachePool(layers, blocks, blockSize, rank, ropeDim int, dtype backend.CacheDType) (backend.CachePool, error) {
	if layers <= 0 || blocks <= 0 || blockSize <= 0 || rank <= 0 || ropeDim < 0 || rank%2 != 0 || ropeDim%2 != 0 {
		return nil, fmt.Errorf("cuda backend: cache pool of %d layers, %d blocks of %d, rank %d, rope dims %d", layers, blocks, blockSize, rank, ropeDim)
	}
	switch dtype {
	case backend.CacheF32, backend.CacheBF16, backend.CacheFP4:
	case backend.CacheFP8:
		if (rank+ropeDim)%4 != 0 {
			return nil, fmt.Errorf("cuda backend: fp8 cache of rank %d + rope dims %d: the sum must be a multiple of 4", rank, ropeDim)
		}
	default:
		return nil, fmt.Errorf("cuda backend: cache dtype %v", dtype)
	}
	p := &cachePool{layers: layers, blocks: blocks, blockSize: blockSize, rank: rank, ropeDim: ropeDim, dtype: dtype}
	p.layerBytes = align(blocks*blockSize*p.slotBytes(), 256)
	b.flush()
	err := b.dev.Do(func(c *Ctx) error {
		buf, err := c.Alloc(layers * p.layerBytes)
		if err != nil {
			return err
		}
		p.buf = buf
		return c.Memset(buf.Ptr, 0, buf.Size)
	})
	if err != nil {
		return nil, fmt.Errorf("cuda backend: cache pool of %d bytes: %w", layers*p.layerBytes, err)
	}
	b.cacheBytes += int64(p.buf.Size)
	return p, nil
}

func (p *cachePool) layer(l int) uint64 { return p.buf.At(l * p.layerBytes) }

// ropeCacheOff keeps the RoPEs and the cache write in launches of their
// own (tests compare the fused launches with them).
var ropeCacheOff bool

// CacheWrite stores each row's latent and k_pe at its slot.
func (b *Backend) CacheWrite(layer int, latent, kpe backend.Tensor) {
	lm, km, p := asTensor(latent), asTensor(kpe), b.pool
	switch {
	case p == nil || b.batch == nil:
		b.fail("cache write without a batch and cache pool (SetBatch)")
		return
	case layer < 0 || layer >= p.layers:
		b.fail("cache write to layer %d of %d", layer, p.layers)
		return
	}
	if b.badShape("cache latent", [2]int{lm.rows, lm.cols}, [2]int{b.batch.Rows(), p.rank}) ||
		b.badShape("cache kpe", [2]int{km.rows, km.cols}, [2]int{b.batch.Rows(), p.ropeDim}) || lm.rows == 0 {
		return
	}
	if r1, r2 := b.ropes[0], b.ropes[1]; !ropeCacheOff && r1 != nil && r2 != nil && r1.flush == b.flushes && r2.flush == b.flushes &&
		r2.idx == len(b.pending)-1 && r1.idx == r2.idx-1 && r2.m == *km && r1.table == r2.table && r1.dim == r2.dim && r1.il == r2.il {
		// Both RoPEs just queued (the queries', then this key's) run in
		// the cache write's launch, for every cache dtype.
		b.ropeCaches++
		if b.latentNorm(r1, r2, lm, km, layer) {
			return
		}
		b.pending = b.pending[:r1.idx]
		b.ropes = [2]*ropeOp{}
		q := r1.m
		mod, name := "ops", "rope2_cache_write"
		if ropeRowsFit(lm.rows, r1, r2, p.rank, p.ropeDim, p.kernelDType()) {
			mod, name = "absorb", "rope2_cache_rows" // a prefill's rows (absorb.go)
			b.prefillMerges[prefillRopeRows]++
		}
		b.launch("rope+cache write", mod, name, D1(lm.rows), D1(256),
			q.ptr, q.ld, r1.heads, r1.headStride, r1.offset, km.ptr, km.ld, r2.heads, r2.headStride, r2.offset, r2.dim, r2.il, r2.table, lm.rows,
			p.layer(layer), p.kernelDType(), b.meta.slots, lm.ptr, lm.ld, p.rank, p.ropeDim)
		b.noteRopeCache(r1, r2, km, lm, p.layer(layer), b.meta.slots, p.kernelDType(), p.rank, p.ropeDim)
		return
	}
	if p.dtype == backend.CacheFP8 || p.dtype == backend.CacheFP4 {
		name := "cache_write_fp8"
		if p.dtype == backend.CacheFP4 {
			name = "cache_write_fp4"
		}
		b.launch("cache write", "ops", name, D1(lm.rows), D1(256), p.layer(layer), b.meta.slots,
			lm.ptr, lm.ld, km.ptr, km.ld, p.rank, p.ropeDim)
		return
	}
	b.launch("cache write", "ops", "cache_write", D1(lm.rows), D1(256), p.layer(layer), p.kernelDType(), b.meta.slots,
		lm.ptr, lm.ld, km.ptr, km.ld, p.rank, p.ropeDim)
}

// AbsorbQuery computes qlat[t,h] = W_UK[h]^T q_nope[t,h].
func (b *Backend) AbsorbQuery(qlat, q backend.Tensor, wUK backend.Weight, s backend.MLAShape) {
	ql, qm, w := asTensor(qlat), asTensor(q), asWeight(wUK)
	if b.badShape("absorb out", [2]int{ql.rows, ql.cols}, [2]int{qm.rows, s.Heads * s.Rank}) ||
		b.badShape("absorb in", [2]int{qm.rows, qm.cols}, [2]int{ql.rows, s.Heads * (s.NopeDim + s.RopeDim)}) ||
		b.badShape("absorb W_UK", [2]int{w.n, w.k}, [2]int{s.Heads * s.NopeDim, s.Rank}) || ql.rows == 0 {
		return
	}
	b.count(weightBytes(w))
	b.wrote(ql)
	if b.absorbTC(ql, qm, w, s) || b.absorbMany(ql, qm, w, s) {
		return
	}
	if w.q != nil && s.Rank%32 == 0 && s.Rank <= 512 {
		b.launch("absorb query", "ops", "absorb_query_q", Dim{uint32(ql.rows), uint32(s.Heads), 1}, D1(32*absorbWarps),
			ql.ptr, ql.ld, qm.ptr, qm.ld, w.q.Codes, w.q.Scales, w.q.RowScale, w.q.G, s.Rank, s.NopeDim, s.RopeDim)
		return
	}
	var codes, scales, rows uint64
	G := 32
	if w.q != nil {
		codes, scales, rows, G = w.q.Codes, w.q.Scales, w.q.RowScale, w.q.G
	}
	b.launch("absorb query", "ops", "absorb_query", Dim{uint32(ql.rows), uint32(s.Heads), uint32((s.Rank + 63) / 64)}, D1(64),
		ql.ptr, ql.ld, qm.ptr, qm.ld, w.dense, codes, scales, rows, G, s.Rank, s.NopeDim, s.RopeDim)
}

// absorbWarps is ABSORB_WARPS in ops.cu.
const absorbWarps = 16

// countCached counts the step's attention reads: every row's cached
// positions, as the CPU backend counts them.
func (b *Backend) countCached(p *cachePool) {
	perToken := int64(backend.CacheBytesPerToken(p.rank, p.ropeDim, p.dtype))
	for _, pos := range b.batch.Positions {
		b.count(perToken * int64(pos+1))
	}
}

// LatentAttention is causal attention over the bound pool in latent space.
func (b *Backend) LatentAttention(olat, qlat, q backend.Tensor, layer int, s backend.MLAShape, scale float32) {
	b.flushPiece()
	om, ql, qm, p := asTensor(olat), asTensor(qlat), asTensor(q), b.pool
	switch {
	case p == nil || b.batch == nil:
		b.fail("attention without a batch and cache pool (SetBatch)")
		return
	case layer < 0 || layer >= p.layers:
		b.fail("attention over layer %d of %d", layer, p.layers)
		return
	case p.rank != s.Rank || p.ropeDim != s.RopeDim:
		b.fail("attention of rank %d, rope dims %d over a pool of rank %d, rope dims %d", s.Rank, s.RopeDim, p.rank, p.ropeDim)
		return
	}
	T := b.batch.Rows()
	if b.badShape("attention out", [2]int{om.rows, om.cols}, [2]int{T, s.Heads * s.Rank}) ||
		b.badShape("attention qlat", [2]int{ql.rows, ql.cols}, [2]int{T, s.Heads * s.Rank}) ||
		b.badShape("attention q", [2]int{qm.rows, qm.cols}, [2]int{T, s.Heads * (s.NopeDim + s.RopeDim)}) {
		return
	}
	b.countCached(p)
	b.wrote(om)
	if (b.flashUse(b.batch) || b.flashMixedUse(b.batch)) && b.flashFits(ql, qm, p, s) {
		b.flashAttention(om, ql, qm, p, layer, s, scale)
		return
	}
	if attentionWarps*4*s.Rank > 48<<10 {
		b.fail("attention: rank %d needs more shared memory than 48 KiB", s.Rank)
		return
	}
	if b.decodeAttention(om, ql, qm, p, layer, s, scale) {
		return
	}
	maxN := b.meta.maxN
	width := s.Rank + s.RopeDim
	splits := splitBucket((maxN + attentionHeadsPos - 1) / attentionHeadsPos)
	// Many rows (a long prefill): the same kernels over chunks of rows
	// whose partial sums fit splitFloats.
	rows := T
	if T*s.Heads*splits*s.Rank > b.splitFloats {
		rows = b.splitFloats / (s.Heads * splits * s.Rank)
	}
	// Heads per block: enough blocks to cover the SMs, at most
	// attentionHeadsMax heads each.
	groups := max((s.Heads+attentionHeadsMax-1)/attentionHeadsMax, min(s.Heads, (b.dev.Info().SMs+max(rows, 1)*splits-1)/(max(rows, 1)*splits)))
	hb := (s.Heads + groups - 1) / groups
	groups = (s.Heads + hb - 1) / hb
	heads := 4 * (attentionHeadsPos*(width+4) + hb*width + 17*hb*attentionHeadsPos)
	if !b.noHeadsAttention && s.Rank%4 == 0 && s.RopeDim%4 == 0 && rows >= 1 &&
		splits <= maxMergeSplits && heads <= b.dev.Info().SharedOptin {
		// Blocks of positions, each read once for all heads.
		parts := rows * s.Heads * splits
		pm, ps, pacc := b.alloc(4*parts), b.alloc(4*parts), b.alloc(4*parts*s.Rank)
		b.do("attention", func(c *Ctx) error {
			k, err := c.kernelShared("ops", "latent_attention_heads", heads)
			if err != nil {
				return err
			}
			for r0 := 0; r0 < T; r0 += rows {
				n := min(rows, T-r0)
				if err := c.Launch(k, Dim{uint32(n), uint32(splits), uint32(groups)}, D1(256), heads,
					ql.row(r0), ql.ld, qm.row(r0), qm.ld, p.layer(layer), p.kernelDType(),
					b.meta.pos+4*uint64(r0), b.meta.rowSeq+4*uint64(r0), b.meta.seqBlocks, b.meta.blocks, p.blockSize,
					s.Heads, hb, s.Rank, s.NopeDim, s.RopeDim, scale, splits, pm, ps, pacc); err != nil {
					return err
				}
				if err := b.merge(c, &tensor{rows: n, cols: om.cols, ld: om.ld, ptr: om.row(r0)}, n, s, splits, pm, ps, pacc); err != nil {
					return err
				}
			}
			return nil
		})
		return
	}
	if splits := splitBucket((maxN + attentionSplitPos - 1) / attentionSplitPos); T*s.Heads*splits*s.Rank <= b.splitFloats && splits <= maxMergeSplits {
		// Few rows: spread each row's positions over blocks, then merge.
		parts := T * s.Heads * splits
		pm, ps, pacc := b.alloc(4*parts), b.alloc(4*parts), b.alloc(4*parts*s.Rank)
		b.do("attention", func(c *Ctx) error {
			k, err := c.Kernel("ops", "latent_attention_split")
			if err != nil {
				return err
			}
			if err := c.Launch(k, Dim{uint32(T), uint32(s.Heads), uint32(splits)}, D1(256), attentionWarps*4*s.Rank,
				ql.ptr, ql.ld, qm.ptr, qm.ld, p.layer(layer), p.kernelDType(),
				b.meta.pos, b.meta.rowSeq, b.meta.seqBlocks, b.meta.blocks, p.blockSize,
				s.Heads, s.Rank, s.NopeDim, s.RopeDim, scale, splits, pm, ps, pacc); err != nil {
				return err
			}
			return b.merge(c, om, T, s, splits, pm, ps, pacc)
		})
		return
	}
	scratch := b.alloc(4 * T * s.Heads * maxN)
	b.do("attention", func(c *Ctx) error {
		k, err := c.Kernel("ops", "latent_attention")
		if err != nil {
			return err
		}
		return c.Launch(k, Dim{uint32(T), uint32(s.Heads), 1}, D1(256), attentionWarps*4*s.Rank,
			om.ptr, om.ld, ql.ptr, ql.ld, qm.ptr, qm.ld, p.layer(layer), p.kernelDType(),
			b.meta.pos, b.meta.rowSeq, b.meta.seqBlocks, b.meta.blocks, p.blockSize,
			s.Heads, s.Rank, s.NopeDim, s.RopeDim, scale, scratch, maxN)
	})
}

// merge launches attention_merge: a block per row, head and 128 columns.
func (b *Backend) merge(c *Ctx, om *tensor, T int, s backend.MLAShape, splits int, pm, ps, pacc uint64) error {
	k, err := c.Kernel("ops", "attention_merge")
	if err != nil {
		return err
	}
	return c.Launch(k, Dim{uint32(T), uint32(s.Heads), uint32((s.Rank + 127) / 128)}, D1(128), 0, om.ptr, om.ld, s.Heads, s.Rank, splits, pm, ps, pacc)
}

// splitBucket rounds the split count up (a power of two to 16, then a
// multiple of 16; splits past a row's positions do nothing), so that
// decode steps keep one launch shape, and so one graph, for many tokens.
func splitBucket(n int) int {
	if n > 16 {
		return (n + 15) / 16 * 16
	}
	p := 1
	for p < n {
		p *= 2
	}
	return p
}

// attentionWarps is OPS_THREADS/32 in ops.cu: latent_attention keeps one
// rank-sized accumulator per warp in shared memory.
const attentionWarps = 8

// attentionSplitPos is SPLIT_POS in ops.cu: the positions of one block of
// the split attention kernel. maxSplitFloats bounds its partial sums (so
// that long prefills take the one-block-per-row kernel).
const (
	attentionSplitPos = 64
	maxSplitFloats    = 16 << 20
)

// attentionHeadsPos is ATT_P in ops.cu (the positions of one block of
// latent_attention_heads), maxMergeSplits MERGE_MAX_SPLITS.
const (
	attentionHeadsPos = 32
	attentionHeadsMax = 8 // ATT_HB
	maxMergeSplits    = 2048
)

// ExpandValues applies the value up-projection head by head.
func (b *Backend) ExpandValues(out, olat backend.Tensor, wUV backend.Weight, s backend.MLAShape) {
	om, ol, w := asTensor(out), asTensor(olat), asWeight(wUV)
	if b.badShape("expand out", [2]int{om.rows, om.cols}, [2]int{ol.rows, s.Heads * s.VDim}) ||
		b.badShape("expand in", [2]int{ol.rows, ol.cols}, [2]int{om.rows, s.Heads * s.Rank}) ||
		b.badShape("expand W_UV", [2]int{w.n, w.k}, [2]int{s.Heads * s.VDim, s.Rank}) {
		return
	}
	b.wrote(om)
	if w.q != nil && ol.rows == 1 && s.Rank%w.q.G == 0 && s.VDim%gemvRowsPerWarp == 0 {
		// One token: the heads' column blocks hold whole groups, so one
		// quantization of the row serves every head, and one launch runs
		// all heads' products (each warp's rows lie in one head).
		b.count(weightBytes(w))
		if b.fusedHeads(om, ol, w, s.Heads, s.Rank, s.VDim) {
			return
		}
		lc := b.lastDecodeAttn
		a := b.quantize(ol, w.q.G)
		if b.mergedValues(lc, om, ol, w.q, a, s) {
			return
		}
		b.do("expand values", func(c *Ctx) error { return c.GEMVHeads(om.ptr, w.q, a, s.Heads, s.VDim) })
		b.noteValues(om, w.q, a, s.Heads, s.VDim)
		return
	}
	if w.q != nil && ol.rows >= 2 && s.Rank%w.q.G == 0 && GEMMFits(s.Rank, w.q.G) {
		// Several tokens: every head's product in one GEMM launch, on one
		// quantization of the rows (whole groups per head).
		b.count(weightBytes(w))
		a := b.quantize(ol, w.q.G)
		if b.streamHeadsQuant(om, a, w, s.Heads) || b.streamHeads(om, a, w, s.Heads) || b.gemmHeadsQuant(om, a, w, s.Heads) {
			return
		}
		b.do(b.opName("expand values", w), func(c *Ctx) error { return c.GEMMHeads(om.ptr, om.ld, w.q, a, s.Heads, s.VDim, GEMMTileAuto) })
		return
	}
	for h := 0; h < s.Heads; h++ {
		b.MatMul(b.Cols(out, h*s.VDim, (h+1)*s.VDim), b.Cols(olat, h*s.Rank, (h+1)*s.Rank), weightRows(w, h*s.VDim, s.VDim))
	}
}

// routing is the device record of each token's experts (int32 ids) and
// weights, topK per token.
type routing struct {
	tokens, topK int
	ids, wts     uint64
}

func (r *routing) Tokens() int { return r.tokens }

// Route runs the router kernel on the logits: with an identity matrix as
// the router weight, its fp32 product reproduces the logits exactly.
func (b *Backend) Route(logits backend.Tensor, bias backend.Weight, cfg backend.RouterConfig) backend.Routing {
	lm := asTensor(logits)
	r := &routing{tokens: lm.rows, topK: max(cfg.TopK, 1)}
	bv, ok := b.vector("router bias", bias)
	if !ok || b.badShape("route", [2]int{lm.rows, lm.cols}, [2]int{lm.rows, bv.k}) ||
		b.badShape("route", [2]int{lm.rows, lm.cols}, [2]int{lm.rows, cfg.NumExperts}) ||
		cfg.TopK <= 0 || cfg.TopK > cfg.NumExperts {
		b.fail("route: top-%d of %d experts", cfg.TopK, cfg.NumExperts)
		r.tokens = 0
		return r
	}
	E := cfg.NumExperts
	if E%4 != 0 || lm.ld%4 != 0 || E > 512 {
		b.fail("route: %d experts (row stride %d): the router kernel needs a multiple of 4, at most 512", E, lm.ld)
		r.tokens = 0
		return r
	}
	if lm.rows == 0 {
		return r
	}
	b.count(4 * int64(bv.k))
	r.ids, r.wts = b.alloc(4*lm.rows*cfg.TopK), b.alloc(4*lm.rows*cfg.TopK)
	if cfg.Groups <= 1 && cfg.TopK <= 32 && !b.noRouteLogits {
		norm := 0
		if cfg.NormTopKProb {
			norm = 1
		}
		if ld := b.lastDense; ld != nil && ld.flush == b.flushes && ld.idx == len(b.pending)-1 && ld.d == *lm && b.routeCountersFor(lm.rows) &&
			b.routerNorm(ld, lm, bv, cfg, norm, r) {
			return r
		}
		if ld := b.lastDense; ld != nil && ld.flush == b.flushes && ld.idx == len(b.pending)-1 && ld.d == *lm && b.routeCountersFor(lm.rows) {
			// The router's product was queued just before: one launch
			// computes the logits (still written) and picks the experts.
			ro := &routerOp{idx: ld.idx, flush: b.flushes, x: ld.x, call: func(c *Ctx, q *QActs) error {
				if q == nil && lm.rows >= routerManyMinRows && RouterManyFits(E, ld.w.k, ld.x.ptr, ld.x.ld, cfg.TopK) {
					return c.RouterMany(ld.w.dense, E, ld.w.k, ld.x.ptr, ld.x.ld, lm.rows, lm.ptr, lm.ld, bv.dense, cfg.TopK, norm == 1,
						cfg.RoutedScaling, r.ids, r.wts)
				}
				return c.RouterRoute(ld.w.dense, E, ld.w.k, ld.x.ptr, ld.x.ld, lm.rows, lm.ptr, lm.ld, bv.dense, cfg.TopK, norm == 1,
					cfg.RoutedScaling, r.ids, r.wts, b.routeCounters.Ptr, q)
			}}
			if call, ok := b.routerNormCall(ld, lm, bv, cfg, norm, r); ok {
				ro.idx, ro.call = ld.idx-1, call // the norm before it in its launch (chain.go)
			} else if call, ok := b.routerNormRowsCall(ld, lm, bv, cfg, norm, r); ok {
				ro.idx, ro.call = ld.idx-1, call // the add and norm before it, several rows (serve.go)
			}
			b.pending[ro.idx] = queuedOp{"router+route", func(c *Ctx) error { return ro.call(c, nil) }}
			b.lastDense = nil
			if lm.rows == 1 && ld.x.rows == 1 && RouterFastFits(E, ld.w.k, ld.x.ptr, ld.x.ld, cfg.TopK) {
				b.lastRouter = ro
			}
			return r
		}
		// No expert groups: one warp per token picks from the logits.
		b.launch("route", "moe", "moe_route_logits", D1(lm.rows), D1(32), lm.ptr, lm.ld, bv.dense, E, cfg.TopK, norm, cfg.RoutedScaling, r.ids, r.wts)
		return r
	}
	b.do("route", func(c *Ctx) error {
		id, ok := b.identity[E]
		if !ok {
			eye := make([]float32, E*E)
			for e := 0; e < E; e++ {
				eye[e*E+e] = 1
			}
			p, err := b.weights.alloc(c, 4*len(eye))
			if err != nil {
				return err
			}
			if err := CopyIn(c, p, eye); err != nil {
				return err
			}
			b.identity[E], id = p, p
		}
		rc := RouteConfig{TopK: cfg.TopK, Groups: cfg.Groups, TopKGroups: cfg.TopKGroups, Norm: cfg.NormTopKProb, Scaling: cfg.RoutedScaling}
		return c.Route(id, bv.dense, lm.ptr, lm.ld, lm.rows, E, E, rc, r.ids, r.wts, 0)
	})
	return r
}

// MoEShared adds the routed experts' and the shared experts' outputs to
// dst: for one token, all of them in the fused kernels' one pass (the
// shared experts are slots after the routed ones, weight 1); otherwise MoE,
// then each shared expert's block added to dst.
func (b *Backend) MoEShared(dst, x backend.Tensor, r backend.Routing, experts, shared []backend.Expert) {
	d, xm := asTensor(dst), asTensor(x)
	rt, ok := r.(*routing)
	if !ok {
		panic(fmt.Sprintf("cuda backend: routing of type %T from another backend", r))
	}
	batched := d.rows >= moeBatchedMinTokens
	if !b.opts.NoFusedMoE && d.rows == xm.rows && (d.rows <= moeFusedMaxTokens || batched) && rt.Tokens() == d.rows && len(experts) > 0 && d.cols == xm.cols {
		if l := b.moeLayerShared(experts, shared, rt.topK); l != nil {
			b.wrote(d)
			perToken := int64(rt.topK) * expertBytes(experts[0])
			for _, s := range shared {
				perToken += expertBytes(s)
			}
			b.fusedMoE(d, xm, rt, l, batched, perToken)
			return
		}
	}
	b.MoE(dst, x, r, experts)
	for _, s := range shared {
		b.Add(dst, dst, backend.RunExpert(b, x, s))
	}
}

// PrepareExperts makes a MoE layer's device table at load
// (backend.ExpertPreparer): the table's repacking of the expert codes
// (tile-major, NewExpertTable) is timed with the upload, and the first
// forward pass finds it made. Experts that the fused kernels do not take
// get no table, as at their first use.
func (b *Backend) PrepareExperts(experts, shared []backend.Expert, topK int) error {
	if b.opts.NoFusedMoE || len(experts) == 0 {
		return nil
	}
	start := time.Now()
	defer func() { b.uploadTime += time.Since(start) }()
	// The tables that MoE and MoEShared would make at their first call.
	var l *moeLayer
	if len(shared) > 0 {
		l = b.moeLayerShared(experts, shared, topK)
	} else {
		l = b.moeLayer(experts, topK)
	}
	if l == nil {
		return nil
	}
	return b.dev.Do(func(c *Ctx) error { return c.Sync() })
}

// moeLayerShared is moeLayer for a table with the shared experts after the
// routed ones.
func (b *Backend) moeLayerShared(experts, shared []backend.Expert, topK int) *moeLayer {
	return b.expertLayer(b.moeShared, experts, shared, topK)
}

// expertLayer returns the layer of cache (keyed by the first routed gate)
// for these routed and shared experts, making its device table and topK
// scratch where the load (PrepareExperts) has not; nil where they do not
// suit the fused kernels (dense, mixed shapes).
func (b *Backend) expertLayer(cache map[*QMatrix]*moeLayer, experts, shared []backend.Expert, topK int) *moeLayer {
	if q := asWeight(experts[0].Gate).q; q != nil {
		if l := cache[q]; l != nil && l.scratch[topK] != nil {
			return l // no device work: keep the step's ops queued
		}
	}
	mats := func(es []backend.Expert) []ExpertMats {
		var out []ExpertMats
		for _, e := range es {
			g, u, dn := asWeight(e.Gate), asWeight(e.Up), asWeight(e.Down)
			if g.q == nil || u.q == nil || dn.q == nil {
				return nil
			}
			out = append(out, ExpertMats{Gate: g.q, Up: u.q, Down: dn.q})
		}
		return out
	}
	routed, sh := mats(experts), mats(shared)
	if routed == nil || len(sh) != len(shared) {
		return nil
	}
	l := cache[routed[0].Gate]
	b.flush()
	err := b.dev.Do(func(c *Ctx) error {
		if l == nil {
			t, err := c.NewExpertTable(routed, sh)
			if err != nil {
				return err
			}
			l = &moeLayer{table: t, scratch: map[int]*MoEScratch{}}
			cache[routed[0].Gate] = l
		}
		if l.scratch[topK] == nil {
			s, err := c.NewMoEScratch(l.table, topK)
			if err != nil {
				return err
			}
			l.scratch[topK] = s
		}
		return nil
	})
	if err != nil {
		return nil
	}
	return l
}

// routeCountersFor makes sure there are zeroed router counters for rows
// tokens (growing them waits for the queued ops, which the caller checks).
func (b *Backend) routeCountersFor(rows int) bool {
	if b.routeCounters.Size >= 4*rows {
		return true
	}
	b.now("router counters", func(c *Ctx) error {
		if err := c.Free(b.routeCounters); err != nil {
			return err
		}
		buf, err := c.Alloc(4 * max(rows, 64))
		if err != nil {
			return err
		}
		b.routeCounters = buf
		return c.Memset(buf.Ptr, 0, buf.Size)
	})
	return false // the queue was flushed: the product is no longer the last op
}

// moeLayer is a MoE layer's expert table and per-top-k scratch for the
// fused single-token kernels.
type moeLayer struct {
	table   *ExpertTable
	scratch map[int]*MoEScratch
}

// MoE adds sum_e w_e expert_e(x) to dst: one token with MMFP4 experts
// through the fused kernels, otherwise grouped by expert as the CPU does.
func (b *Backend) MoE(dst, x backend.Tensor, r backend.Routing, experts []backend.Expert) {
	d, xm := asTensor(dst), asTensor(x)
	rt, ok := r.(*routing)
	if !ok {
		panic(fmt.Sprintf("cuda backend: routing of type %T from another backend", r))
	}
	if b.badShape("moe", [2]int{d.rows, d.cols}, [2]int{xm.rows, xm.cols}) ||
		b.badShape("moe routing", [2]int{rt.Tokens(), 1}, [2]int{xm.rows, 1}) || d.rows == 0 || len(experts) == 0 {
		return
	}
	b.wrote(d)
	batched := d.rows >= moeBatchedMinTokens
	if !b.opts.NoFusedMoE && (d.rows <= moeFusedMaxTokens || batched) {
		if l := b.moeLayer(experts, rt.topK); l != nil {
			// Each token: topK distinct experts (the ids stay on the device).
			b.fusedMoE(d, xm, rt, l, batched, int64(rt.topK)*expertBytes(experts[0]))
			return
		}
	}
	b.moeGrouped(d, xm, rt, experts)
}

// fusedMoE counts perToken bytes for each row and runs l's kernels: the
// batched ones (streaming or tiled; the streaming ones also below
// moeBatchedMinTokens, from moeStreamMinTokens), or the single-token
// kernels row by row. A table whose shapes the batched kernels do not take
// runs the single-token kernels row by row (its matrices are tile-major,
// which only the MoE kernels read).
func (b *Backend) fusedMoE(d, xm *tensor, rt *routing, l *moeLayer, batched bool, perToken int64) {
	b.count(int64(d.rows) * perToken)
	if !l.batchable() {
		batched = false
	}
	if batched || b.moeStreams(d.rows, l.table) {
		b.moeBatched(d, xm, rt, l)
	} else {
		b.moeRows(d, xm, rt, l)
	}
}

// expertBytes is what one pass over e's three matrices reads.
func expertBytes(e backend.Expert) int64 {
	return weightBytes(asWeight(e.Gate)) + weightBytes(asWeight(e.Up)) + weightBytes(asWeight(e.Down))
}

// moeFusedMaxTokens is the largest batch whose MoE runs the fused
// single-token kernels once per token. Decode batches stay on the device
// that way: the grouped path reads the routing back to the host to group
// the tokens, which made a step of 8 sequences 20x slower than a step of
// one (at 8 sequences, 218 -> 67 ms a step on an H200). An expert chosen by
// several tokens is read once per token (from the L2 cache after the first,
// when the launches are close).
const moeFusedMaxTokens = 64

// moeRows runs the fused MoE kernels on each row of xm in turn, adding
// into the same row of d; the routing's ids and weights of token t start
// at t*topK on the device.
func (b *Backend) moeRows(d, xm *tensor, rt *routing, l *moeLayer) {
	for t := 0; t < d.rows; t++ {
		xr := &tensor{rows: 1, cols: xm.cols, ld: xm.ld, ptr: xm.row(t)}
		dr := d.row(t)
		a := b.routerQuant(xr, l.table.G)
		off := 4 * uint64(t*rt.topK)
		h := b.newAhead(&b.moeAhead)
		b.do("moe", func(c *Ctx) error {
			return withAhead(c, h, func() error {
				return c.MoE(dr, true, l.table, rt.ids+off, rt.wts+off, rt.topK, a, l.scratch[rt.topK])
			})
		})
		b.queuedAhead(b.moeAhead, len(b.pending)-1)
	}
}

// routerQuant is quantize(x, G) for one row, written by the router
// launch queued just before when that launch read x: one launch less in
// the chain before the MoE kernels.
func (b *Backend) routerQuant(x *tensor, G int) *QActs {
	ro := b.lastRouter
	b.lastRouter = nil
	fits := func() bool {
		return ro != nil && ro.flush == b.flushes && ro.idx == len(b.pending)-1 && b.pending[ro.idx].op == "router+route" &&
			x.rows == 1 && ro.x.ptr == x.ptr && ro.x.cols == x.cols
	}
	if !fits() || x.cols%G != 0 {
		return b.quantize(x, G)
	}
	for _, e := range b.quantized {
		if e.src == *x && e.a.G == G {
			return e.a
		}
	}
	a := b.quantizeInto(x, G)
	b.rememberQuant(quantEntry{*x, a})
	if !fits() { // the allocation handed the queue to the device
		b.do("quantize", func(c *Ctx) error { return c.RMSNormQuant(x.ptr, x.ld, 0, 0, 0, 0, x.rows, x.cols, G, a) })
		return a
	}
	call := ro.call
	b.pending[ro.idx] = queuedOp{"router+route+quant", func(c *Ctx) error { return call(c, a) }}
	return a
}

// moeLayer returns the fused kernels' table for experts (expertLayer), or
// nil where the experts do not suit them (dense, mixed shapes).
func (b *Backend) moeLayer(experts []backend.Expert, topK int) *moeLayer {
	return b.expertLayer(b.moe, experts, nil, topK)
}

// moeGrouped runs each chosen expert on its tokens (gathered), then adds
// the weighted outputs to their rows, experts in index order as on the CPU.
// The routing is read back to the host to group the tokens.
func (b *Backend) moeGrouped(d, xm *tensor, rt *routing, experts []backend.Expert) {
	T, K := xm.rows, rt.topK
	ids := make([]int32, T*K)
	wts := make([]float32, T*K)
	b.now("moe routing download", func(c *Ctx) error {
		return errors.Join(CopyOut(c, ids, rt.ids), CopyOut(c, wts, rt.wts))
	})
	if b.err != nil {
		return
	}
	rows := make([][]int32, len(experts))
	ws := make([][]float32, len(experts))
	for t := 0; t < T; t++ {
		for k := 0; k < K; k++ {
			e := int(ids[t*K+k])
			if e < 0 || e >= len(experts) {
				b.fail("moe: expert %d of %d", e, len(experts))
				return
			}
			rows[e] = append(rows[e], int32(t))
			ws[e] = append(ws[e], wts[t*K+k])
		}
	}
	for e, rs := range rows {
		if len(rs) == 0 {
			continue
		}
		ex := experts[e]
		n := len(rs)
		in := asTensor(b.NewTensor(n, xm.cols))
		rowPtr, wPtr, we := b.alloc(4*n), b.alloc(4*n), ws[e]
		b.do("moe gather", func(c *Ctx) error {
			return errors.Join(CopyIn(c, rowPtr, rs), CopyIn(c, wPtr, we))
		})
		b.launch("moe gather", "ops", "gather_rows", D1(n), D1(256), in.ptr, in.ld, xm.ptr, xm.ld, rowPtr, xm.cols)
		inter := ex.Gate.Rows()
		gate, up := b.NewTensor(n, inter), b.NewTensor(n, inter)
		b.MatMul(gate, in, ex.Gate)
		b.MatMul(up, in, ex.Up)
		b.SwiGLU(gate, gate, up)
		out := asTensor(b.NewTensor(n, xm.cols))
		b.MatMul(out, gate, ex.Down)
		b.launch("moe scatter", "ops", "scatter_axpy", D1(n), D1(256), d.ptr, d.ld, out.ptr, out.ld, rowPtr, wPtr, d.cols)
	}
}
