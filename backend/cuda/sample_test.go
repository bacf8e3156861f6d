//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/mmfp4/mmfp4"
	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/engine"
	"github.com/mmfp4/mmfp4/sample"
)

// sampleRow is one kind of logits row for the sampler tests.
type sampleRow struct {
	name string
	make func(r *rand.Rand, n int) []float32
}

var sampleRows = []sampleRow{
	{"lm-like", func(r *rand.Rand, n int) []float32 {
		// Broad noise and a handful of clearly preferred tokens.
		l := randVec(r, n, 2)
		for i := 0; i < min(20, n/4); i++ {
			l[r.IntN(n)] = float32(12 + r.Float64()*6)
		}
		return l
	}},
	{"ties", func(r *rand.Rand, n int) []float32 {
		// Five levels: ties everywhere, the maximum included.
		l := make([]float32, n)
		for i := range l {
			l[i] = float32(r.IntN(5)) * 0.75
		}
		return l
	}},
	{"peaked", func(r *rand.Rand, n int) []float32 {
		l := randVec(r, n, 1)
		l[r.IntN(n)] = 40
		return l
	}},
	{"flat", func(r *rand.Rand, n int) []float32 { return make([]float32, n) }},
	{"near-flat", func(r *rand.Rand, n int) []float32 { return randVec(r, n, 1e-3) }},
	{"signed zeros", func(r *rand.Rand, n int) []float32 {
		// +0 and -0 compare equal: ties broken by id, as on the host.
		l := make([]float32, n)
		for i := range l {
			switch r.IntN(3) {
			case 0:
				l[i] = float32(math.Copysign(0, -1))
			case 1:
				l[i] = -1
			}
		}
		return l
	}},
	{"NaN", func(r *rand.Rand, n int) []float32 {
		l := randVec(r, n, 2)
		l[r.IntN(n)] = float32(math.NaN())
		return l
	}},
	{"+Inf", func(r *rand.Rand, n int) []float32 {
		l := randVec(r, n, 2)
		l[r.IntN(n)] = float32(math.Inf(1))
		return l
	}},
	{"-Inf", func(r *rand.Rand, n int) []float32 {
		l := randVec(r, n, 2)
		l[n-1] = float32(math.Inf(-1))
		return l
	}},
}

// sampleSettings is the grid of settings each row is sampled with: every
// temperature, top-k, top-p and min-p of the grid, each with several u.
func sampleSettings(r *rand.Rand, n int) []backend.SampleParams {
	var out []backend.SampleParams
	for _, temp := range []float32{0, 0.7, 1.5} {
		for _, k := range []int{0, 1, 40, 3000, n} {
			for _, topP := range []float32{0.1, 0.9, 1} {
				for _, minP := range []float32{0, 0.05} {
					us := []float64{0, 1e-9, r.Float64(), r.Float64(), r.Float64(), 1 - 1e-6}
					if temp == 0 {
						us = us[2:3]
					}
					for _, u := range us {
						out = append(out, backend.SampleParams{Temperature: temp, TopK: k, TopP: topP, MinP: minP, U: u})
					}
				}
			}
		}
	}
	return out
}

// hostChoice is package sample's choice, or -1 where it reports
// non-finite logits.
func hostChoice(t testing.TB, logits []float32, p backend.SampleParams) int32 {
	t.Helper()
	s, err := sample.New(sample.Options{Temperature: p.Temperature, TopK: p.TopK, TopP: p.TopP, MinP: p.MinP})
	if err != nil {
		t.Fatal(err)
	}
	id, err := s.SampleWith(logits, p.U)
	if err != nil {
		return -1
	}
	return int32(id)
}

// roundingTolerance is how far (relative to 1) the device's u times the
// survivors' weight may sit from the host's, for a differing choice to
// count as a rounding difference: the device sums the weights in another
// order than the host (about 1e-13 relative apart for 154,880 terms, and
// at most 154,880 x 2^-53 = 1.7e-11), which matters only where u lands on
// the boundary between two tokens (where the row's tail of tiny weights
// is, the boundaries are about 1e-11 apart).
const roundingTolerance = 2e-11

// choiceMatches compares the device's choice with package sample's: equal,
// or (rounding) between the host's choices for u moved by the tolerance
// either way, in id order.
func choiceMatches(t testing.TB, logits []float32, p backend.SampleParams, got int32) (ok, rounding bool) {
	t.Helper()
	if got == hostChoice(t, logits, p) {
		return true, false
	}
	if p.Temperature == 0 || got < 0 {
		return false, false
	}
	lo, hi := p, p
	lo.U = max(0, p.U-roundingTolerance)
	hi.U = min(math.Nextafter(1, 0), p.U+roundingTolerance)
	ok = hostChoice(t, logits, lo) <= got && got <= hostChoice(t, logits, hi)
	return ok, ok
}

