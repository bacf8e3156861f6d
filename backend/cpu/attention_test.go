package cpu

import (
	"math/rand/v2"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
)

// attnCase is one batch for the attention tests: per sequence, the number
// of cached positions and of new rows.
type attnCase struct {
	name  string
	seqs  [][2]int
	bs    int // cache block size
	dtype backend.CacheDType
}

// runAttention fills a pool of the case's dtype with random latents (the
// cached positions in one step, then the new rows), then runs
// LatentAttention of the new rows on each backend of bs; it returns each
// backend's output.
func runAttention(t *testing.T, bs []*Backend, c attnCase, s backend.MLAShape, r *rand.Rand) [][]float32 {
	t.Helper()
	blocksOf := func(n int) int { return (n + c.bs - 1) / c.bs }
	total := 0
	for _, sq := range c.seqs {
		total += blocksOf(sq[0] + sq[1])
	}
	perm := r.Perm(total) // scattered block tables
	var tables [][]int32
	for _, sq := range c.seqs {
		var tb []int32
		for range blocksOf(sq[0] + sq[1]) {
			tb = append(tb, int32(perm[0]))
			perm = perm[1:]
		}
		tables = append(tables, tb)
	}
	p, err := bs[0].NewCachePool(2, total, c.bs, s.Rank, s.RopeDim, c.dtype)
	if err != nil {
		t.Fatal(err)
	}
	step := func(b *Backend, cached bool) *backend.Batch {
		batch := &backend.Batch{}
		for i, sq := range c.seqs {
			from, n := sq[0], sq[1]
			if cached {
				from, n = 0, sq[0]
			}
			if n == 0 {
				continue
			}
			batch.Seqs = append(batch.Seqs, backend.Seq{Start: len(batch.Tokens), Len: n, Blocks: tables[i]})
			for j := from; j < from+n; j++ {
				batch.Tokens = append(batch.Tokens, 0)
				batch.Positions = append(batch.Positions, int32(j))
			}
		}
		if err := batch.Validate(1, total, c.bs); err != nil {
			t.Fatal(err)
		}
		b.SetBatch(batch, p)
		return batch
	}
	anyCached := false
	for _, sq := range c.seqs {
		anyCached = anyCached || sq[0] > 0
	}
	for _, cached := range []bool{true, false} {
		if cached && !anyCached {
			continue
		}
		b := bs[0]
		batch := step(b, cached)
		lt, kt := b.NewTensor(batch.Rows(), s.Rank), b.NewTensor(batch.Rows(), s.RopeDim)
		b.Upload(lt, randMat(r, batch.Rows()*s.Rank, 1))
		b.Upload(kt, randMat(r, batch.Rows()*s.RopeDim, 1))
		b.CacheWrite(1, lt, kt)
	}
	T := 0
	for _, sq := range c.seqs {
		T += sq[1]
	}
	qlat := randMat(r, T*s.Heads*s.Rank, 0.1)
	q := randMat(r, T*s.Heads*(s.NopeDim+s.RopeDim), 0.1)
	var outs [][]float32
	for _, b := range bs {
		step(b, false)
		qlt, qt, out := b.NewTensor(T, s.Heads*s.Rank), b.NewTensor(T, s.Heads*(s.NopeDim+s.RopeDim)), b.NewTensor(T, s.Heads*s.Rank)
		b.Upload(qlt, qlat)
		b.Upload(qt, q)
		b.LatentAttention(out, qlt, qt, 1, s, 0.3)
		if err := b.Sync(); err != nil {
			t.Fatal(err)
		}
		outs = append(outs, b.Download(out))
	}
	return outs
}

