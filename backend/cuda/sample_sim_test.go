//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/sample"
)

// A step-by-step Go transcription of kernels/sample.cu (sample_rows), with
// its thread layout (1,024 threads, warps of 32) written out as loops and
// its sums taken in the kernel's order, so that the algorithm — the
// candidate bounds, the radix select, the top-p bisection and the
// inverse transform — is checked against package sample on the CPU,
// before and besides the GPU tests.

const (
	simThreads = 1024
	simWarps   = simThreads / 32
	simCap     = 2048
	simBuckets = 64
)

func simRankKey(f float32) uint32 {
	if f == 0 {
		f = 0
	}
	b := math.Float32bits(f)
	if b&0x80000000 != 0 {
		return ^b
	}
	return b | 0x80000000
}

func simKeyValue(k uint32) float32 {
	if k&0x80000000 != 0 {
		return math.Float32frombits(k & 0x7fffffff)
	}
	return math.Float32frombits(^k)
}

// simButterfly is warp_sum_d (float64) or warp_sum (float32) over 32 lane
// values: at offsets 16, 8, 4, 2, 1 each lane adds its partner's value.
func simButterfly[T float32 | float64](v []T) T {
	var a [32]T
	copy(a[:], v)
	for o := 16; o > 0; o >>= 1 {
		var b [32]T
		for l := range a {
			b[l] = a[l] + a[l^o]
		}
		a = b
	}
	return a[0]
}

// simBlockSum is sample_block_sum over per-thread values.
func simBlockSum(parts []float64) float64 {
	var warps [32]float64
	for w := 0; w < simWarps; w++ {
		warps[w] = simButterfly(parts[32*w : 32*w+32])
	}
	return simButterfly(warps[:])
}

// simWarpScan is warp_scan_d: an inclusive Hillis-Steele scan.
func simWarpScan(v []float64) [32]float64 {
	var a [32]float64
	copy(a[:], v)
	for o := 1; o < 32; o <<= 1 {
		b := a
		for l := o; l < 32; l++ {
			b[l] = a[l] + a[l-o]
		}
		a = b
	}
	return a
}

// simBlockScan is sample_block_scan: exclusive prefixes and the total.
func simBlockScan(v []float64) ([]float64, float64) {
	out := make([]float64, simThreads)
	var part [32]float64
	incl := make([][32]float64, simWarps)
	for w := 0; w < simWarps; w++ {
		incl[w] = simWarpScan(v[32*w : 32*w+32])
		part[w] = incl[w][31]
	}
	pi := simWarpScan(part[:])
	for w := 0; w < simWarps; w++ {
		pe := 0.0
		if w > 0 {
			pe = pi[w-1]
		}
		for l := 0; l < 32; l++ {
			ex := 0.0
			if l > 0 {
				ex = incl[w][l-1]
			}
			out[32*w+l] = pe + ex
		}
	}
	return out, pi[31]
}

func simChunk(m, lane int) (lo, hi int) {
	C := (m + 31) / 32
	lo = min(m, lane*C)
	return lo, min(m, lo+C)
}

func simChunkTotal(w []float64) float64 {
	var s [32]float64
	for l := range s {
		lo, hi := simChunk(len(w), l)
		for _, x := range w[lo:hi] {
			s[l] += x
		}
	}
	return simButterfly(s[:])
}

func simChunkFind(w []float64, x float64, strict bool) int {
	m := len(w)
	reach := func(c float64) bool { return c > x || (!strict && c >= x) }
	var s [32]float64
	for l := range s {
		lo, hi := simChunk(m, l)
		for _, v := range w[lo:hi] {
			s[l] += v
		}
	}
	incl := simWarpScan(s[:])
	for l := 0; l < 32; l++ {
		if !reach(incl[l]) {
			continue
		}
		c := 0.0
		if l > 0 {
			c = incl[l-1]
		}
		lo, _ := simChunk(m, l)
		for j := lo; j < m; j++ {
			c += w[j]
			if reach(c) {
				return j
			}
		}
		return -1
	}
	return -1
}

