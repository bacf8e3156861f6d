//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"runtime"
	"slices"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/backend/cpu"
)

// servePromptStep is a serving step's sequences: decode rows first (one
// row after prefix positions each), then prompts of n rows from an empty
// cache, as the engine schedules them.
func servePromptStep(decodes []int, prompts, n int) []flashSeq {
	var seqs []flashSeq
	for _, p := range decodes {
		seqs = append(seqs, flashSeq{p, 1})
	}
	for i := 0; i < prompts; i++ {
		seqs = append(seqs, flashSeq{0, n})
	}
	return seqs
}

// A serving step of short prompts and a few decode rows takes the flash
// kernel when no block's sequences add up to more than flashMixedTiles
// cache tiles, and its output matches the CPU backend (within the bf16
// cache's flash bound); one with decode rows of long contexts stays on
// the split kernels, and matches the CPU too.
func TestServeMixedFlashMatchesCPU(t *testing.T) {
	g, _ := testBackends(t, Options{})
	c := cpu.New(cpu.Options{Threads: runtime.NumCPU()})
	s := backend.MLAShape{Heads: 20, NopeDim: 192, RopeDim: 64, VDim: 256, Rank: 512}
	cases := []struct {
		seqs  []flashSeq
		flash bool
	}{
		{servePromptStep([]int{17, 40, 63, 64, 80}, 27, 16), true},
		{servePromptStep([]int{3, 90}, 9, 16), true},
		{append(servePromptStep(nil, 4, 16), flashSeq{100, 3}, flashSeq{30, 1}), true},
		{servePromptStep([]int{1000, 1100, 1200, 1300, 1400, 1500, 1600, 1700}, 2, 16), false},
		{servePromptStep([]int{1000, 1100, 1200, 1300, 1400, 1500, 1600, 1700}, 5, 16), false},
		{servePromptStep([]int{20, 30, 40, 47, 47, 47, 47, 47, 47, 47, 47, 47, 47, 47, 47, 47, 47, 47, 47, 47, 47, 47, 47, 47, 47, 47, 47, 47, 47, 47, 47, 47}, 0, 0), false},
	}
	for i, cs := range cases {
		_, step, _ := flashBatches(cs.seqs, 16)
		if g.flashUse(step) {
			t.Fatalf("case %d: flashUse takes a step with decode rows", i)
		}
		if got := g.flashMixedUse(step); got != cs.flash {
			t.Fatalf("case %d (%d rows): flashMixedUse %v, want %v", i, step.Rows(), got, cs.flash)
		}
		seed := uint64(300 + i)
		want := flashRun(t, c, cs.seqs, s, backend.CacheBF16, seed)
		got := flashRun(t, g, cs.seqs, s, backend.CacheBF16, seed)
		bound := 1e-5
		if cs.flash {
			bound = flashBound(flashFormName)
		} else if step.Rows() <= decodeAttnRows {
			bound = decodeBF16Bound() // decode_mma's form
		}
		e := maxRelErr(want, got)
		if !(e <= bound) {
			t.Errorf("case %d (%d rows, flash %v): max relative error %.3e above %.0e", i, step.Rows(), cs.flash, e, bound)
		}
		t.Logf("case %d: %d rows, flash %v, max rel err %.2e", i, step.Rows(), cs.flash, e)
	}
}