// The SIMD latent attention against the Go reference loop: decode rows
// (whose positions are split over the threads), several sequences in one
// batch, prefill chunks (the matrix-product path), every cache dtype, and
// block sizes and shapes that leave partial blocks of four positions and
// partial vectors.
func TestLatentAttentionSIMDMatchesGo(t *testing.T) {
	r := rand.New(rand.NewPCG(40, 1))
	ref := New(Options{Threads: 2, Kernel: "go"})
	shapes := []backend.MLAShape{
		{Heads: 5, NopeDim: 8, RopeDim: 12, VDim: 8, Rank: 40},
		{Heads: 5, NopeDim: 8, RopeDim: 16, VDim: 8, Rank: 128}, // odd heads through the fused kernels
		{Heads: 8, NopeDim: 8, RopeDim: 32, VDim: 8, Rank: 64},  // the bf16 kernels' smallest sizes
		{Heads: 20, NopeDim: 192, RopeDim: 64, VDim: 256, Rank: 512},
	}
	cases := []attnCase{
		{"decode", [][2]int{{0, 1}}, 16, backend.CacheF32},
		{"decode-long", [][2]int{{300, 1}}, 16, backend.CacheF32},
		{"decode-two", [][2]int{{200, 1}, {37, 1}}, 6, backend.CacheF32},
		{"mixed", [][2]int{{5, 9}, {70, 1}, {0, 3}}, 6, backend.CacheF32},
		{"prefill", [][2]int{{0, 16}}, 16, backend.CacheF32},
		{"prefill-chunk", [][2]int{{70, 37}, {9, 1}}, 6, backend.CacheF32},
		{"bf16", [][2]int{{150, 1}, {3, 17}}, 16, backend.CacheBF16},
		{"bf16-short", [][2]int{{2, 1}}, 16, backend.CacheBF16},
		{"bf16-two", [][2]int{{200, 1}, {37, 1}}, 6, backend.CacheBF16}, // partial blocks of four positions
		{"fp8", [][2]int{{40, 1}, {3, 17}}, 16, backend.CacheFP8},
		{"fp4", [][2]int{{40, 1}}, 16, backend.CacheFP4},
	}
	for _, b := range backends(2)[:len(Kernels())-1] {
		for _, s := range shapes {
			for _, c := range cases {
				if s.Rank == 512 && c.name != "decode-long" && c.name != "prefill-chunk" && c.name != "bf16" && c.name != "bf16-two" {
					continue // full size: a few cases, the race detector slows the reference
				}
				outs := runAttention(t, []*Backend{ref, b}, c, s, r)
				// Scores differ by float32 rounding (about 1e-6 relative);
				// the outputs are convex combinations of the latents.
				e := relErr(outs[0], outs[1])
				t.Logf("%s heads=%d rank=%d %s: %.2e", b.isa, s.Heads, s.Rank, c.name, e)
				if e > 2e-6 { // up to 5.4e-7 measured
					t.Errorf("%s heads=%d rank=%d %s: relative error %.2e", b.isa, s.Heads, s.Rank, c.name, e)
				}
			}
		}
	}
}

// The one-dispatch value expansion is the per-head matrix products, bit for
// bit, on every kernel family.
func TestExpandValuesInt8MatchesPerHead(t *testing.T) {
	r := rand.New(rand.NewPCG(41, 1))
	s := backend.MLAShape{Heads: 3, NopeDim: 8, RopeDim: 4, VDim: 20, Rank: 256}
	for _, b := range backends(2) {
		m := randQuant(r, s.Heads*s.VDim, s.Rank, 128)
		wUV, err := b.NewWeight(backend.HostWeight{Name: "w_uv", N: m.N, K: m.K, Quant: m})
		if err != nil {
			t.Fatal(err)
		}
		for _, T := range []int{1, 3} {
			olat := b.NewTensor(T, s.Heads*s.Rank)
			b.Upload(olat, randMat(r, T*s.Heads*s.Rank, 1))
			got, want := b.NewTensor(T, s.Heads*s.VDim), b.NewTensor(T, s.Heads*s.VDim)
			if !b.expandValuesInt8(asMat(got), asMat(olat), wUV, s) {
				t.Fatalf("%s: the one-dispatch path did not apply", b.isa)
			}
			for h := 0; h < s.Heads; h++ {
				wuv := weightRows(wUV, h*s.VDim, s.VDim)
				b.MatMul(b.Cols(want, h*s.VDim, (h+1)*s.VDim), b.Cols(olat, h*s.Rank, (h+1)*s.Rank), wuv)
			}
			g, w := b.Download(got), b.Download(want)
			for i := range g {
				if g[i] != w[i] {
					t.Fatalf("%s T=%d element %d: %g, per head %g", b.isa, T, i, g[i], w[i])
				}
			}
		}
	}
}

// AbsorbQuery on MMFP4 weights (rows four at a time where a kernel has it)
// against the pure-Go family, to float rounding (the families sum the dn
// products of a column in different orders).
func TestAbsorbQueryMatchesGo(t *testing.T) {
	r := rand.New(rand.NewPCG(42, 1))
	ref := New(Options{Threads: 1, Kernel: "go"})
	s := backend.MLAShape{Heads: 3, NopeDim: 10, RopeDim: 4, VDim: 8, Rank: 256}
	m := randQuant(r, s.Heads*s.NopeDim, s.Rank, 128)
	for _, b := range backends(2) {
		wUK, err := b.NewWeight(backend.HostWeight{Name: "w_uk", N: m.N, K: m.K, Quant: m})
		if err != nil {
			t.Fatal(err)
		}
		for _, T := range []int{1, 3, 17, 22} { // from 16 rows: the matrix-product path
			q := b.NewTensor(T, s.Heads*(s.NopeDim+s.RopeDim))
			b.Upload(q, randMat(r, T*s.Heads*(s.NopeDim+s.RopeDim), 1))
			got, want := b.NewTensor(T, s.Heads*s.Rank), ref.NewTensor(T, s.Heads*s.Rank)
			b.AbsorbQuery(got, q, wUK, s)
			ref.AbsorbQuery(want, q, wUK, s)
			e := relErr(ref.Download(want), b.Download(got))
			t.Logf("%s T=%d: %.2e", b.isa, T, e)
			if e > 2e-7 { // up to 5.6e-8 measured
				t.Errorf("%s T=%d: relative error %.2e", b.isa, T, e)
			}
		}
	}
}
