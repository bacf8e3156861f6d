// Package bench measures a model the way DESIGN.md section 7 asks: load
// time (warm, and cold where the page cache can be dropped), prefill and
// decode speed at a given context, peak RSS, the bytes of weights and cache
// one decoded token reads, this machine's read bandwidth measured in the
// same run with vector loads, and the fraction of that roofline decode
// reaches. It drives the model through the public mmfp4 API only.
package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/mmfp4/mmfp4"
	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/backend/cpu"
	"github.com/mmfp4/mmfp4/engine"
	"github.com/mmfp4/mmfp4/internal/benchmode"
	"github.com/mmfp4/mmfp4/sample"
)

// ErrSkipped is returned when benchmarks are switched off
// (ALPHAHENG_TASK_MODE=1).
var ErrSkipped = errors.New("benchmarks are skipped (ALPHAHENG_TASK_MODE=1)")

// Options control Run.
type Options struct {
	Dir     string // model directory
	Ctx     int    // prompt tokens prefilled before decoding
	Gen     int    // tokens generated after the prompt (at least 2)
	Threads int    // 0: every core
	// Cold measures a load with the weight files dropped from the page cache
	// first, where the system allows it. The weights are then read back from
	// disk before the warm measurements.
	Cold bool
	// BandwidthBytes is the buffer of the read-bandwidth test; 0 means 1 GiB.
	BandwidthBytes int64
	// Seed picks the prompt's random token ids.
	Seed uint64
	// Histogram records, per MoE layer, how often each expert was chosen.
	Histogram bool
	// Log receives progress lines (a long run must not look hung); nil: none.
	Log io.Writer
	// NewBackend makes the backend to measure; nil means the CPU backend
	// with Threads. A backend with a MemoryBandwidth method (a GPU) is
	// measured against that bandwidth instead of the CPU's read bandwidth,
	// and the cold load is not measured.
	NewBackend func() (backend.Backend, error)
	// CacheDType is the latent cache precision (zero value bf16).
	CacheDType backend.CacheDType
}

// bandwidthMeter is a backend that measures its own memory bandwidth.
type bandwidthMeter interface {
	MemoryBandwidth() (bytesPerSec float64, kernel string, err error)
}

// Result is what Run measured. JSON keys follow DESIGN.md section 7.
type Result struct {
	Device  string `json:"device"`
	Threads int    `json:"threads"`
	Backend string `json:"backend"`
	Ctx     int    `json:"ctx"`
	Gen     int    `json:"gen"`

	ModelBytes       int64    `json:"model_bytes"` // weight files on disk
	ResidentFraction *float64 `json:"resident_fraction,omitempty"`
	WeightsResident  bool     `json:"weights_resident"` // before the run, by mincore or the pre-read's speed
	PreReadS         float64  `json:"preread_s"`
	// ResidentAfterPreRead is the share of pages cached after the pre-read:
	// below 1 the page cache cannot hold the model next to everything else.
	ResidentAfterPreRead *float64 `json:"resident_after_preread,omitempty"`
	PreReadGBPerSec      float64  `json:"preread_gb_s"`
	ColdLoadS            *float64 `json:"cold_load_s,omitempty"`
	ColdNote             string   `json:"cold_note,omitempty"` // why there is no cold figure
	LoadS                float64  `json:"load_s"`              // warm
	PrefaultS            float64  `json:"prefault_s"`          // mapping every weight page after the load
	// HugePageFraction is the share of the weights mapped in 2 MB pages
	// after the prefault (Linux): the rest costs a TLB entry per 4 KB.
	HugePageFraction *float64 `json:"huge_page_fraction,omitempty"`

	// FirstPrefillTokS is the warm-up's prefill on a GPU: the first step of
	// its size after the load, which loads kernels and grows step memory.
	FirstPrefillTokS *float64 `json:"first_prefill_tok_s,omitempty"`
	PrefillS         float64  `json:"prefill_s"`
	PrefillTokS      float64  `json:"prefill_tok_s"`
	DecodeS          float64  `json:"decode_s"`
	DecodeSteps      int      `json:"decode_steps"`
	DecodeTokS       float64  `json:"decode_tok_s"`
	BytesPerTok      int64    `json:"bytes_per_token"`
	PeakRSS          int64    `json:"peak_rss_bytes"`
	KVCacheBytes     int64    `json:"kv_cache_bytes"`
	RSSLimit         int64    `json:"rss_limit_bytes"` // 1.1 x model + KV cache

	// Device memory, on a backend with its own (a GPU): weights, cache
	// pools, step workspace, all that is in use on the device (the context
	// and kernels too), and the time spent uploading the weights.
	GPUWeightBytes    int64    `json:"gpu_weight_bytes,omitempty"`
	GPUCacheBytes     int64    `json:"gpu_cache_bytes,omitempty"`
	GPUWorkspaceBytes int64    `json:"gpu_workspace_bytes,omitempty"`
	GPUUsedBytes      int64    `json:"gpu_used_bytes,omitempty"`
	UploadS           *float64 `json:"upload_s,omitempty"`

	BandwidthGBs     float64 `json:"bandwidth_gb_s"`
	BandwidthKernel  string  `json:"bandwidth_kernel"`
	RooflineFraction float64 `json:"roofline_fraction"`

	// ExpertCounts[l][e] counts the picks of expert e by the l-th MoE layer
	// over prefill and decode (with Options.Histogram).
	ExpertCounts [][]int `json:"expert_counts,omitempty"`
}

