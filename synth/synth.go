// Package synth writes MMFP4 models with random weights at the exact shapes
// of a published configuration, straight to MMFP4 (codes and scales are
// drawn directly; no bf16 model is ever made). They exist to measure speed
// and memory at full size without a 60 GB download.
//
// The values are chosen so that the model behaves like a real one where it
// matters for benchmarks: activations stay finite through every layer and
// the router spreads tokens over the experts (see plan).
package synth

import (
	"context"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/mmfp4/mmfp4/format"
	"github.com/mmfp4/mmfp4/internal/outdir"
	"github.com/mmfp4/mmfp4/model/glm4moelite"
	"github.com/mmfp4/mmfp4/safetensors"
)

//go:embed presets/*.json
var presets embed.FS

// The tokenizer is the small GLM-style one of the test fixture (512 tokens
// with GLM-4's special tokens and chat template): text prompts work, and
// every id it makes is inside the real vocabulary.
//
//go:embed tokenizer/*
var tokenizerFiles embed.FS

// Presets lists the known preset names.
func Presets() []string {
	ents, _ := presets.ReadDir("presets")
	var names []string
	for _, e := range ents {
		names = append(names, strings.TrimSuffix(e.Name(), ".json"))
	}
	return names
}

// PresetConfig returns the config.json of a preset.
func PresetConfig(name string) ([]byte, error) {
	b, err := presets.ReadFile("presets/" + name + ".json")
	if err != nil {
		return nil, fmt.Errorf("unknown preset %q (known: %s)", name, strings.Join(Presets(), ", "))
	}
	return b, nil
}

// Options control Write.
type Options struct {
	// Config is the config.json of the model (see PresetConfig).
	Config []byte
	// Layers overrides num_hidden_layers when positive, for smaller models.
	Layers int
	// GroupSize of the MMFP4 weights: 32, 64 or 128; 0 means 128.
	GroupSize int
	// Seed makes the weights; the same seed gives the same files.
	Seed uint64
	// Threads that draw values; 0 means GOMAXPROCS.
	Threads int
	// ShardBytes is the target size of a safetensors file; 0 means 4 GiB.
	ShardBytes int64
	// Progress, if set, is called with the bytes written so far and the total.
	Progress func(done, total int64)
}

// Summary describes a written model.
type Summary struct {
	Dir     string
	Bytes   int64 // all files
	Tensors int   // logical tensors
	Shards  int
	Layers  int
	Elapsed time.Duration
}

// Write makes a model directory dir, which must not exist or be empty. The
// files are assembled in a temporary sibling directory that is renamed to
// dir at the end, and config.json is written into it last: an interrupted
// run leaves no directory at dir, and the partial one has no config.json,
// so neither loads. When ctx is cancelled, the partial directory is removed.
func Write(ctx context.Context, dir string, opt Options) (*Summary, error) {
	start := time.Now()
	if opt.GroupSize == 0 {
		opt.GroupSize = 128
	}
	if !format.ValidGroupSize(opt.GroupSize) {
		return nil, fmt.Errorf("group size %d: must be 32, 64 or 128", opt.GroupSize)
	}
	if opt.Layers < 0 {
		return nil, fmt.Errorf("layers %d: must be positive", opt.Layers)
	}
	if opt.ShardBytes <= 0 {
		opt.ShardBytes = 4 << 30
	}
	if opt.Threads <= 0 {
		opt.Threads = runtime.GOMAXPROCS(0)
	}
	configJSON, cfg, err := resolveConfig(opt.Config, opt.Layers)
	if err != nil {
		return nil, err
	}
	tensors, err := plan(cfg, opt.GroupSize)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	shards := planShards(tensors, opt.GroupSize, opt.ShardBytes)
	// The model appears whole or not at all (outdir.Write).
	size, err := outdir.Write(dir, func(tmp string) error {
		if err := writeShards(ctx, tmp, tensors, shards, opt); err != nil {
			return err
		}
		if err := writeMeta(tmp, tensors, shards, opt.GroupSize, configJSON); err != nil {
			return err
		}
		return ctx.Err()
	})
	if err != nil {
		return nil, err
	}
	return &Summary{Dir: dir, Bytes: size, Tensors: len(tensors), Shards: len(shards), Layers: cfg.NumLayers,
		Elapsed: time.Since(start)}, nil
}

