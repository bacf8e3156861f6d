package sample

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
)

// logitsOf returns log-probabilities, so that softmax(logits) == p.
func logitsOf(p []float64) []float32 {
	l := make([]float32, len(p))
	for i, v := range p {
		l[i] = float32(math.Log(v))
	}
	return l
}

// refDist is a straightforward reference: full softmax at temperature t,
// full sort, then top-k, top-p and min-p exactly as documented. It returns
// the kept ids (best first) and their renormalised probabilities.
func refDist(logits []float32, o Options) ([]int, []float64) {
	n := len(logits)
	ids := make([]int, n)
	for i := range ids {
		ids[i] = i
	}
	slices.SortStableFunc(ids, func(a, b int) int {
		switch {
		case logits[a] > logits[b]:
			return -1
		case logits[a] < logits[b]:
			return 1
		}
		return 0
	})
	if o.TopK > 0 && o.TopK < n {
		ids = ids[:o.TopK]
	}
	lmax := float64(logits[ids[0]])
	p := make([]float64, len(ids))
	var z float64
	for i, id := range ids {
		p[i] = math.Exp((float64(logits[id]) - lmax) / float64(o.Temperature))
		z += p[i]
	}
	for i := range p {
		p[i] /= z
	}
	if o.TopP > 0 && o.TopP < 1 {
		var cum float64
		for i := range p {
			cum += p[i]
			if cum >= float64(o.TopP) {
				ids, p = ids[:i+1], p[:i+1]
				break
			}
		}
	}
	if o.MinP > 0 {
		k := 0
		for k < len(p) && p[k] >= float64(o.MinP)*p[0] {
			k++
		}
		ids, p = ids[:k], p[:k]
	}
	z = 0
	for _, v := range p {
		z += v
	}
	for i := range p {
		p[i] /= z
	}
	return ids, p
}

// keptSet runs the sampler's filter stage and returns the sorted ids kept.
func keptSet(t *testing.T, s *Sampler, logits []float32) []int {
	t.Helper()
	best, err := scan(logits)
	if err != nil {
		t.Fatal(err)
	}
	var out []int
	for _, id := range s.filter(logits, best) {
		out = append(out, int(id))
	}
	slices.Sort(out)
	return out
}

func sortedCopy(ids []int) []int {
	c := slices.Clone(ids)
	slices.Sort(c)
	return c
}

func mustNew(t testing.TB, o Options) *Sampler {
	t.Helper()
	s, err := New(o)
	if err != nil {
		t.Fatalf("New(%+v): %v", o, err)
	}
	return s
}

func TestGreedyArgmax(t *testing.T) {
	s := mustNew(t, Options{})
	cases := []struct {
		logits []float32
		want   int
	}{
		{[]float32{0}, 0},
		{[]float32{1, 3, 2}, 1},
		{[]float32{-5, -1, -3}, 1},
		{[]float32{2, 7, 7, 1}, 1},   // tie -> lowest id
		{[]float32{9, 9, 9}, 0},      // all tied
		{[]float32{-1e30, -1e31}, 0}, // very negative
		{[]float32{0, float32(math.Copysign(0, -1))}, 0},
	}
	for _, c := range cases {
		got, err := s.Sample(c.logits)
		if err != nil || got != c.want {
			t.Errorf("Sample(%v) = %d, %v; want %d", c.logits, got, err, c.want)
		}
	}

	r := rand.New(rand.NewPCG(1, 2))
	logits := make([]float32, 1000)
	for trial := 0; trial < 50; trial++ {
		for i := range logits {
			logits[i] = float32(r.NormFloat64())
		}
		want := 0
		for i, v := range logits {
			if v > logits[want] {
				want = i
			}
		}
		if got, _ := s.Sample(logits); got != want {
			t.Fatalf("trial %d: got %d, want %d", trial, got, want)
		}
	}
}

func TestGreedyNoAlloc(t *testing.T) {
	s := mustNew(t, Options{TopK: 5, TopP: 0.5, MinP: 0.1})
	logits := make([]float32, 4096)
	for i := range logits {
		logits[i] = float32(i % 97)
	}
	if a := testing.AllocsPerRun(100, func() {
		if _, err := s.Sample(logits); err != nil {
			t.Fatal(err)
		}
	}); a != 0 {
		t.Errorf("greedy Sample allocates %v times per call", a)
	}
}