// Decode steps of 2-44 rows of short contexts take decode_mma in blocks
// of 8 heads with one split (rowsOneSplit): against the CPU, and bit for
// bit the all-heads kernel with one split in the same form (blocks of all
// heads have no two-part form, decodeMMABF2); 64 rows, or a context past
// decodeOneSplitMaxN, do not.
func TestServeDecodeOneSplitMatchesCPU(t *testing.T) {
	g, c := testBackends(t, Options{})
	bf2 := decodeMMABF2
	defer func() { decodeMMABF2, decodeSplitsFixed = bf2, 0 }()
	r := testRand(t)
	s := backend.MLAShape{Heads: 20, NopeDim: 192, RopeDim: 64, VDim: 256, Rank: 512}
	qk := s.NopeDim + s.RopeDim
	const blockSize = 16
	for _, T := range []int{2, 8, 16, 24, 32, 44} {
		lens := make([]int, T)
		for i := range lens {
			lens[i] = 1 + r.IntN(decodeOneSplitMaxN)
		}
		prefill, tables, blocks := attnSeqs(r, lens, blockSize)
		P := prefill.Rows()
		lat, kpe := randVec(r, P*s.Rank, 1), randVec(r, P*s.RopeDim, 1)
		ql, q := randVec(r, T*s.Heads*s.Rank, 1), randVec(r, T*s.Heads*qk, 1)
		which := make([]int, T)
		for i := range which {
			which[i] = i
		}
		step := decodeBatch(lens, tables, which)
		op := func(b backend.Backend) []float32 {
			pool, err := b.NewCachePool(1, blocks, blockSize, s.Rank, s.RopeDim, backend.CacheBF16)
			if err != nil {
				t.Fatal(err)
			}
			b.SetBatch(prefill, pool)
			lt, kt := b.NewTensor(P, s.Rank), b.NewTensor(P, s.RopeDim)
			b.Upload(lt, lat)
			b.Upload(kt, kpe)
			b.CacheWrite(0, lt, kt)
			b.SetBatch(step, pool)
			qt, qmt, ol := b.NewTensor(T, s.Heads*s.Rank), b.NewTensor(T, s.Heads*qk), b.NewTensor(T, s.Heads*s.Rank)
			b.Upload(qt, ql)
			b.Upload(qmt, q)
			b.Upload(ol, nanVec(T*s.Heads*s.Rank))
			b.LatentAttention(ol, qt, qmt, 0, s, 0.07)
			return b.Download(ol)
		}
		g.SetBatch(step, nil)
		if !g.rowsOneSplit(T, s) {
			t.Fatalf("%d rows: rowsOneSplit false", T)
		}
		g.SetBatch(decodeBatch(append(slices.Repeat([]int{decodeOneSplitMaxN + 1}, 1), lens[1:]...), tables, which), nil)
		if g.rowsOneSplit(T, s) {
			t.Fatalf("%d rows, a context of %d: rowsOneSplit true", T, decodeOneSplitMaxN+1)
		}
		name := fmt.Sprintf("decode attention, %d rows, blocks of 8 heads, one split", T)
		compareOp(t, g, c, name, decodeBF16Bound(), op)
		decodeMMABF2 = false
		got := op(g)
		decodeSplitsFixed = 1
		want := op(g)
		decodeSplitsFixed, decodeMMABF2 = 0, bf2
		mustSameBits(t, name, got, want)
	}
	g.SetBatch(simpleBatch(64, 0), nil)
	if g.rowsOneSplit(64, s) {
		t.Fatal("64 rows: rowsOneSplit true")
	}
}

// BenchmarkServeAttention times one layer's attention of serving steps
// (device time of back-to-back launches, the cache rotated over layers
// beyond L2): decode steps of 8-32 rows by the split target and merge,
// and steps of short prompts with and without a few decode rows (the
// split kernels, or the flash kernel).
func BenchmarkServeAttention(b *testing.B) {
	d := benchDevice(b)
	type variant struct {
		name string
		set  func(g *Backend)
	}
	defer func(m int) { flashMixedTiles = m }(flashMixedTiles)
	mixedVars := []variant{{"split_kernels", func(*Backend) { flashMixedTiles = 0 }}, {"flash", func(*Backend) { flashMixedTiles = 1 << 20 }}}
	type bcase struct {
		name string
		seqs []flashSeq
		vars []variant
	}
	var decodeVars []variant
	for _, pct := range []int{50, 100} {
		for _, m := range []struct {
			name  string
			merge int
		}{{"auto", mergeAuto}, {"launch", mergeLaunch}} {
			decodeVars = append(decodeVars, variant{fmt.Sprintf("b%d_%s", pct, m.name), func(g *Backend) { g.decodeBlocks, g.decodeMerge = pct, m.merge }})
		}
	}
	var cases []bcase
	for _, T := range []int{8, 16} {
		for _, n := range []int{48, 128, 512} {
			cases = append(cases, bcase{fmt.Sprintf("decode_rows%d_ctx%d", T, n), servePromptStep(slices.Repeat([]int{n - 1}, T), 0, 0), decodeVars})
		}
	}
	cases = append(cases, bcase{"decode_rows32_ctx48", servePromptStep(slices.Repeat([]int{47}, 32), 0, 0), decodeVars[2:3]},
		bcase{"mixed_5x40_27x16", servePromptStep([]int{17, 40, 63, 64, 80}, 27, 16), mixedVars},
		bcase{"prompts_32x16", servePromptStep(nil, 32, 16), mixedVars[1:]})
	for _, cs := range cases {
		for _, v := range cs.vars {
			b.Run(cs.name+"/"+v.name, func(b *testing.B) {
				serveAttnBench(b, d, cs.seqs, v.set)
			})
		}
	}
}

