//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"context"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"slices"
	"sort"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/engine"
	"github.com/mmfp4/mmfp4/sample"
)

// hostRowLogprobs is the plain definition of a row's log-probabilities at
// id: the float64 log-sum-exp with math.Exp, and the top k by a stable sort
// on the logit (ties to the lower id). ok is false for a row with a NaN or
// +Inf, or without a finite entry, which the kernel reports as bad.
func hostRowLogprobs(row []float32, id, k int) (lp backend.RowLogprobs, ok bool) {
	m := math.Inf(-1)
	for _, v := range row {
		if v != v || math.IsInf(float64(v), 1) {
			return lp, false
		}
		m = math.Max(m, float64(v))
	}
	if math.IsInf(m, -1) {
		return lp, false
	}
	var s float64
	for _, v := range row {
		s += math.Exp(float64(v) - m)
	}
	lse := m + math.Log(s)
	ids := make([]int, len(row))
	for i := range ids {
		ids[i] = i
	}
	sort.SliceStable(ids, func(a, b int) bool { return row[ids[a]] > row[ids[b]] })
	for _, i := range ids[:min(k, len(ids))] {
		lp.Top = append(lp.Top, backend.TokenLogprob{ID: i, Logprob: float32(float64(row[i]) - lse)})
	}
	lp.Chosen = float32(float64(row[id]) - lse)
	return lp, true
}

// logprobDiff is the largest difference between two rows' log-probabilities
// (0 where both are -Inf), or +Inf where their top ids differ.
func logprobDiff(got, want backend.RowLogprobs) float64 {
	d := func(a, b float32) float64 {
		if a == b {
			return 0
		}
		return math.Abs(float64(a) - float64(b))
	}
	worst := d(got.Chosen, want.Chosen)
	if len(got.Top) != len(want.Top) {
		return math.Inf(1)
	}
	for j := range got.Top {
		if got.Top[j].ID != want.Top[j].ID {
			return math.Inf(1)
		}
		worst = max(worst, d(got.Top[j].Logprob, want.Top[j].Logprob))
	}
	return worst
}

// logprobTolerance bounds the difference from the float64 reference: the
// device's sum is within about 1e-7 relative, and results of magnitude up
// to about 40 round to float32 2-4e-6 apart.
const logprobTolerance = 1e-5

// runLogprobKernel runs logprob_rows on rows (each of n logits, starting
// off floats into rows ld floats apart) with the given chosen ids and top
// counts (-1: none), and returns each row's record, poisoned before.
func runLogprobKernel(t *testing.T, g *Backend, host []float32, rows, ld, off, n int, ids, ks []int32) [][]int32 {
	t.Helper()
	out := make([]int32, rows*logprobRecordWords)
	err := g.Device().Do(func(cx *Ctx) error {
		lg, err := cx.Alloc(4 * len(host))
		if err != nil {
			return err
		}
		defer cx.Free(lg)
		in, err := cx.Alloc(4 * 2 * rows)
		if err != nil {
			return err
		}
		defer cx.Free(in)
		rec, err := cx.Alloc(4 * len(out))
		if err != nil {
			return err
		}
		defer cx.Free(rec)
		poison := make([]int32, len(out))
		for i := range poison {
			poison[i] = -7
		}
		if err := CopyIn(cx, lg.Ptr, host); err != nil {
			return err
		}
		if err := CopyIn(cx, in.Ptr, append(slices.Clone(ks), ids...)); err != nil {
			return err
		}
		if err := CopyIn(cx, rec.Ptr, poison); err != nil {
			return err
		}
		k, err := cx.Kernel("logprob", "logprob_rows")
		if err != nil {
			return err
		}
		if err := cx.Launch(k, D1(rows), D1(logprobThreads), 0, lg.At(4*off), ld, n, in, in.At(4*rows), rec); err != nil {
			return err
		}
		if err := cx.Sync(); err != nil {
			return err
		}
		return CopyOut(cx, out, rec.Ptr)
	})
	if err != nil {
		t.Fatal(err)
	}
	recs := make([][]int32, rows)
	for i := range recs {
		recs[i] = out[i*logprobRecordWords : (i+1)*logprobRecordWords]
	}
	return recs
}