func TestSamplingNoAllocAfterWarmup(t *testing.T) {
	logits := make([]float32, 4096)
	r := rand.New(rand.NewPCG(3, 4))
	for i := range logits {
		logits[i] = float32(r.NormFloat64() * 2)
	}
	for _, o := range []Options{
		{Temperature: 1},
		{Temperature: 0.7, TopK: 40},
		{Temperature: 0.7, TopP: 0.9},
		{Temperature: 0.7, MinP: 0.05},
		{Temperature: 0.8, TopK: 100, TopP: 0.95, MinP: 0.02},
	} {
		s := mustNew(t, o)
		if _, err := s.Sample(logits); err != nil {
			t.Fatal(err)
		}
		if a := testing.AllocsPerRun(50, func() { s.Sample(logits) }); a != 0 {
			t.Errorf("%+v: Sample allocates %v times per call after warm-up", o, a)
		}
	}
}

func TestSeedDeterminism(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	steps := make([][]float32, 200)
	for i := range steps {
		l := make([]float32, 1000)
		for j := range l {
			l[j] = float32(r.NormFloat64() * 0.5)
		}
		steps[i] = l
	}
	run := func(o Options) []int {
		s := mustNew(t, o)
		out := make([]int, len(steps))
		for i, l := range steps {
			id, err := s.Sample(l)
			if err != nil {
				t.Fatal(err)
			}
			out[i] = id
		}
		return out
	}
	for _, o := range []Options{
		{Temperature: 1, Seed: 42},
		{Temperature: 0.9, TopK: 50, Seed: 42},
		{Temperature: 1.2, TopP: 0.8, MinP: 0.1, Seed: 42},
	} {
		a, b := run(o), run(o)
		if !slices.Equal(a, b) {
			t.Errorf("%+v: same seed gave different sequences", o)
		}
		o2 := o
		o2.Seed++
		if c := run(o2); slices.Equal(a, c) {
			t.Errorf("%+v: seeds %d and %d gave the same sequence", o, o.Seed, o2.Seed)
		}
	}
}

// chiSquareCritical approximates the upper alpha=1e-4 quantile of the
// chi-square distribution with df degrees of freedom (Wilson-Hilferty).
func chiSquareCritical(df int) float64 {
	const z = 3.719 // standard normal upper 1e-4 quantile
	k := float64(df)
	a := 2 / (9 * k)
	return k * math.Pow(1-a+z*math.Sqrt(a), 3)
}

// checkFrequencies draws n tokens and compares the counts with the
// reference distribution: no token outside the kept set, a chi-square test
// over the kept set, and a 5-sigma per-token bound.
func checkFrequencies(t *testing.T, logits []float32, o Options, n int) {
	t.Helper()
	ids, p := refDist(logits, o)
	want := make(map[int]float64, len(ids))
	for i, id := range ids {
		want[id] = p[i]
	}
	s := mustNew(t, o)
	counts := make([]int, len(logits))
	for i := 0; i < n; i++ {
		id, err := s.Sample(logits)
		if err != nil {
			t.Fatal(err)
		}
		counts[id]++
	}
	var chi2 float64
	for id, c := range counts {
		q, ok := want[id]
		if !ok {
			if c != 0 {
				t.Errorf("%+v: token %d drawn %d times but is filtered out", o, id, c)
			}
			continue
		}
		e := float64(n) * q
		d := float64(c) - e
		chi2 += d * d / e
		if tol := 5 * math.Sqrt(float64(n)*q*(1-q)); math.Abs(d) > tol+1 {
			t.Errorf("%+v: token %d drawn %d times, expected %.1f ± %.1f", o, id, c, e, tol)
		}
	}
	if df := len(ids) - 1; df > 0 {
		if crit := chiSquareCritical(df); chi2 > crit {
			t.Errorf("%+v: chi-square %.2f > %.2f (df=%d)", o, chi2, crit, df)
		}
	}
}

