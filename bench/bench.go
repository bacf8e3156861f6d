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
	// CacheDType is the latent cache precision (zero value bf16); the CPU
	// run keeps its float32 per-layer cache whatever this says.
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

	PrefillS     float64 `json:"prefill_s"`
	PrefillTokS  float64 `json:"prefill_tok_s"`
	DecodeS      float64 `json:"decode_s"`
	DecodeSteps  int     `json:"decode_steps"`
	DecodeTokS   float64 `json:"decode_tok_s"`
	BytesPerTok  int64   `json:"bytes_per_token"`
	PeakRSS      int64   `json:"peak_rss_bytes"`
	KVCacheBytes int64   `json:"kv_cache_bytes"`
	RSSLimit     int64   `json:"rss_limit_bytes"` // 1.1 x model + KV cache

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
	opts := mmfp4.Options{Backend: b, MaxContext: o.Ctx + o.Gen, Engine: engine.Options{CacheDType: o.CacheDType}}
	log.phase("loading (warm)", nil)
	m, err := mmfp4.Load(o.Dir, opts)
	if err != nil {
		return nil, err
	}
	defer m.Close()
	r.LoadS = m.LoadTime.Seconds()
	log.donef("")
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
	// The CPU backend caches c and k_pe per layer and position in float32.
	r.KVCacheBytes = int64(cfg.NumLayers) * int64(o.Ctx+o.Gen) * int64(cfg.KVLoraRank+cfg.QKRopeHeadDim) * 4
	if gpu != nil {
		r.Backend = gpu.Name()
		r.KVCacheBytes = int64(cfg.NumLayers) * int64(o.Ctx+o.Gen) * int64(backend.CacheBytesPerToken(cfg.KVLoraRank, cfg.QKRopeHeadDim, o.CacheDType))
	}

	rng := rand.New(rand.NewPCG(o.Seed, 0x6d6d667034))
	prompt := make([]int, o.Ctx)
	for i := range prompt {
		prompt[i] = rng.IntN(cfg.VocabSize)
	}
	if err := r.generate(ctx, m, prompt, o.Gen, log); err != nil {
		return nil, err
	}
	r.PeakRSS = peakRSS()
	r.RSSLimit = int64(1.1*float64(modelBytes)) + r.KVCacheBytes
	if r.BandwidthGBs > 0 {
		r.RooflineFraction = r.DecodeTokS * float64(r.BytesPerTok) / (r.BandwidthGBs * 1e9)
	}
	r.ExpertCounts = counts
	return r, nil
}

// generate prefills prompt and decodes gen tokens, greedily and without
// stopping at EOS, counting the bytes the decode steps read.
func (r *Result) generate(ctx context.Context, m *mmfp4.Model, prompt []int, gen int, log *progress) error {
	var mu sync.Mutex
	tokens := 0
	var atFirst int64
	log.phase(fmt.Sprintf("prefill of %d tokens", len(prompt)), nil)
	decodeStart := time.Time{}
	res, err := m.Generate(ctx, prompt, mmfp4.GenerateOptions{MaxTokens: gen, StopIDs: []int{}, Sampling: sample.Options{},
		OnToken: func(int) error {
			mu.Lock()
			defer mu.Unlock()
			tokens++
			if tokens == 1 {
				atFirst = m.BytesRead()
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
	r.DecodeS = res.DecodeTime.Seconds()
	r.DecodeSteps = len(res.Tokens) - 1
	r.DecodeTokS = res.DecodeTokensPerSecond()
	if r.DecodeSteps > 0 {
		r.BytesPerTok = (m.BytesRead() - atFirst) / int64(r.DecodeSteps)
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

// preRead reads the files once, threads chunks at a time.
func preRead(ctx context.Context, paths []string, threads int) error {
	const chunk = 8 << 20
	type job struct {
		f   *os.File
		off int64
	}
	jobs := make(chan job)
	errs := make(chan error, threads)
	var wg sync.WaitGroup
	for range threads {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, chunk)
			for j := range jobs {
				if _, err := j.f.ReadAt(buf, j.off); err != nil && !errors.Is(err, io.EOF) {
					errs <- err
					return
				}
			}
		}()
	}
	var err error
	var open []*os.File
feed:
	for _, p := range paths {
		f, e := os.Open(p)
		if e != nil {
			err = e
			break
		}
		open = append(open, f)
		st, e := f.Stat()
		if e != nil {
			err = e
			break
		}
		for off := int64(0); off < st.Size(); off += chunk {
			select {
			case jobs <- job{f, off}:
			case e := <-errs:
				err = e
				break feed
			case <-ctx.Done():
				err = ctx.Err()
				break feed
			}
		}
	}
	close(jobs)
	wg.Wait()
	for _, f := range open {
		f.Close()
	}
	if err == nil {
		select {
		case err = <-errs:
		default:
		}
	}
	return err
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