// simSelectKey is select_key: the r-th largest key and the rank left.
func simSelectKey(row []float32, r int) (uint32, int) {
	var prefix, mask uint32
	for shift := 24; shift >= 0; shift -= 8 {
		var hist [256]int
		for _, v := range row {
			if key := simRankKey(v); key&mask == prefix {
				hist[(key>>shift)&255]++
			}
		}
		b := 255
		for ; b > 0; b-- {
			if r <= hist[b] {
				break
			}
			r -= hist[b]
		}
		prefix |= uint32(b) << shift
		mask |= 255 << shift
	}
	return prefix, r
}

// simNth is nth_with_key.
func simNth(row []float32, K uint32, maxID, r int) int {
	c := 0
	for i, v := range row {
		if i <= maxID && simRankKey(v) == K {
			if c++; c == r {
				return i
			}
		}
	}
	return -1
}

// simFallbacks counts the top-p searches whose start had to fall back to
// key 0 (never, by the margin of the bound).
var simFallbacks []int

// simLarge counts the rows that took the multi-pass path.
var simLarge int

// simSample is sample_rows for one row.
func simSample(row []float32, p backend.SampleParams) int32 {
	n := len(row)
	bv, best := float32(math.Inf(-1)), n
	for i, v := range row {
		if v-v != 0 {
			return -1
		}
		if v > bv {
			bv, best = v, i
		}
	}
	if p.Temperature == 0 || n == 1 {
		return int32(best)
	}
	lmax := float64(row[best])
	invT := 1 / float64(p.Temperature)
	topK := p.TopK > 0 && p.TopK < n
	topP := p.TopP > 0 && p.TopP < 1
	minP := float64(p.MinP)
	k := n
	kk, ik := uint32(0), n-1
	if topK {
		k = p.TopK
		var r int
		kk, r = simSelectKey(row, k)
		ik = simNth(row, kk, n-1, r)
	}
	inK := func(key uint32, i int) bool { return key > kk || (key == kk && i <= ik) }
	scaled := func(v float32) float64 { return (float64(v) - lmax) * invT }
	strided := func(f func(i int, v float32) float64) float64 {
		parts := make([]float64, simThreads)
		for i, v := range row {
			parts[i%simThreads] += f(i, v)
		}
		return simBlockSum(parts)
	}

	z, lo := 0.0, -1e300
	if !(topP && k <= simCap) {
		if topP {
			var hist [simBuckets]uint64
			z = strided(func(i int, v float32) float64 {
				if inK(simRankKey(v), i) {
					t := scaled(v)
					w := math.Exp(t)
					b := simBuckets - 1
					if -t < simBuckets/4.0 {
						b = min(int(-t*4), simBuckets-1)
					}
					hist[b] += uint64(w*0x1p40) + 1
					return w
				}
				return 0
			})
			lo = math.Log((1-float64(p.TopP))*z) - math.Log(2*float64(n)) - 1e-6
			budget := uint64((1 - float64(p.TopP)) * z * 0.5 * 0x1p40)
			below, cut := uint64(0), simBuckets
			for cut > 1 && below+hist[cut-1] < budget {
				cut--
				below += hist[cut]
			}
			if cut < simBuckets {
				lo = math.Max(lo, -float64(cut)/4-1e-6)
			}
		}
		if minP > 0 {
			lo = math.Max(lo, math.Log(minP)-1e-6)
		}
	}
	type tok struct {
		l  float32
		id int
		w  float64
	}
	var gathered []tok
	kmin := uint32(math.MaxUint32)
	bounded := k <= simCap || lo > -1e300
	for i, v := range row {
		if key := simRankKey(v); bounded && inK(key, i) && scaled(v) >= lo {
			gathered = append(gathered, tok{l: v, id: i})
			kmin = min(kmin, key)
		}
	}
	if m := len(gathered); bounded && m <= simCap {
		slices.SortFunc(gathered, func(a, b tok) int {
			if a.l > b.l || (a.l == b.l && a.id < b.id) {
				return -1
			}
			return 1
		})
		w := make([]float64, m)
		for j := range gathered {
			w[j] = math.Exp(scaled(gathered[j].l))
			gathered[j].w = w[j]
		}
		cut := m
		if topP {
			if k <= simCap {
				z = simChunkTotal(w)
			}
			if j := simChunkFind(w, float64(p.TopP)*z, false); j >= 0 {
				cut = j + 1
			}
		}
		var surv []tok
		for j, t := range gathered {
			if j < cut && !(minP > 0 && !(t.w >= minP)) {
				surv = append(surv, t)
			}
		}
		slices.SortFunc(surv, func(a, b tok) int { return a.id - b.id })
		ws := make([]float64, len(surv))
		for j := range surv {
			ws[j] = surv[j].w
		}
		j := simChunkFind(ws, p.U*simChunkTotal(ws), true)
		if j < 0 {
			for q := range ws {
				if ws[q] != 0 {
					j = q
				}
			}
		}
		return int32(surv[j].id)
	}

	kp, ip := uint32(0), n-1
	if topP {
		target := float64(p.TopP) * z
		mass := func(K uint32) float64 {
			return strided(func(i int, v float32) float64 {
				if key := simRankKey(v); key >= K && inK(key, i) {
					return math.Exp(scaled(v))
				}
				return 0
			})
		}
		a := kmin
		if !(mass(a) >= target) {
			simFallbacks = append(simFallbacks, 0)
			a = 0
		}
		b := simRankKey(row[best]) + 1
		massB := 0.0
		for b-a > 1 {
			mid := a + (b-a)/2
			s := mass(mid)
			if s >= target {
				a = mid
			} else {
				b, massB = mid, s
			}
		}
		kp = a
		ties := 0
		for i, v := range row {
			if key := simRankKey(v); key == kp && inK(key, i) {
				ties++
			}
		}
		w := math.Exp(scaled(simKeyValue(kp)))
		j := ties
		if w > 0 {
			qa, qb := 0, ties
			for qb-qa > 1 {
				mid := qa + (qb-qa)/2
				if massB+float64(mid)*w >= target {
					qb = mid
				} else {
					qa = mid
				}
			}
			j0 := max(1, qb-2)
			acc := massB + float64(j0-1)*w
			for j = j0; j < ties; j++ {
				acc += w
				if acc >= target {
					break
				}
			}
		}
		maxID := n - 1
		if kp == kk {
			maxID = ik
		}
		ip = simNth(row, kp, maxID, max(1, min(j, ties)))
	}
	survives := func(key uint32, i int, w float64) bool {
		return inK(key, i) && (key > kp || (key == kp && i <= ip)) && !(minP > 0 && !(w >= minP))
	}
	simLarge++
	C := (n + simThreads - 1) / simThreads
	s := make([]float64, simThreads)
	last := -1
	for t := 0; t < simThreads; t++ {
		lo := min(n, t*C)
		for i := lo; i < min(n, lo+C); i++ {
			v := row[i]
			if w := math.Exp(scaled(v)); survives(simRankKey(v), i, w) && w != 0 {
				s[t] += w
				last = i
			}
		}
	}
	before, zs := simBlockScan(s)
	x := p.U * zs
	for t := 0; t < simThreads; t++ {
		if before[t]+s[t] > x {
			c := before[t]
			for i := min(n, t*C); i < n; i++ {
				v := row[i]
				if w := math.Exp(scaled(v)); survives(simRankKey(v), i, w) {
					if c += w; c > x {
						return int32(i)
					}
				}
			}
			return int32(last)
		}
	}
	return int32(last)
}