func TestFrequenciesMatchSoftmax(t *testing.T) {
	logits := []float32{1.5, -0.3, 0.8, 2.1, 0.0, -1.2, 1.1, 0.4}
	const n = 200000
	for _, o := range []Options{
		{Temperature: 1, Seed: 1},
		{Temperature: 0.6, Seed: 2},
		{Temperature: 2.5, Seed: 3},
		{Temperature: 1, TopK: 5, Seed: 4},
		{Temperature: 1, TopP: 0.8, Seed: 5},
		{Temperature: 1.3, MinP: 0.3, Seed: 6},
		{Temperature: 0.9, TopK: 6, TopP: 0.9, MinP: 0.1, Seed: 7},
	} {
		checkFrequencies(t, logits, o, n)
	}
}

func TestTopKNeverOutside(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	logits := make([]float32, 2000)
	for i := range logits {
		// Coarse values produce many ties, exercising the id tie-break.
		logits[i] = float32(r.IntN(60)) / 10
	}
	for _, k := range []int{1, 2, 5, 40, 500, 1999, 2000, 5000} {
		o := Options{Temperature: 50, TopK: k, Seed: uint64(k)}
		ids, _ := refDist(logits, o)
		allowed := make(map[int]bool, len(ids))
		for _, id := range ids {
			allowed[id] = true
		}
		s := mustNew(t, o)
		if got, want := keptSet(t, s, logits), sortedCopy(ids); !slices.Equal(got, want) {
			t.Errorf("TopK=%d: kept %d ids, want %d (sets differ)", k, len(got), len(want))
		}
		for i := 0; i < 3000; i++ {
			id, err := s.Sample(logits)
			if err != nil {
				t.Fatal(err)
			}
			if !allowed[id] {
				t.Fatalf("TopK=%d: drew token %d (logit %g) outside the k best", k, id, logits[id])
			}
		}
	}
}

func TestTopPHandComputed(t *testing.T) {
	// Probabilities chosen so that no TopP below sits on a cumulative sum.
	probs := []float64{0.05, 0.30, 0.02, 0.40, 0.15, 0.08}
	logits := logitsOf(probs)
	order := make([]int, len(probs))
	for i := range order {
		order[i] = i
	}
	slices.SortFunc(order, func(a, b int) int {
		switch {
		case probs[a] > probs[b]:
			return -1
		case probs[a] < probs[b]:
			return 1
		}
		return 0
	})
	for _, topP := range []float32{0.01, 0.39, 0.41, 0.69, 0.71, 0.8, 0.86, 0.9, 0.94, 0.96, 0.99} {
		// Smallest prefix of decreasing probabilities reaching topP.
		var want []int
		var cum float64
		for _, id := range order {
			want = append(want, id)
			cum += probs[id]
			if cum >= float64(topP) {
				break
			}
		}
		slices.Sort(want)
		s := mustNew(t, Options{Temperature: 1, TopP: topP})
		if got := keptSet(t, s, logits); !slices.Equal(got, want) {
			t.Errorf("TopP=%g: kept %v, want %v", topP, got, want)
		}
	}
	// 0 and 1 disable the filter.
	for _, topP := range []float32{0, 1} {
		s := mustNew(t, Options{Temperature: 1, TopP: topP})
		if got := keptSet(t, s, logits); len(got) != len(probs) {
			t.Errorf("TopP=%g: kept %v, want all", topP, got)
		}
	}
}

func TestMinPHandComputed(t *testing.T) {
	probs := []float64{0.12, 0.45, 0.03, 0.2, 0.015, 0.185}
	logits := logitsOf(probs)
	pmax := slices.Max(probs)
	for _, minP := range []float32{0.01, 0.05, 0.1, 0.3, 0.42, 0.5, 0.9, 1} {
		var want []int
		for id, p := range probs {
			if p >= float64(minP)*pmax {
				want = append(want, id)
			}
		}
		s := mustNew(t, Options{Temperature: 1, MinP: minP})
		if got := keptSet(t, s, logits); !slices.Equal(got, want) {
			t.Errorf("MinP=%g: kept %v, want %v", minP, got, want)
		}
	}
}