// parseRecord reads a kernel record; bad is true for count -1.
func parseRecord(t *testing.T, r []int32) (lp backend.RowLogprobs, bad bool) {
	t.Helper()
	n := int(r[0])
	if n == -1 {
		return lp, true
	}
	if n < 0 || n > backend.MaxTopLogprobs {
		t.Fatalf("record count %d", n)
	}
	lp.Chosen = math.Float32frombits(uint32(r[1]))
	for j := range n {
		lp.Top = append(lp.Top, backend.TokenLogprob{ID: int(r[2+2*j]), Logprob: math.Float32frombits(uint32(r[3+2*j]))})
	}
	return lp, false
}

// logprobKernelRows are sampleRows and rows that only logprobs meet: most
// entries -Inf (fewer finite ones than the top asks for), every entry
// -Inf (bad), and logits of a large spread.
var logprobKernelRows = append(slices.Clone(sampleRows),
	sampleRow{"mostly -Inf", func(r *rand.Rand, n int) []float32 {
		l := make([]float32, n)
		for i := range l {
			l[i] = float32(math.Inf(-1))
		}
		for range 3 {
			l[r.IntN(n)] = float32(r.NormFloat64())
		}
		return l
	}},
	sampleRow{"all -Inf", func(r *rand.Rand, n int) []float32 {
		l := make([]float32, n)
		for i := range l {
			l[i] = float32(math.Inf(-1))
		}
		return l
	}},
	sampleRow{"wide", func(r *rand.Rand, n int) []float32 { return randVec(r, n, 30) }},
)

// The kernel gives the plain definition's top ids, in order, and
// log-probabilities within logprobTolerance, for vocabularies of 1 to
// GLM-4.7-Flash's 154,880 (aligned rows, and rows that take the scalar
// path, with and without a tail), ties, signed zeros, -Inf entries, k = 0, 1, 5 and 20, the chosen
// id anywhere in the row; rows with a NaN or +Inf, or no finite entry, are
// bad; rows that ask for nothing are not written.
func TestLogprobRowsMatchesHost(t *testing.T) {
	g, _ := testBackends(t, Options{})
	r := rand.New(rand.NewPCG(51, 52))
	worst := 0.0
	for _, n := range []int{1, 7, 1000, 1001, 154880} {
		for _, off := range []int{0, 1} {
			ld := (n + 4 + 3) &^ 3 // 16-byte rows: the vector path, with a tail where n%4 != 0
			rows := len(logprobKernelRows) * 5
			host := make([]float32, rows*ld)
			logits := make([][]float32, rows)
			ids, ks := make([]int32, rows), make([]int32, rows)
			for i := range rows {
				kind := logprobKernelRows[i/5]
				logits[i] = kind.make(r, n)
				copy(host[i*ld+off:], logits[i])
				ks[i] = []int32{0, 1, 5, 20, -1}[i%5]
				ids[i] = int32(r.IntN(n))
			}
			recs := runLogprobKernel(t, g, host, rows, ld, off, n, ids, ks)
			for i, rec := range recs {
				name := fmt.Sprintf("n=%d off=%d %s k=%d id=%d", n, off, logprobKernelRows[i/5].name, ks[i], ids[i])
				if ks[i] < 0 {
					if rec[0] != -7 || rec[1] != -7 {
						t.Errorf("%s: a row that asks for nothing was written: %v", name, rec[:2])
					}
					continue
				}
				got, bad := parseRecord(t, rec)
				want, ok := hostRowLogprobs(logits[i], int(ids[i]), int(ks[i]))
				if bad != !ok {
					t.Errorf("%s: device bad %v, host bad %v", name, bad, !ok)
					continue
				}
				if bad {
					continue
				}
				d := logprobDiff(got, want)
				if !(d <= logprobTolerance) {
					t.Errorf("%s: device %v %v, host %v %v", name, got.Chosen, got.Top, want.Chosen, want.Top)
				}
				worst = max(worst, d)
			}
		}
	}
	t.Logf("largest difference from the float64 reference: %.2g", worst)
}