// resolveConfig applies the layer override, drops comment fields, and
// checks the result with the model's own parser.
func resolveConfig(raw []byte, layers int) ([]byte, *glm4moelite.Config, error) {
	if raw == nil {
		return nil, nil, errors.New("no config given")
	}
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, nil, fmt.Errorf("config: %w", err)
	}
	for k := range m {
		if strings.HasPrefix(k, "_") {
			delete(m, k)
		}
	}
	if layers > 0 {
		m["num_hidden_layers"] = layers
		if types, ok := m["mlp_layer_types"].([]any); ok && len(types) != layers {
			return nil, nil, fmt.Errorf("config lists mlp_layer_types for %d layers; cannot resize it to %d", len(types), layers)
		}
		if k, ok := m["first_k_dense_replace"].(float64); ok && int(k) > layers {
			m["first_k_dense_replace"] = layers
		}
	}
	out, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return nil, nil, err
	}
	cfg, err := glm4moelite.ParseConfig(out)
	if err != nil {
		return nil, nil, fmt.Errorf("config: %w", err)
	}
	return append(out, '\n'), cfg, nil
}

// shard is a run of consecutive tensors stored in one file.
type shard struct {
	file     string
	from, to int // tensors[from:to]
}

func planShards(ts []*tensor, g int, maxBytes int64) []shard {
	var out []shard
	var size int64
	from := 0
	for i, t := range ts {
		if i > from && size+t.bytes(g) > maxBytes {
			out = append(out, shard{from: from, to: i})
			from, size = i, 0
		}
		size += t.bytes(g)
	}
	out = append(out, shard{from: from, to: len(ts)})
	for i := range out {
		out[i].file = "model.safetensors"
		if len(out) > 1 {
			out[i].file = fmt.Sprintf("model-%05d-of-%05d.safetensors", i+1, len(out))
		}
	}
	return out
}

// item is one tensor being drawn: its stored outputs, filled by pieces on
// the worker threads.
type item struct {
	t    *tensor
	data [][]byte // one buffer per output
	wg   sync.WaitGroup
	size int64
}

// pieceBytes is about how much one worker draws at a time.
const pieceBytes = 2 << 20

// writeShards draws the tensors on opt.Threads workers, a bounded amount
// ahead of the writer, and streams them in order into the shard files.
func writeShards(ctx context.Context, dir string, ts []*tensor, shards []shard, opt Options) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	g := opt.GroupSize
	budget := newBudget(ctx, 512<<20)
	bufs := &bufPool{}
	jobs := make(chan func(), 4*opt.Threads)
	ready := make(chan *item, len(ts))

	var workers sync.WaitGroup
	for range opt.Threads {
		workers.Add(1)
		go func() {
			defer workers.Done()
			for job := range jobs {
				job()
			}
		}()
	}
	go func() { // producer: tensors in order, pieces to the workers
		defer close(ready)
		defer close(jobs)
		for _, t := range ts {
			it := &item{t: t, size: t.bytes(g)}
			if !budget.acquire(it.size) {
				return
			}
			for _, o := range t.outputs(g) {
				it.data = append(it.data, bufs.get(byteSize(o)))
			}
			if t.kind != matrixMMFP4 {
				it.wg.Add(1)
				jobs <- func() {
					defer it.wg.Done()
					fillVector(seedFor(opt.Seed, t.name, 0), t, it.data[0])
				}
			} else {
				rows := max(1, pieceBytes/(t.k/2))
				for p, lo := 0, 0; lo < t.n; p, lo = p+1, lo+rows {
					hi := min(lo+rows, t.n)
					it.wg.Add(1)
					jobs <- func() {
						defer it.wg.Done()
						if ctx.Err() == nil {
							fillMatrix(seedFor(opt.Seed, t.name, p), t, g, lo, hi, it.data[0], it.data[1], it.data[2])
						}
					}
				}
			}
			ready <- it
		}
	}()
	defer workers.Wait()

	err := writeInOrder(ctx, dir, ts, shards, ready, budget, bufs, opt)
	if err != nil {
		cancel()
		for it := range ready { // let the producer finish
			it.wg.Wait()
			budget.release(it.size)
		}
	}
	return err
}