func TestTemperatureChangesKeptSet(t *testing.T) {
	// At T=2 probabilities are proportional to sqrt(probs).
	probs := []float64{0.64, 0.16, 0.09, 0.04, 0.04, 0.03}
	logits := logitsOf(probs)
	const temp = 2
	q := make([]float64, len(probs))
	var z float64
	for i, p := range probs {
		q[i] = math.Pow(p, 1.0/temp)
		z += q[i]
	}
	for i := range q {
		q[i] /= z
	}
	// Top-p on the tempered distribution.
	const topP = 0.75
	var want []int
	var cum float64
	for _, id := range []int{0, 1, 2, 3, 4, 5} { // already in decreasing order
		want = append(want, id)
		cum += q[id]
		if cum >= topP {
			break
		}
	}
	s := mustNew(t, Options{Temperature: temp, TopP: topP})
	if got := keptSet(t, s, logits); !slices.Equal(got, want) {
		t.Errorf("T=%g TopP=%g: kept %v, want %v (tempered %v)", float64(temp), topP, got, want, q)
	}
	// Min-p on the tempered distribution.
	const minP = 0.3
	want = want[:0]
	for id, v := range q {
		if v >= minP*q[0] {
			want = append(want, id)
		}
	}
	s = mustNew(t, Options{Temperature: temp, MinP: minP})
	if got := keptSet(t, s, logits); !slices.Equal(got, want) {
		t.Errorf("T=%g MinP=%g: kept %v, want %v", float64(temp), minP, got, want)
	}
}

func TestFilterOrder(t *testing.T) {
	// Top-p is computed on the top-k renormalised distribution, and min-p
	// after top-p; compare with the reference for many random cases,
	// including vocabularies large enough for several nucleus rounds.
	r := rand.New(rand.NewPCG(9, 10))
	for trial := 0; trial < 400; trial++ {
		n := 1 + r.IntN(6000)
		logits := make([]float32, n)
		scale := []float64{0.1, 1, 4}[trial%3]
		for i := range logits {
			logits[i] = float32(r.NormFloat64() * scale)
		}
		o := Options{Temperature: float32(0.2 + 2*r.Float64())}
		if r.IntN(3) != 0 {
			o.TopP = float32(r.Float64())
		}
		if r.IntN(2) == 0 {
			o.TopK = 1 + r.IntN(n+10)
		}
		if r.IntN(3) != 0 {
			o.MinP = float32(r.Float64() * 0.5)
		}
		ids, _ := refDist(logits, o)
		s := mustNew(t, o)
		if got, want := keptSet(t, s, logits), sortedCopy(ids); !slices.Equal(got, want) {
			t.Fatalf("trial %d n=%d %+v: kept %d ids, want %d", trial, n, o, len(got), len(want))
		}
	}
}

func TestSelectTop(t *testing.T) {
	r := rand.New(rand.NewPCG(11, 12))
	for trial := 0; trial < 500; trial++ {
		n := 1 + r.IntN(3000)
		logits := make([]float32, n)
		levels := 1 + r.IntN(n+1) // few levels = many ties
		for i := range logits {
			logits[i] = float32(r.IntN(levels))
		}
		ref := make([]int32, n)
		for i := range ref {
			ref[i] = int32(i)
		}
		sortDesc(ref, logits)
		for _, k := range []int{1, r.IntN(n + 1), n / 2, n - 1} {
			ids := make([]int32, n)
			for i := range ids {
				ids[i] = int32(i)
			}
			r.Shuffle(n, func(i, j int) { ids[i], ids[j] = ids[j], ids[i] })
			selectTop(ids, k, logits)
			if k <= 0 || k > n {
				continue
			}
			got := slices.Clone(ids[:k])
			slices.Sort(got)
			want := slices.Clone(ref[:k])
			slices.Sort(want)
			if !slices.Equal(got, want) {
				t.Fatalf("trial %d n=%d k=%d: wrong top set", trial, n, k)
			}

			heap := make([]int32, k)
			topKHeap(heap, logits)
			slices.Sort(heap)
			if !slices.Equal(heap, want) {
				t.Fatalf("trial %d n=%d k=%d: heap gives wrong top set", trial, n, k)
			}
		}
	}
	// Ascending and descending logits: worst and best case for the heap.
	for _, asc := range []bool{true, false} {
		logits := make([]float32, 500)
		for i := range logits {
			logits[i] = float32(i)
			if !asc {
				logits[i] = -logits[i]
			}
		}
		heap := make([]int32, 7)
		topKHeap(heap, logits)
		slices.Sort(heap)
		want := []int32{0, 1, 2, 3, 4, 5, 6}
		if asc {
			want = []int32{493, 494, 495, 496, 497, 498, 499}
		}
		if !slices.Equal(heap, want) {
			t.Errorf("ascending=%v: heap gives %v, want %v", asc, heap, want)
		}
	}
}