// The device sampler chooses package sample's token for every row, setting
// and u: vocabularies of 1 to GLM-4.7-Flash's 154,880, ties, signed zeros,
// peaked and flat rows (the latter take the kernel's path for large
// candidate sets), and rows with a NaN or an infinity (-1).
func TestSampleRowsMatchesHost(t *testing.T) {
	g, _ := testBackends(t, Options{})
	r := rand.New(rand.NewPCG(41, 42))
	bad, rounding := 0, 0
	for _, n := range []int{1, 7, 1000, 154880} {
		for _, kind := range sampleRows {
			row := kind.make(r, n)
			params := sampleSettings(r, n)
			g.SetBatch(simpleBatch(1, 1000), nil)
			one := g.NewTensor(1, n)
			g.Upload(one, row)
			// Every setting samples the same row: a view whose rows are
			// all that row (ld 0).
			src := asTensor(one)
			got := g.SampleRows(&tensor{rows: len(params), cols: n, ld: 0, ptr: src.ptr}, params)
			if err := g.Sync(); err != nil {
				t.Fatalf("n=%d %s: %v", n, kind.name, err)
			}
			for i, p := range params {
				ok, r := choiceMatches(t, row, p, got[i])
				if r {
					rounding++
					t.Logf("n=%d %s, %+v: device chose %d, package sample %d: u is within %.0e of their boundary", n, kind.name, p, got[i], hostChoice(t, row, p), roundingTolerance)
				}
				if !ok {
					if bad++; bad <= 20 {
						t.Errorf("n=%d %s, %+v: device chose %d, package sample %d", n, kind.name, p, got[i], hostChoice(t, row, p))
					}
				}
			}
			t.Logf("n=%d %s: %d settings", n, kind.name, len(params))
		}
	}
	if bad > 0 {
		t.Errorf("%d choices differ", bad)
	}
	// Boundaries are rare: a handful in these rows' tails at most.
	if rounding > 5 {
		t.Errorf("%d choices differ within the rounding tolerance: more than rounding explains", rounding)
	}
}

// Rows of one tensor (its own row stride, a column view of a wider one,
// vocabularies that do not allow 16-byte loads) each get their own choice.
func TestSampleRowsDistinctRows(t *testing.T) {
	g, _ := testBackends(t, Options{})
	r := rand.New(rand.NewPCG(43, 44))
	for _, n := range []int{7, 1000, 1001, 154880} {
		const rows = 12
		g.SetBatch(simpleBatch(1, 1000), nil)
		wide := g.NewTensor(rows, n+5)
		host := make([]float32, rows*(n+5))
		logits := make([][]float32, rows)
		for i := range logits {
			logits[i] = sampleRows[i%6].make(r, n)
			copy(host[i*(n+5)+5:], logits[i])
		}
		g.Upload(wide, host)
		params := make([]backend.SampleParams, rows)
		for i := range params {
			params[i] = backend.SampleParams{Temperature: []float32{0, 0.7, 1.5}[i%3], TopK: []int{0, 40}[i%2], TopP: []float32{1, 0.9}[i/6], MinP: 0.05, U: r.Float64()}
		}
		got := g.SampleRows(g.Cols(wide, 5, n+5), params)
		if err := g.Sync(); err != nil {
			t.Fatal(err)
		}
		for i, p := range params {
			if ok, r := choiceMatches(t, logits[i], p, got[i]); !ok || r {
				t.Logf("n=%d row %d %+v: device chose %d, package sample %d (rounding: %v)", n, i, p, got[i], hostChoice(t, logits[i], p), r)
				if !ok {
					t.Fail()
				}
			}
		}
	}
	// Settings for another number of rows than the tensor's: an error.
	g.SetBatch(simpleBatch(1, 1000), nil)
	g.SampleRows(g.NewTensor(2, 10), make([]backend.SampleParams, 3))
	if err := g.Sync(); err == nil {
		t.Error("3 settings for 2 rows: no error")
	}
}

// hostSampled is the GPU backend with package sample as its sampler: the
// same forward pass, with each row's token chosen on the host from the
// downloaded logits.
type hostSampled struct{ *Backend }

func (h hostSampled) SampleRows(logits backend.Tensor, params []backend.SampleParams) []int32 {
	all, V := h.Download(logits), logits.Cols()
	ids := make([]int32, len(params))
	for i, p := range params {
		s, err := sample.New(sample.Options{Temperature: p.Temperature, TopK: p.TopK, TopP: p.TopP, MinP: p.MinP})
		if err != nil {
			panic(err)
		}
		id, err := s.SampleWith(all[i*V:(i+1)*V], p.U)
		if err != nil {
			id = -1
		}
		ids[i] = int32(id)
	}
	return ids
}