// Run measures the model in o.Dir.
func Run(ctx context.Context, o Options) (*Result, error) {
	if benchmode.Off() {
		return nil, ErrSkipped
	}
	if o.Ctx < 1 || o.Gen < 2 {
		return nil, fmt.Errorf("want ctx >= 1 and gen >= 2 (decode speed needs a step after the first token), got ctx %d, gen %d", o.Ctx, o.Gen)
	}
	if o.Threads <= 0 {
		o.Threads = runtime.GOMAXPROCS(0)
	}
	if o.BandwidthBytes <= 0 {
		o.BandwidthBytes = 1 << 30
	}
	log := newProgress(o.Log)
	files, modelBytes, err := weightFiles(o.Dir)
	if err != nil {
		return nil, err
	}
	r := &Result{Device: device(), Threads: o.Threads, Ctx: o.Ctx, Gen: o.Gen, ModelBytes: modelBytes}

	var gpu backend.Backend
	if o.NewBackend != nil {
		if gpu, err = o.NewBackend(); err != nil {
			return nil, err
		}
		if c, ok := gpu.(io.Closer); ok {
			defer c.Close() // after the model's Close, deferred later
		}
		o.Cold = false
	}
	if gpu == nil {
		// The bandwidth test first, while its 1 GiB buffer is the only big
		// thing in memory; it is handed back before the model loads.
		log.phase(fmt.Sprintf("read bandwidth: %s buffer, %d threads, %s kernel", gib(o.BandwidthBytes), o.Threads, readKernel()), nil)
		bw := MeasureReadBandwidth(o.BandwidthBytes, o.Threads, 10)
		r.BandwidthGBs, r.BandwidthKernel = bw.GBPerSec, bw.Kernel
		resetPeakRSS()
		log.donef("%.2f GB/s", bw.GBPerSec)
	} else if m, ok := gpu.(bandwidthMeter); ok {
		log.phase("device memory bandwidth", nil)
		bw, kernel, err := m.MemoryBandwidth()
		if err != nil {
			return nil, err
		}
		r.BandwidthGBs, r.BandwidthKernel = bw/1e9, kernel
		log.donef("%.2f GB/s", r.BandwidthGBs)
	}

	frac, known := residentFraction(files)
	if known {
		r.ResidentFraction = &frac
	}
	switch {
	case o.Cold:
		r.ColdLoadS, r.ColdNote = coldLoad(o, files, log)
	case gpu != nil:
		r.ColdNote = "not measured on a GPU backend"
	default:
		r.ColdNote = "not measured"
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}

	// Read every weight byte once (outside the model's mapping, so RSS is
	// not touched), timing it: this warms the page cache and tells whether
	// the weights were already there.
	log.phase(fmt.Sprintf("pre-reading %s of weights", gib(modelBytes)), nil)
	start := time.Now()
	if err := preRead(ctx, files, o.Threads); err != nil {
		return nil, err
	}
	r.PreReadS = time.Since(start).Seconds()
	r.PreReadGBPerSec = float64(modelBytes) / r.PreReadS / 1e9
	switch {
	case known: // measured before the cache was dropped for the cold load
		r.WeightsResident = frac > 0.99
	case r.ColdLoadS == nil:
		r.WeightsResident = r.PreReadGBPerSec > 2 // far above the disks of these machines
	}
	if f, ok := residentFraction(files); ok {
		r.ResidentAfterPreRead = &f
		if f < 0.99 {
			log.warnf("only %.0f%% of the weights stayed in the page cache after the pre-read: the run will read from disk", 100*f)
		}
	}
	log.donef("%.2f GB/s", r.PreReadGBPerSec)

	var counts [][]int
	var moeLayers, calls int
	cpuOpts := cpu.Options{Threads: o.Threads}
	if o.Histogram {
		cpuOpts.OnRoute = func(experts []int) {
			row := counts[calls%moeLayers]
			for _, e := range experts {
				row[e]++
			}
			calls++
		}
	}
	var b backend.Backend = cpu.New(cpuOpts)
	if gpu != nil {
		b = gpu
	}
	// Decode is timed and its bytes counted on the engine's goroutine,
	// after each step: tokens reach the caller's callback through a
	// channel, possibly after later steps have run.
	var m *mmfp4.Model
	steps := &stepLog{}
	opts := mmfp4.Options{Backend: b, MaxContext: o.Ctx + o.Gen,
		Engine: engine.Options{CacheDType: o.CacheDType, MaxNumSeqs: 1, MaxBatchTokens: engine.OneSequenceBatchTokens,
			OnStep: func(info engine.StepInfo) { steps.add(info, m.BytesRead()) }}}
	log.phase("loading (warm)", nil)
	m, err = mmfp4.Load(o.Dir, opts)
	if err != nil {
		return nil, err
	}
	defer m.Close()
	r.LoadS = m.LoadTime.Seconds()
	log.donef("")
	// As llama-bench's warm-up run does, keep first-touch page faults out
	// of the prefill figure: map every page now, timed on its own.
	log.phase("mapping the weight pages", nil)
	start = time.Now()
	if err := m.Prefault(); err != nil {
		return nil, err
	}
	r.PrefaultS = time.Since(start).Seconds()
	if n, ok := pmdMappedBytes(); ok {
		f := min(float64(n)/float64(modelBytes), 1)
		r.HugePageFraction = &f
	}
	log.donef("%.2f s", r.PrefaultS)
	cfg := m.Config()
	for _, dense := range cfg.Dense {
		if !dense {
			moeLayers++
		}
	}
	if o.Histogram {
		counts = make([][]int, moeLayers)
		for i := range counts {
			counts[i] = make([]int, cfg.NumExperts)
		}
	}
	r.Backend = fmt.Sprintf("cpu, %d threads", o.Threads)
	if gpu != nil {
		r.Backend = gpu.Name()
	}
	// The engine's cache pool: one sequence of ctx+gen tokens in whole
	// blocks, at the engine's cache precision.
	e, err := m.Engine()
	if err != nil {
		return nil, err
	}
	eo := e.Options()
	r.KVCacheBytes = int64(eo.CacheBlocks) * int64(eo.BlockSize) * int64(cfg.NumLayers) *
		int64(backend.CacheBytesPerToken(cfg.KVLoraRank, cfg.QKRopeHeadDim, eo.CacheDType))

	rng := rand.New(rand.NewPCG(o.Seed, 0x6d6d667034))
	randomPrompt := func() []int {
		p := make([]int, o.Ctx)
		for i := range p {
			p[i] = rng.IntN(cfg.VocabSize)
		}
		return p
	}
	// On a GPU the first step of a size loads kernel modules and grows the
	// device's step memory: as llama-bench's warm-up run does, a
	// generation on another prompt of the same length runs before the
	// timed one. Its prefill is reported as the first after the load. On
	// the CPU a warm-up would double a run of minutes for little: the
	// weight pages are mapped above.
	if gpu != nil {
		log.phase(fmt.Sprintf("warm-up: prefill of %d tokens and a decode step", o.Ctx), nil)
		res, err := m.Generate(ctx, randomPrompt(), mmfp4.GenerateOptions{MaxTokens: 2, StopIDs: []int{}})
		if err != nil {
			log.donef("failed")
			return nil, fmt.Errorf("warm-up: %w", err)
		}
		f := res.PrefillTokensPerSecond()
		r.FirstPrefillTokS = &f
		log.donef("first prefill %.2f tok/s", f)
	}
	prompt := randomPrompt()
	if err := r.generate(ctx, m, prompt, o.Gen, steps, log); err != nil {
		return nil, err
	}
	r.PeakRSS = peakRSS()
	if mr, ok := b.(backend.MemoryReporter); ok {
		mem, err := mr.DeviceMemory()
		if err != nil {
			return nil, err
		}
		r.GPUWeightBytes, r.GPUCacheBytes, r.GPUWorkspaceBytes = mem.WeightBytes, mem.CacheBytes, mem.WorkspaceBytes
		r.GPUUsedBytes = mem.TotalBytes - mem.FreeBytes
		r.UploadS = &mem.UploadSeconds
	}
	r.RSSLimit = int64(1.1*float64(modelBytes)) + r.KVCacheBytes
	if r.BandwidthGBs > 0 {
		r.RooflineFraction = r.DecodeTokS * float64(r.BytesPerTok) / (r.BandwidthGBs * 1e9)
	}
	r.ExpertCounts = counts
	return r, nil
}