// The transcription of the kernel chooses package sample's token on the
// GPU tests' rows and settings, at vocabularies that keep it quick here
// (20,000 columns are past the kernel's shared-memory candidate set, so
// flat rows take its multi-pass path).
func TestSampleKernelAlgorithmMatchesHost(t *testing.T) {
	r := rand.New(rand.NewPCG(45, 46))
	bad := 0
	simLarge, simFallbacks = 0, nil
	for _, n := range []int{1, 7, 1000, 5000, 20000} {
		for _, kind := range sampleRows {
			row := kind.make(r, n)
			params := sampleSettings(r, n)
			if n > 1000 {
				// A sample of the grid, to keep the CPU time small.
				r.Shuffle(len(params), func(i, j int) { params[i], params[j] = params[j], params[i] })
				params = params[:40]
			}
			for _, p := range params {
				s, err := sample.New(sample.Options{Temperature: p.Temperature, TopK: p.TopK, TopP: p.TopP, MinP: p.MinP})
				if err != nil {
					t.Fatal(err)
				}
				want := int32(-1)
				if id, err := s.SampleWith(row, p.U); err == nil {
					want = int32(id)
				}
				if got := simSample(row, p); got != want {
					if bad++; bad <= 20 {
						t.Errorf("n=%d %s, %+v: kernel algorithm chose %d, package sample %d", n, kind.name, p, got, want)
					}
				}
			}
		}
	}
	if bad > 0 {
		t.Errorf("%d choices differ", bad)
	}
	if simLarge == 0 {
		t.Error("no case took the multi-pass path")
	}
	if len(simFallbacks) > 0 {
		t.Errorf("%d top-p searches could not start at the bound", len(simFallbacks))
	}
	t.Logf("%d rows took the multi-pass path", simLarge)
}