// SampleRowsLogprobs chooses SampleRows' ids, and gives each row that asks
// the log-probabilities at its id; rows that do not ask get none, and a
// row with a NaN gets id -1 and none (the engine then reads its logits and
// reports it). Columns views and rows of a tensor of their own.
func TestSampleRowsLogprobs(t *testing.T) {
	g, _ := testBackends(t, Options{})
	r := rand.New(rand.NewPCG(53, 54))
	for _, n := range []int{1001, 154880} {
		const rows = 12
		g.SetBatch(simpleBatch(1, 1000), nil)
		wide := g.NewTensor(rows, n+5)
		host := make([]float32, rows*(n+5))
		logits := make([][]float32, rows)
		for i := range logits {
			logits[i] = sampleRows[i%7].make(r, n) // lm-like .. NaN
			copy(host[i*(n+5)+5:], logits[i])
		}
		g.Upload(wide, host)
		params := make([]backend.SampleParams, rows)
		for i := range params {
			params[i] = backend.SampleParams{Temperature: []float32{0, 0.7, 1.5}[i%3], TopK: []int{0, 40}[i%2], TopP: 0.9, U: r.Float64(),
				Logprobs: i%4 != 3, TopLogprobs: []int{0, 1, 5, 20}[i%4]}
		}
		view := g.Cols(wide, 5, n+5)
		plain := g.SampleRows(view, params)
		before := g.logprobRows
		ids, lps := g.SampleRowsLogprobs(view, params)
		if err := g.Sync(); err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(ids, plain) {
			t.Errorf("n=%d: ids %v, SampleRows %v", n, ids, plain)
		}
		asked := 0
		for i, p := range params {
			name := fmt.Sprintf("n=%d row %d (%s) %+v", n, i, sampleRows[i%7].name, p)
			if ok, _ := choiceMatches(t, logits[i], p, ids[i]); !ok {
				t.Errorf("%s: device chose %d, package sample %d", name, ids[i], hostChoice(t, logits[i], p))
			}
			if !p.Logprobs || ids[i] < 0 {
				if lps[i].Chosen != 0 || lps[i].Top != nil {
					t.Errorf("%s: log-probabilities %+v for a row without them", name, lps[i])
				}
				continue
			}
			asked++
			want, _ := hostRowLogprobs(logits[i], int(ids[i]), p.TopLogprobs)
			if d := logprobDiff(lps[i], want); !(d <= logprobTolerance) {
				t.Errorf("%s: device %v %v, host %v %v", name, lps[i].Chosen, lps[i].Top, want.Chosen, want.Top)
			}
		}
		if ids[6] != -1 {
			t.Errorf("n=%d: the NaN row got id %d", n, ids[6])
		}
		if g.logprobRows-before != asked || asked == 0 {
			t.Errorf("n=%d: %d rows with log-probabilities, want %d", n, g.logprobRows-before, asked)
		}
	}
}

// hostLogprobs is the GPU backend with its device sampler and the
// log-probabilities of the plain definition, from the downloaded logits.
type hostLogprobs struct{ *Backend }

func (h hostLogprobs) SampleRowsLogprobs(logits backend.Tensor, params []backend.SampleParams) ([]int32, []backend.RowLogprobs) {
	ids := h.SampleRows(logits, params)
	all, V := h.Download(logits), logits.Cols()
	lps := make([]backend.RowLogprobs, len(params))
	for i, p := range params {
		if p.Logprobs && ids[i] >= 0 {
			lps[i], _ = hostRowLogprobs(all[i*V:(i+1)*V], int(ids[i]), p.TopLogprobs)
		}
	}
	return ids, lps
}