// stepLog records, for each engine step, when it ended, the backend's
// byte counter then, and whether it prefilled.
type stepLog struct {
	mu      sync.Mutex
	ends    []time.Time
	bytes   []int64
	prefill []bool
}

func (l *stepLog) add(info engine.StepInfo, bytesRead int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.ends = append(l.ends, time.Now())
	l.bytes = append(l.bytes, bytesRead)
	l.prefill = append(l.prefill, info.Prefill > 0)
}

// decode returns the steps after the last prefill step, their wall time
// (from the end of that prefill step to the end of the last step) and the
// bytes they read.
func (l *stepLog) decode() (steps int, d time.Duration, bytes int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	last := -1
	for i, p := range l.prefill {
		if p {
			last = i
		}
	}
	n := len(l.ends) - 1
	if last < 0 || n <= last {
		return 0, 0, 0
	}
	return n - last, l.ends[n].Sub(l.ends[last]), l.bytes[n] - l.bytes[last]
}

// generate prefills prompt and decodes gen tokens, greedily and without
// stopping at EOS; steps has recorded the engine's steps when it returns.
func (r *Result) generate(ctx context.Context, m *mmfp4.Model, prompt []int, gen int, steps *stepLog, log *progress) error {
	var mu sync.Mutex
	tokens := 0
	log.phase(fmt.Sprintf("prefill of %d tokens", len(prompt)), nil)
	decodeStart := time.Time{}
	res, err := m.Generate(ctx, prompt, mmfp4.GenerateOptions{MaxTokens: gen, StopIDs: []int{}, Sampling: sample.Options{},
		OnToken: func(int) error {
			mu.Lock()
			defer mu.Unlock()
			tokens++
			if tokens == 1 {
				decodeStart = time.Now()
				log.donef("")
				log.phase(fmt.Sprintf("decoding %d tokens", gen), func() string {
					mu.Lock()
					defer mu.Unlock()
					if tokens < 2 {
						return fmt.Sprintf("%d/%d", tokens, gen)
					}
					return fmt.Sprintf("%d/%d, %.2f tok/s", tokens, gen, float64(tokens-1)/time.Since(decodeStart).Seconds())
				})
			}
			return nil
		}})
	if err != nil {
		log.donef("failed")
		return err
	}
	r.PrefillS = res.PrefillTime.Seconds()
	r.PrefillTokS = res.PrefillTokensPerSecond()
	n, d, bytes := steps.decode()
	if n != len(res.Tokens)-1 {
		return fmt.Errorf("bench: %d decode steps ran for %d tokens after the first", n, len(res.Tokens)-1)
	}
	r.DecodeSteps, r.DecodeS = n, d.Seconds()
	if n > 0 && d > 0 {
		r.DecodeTokS = float64(n) / d.Seconds()
		r.BytesPerTok = bytes / int64(n)
	}
	log.donef("%.2f tok/s", r.DecodeTokS)
	return nil
}