// The compare-exchange network of sort_gathered, transcribed: it sorts
// every power-of-two length up to the kernel's candidate capacity, by rank
// with ties to the lower id.
func TestSortGatheredNetwork(t *testing.T) {
	r := rand.New(rand.NewPCG(49, 50))
	for M := 1; M <= simCap; M *= 2 {
		key := make([]float32, M)
		id := make([]int, M)
		for i := range key {
			key[i] = float32(r.IntN(7))
			id[i] = r.IntN(1 << 20)
		}
		before := func(a, b int) bool { return key[a] > key[b] || (key[a] == key[b] && id[a] < id[b]) }
		for size := 2; size <= M; size <<= 1 {
			for stride := size >> 1; stride > 0; stride >>= 1 {
				for j := 0; j < M/2; j++ {
					a := 2*j - (j & (stride - 1))
					b := a + stride
					up := a&size == 0
					if (up && before(b, a)) || (!up && before(a, b)) {
						key[a], key[b] = key[b], key[a]
						id[a], id[b] = id[b], id[a]
					}
				}
			}
		}
		for i := 1; i < M; i++ {
			if before(i, i-1) {
				t.Fatalf("M=%d: not sorted at %d", M, i)
			}
		}
	}
}

// On a language-model-like row of GLM-4.7-Flash's vocabulary at T = 1,
// top-p 0.9 and 0.95 keep a few hundred tokens in practice, but the bound
// (1 - top_p) z / 2n alone keeps thousands, past the kernel's shared
// memory: the weight histogram's bound keeps the row on the one-pass path,
// and the choices stay package sample's.
func TestSampleKernelBucketBound(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	row := sampleRows[0].make(r, 154880)
	for _, topP := range []float32{0.9, 0.95} {
		for _, u := range []float64{0, 0.3, r.Float64(), 1 - 1e-6} {
			p := backend.SampleParams{Temperature: 1, TopP: topP, U: u}
			simLarge = 0
			got := simSample(row, p)
			if simLarge != 0 {
				t.Errorf("%+v: took the multi-pass path", p)
			}
			s, err := sample.New(sample.Options{Temperature: 1, TopP: topP})
			if err != nil {
				t.Fatal(err)
			}
			if want, _ := s.SampleWith(row, u); int(got) != want {
				t.Errorf("%+v: kernel algorithm chose %d, package sample %d", p, got, want)
			}
		}
	}
}
