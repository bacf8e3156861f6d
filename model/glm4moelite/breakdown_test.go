package glm4moelite

import (
	"fmt"
	"math"
	"os"
	"runtime/pprof"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/backend/cpu"
	"github.com/mmfp4/mmfp4/internal/benchmode"
)

// timedBackend wraps a backend and adds up the wall time of each op, keyed
// by op and weight shape: where the milliseconds of a step go.
type timedBackend struct {
	backend.Backend
	spent map[string]time.Duration
	calls map[string]int
}

func (b *timedBackend) time(key string, t0 time.Time) {
	b.spent[key] += time.Since(t0)
	b.calls[key]++
}

func wshape(w backend.Weight) string { return fmt.Sprintf("%dx%d", w.Rows(), w.Cols()) }

func (b *timedBackend) Embed(dst backend.Tensor, table backend.Weight) {
	defer b.time("Embed", time.Now())
	b.Backend.Embed(dst, table)
}
func (b *timedBackend) MatMul(dst, x backend.Tensor, w backend.Weight) {
	defer b.time("MatMul "+wshape(w), time.Now())
	b.Backend.MatMul(dst, x, w)
}
func (b *timedBackend) RMSNorm(dst, x backend.Tensor, gain backend.Weight, eps float32) {
	defer b.time("RMSNorm", time.Now())
	b.Backend.RMSNorm(dst, x, gain, eps)
}
func (b *timedBackend) RoPE(x backend.Tensor, heads, headStride, offset, dim int, theta float64, interleaved bool) {
	defer b.time("RoPE", time.Now())
	b.Backend.RoPE(x, heads, headStride, offset, dim, theta, interleaved)
}
func (b *timedBackend) Add(dst, a, c backend.Tensor) {
	defer b.time("Add", time.Now())
	b.Backend.Add(dst, a, c)
}
func (b *timedBackend) SwiGLU(dst, gate, up backend.Tensor) {
	defer b.time("SwiGLU", time.Now())
	b.Backend.SwiGLU(dst, gate, up)
}
func (b *timedBackend) CacheWrite(layer int, latent, kpe backend.Tensor) {
	defer b.time("CacheWrite", time.Now())
	b.Backend.CacheWrite(layer, latent, kpe)
}
func (b *timedBackend) AbsorbQuery(qlat, q backend.Tensor, wUK backend.Weight, s backend.MLAShape) {
	defer b.time("AbsorbQuery "+wshape(wUK), time.Now())
	b.Backend.AbsorbQuery(qlat, q, wUK, s)
}
func (b *timedBackend) LatentAttention(olat, qlat, q backend.Tensor, layer int, s backend.MLAShape, scale float32) {
	defer b.time("LatentAttention", time.Now())
	b.Backend.LatentAttention(olat, qlat, q, layer, s, scale)
}
func (b *timedBackend) ExpandValues(out, olat backend.Tensor, wUV backend.Weight, s backend.MLAShape) {
	defer b.time("ExpandValues "+wshape(wUV), time.Now())
	b.Backend.ExpandValues(out, olat, wUV, s)
}
func (b *timedBackend) Route(logits backend.Tensor, bias backend.Weight, cfg backend.RouterConfig) backend.Routing {
	defer b.time("Route", time.Now())
	return b.Backend.Route(logits, bias, cfg)
}
func (b *timedBackend) MoE(dst, x backend.Tensor, r backend.Routing, experts []backend.Expert) {
	defer b.time("MoE (routed experts)", time.Now())
	b.Backend.MoE(dst, x, r, experts)
}
func (b *timedBackend) MoEShared(dst, x backend.Tensor, r backend.Routing, experts, shared []backend.Expert) {
	sm, ok := b.Backend.(backend.SharedMoE)
	if !ok { // what the model does without it
		b.MoE(dst, x, r, experts)
		for _, s := range shared {
			b.Add(dst, dst, backend.RunExpert(b, x, s))
		}
		return
	}
	defer b.time("MoE (routed and shared experts)", time.Now())
	sm.MoEShared(dst, x, r, experts, shared)
}
func (b *timedBackend) NewTensor(rows, cols int) backend.Tensor {
	defer b.time("NewTensor", time.Now())
	return b.Backend.NewTensor(rows, cols)
}
func (b *timedBackend) SetBatch(batch *backend.Batch, pool backend.CachePool) {
	defer b.time("SetBatch", time.Now())
	b.Backend.SetBatch(batch, pool)
}
func (b *timedBackend) SelectOutputs(dst, x backend.Tensor) {
	defer b.time("SelectOutputs", time.Now())
	b.Backend.SelectOutputs(dst, x)
}
func (b *timedBackend) Sync() error {
	defer b.time("Sync", time.Now())
	return b.Backend.Sync()
}
func (b *timedBackend) Download(src backend.Tensor) []float32 {
	defer b.time("Download", time.Now())
	return b.Backend.Download(src)
}