// coldLoad drops the weight files from the page cache and times a load.
func coldLoad(o Options, files []string, log *progress) (*float64, string) {
	if err := dropCache(files); err != nil {
		return nil, "n/a: " + err.Error()
	}
	if f, ok := residentFraction(files); ok && f > 0.05 {
		return nil, fmt.Sprintf("n/a: %.0f%% of the pages stayed in the page cache", 100*f)
	}
	log.phase("loading (cold)", nil)
	m, err := mmfp4.Load(o.Dir, mmfp4.Options{Backend: cpu.New(cpu.Options{Threads: o.Threads}), MaxContext: o.Ctx + o.Gen})
	if err != nil {
		log.donef("failed")
		return nil, "n/a: " + err.Error()
	}
	s := m.LoadTime.Seconds()
	m.Close()
	log.donef("")
	return &s, ""
}

// weightFiles lists the model's safetensors files and their total size.
func weightFiles(dir string) ([]string, int64, error) {
	paths, err := filepath.Glob(filepath.Join(dir, "*.safetensors"))
	if err != nil {
		return nil, 0, err
	}
	if len(paths) == 0 {
		return nil, 0, fmt.Errorf("%s: no .safetensors files", dir)
	}
	var total int64
	for _, p := range paths {
		st, err := os.Stat(p)
		if err != nil {
			return nil, 0, err
		}
		total += st.Size()
	}
	return paths, total, nil
}