func serveAttnBench(b *testing.B, d *Device, seqs []flashSeq, set func(g *Backend)) {
	g := NewOnDevice(d, Options{NoGraphs: true})
	defer g.Close()
	set(g)
	s := backend.MLAShape{Heads: 20, NopeDim: 192, RopeDim: 64, VDim: 256, Rank: 512}
	width := s.Rank + s.RopeDim
	const blockSize = 64
	_, step, blocks := flashBatches(seqs, blockSize)
	layers := max(2, (128<<20)/(blocks*blockSize*2*width))
	pool, err := g.NewCachePool(layers, blocks, blockSize, s.Rank, s.RopeDim, backend.CacheBF16)
	if err != nil {
		b.Fatal(err)
	}
	r := rand.New(rand.NewPCG(13, 13))
	cp := pool.(*cachePool)
	// bf16 normal values, a table of 4096 read in a scrambled order (fast
	// to fill: the pool is over 100 MB).
	var tbl [4096]uint16
	for i := range tbl {
		tbl[i] = uint16(math.Float32bits(float32(r.NormFloat64())) >> 16)
	}
	bits := make([]uint16, layers*blocks*blockSize*width)
	for i := range bits {
		bits[i] = tbl[(i*7+i>>12)&4095]
	}
	g.SetBatch(step, pool)
	T := step.Rows()
	ql, q, ol := g.NewTensor(T, s.Heads*s.Rank), g.NewTensor(T, s.Heads*(s.NopeDim+s.RopeDim)), g.NewTensor(T, s.Heads*s.Rank)
	g.Upload(ql, randVec(r, T*s.Heads*s.Rank, 1))
	g.Upload(q, randVec(r, T*s.Heads*(s.NopeDim+s.RopeDim), 1))
	if err := errors.Join(g.Sync(), d.Do(func(c *Ctx) error { return CopyIn(c, cp.buf.Ptr, bits) })); err != nil {
		b.Fatal(err)
	}
	fns := attentionLaunches(g, ol, ql, q, layers, s)
	us, err := timeRotated(d, fns, 100)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(us, "us/call")
	b.Logf("%d rows: %.2f us/call (%d layers rotated)", T, us, layers)
}

// BenchmarkServeStreamPlans times the dense streaming products of a
// 32-row serving step (o_proj, q_b, q_a, the value expansion's per-head
// product) over launch plans (D groups in flight, KS blocks over K), the
// chosen plan first, to see whether the plans' split of K still fits.
func BenchmarkServeStreamPlans(b *testing.B) {
	d := benchDevice(b)
	r := rand.New(rand.NewPCG(9, 9))
	cases := []struct {
		name        string
		n, k, heads int
	}{
		{"o_proj_2048x5120", 2048, 5120, 1},
		{"q_b_5120x768", 5120, 768, 1},
		{"q_a_768x2048", 768, 2048, 1},
		{"values_20x256x512", 5120, 512, 20},
	}
	sms, optin := d.Info().SMs, d.Info().SharedOptin
	const T = 32
	for _, cs := range cases {
		var q *QMatrix
		if err := d.Do(func(c *Ctx) error {
			var err error
			q, err = c.UploadMatrix(synthMatrix(r, cs.n, cs.k, 128))
			return err
		}); err != nil {
			b.Fatal(err)
		}
		rows := cs.n / cs.heads
		chosen := PlanStream(rows, cs.k, cs.heads, T, sms, optin)
		plans := []StreamPlan{chosen}
		for _, D := range []int{1, 2} {
			for _, KS := range []int{1, 2, 3, 4, 5, 8, 10, 16, 20} {
				p := StreamPlan{D: D, KS: KS}
				if p != chosen && (cs.k/128)%D == 0 && KS <= cs.k/128/D && streamShared(streamTiles(T), cs.k, p) <= optin &&
					cs.heads*((rows+127)/128) <= streamCounters {
					plans = append(plans, p)
				}
			}
		}
		for i, p := range plans {
			tag := ""
			if i == 0 {
				tag = "_chosen"
			}
			b.Run(fmt.Sprintf("%s/T%d/D%d_KS%d%s", cs.name, T, p.D, p.KS, tag), func(b *testing.B) {
				err := d.Do(func(c *Ctx) error {
					xb, err1 := upload(c, randVec(r, T*cs.k*cs.heads, 1))
					a, err2 := c.NewQActs(T, cs.k*cs.heads, 128)
					y, err3 := c.Alloc(4 * T * cs.n)
					part, err4 := c.Alloc(4 * p.KS * T * cs.n)
					cnt, err5 := c.Alloc(4 * streamCounters)
					if err := errors.Join(err1, err2, err3, err4, err5); err != nil {
						return err
					}
					defer func() { c.Free(xb); c.FreeQActs(a); c.Free(y); c.Free(part); c.Free(cnt) }()
					if err := errors.Join(c.Memset(cnt.Ptr, 0, cnt.Size), c.RMSNormQuant(xb.Ptr, cs.k*cs.heads, 0, 0, 0, 0, T, cs.k*cs.heads, 128, a)); err != nil {
						return err
					}
					return benchUsPerOp(b, c, 1, func() error {
						if cs.heads > 1 {
							return c.MatMulStreamHeads(y.Ptr, cs.n, q, a, cs.heads, p, part.Ptr, cnt.Ptr)
						}
						return c.MatMulStream(y.Ptr, cs.n, q, a, p, part.Ptr, cnt.Ptr)
					})
				})
				if err != nil {
					b.Fatal(err)
				}
			})
		}
	}
}