// BenchmarkDecodeStepBreakdown decodes like BenchmarkDecodeStep (the
// default kernel family) and prints, for the fastest of its steps, the wall
// time of each op: the per-step profile of a decode at real shapes.
func BenchmarkDecodeStepBreakdown(b *testing.B) {
	benchmode.Check(b)
	const layers, ctx = 4, 1024
	c := glmFlashConfig(layers)
	tb := &timedBackend{Backend: cpu.New(cpu.Options{}), spent: map[string]time.Duration{}, calls: map[string]int{}}
	m := synthModel(b, tb, c, 1)
	s, err := m.NewState(ctx+1, backend.CacheBF16)
	if err != nil {
		b.Fatal(err)
	}
	fillCache(tb, m, s, ctx)
	breakdown(b, tb, fmt.Sprintf("decode, %d layers, ctx %d", layers, ctx), func(i int) {
		s.Pos = ctx
		if _, err := m.ForwardSeq(s, []int{i % c.VocabSize}, false); err != nil {
			b.Fatal(err)
		}
	})
}

// BenchmarkPrefillBreakdown is BenchmarkDecodeStepBreakdown for a prompt of
// 512 tokens.
func BenchmarkPrefillBreakdown(b *testing.B) {
	benchmode.Check(b)
	const layers, T = 4, 512
	c := glmFlashConfig(layers)
	tb := &timedBackend{Backend: cpu.New(cpu.Options{}), spent: map[string]time.Duration{}, calls: map[string]int{}}
	m := synthModel(b, tb, c, 1)
	ids := make([]int, T)
	for i := range ids {
		ids[i] = (i * 7919) % c.VocabSize
	}
	breakdown(b, tb, fmt.Sprintf("prefill of %d tokens, %d layers", T, layers), func(int) {
		s, err := m.NewState(T, backend.CacheBF16)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := m.ForwardSeq(s, ids, false); err != nil {
			b.Fatal(err)
		}
	})
}

// breakdown runs step b.N+1 times (the first one warms the backend's
// arena) and prints the ops' wall times of the fastest run.
func breakdown(b *testing.B, tb *timedBackend, what string, step func(i int)) {
	var best map[string]time.Duration
	bestTotal := time.Duration(math.MaxInt64)
	var calls map[string]int
	b.ResetTimer()
	for i := 0; i <= b.N; i++ {
		tb.spent, tb.calls = map[string]time.Duration{}, map[string]int{}
		t0 := time.Now()
		step(i)
		if d := time.Since(t0); i > 0 && d < bestTotal {
			bestTotal, best, calls = d, tb.spent, tb.calls
		}
	}
	var keys []string
	var inOps time.Duration
	for k, d := range best {
		keys = append(keys, k)
		inOps += d
	}
	sort.Slice(keys, func(i, j int) bool { return best[keys[i]] > best[keys[j]] })
	var w strings.Builder
	fmt.Fprintf(&w, "fastest %s: %.2f ms (%s):\n", what, bestTotal.Seconds()*1e3, tb.Name())
	for _, k := range keys {
		fmt.Fprintf(&w, "  %-32s %3d calls %8.3f ms %5.1f%%\n", k, calls[k], best[k].Seconds()*1e3, 100*best[k].Seconds()/bestTotal.Seconds())
	}
	fmt.Fprintf(&w, "  %-32s           %8.3f ms %5.1f%%\n", "(between ops)", (bestTotal-inOps).Seconds()*1e3, 100*(bestTotal-inOps).Seconds()/bestTotal.Seconds())
	fmt.Fprint(os.Stderr, w.String())
}