// writeInOrder takes the drawn tensors from ready and writes them.
func writeInOrder(ctx context.Context, dir string, ts []*tensor, shards []shard, ready <-chan *item, budget *budget, bufs *bufPool, opt Options) error {
	g := opt.GroupSize
	var total, written int64
	for _, t := range ts {
		total += t.bytes(g)
	}
	report := func() {
		if opt.Progress != nil {
			opt.Progress(written, total)
		}
	}
	report()
	for _, sh := range shards {
		var infos []safetensors.TensorInfo
		for _, t := range ts[sh.from:sh.to] {
			infos = append(infos, t.outputs(g)...)
		}
		w, err := safetensors.Create(filepath.Join(dir, sh.file), infos, map[string]string{"format": "pt"})
		if err != nil {
			return err
		}
		for range ts[sh.from:sh.to] {
			it, ok := <-ready
			if !ok || ctx.Err() != nil {
				w.Abort()
				if err := ctx.Err(); err != nil {
					return err
				}
				return errors.New("synth: tensor producer stopped early")
			}
			it.wg.Wait()
			for i, o := range it.t.outputs(g) {
				if err := w.Write(o.Name, it.data[i]); err != nil {
					w.Abort()
					budget.release(it.size)
					return err
				}
			}
			for _, b := range it.data {
				bufs.put(b)
			}
			budget.release(it.size)
			written += it.size
			report()
		}
		if err := w.Close(); err != nil {
			return err
		}
	}
	return nil
}

func byteSize(o safetensors.TensorInfo) int {
	n := o.DType.Size()
	for _, d := range o.Shape {
		n *= d
	}
	return n
}

// writeMeta writes the index, the format header, the tokenizer and, last,
// config.json.
func writeMeta(dir string, ts []*tensor, shards []shard, g int, configJSON []byte) error {
	weightMap := map[string]string{}
	var total int64
	for _, sh := range shards {
		for _, t := range ts[sh.from:sh.to] {
			for _, o := range t.outputs(g) {
				weightMap[o.Name] = sh.file
			}
			total += t.bytes(g)
		}
	}
	if err := safetensors.WriteIndex(dir, weightMap, total, nil); err != nil {
		return err
	}
	h := format.Header{Format: format.FormatName, Version: format.FormatVersion, GroupSize: g,
		Layout: format.LayoutNK, ScaleType: format.ScaleTypeE4M3, Quantizer: "synthetic", SourceDType: "none"}
	for _, t := range ts {
		h.Tensors = append(h.Tensors, t.headerEntry())
	}
	hb, err := json.MarshalIndent(h, "", "  ")
	if err != nil {
		return err
	}
	if err := writeFileSync(filepath.Join(dir, format.HeaderFile), append(hb, '\n')); err != nil {
		return err
	}
	ents, err := tokenizerFiles.ReadDir("tokenizer")
	if err != nil {
		return err
	}
	names := make([]string, 0, len(ents))
	for _, e := range ents {
		names = append(names, e.Name())
	}
	sort.Strings(names)
	for _, name := range names {
		b, err := tokenizerFiles.ReadFile("tokenizer/" + name)
		if err != nil {
			return err
		}
		if err := writeFileSync(filepath.Join(dir, name), b); err != nil {
			return err
		}
	}
	if err := writeFileSync(filepath.Join(dir, "config.json"), configJSON); err != nil {
		return err
	}
	outdir.SyncDir(dir)
	return nil
}

func writeFileSync(path string, data []byte) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// budget bounds the bytes drawn ahead of the writer.
type budget struct {
	mu    sync.Mutex
	cond  *sync.Cond
	used  int64
	limit int64
	ctx   context.Context
}

func newBudget(ctx context.Context, limit int64) *budget {
	b := &budget{limit: limit, ctx: ctx}
	b.cond = sync.NewCond(&b.mu)
	context.AfterFunc(ctx, func() {
		b.mu.Lock()
		b.cond.Broadcast()
		b.mu.Unlock()
	})
	return b
}

// acquire waits until n bytes fit (one item larger than the limit goes
// alone) and reports false if the context ended first.
func (b *budget) acquire(n int64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	for b.used > 0 && b.used+n > b.limit && b.ctx.Err() == nil {
		b.cond.Wait()
	}
	if b.ctx.Err() != nil {
		return false
	}
	b.used += n
	return true
}

func (b *budget) release(n int64) {
	b.mu.Lock()
	b.used -= n
	b.cond.Broadcast()
	b.mu.Unlock()
}

// bufPool reuses the buffers of written tensors: most tensors have one of a
// few sizes, and fresh memory costs page faults and zeroing.
type bufPool struct {
	mu   sync.Mutex
	free [][]byte
}

// get returns a buffer of n bytes, not zeroed: every byte is drawn anew.
func (p *bufPool) get(n int) []byte {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i, b := range p.free {
		if cap(b) >= n && cap(b) <= 2*n {
			p.free[i] = p.free[len(p.free)-1]
			p.free = p.free[:len(p.free)-1]
			return b[:n]
		}
	}
	return make([]byte, n)
}

// put keeps b for reuse, unless it is one of the few huge ones (the
// embedding and lm_head), which would only hold memory.
func (p *bufPool) put(b []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if cap(b) <= 32<<20 && len(p.free) < 64 {
		p.free = append(p.free, b)
	}
}