// The engine on the GPU takes log-probabilities from the device: the
// tokens and the events' log-probabilities are those of the same forward
// passes with the log-probabilities computed on the host (within
// logprobTolerance), for greedy and seeded sampling, k = 0 to 20.
func TestEngineLogprobsOnDevice(t *testing.T) {
	g, _ := testBackends(t, Options{})
	ref := loadGolden(t)
	reqs := []engine.Request{
		{Logprobs: true},
		{Logprobs: true, TopLogprobs: 5, Sampling: sample.Options{Temperature: 1.2, TopK: 40, Seed: 7}},
		{TopLogprobs: 20, Sampling: sample.Options{Temperature: 0.8, TopP: 0.9, Seed: 3}},
		{TopLogprobs: 1},
		{},
	}
	const n = 16
	events := func(b backend.Backend) [][]engine.Event {
		net := loadOn(t, fixtureDir, b)
		e, err := engine.New(net, nil, nil, engine.Options{CacheBytes: 64 << 20, CacheDType: backend.CacheF32})
		if err != nil {
			t.Fatal(err)
		}
		defer e.Close()
		var streams []*engine.Stream
		for _, r := range reqs {
			r.Prompt, r.MaxTokens, r.StopIDs = ref.prompt, n, []int{}
			st, err := e.Submit(context.Background(), r)
			if err != nil {
				t.Fatal(err)
			}
			streams = append(streams, st)
		}
		var out [][]engine.Event
		for _, st := range streams {
			var evs []engine.Event
			for {
				ev, err := st.Recv(context.Background())
				if err == io.EOF {
					break
				}
				if err != nil {
					t.Fatal(err)
				}
				if ev.Done && ev.Finish != engine.FinishMaxTokens {
					t.Fatalf("finished %s: %v", ev.Finish, ev.Err)
				}
				if !ev.Done {
					evs = append(evs, ev)
				}
			}
			out = append(out, evs)
		}
		return out
	}
	before := g.logprobRows
	got := events(g)
	if g.logprobRows-before != 4*n {
		t.Errorf("the device computed log-probabilities for %d rows, want %d", g.logprobRows-before, 4*n)
	}
	want := events(hostLogprobs{g})
	worst := 0.0
	for i := range reqs {
		if len(got[i]) != n || len(want[i]) != n {
			t.Fatalf("request %d: %d and %d events", i, len(got[i]), len(want[i]))
		}
		for j, ge := range got[i] {
			we := want[i][j]
			d := logprobDiff(backend.RowLogprobs{Chosen: ge.Logprob, Top: ge.TopLogprobs}, backend.RowLogprobs{Chosen: we.Logprob, Top: we.TopLogprobs})
			if ge.Token != we.Token || !(d <= logprobTolerance) {
				t.Fatalf("request %d event %d: token %d logprob %v top %v; host log-probabilities: token %d %v %v",
					i, j, ge.Token, ge.Logprob, ge.TopLogprobs, we.Token, we.Logprob, we.TopLogprobs)
			}
			worst = max(worst, d)
		}
	}
	t.Logf("largest difference from the host's log-probabilities: %.2g", worst)
}

// BenchmarkLogprobRows times the log-probability kernel alone (device
// time per launch, between events) on rows of GLM-4.7-Flash's vocabulary,
// each in its own memory, for 1, 32 and 64 rows, k = 0 and 20.
func BenchmarkLogprobRows(b *testing.B) {
	d := benchDevice(b)
	r := rand.New(rand.NewPCG(55, 56))
	const n = 154880
	row := sampleRows[0].make(r, n)
	for _, rows := range []int{1, 32, 64} {
		for _, k := range []int32{0, 20} {
			b.Run(fmt.Sprintf("rows=%d/k=%d", rows, k), func(b *testing.B) {
				host := make([]float32, rows*n)
				for i := range rows {
					copy(host[i*n:], row)
				}
				in := make([]int32, 2*rows)
				for i := range rows {
					in[i], in[rows+i] = k, 5
				}
				err := d.Do(func(cx *Ctx) error {
					lg, err := cx.Alloc(4 * len(host))
					if err != nil {
						return err
					}
					defer cx.Free(lg)
					ib, err := cx.Alloc(4 * len(in))
					if err != nil {
						return err
					}
					defer cx.Free(ib)
					rec, err := cx.Alloc(4 * logprobRecordWords * rows)
					if err != nil {
						return err
					}
					defer cx.Free(rec)
					kern, err := cx.Kernel("logprob", "logprob_rows")
					if err != nil {
						return err
					}
					if err := CopyIn(cx, lg.Ptr, host); err != nil {
						return err
					}
					if err := CopyIn(cx, ib.Ptr, in); err != nil {
						return err
					}
					launch := func() error {
						return cx.Launch(kern, D1(rows), D1(logprobThreads), 0, lg, n, n, ib, ib.At(4*rows), rec)
					}
					if err := launch(); err != nil { // warm-up
						return err
					}
					const reps = 20
					ms, err := timeDevice(cx, reps, 1, launch)
					if err != nil {
						return err
					}
					out := make([]int32, logprobRecordWords)
					if err := CopyOut(cx, out, rec.Ptr); err != nil {
						return err
					}
					want, _ := hostRowLogprobs(row, 5, int(k))
					if got := math.Float32frombits(uint32(out[1])); out[0] != k || math.Abs(float64(got-want.Chosen)) > logprobTolerance {
						return fmt.Errorf("record %v, want %d entries and %v", out[:2], k, want.Chosen)
					}
					us := float64(ms) * 1e3 / reps
					b.ReportMetric(us, "us/launch")
					b.ReportMetric(float64(4*n*rows)/us/1e3, "GB/s")
					return nil
				})
				if err != nil {
					b.Fatal(err)
				}
			})
		}
	}
}