func TestValidate(t *testing.T) {
	nan := float32(math.NaN())
	inf := float32(math.Inf(1))
	bad := []struct {
		o     Options
		field string
	}{
		{Options{Temperature: -0.1}, "Temperature"},
		{Options{Temperature: nan}, "Temperature"},
		{Options{Temperature: inf}, "Temperature"},
		{Options{TopK: -1}, "TopK"},
		{Options{TopP: -0.01}, "TopP"},
		{Options{TopP: 1.01}, "TopP"},
		{Options{TopP: nan}, "TopP"},
		{Options{MinP: -0.5}, "MinP"},
		{Options{MinP: 2}, "MinP"},
		{Options{MinP: nan}, "MinP"},
	}
	for _, c := range bad {
		err := c.o.Validate()
		if err == nil || !strings.Contains(err.Error(), c.field) {
			t.Errorf("Validate(%+v) = %v; want error naming %s", c.o, err, c.field)
		}
		if s, err := New(c.o); err == nil || s != nil {
			t.Errorf("New(%+v) = %v, %v; want error", c.o, s, err)
		}
	}
	good := []Options{
		{},
		{Temperature: 0.7, TopK: 40, TopP: 0.95, MinP: 0.05, Seed: 1},
		{Temperature: 1, TopP: 1, MinP: 1},
		{Temperature: 1e-6, TopP: 0},
	}
	for _, o := range good {
		if err := o.Validate(); err != nil {
			t.Errorf("Validate(%+v) = %v; want nil", o, err)
		}
	}
}

// Long rows go through scan's blocks of 8: the first non-finite value is
// reported wherever it is, and ties keep the lowest id across blocks.
func TestScanLongRows(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	row := make([]float32, 77)
	for i := range row {
		row[i] = float32(r.IntN(9)) // many ties
	}
	want := 0
	for i, v := range row {
		if v > row[want] {
			want = i
		}
	}
	if got, err := scan(row); err != nil || got != want {
		t.Fatalf("scan = %d, %v; want %d", got, err, want)
	}
	for _, bad := range []float32{float32(math.NaN()), float32(math.Inf(1)), float32(math.Inf(-1))} {
		for pos := range row {
			v := append([]float32(nil), row...)
			v[pos] = bad
			_, err := scan(v)
			if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("logits[%d]", pos)) {
				t.Fatalf("%v at %d: %v", bad, pos, err)
			}
		}
	}
}

func TestBadLogits(t *testing.T) {
	nan := float32(math.NaN())
	pinf := float32(math.Inf(1))
	ninf := float32(math.Inf(-1))
	for _, o := range []Options{{}, {Temperature: 1, TopK: 2, TopP: 0.9, MinP: 0.1}} {
		s := mustNew(t, o)
		for _, l := range [][]float32{
			nil,
			{},
			{nan},
			{1, nan, 2},
			{1, 2, nan},
			{pinf, 1},
			{1, ninf},
		} {
			if id, err := s.Sample(l); err == nil {
				t.Errorf("%+v: Sample(%v) = %d, nil; want error", o, l, id)
			}
		}
	}
}