// Generation on the GPU, whose tokens the device sampler chooses (what
// `mmfp4 generate --device cuda` runs), gives the tokens that package
// sample chooses from the same GPU logits, and the CPU's tokens: greedy,
// and seeded sampling with and without filters. The cache is float32, so
// that GPU and CPU logits differ by summation order only (a bf16 cache
// can turn a last-bit difference into a percent, see above, and move a
// sampled token).
func TestGenerateSampledOnGPUMatchesCPU(t *testing.T) {
	g, c := testBackends(t, Options{})
	ref := loadGolden(t)
	load := func(b backend.Backend) *mmfp4.Model {
		m, err := mmfp4.Load(fixtureDir, mmfp4.Options{Backend: b, Engine: engine.Options{CacheBytes: 64 << 20, CacheDType: backend.CacheF32}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close() })
		return m
	}
	mg, mh, mc := load(g), load(hostSampled{g}), load(c)
	for _, so := range []sample.Options{
		{},
		{Temperature: 0.8, Seed: 7},
		{Temperature: 1.5, TopK: 40, TopP: 0.9, MinP: 0.05, Seed: 11},
		{Temperature: 1, TopP: 0.5, Seed: 12},
	} {
		gen := func(m *mmfp4.Model) []int {
			res, err := m.Generate(context.Background(), ref.prompt, mmfp4.GenerateOptions{MaxTokens: 32, StopIDs: []int{}, Sampling: so})
			if err != nil {
				t.Fatal(err)
			}
			return res.Tokens
		}
		name := fmt.Sprintf("%+v", so)
		before := g.sampledRows
		got := gen(mg)
		if g.sampledRows-before < len(got) || len(got) != 32 {
			t.Errorf("%s: the device sampler chose %d of %d tokens", name, g.sampledRows-before, len(got))
		}
		if host := gen(mh); !slices.Equal(got, host) {
			t.Errorf("%s: device sampler %v, package sample on the same logits %v", name, got, host)
		}
		if cpu := gen(mc); !slices.Equal(got, cpu) {
			t.Errorf("%s: GPU %v, CPU %v", name, got, cpu)
		} else {
			t.Logf("%s: %d tokens identical on GPU and CPU", name, len(got))
		}
	}
}

// BenchmarkSampleRows times the sampling kernel alone (device time per
// launch, between events) on rows of GLM-4.7-Flash's vocabulary, each in
// its own memory, for one row and for 32.
func BenchmarkSampleRows(b *testing.B) {
	d := benchDevice(b)
	r := rand.New(rand.NewPCG(47, 48))
	const n = 154880
	lm, flat := sampleRows[0].make(r, n), sampleRows[4].make(r, n)
	cases := []struct {
		name string
		row  []float32
		p    backend.SampleParams
	}{
		{"greedy", lm, backend.SampleParams{}},
		{"temp0.8", lm, backend.SampleParams{Temperature: 0.8, U: 0.5}},
		{"topk40", lm, backend.SampleParams{Temperature: 0.8, TopK: 40, U: 0.5}},
		{"topp0.95", lm, backend.SampleParams{Temperature: 1, TopP: 0.95, U: 0.5}},
		{"minp0.05", lm, backend.SampleParams{Temperature: 0.8, MinP: 0.05, U: 0.5}},
		{"topk40-topp0.95-minp0.05", lm, backend.SampleParams{Temperature: 0.8, TopK: 40, TopP: 0.95, MinP: 0.05, U: 0.5}},
		{"near-flat-topp0.95", flat, backend.SampleParams{Temperature: 1, TopP: 0.95, U: 0.5}},
	}
	for _, rows := range []int{1, 32} {
		for _, c := range cases {
			b.Run(fmt.Sprintf("rows=%d/%s", rows, c.name), func(b *testing.B) {
				params := make([]backend.SampleParams, rows)
				for i := range params {
					params[i] = c.p
				}
				host := make([]float32, rows*n)
				for i := 0; i < rows; i++ {
					copy(host[i*n:], c.row)
				}
				err := d.Do(func(cx *Ctx) error {
					lg, err := cx.Alloc(4 * len(host))
					if err != nil {
						return err
					}
					defer cx.Free(lg)
					pp, err := cx.Alloc(4 * sampleRecordWords * rows)
					if err != nil {
						return err
					}
					defer cx.Free(pp)
					ids, err := cx.Alloc(4 * rows)
					if err != nil {
						return err
					}
					defer cx.Free(ids)
					k, err := cx.Kernel("sample", "sample_rows")
					if err != nil {
						return err
					}
					if err := errors.Join(CopyIn(cx, lg.Ptr, host), CopyIn(cx, pp.Ptr, sampleRecords(params))); err != nil {
						return err
					}
					launch := func() error { return cx.Launch(k, D1(rows), D1(sampleThreads), 0, lg, n, n, pp, ids) }
					if err := launch(); err != nil { // warm-up
						return err
					}
					const reps = 20
					ms, err := timeDevice(cx, reps, 1, launch)
					if err != nil {
						return err
					}
					got := make([]int32, rows)
					if err := CopyOut(cx, got, ids.Ptr); err != nil {
						return err
					}
					if want := hostChoice(b, c.row, c.p); got[0] != want {
						return fmt.Errorf("device chose %d, package sample %d", got[0], want)
					}
					b.ReportMetric(float64(ms)*1e3/reps, "us/launch")
					return nil
				})
				if err != nil {
					b.Fatal(err)
				}
			})
		}
	}
}