// BenchmarkDecodeStepBreakdownDir is BenchmarkDecodeStepBreakdown on a model
// directory named by MMFP4_BENCH_MODEL (for example the output of `mmfp4
// synth --preset glm-4.7-flash`), with its weights memory-mapped as `mmfp4
// bench` has them. It prints the mean wall time of each op per step, over
// b.N steps at ctx 1024.
func BenchmarkDecodeStepBreakdownDir(b *testing.B) {
	benchmode.Check(b)
	dir := os.Getenv("MMFP4_BENCH_MODEL")
	if dir == "" {
		b.Skip("MMFP4_BENCH_MODEL names no model directory")
	}
	const ctx = 1024
	// MMFP4_BENCH_FIXED_ROUTE=1 routes every token to experts 0-3 of each
	// layer (the router still runs), so the routed experts' pages are the
	// same every step: the step without the first touches of pages unused
	// for a while (docs/perf.md, 2026-11-28 (4)).
	var opts cpu.Options
	if os.Getenv("MMFP4_BENCH_FIXED_ROUTE") == "1" {
		opts.OnRoute = func(ids []int) {
			for i := range ids {
				ids[i] = i % 4
			}
		}
	}
	tb := &timedBackend{Backend: cpu.New(opts), spent: map[string]time.Duration{}, calls: map[string]int{}}
	m, err := Load(dir, tb, LoadOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	s, err := m.NewState(ctx+b.N+2, backend.CacheBF16)
	if err != nil {
		b.Fatal(err)
	}
	// A 128-token prefill first maps every expert's pages into the
	// process (each chosen about 8 times), as a prompt does before decode.
	warm := make([]int, 128)
	for i := range warm {
		warm[i] = (i * 104729) % m.Config.VocabSize
	}
	if _, err := m.ForwardSeq(s, warm, false); err != nil {
		b.Fatal(err)
	}
	fillCache(tb, m, s, ctx)
	step := func(i int) {
		if _, err := m.ForwardSeq(s, []int{(i * 7919) % m.Config.VocabSize}, false); err != nil {
			b.Fatal(err)
		}
	}
	step(0) // warms the arena
	tb.spent, tb.calls = map[string]time.Duration{}, map[string]int{}
	// MMFP4_BENCH_CPUPROFILE names a file for a CPU profile of the timed
	// decode steps alone (-test.cpuprofile also takes in the setup's
	// prefill).
	if path := os.Getenv("MMFP4_BENCH_CPUPROFILE"); path != "" {
		f, err := os.Create(path)
		if err != nil {
			b.Fatal(err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		defer pprof.StopCPUProfile()
	}
	b.ResetTimer()
	t0 := time.Now()
	for i := 1; i <= b.N; i++ {
		step(i)
	}
	total := time.Since(t0)
	var keys []string
	var inOps time.Duration
	for k, d := range tb.spent {
		keys = append(keys, k)
		inOps += d
	}
	sort.Slice(keys, func(i, j int) bool { return tb.spent[keys[i]] > tb.spent[keys[j]] })
	n := float64(b.N)
	var w strings.Builder
	fmt.Fprintf(&w, "mean decode step of %s at ctx %d: %.2f ms over %d steps (%s):\n", dir, ctx, total.Seconds()*1e3/n, b.N, tb.Name())
	for _, k := range keys {
		fmt.Fprintf(&w, "  %-32s %5.0f calls %8.3f ms %5.1f%%\n", k, float64(tb.calls[k])/n, tb.spent[k].Seconds()*1e3/n, 100*tb.spent[k].Seconds()/total.Seconds())
	}
	fmt.Fprintf(&w, "  %-32s             %8.3f ms %5.1f%%\n", "(between ops)", (total-inOps).Seconds()*1e3/n, 100*(total-inOps).Seconds()/total.Seconds())
	fmt.Fprint(os.Stderr, w.String())
}