func TestEdgeCases(t *testing.T) {
	// Single token, tiny temperature, TopP tiny: always the argmax.
	for _, o := range []Options{
		{Temperature: 1},
		{Temperature: 1e-30},
		{Temperature: 1, TopP: 1e-6},
		{Temperature: 1, TopK: 1},
		{Temperature: 1, MinP: 1},
	} {
		s := mustNew(t, o)
		if id, err := s.Sample([]float32{3}); err != nil || id != 0 {
			t.Errorf("%+v: single token: %d, %v", o, id, err)
		}
		if o.Temperature == 1 && o.TopP == 0 && o.TopK == 0 && o.MinP == 0 {
			continue
		}
		for i := 0; i < 100; i++ {
			if id, _ := s.Sample([]float32{0.5, 2, 1.9, -3}); id != 1 {
				t.Fatalf("%+v: got %d, want argmax 1", o, id)
			}
		}
	}
	// Extreme logit range: negligible tokens must never be drawn.
	s := mustNew(t, Options{Temperature: 1})
	for i := 0; i < 1000; i++ {
		if id, _ := s.Sample([]float32{-1e30, 0, 1e30, -1e30}); id != 2 {
			t.Fatalf("got %d, want 2", id)
		}
	}
	// Changing vocabulary size between calls.
	s = mustNew(t, Options{Temperature: 1, TopK: 3})
	for _, n := range []int{10, 1000, 5, 2000} {
		l := make([]float32, n)
		for i := range l {
			l[i] = float32(i)
		}
		if id, err := s.Sample(l); err != nil || id < n-3 {
			t.Errorf("n=%d: got %d, %v", n, id, err)
		}
	}
}

// Uniform followed by SampleWith is Sample: the same tokens from the same
// seed, whichever way each step is taken.
func TestSampleWithSharesTheStream(t *testing.T) {
	r := rand.New(rand.NewPCG(13, 14))
	for _, o := range []Options{
		{Seed: 3},
		{Temperature: 0.7, Seed: 3},
		{Temperature: 1.5, TopK: 40, TopP: 0.9, MinP: 0.05, Seed: 4},
	} {
		a, b := mustNew(t, o), mustNew(t, o)
		for step := 0; step < 200; step++ {
			l := make([]float32, 1+r.IntN(300))
			for i := range l {
				l[i] = float32(r.NormFloat64() * 2)
			}
			want, err := a.Sample(l)
			if err != nil {
				t.Fatal(err)
			}
			var u float64
			if b.NeedsUniform(len(l)) {
				u = b.Uniform()
			}
			if got, err := b.SampleWith(l, u); err != nil || got != want {
				t.Fatalf("%+v step %d: SampleWith %d, %v; Sample %d", o, step, got, err, want)
			}
		}
	}
}

// SampleWith maps u through the cumulative distribution of the kept tokens
// in id order (the contract a device sampler reproduces), whatever order
// top-k and top-p selection leave them in.
func TestSampleWithIsInverseCDFInIDOrder(t *testing.T) {
	r := rand.New(rand.NewPCG(15, 16))
	for trial := 0; trial < 300; trial++ {
		n := 1 + r.IntN(3000)
		if trial%10 == 0 {
			n = 5000 + r.IntN(15000) // past the sort: candidates put in order by a bitmap
		}
		logits := make([]float32, n)
		levels := 1 + r.IntN(n+1) // few levels = many ties
		for i := range logits {
			logits[i] = float32(r.IntN(levels)) * float32(0.05+r.Float64()*0.01)
		}
		o := Options{Temperature: float32(0.3 + 2*r.Float64())}
		if r.IntN(2) == 0 {
			o.TopK = 1 + r.IntN(n+5)
		}
		if r.IntN(2) == 0 {
			o.TopP = float32(r.Float64())
		}
		if r.IntN(2) == 0 {
			o.MinP = float32(r.Float64() * 0.3)
		}
		ids, p := refDist(logits, o)
		order := make([]int, len(ids))
		for i := range order {
			order[i] = i
		}
		slices.SortFunc(order, func(a, b int) int { return ids[a] - ids[b] })
		s := mustNew(t, o)
		for _, u := range []float64{0, 1e-12, r.Float64(), r.Float64(), r.Float64(), 1 - 1e-12} {
			var cum float64
			want := ids[order[len(order)-1]]
			for _, j := range order {
				cum += p[j]
				if u < cum {
					want = ids[j]
					break
				}
			}
			got, err := s.SampleWith(logits, u)
			if err != nil {
				t.Fatal(err)
			}
			if got != want && n > 1 {
				t.Fatalf("trial %d n=%d %+v u=%g: got %d, want %d", trial, n, o, u, got, want)
			}
		}
	}
}