// preRead reads the files once, threads segments at a time.
func preRead(ctx context.Context, paths []string, threads int) error {
	// Each segment is read front to back through its own file handle: the
	// kernel's readahead then grows, and on kernels with large page-cache
	// folios the weights land in 2 MB folios, which the model's mapping
	// maps with one entry each. Two threads taking turns on 8 MB chunks of
	// one handle looked random to readahead and left 4 KB pages, over which
	// the routed experts of a decode step ran 4x slower on this VM.
	const chunk = 8 << 20
	type segment struct {
		path    string
		off, to int64
	}
	var segs []segment
	for _, p := range paths {
		st, err := os.Stat(p)
		if err != nil {
			return err
		}
		per := max(st.Size()/int64(threads), 256<<20)
		for off := int64(0); off < st.Size(); off += per {
			segs = append(segs, segment{p, off, min(off+per, st.Size())})
		}
	}
	jobs := make(chan segment)
	errs := make(chan error, threads)
	var wg sync.WaitGroup
	for range threads {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, chunk)
			for sg := range jobs {
				if err := readSegment(ctx, sg.path, sg.off, sg.to, buf); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	var err error
feed:
	for _, sg := range segs {
		select {
		case jobs <- sg:
		case err = <-errs:
			break feed
		case <-ctx.Done():
			err = ctx.Err()
			break feed
		}
	}
	close(jobs)
	wg.Wait()
	if err == nil {
		select {
		case err = <-errs:
		default:
		}
	}
	return err
}

// readSegment reads [off, to) of path in order, buf at a time.
func readSegment(ctx context.Context, path string, off, to int64, buf []byte) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	for ; off < to; off += int64(len(buf)) {
		if err := ctx.Err(); err != nil {
			return err
		}
		n := min(int64(len(buf)), to-off)
		if _, err := f.ReadAt(buf[:n], off); err != nil && !errors.Is(err, io.EOF) {
			return err
		}
	}
	return nil
}

// device names the CPU: the model name from /proc/cpuinfo where there is
// one, and the architecture.
func device() string {
	name := runtime.GOOS + "/" + runtime.GOARCH
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				name = strings.TrimSpace(v) + " (" + runtime.GOARCH + ")"
				break
			}
		}
	}
	return fmt.Sprintf("%s, %d cores", name, runtime.NumCPU())
}

func gib(n int64) string { return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30)) }
