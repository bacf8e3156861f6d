package cpu

import (
	"math"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
)

// Each cache dtype stores and loads a token with the error its format
// allows: exact for f32, 2^-9 relative per value for bf16, and the RMS
// error of E4M3 and E2M1 with their scales for fp8 and fp4.
func TestCachePoolRoundTrip(t *testing.T) {
	const rank, rope = 128, 16
	r := rand.New(rand.NewPCG(5, 6))
	for _, c := range []struct {
		dtype backend.CacheDType
		tol   float64 // relative RMS error
	}{
		{backend.CacheF32, 0},
		{backend.CacheBF16, 4e-3},
		{backend.CacheFP8, 4e-2},
		{backend.CacheFP4, 1.5e-1},
	} {
		b := New(Options{Threads: 1})
		p, err := b.NewCachePool(2, 3, 4, rank, rope, c.dtype)
		if err != nil {
			t.Fatal(err)
		}
		pl := p.(*pool)
		var worst float64
		for slot := 0; slot < 12; slot++ {
			lat := randMat(r, rank, 1)
			kpe := randMat(r, rope, 5) // k_pe has its own scale
			if slot == 3 {
				clear(lat) // an all-zero latent stays zero
			}
			pl.store(1, slot, lat, kpe)
			got := pl.load(1, slot, make([]float32, rank+rope))
			for _, part := range [][2][]float32{{lat, got[:rank]}, {kpe, got[rank:]}} {
				if slot == 3 && len(part[0]) == rank {
					for _, v := range part[1] {
						if v != 0 {
							t.Fatalf("%v: zero latent loads as %v", c.dtype, part[1])
						}
					}
					continue
				}
				worst = math.Max(worst, relErr(part[0], part[1]))
			}
		}
		t.Logf("%v: %d bytes per token per layer, worst relative RMS error %.2e", c.dtype, backend.CacheBytesPerToken(rank, rope, c.dtype), worst)
		if worst > c.tol || (c.tol == 0 && worst != 0) {
			t.Errorf("%v: relative RMS error %.2e > %.1e", c.dtype, worst, c.tol)
		}
		// Layer 0 was never written: still zero.
		for _, v := range pl.load(0, 5, make([]float32, rank+rope)) {
			if v != 0 {
				t.Fatalf("%v: layer 0 was written", c.dtype)
			}
		}
	}
}

// naiveAttention is LatentAttention for one row and head over plain
// slices of cached values, in float64.
func naiveAttention(qv, qpe []float32, lat, kpe [][]float32, scale float64) []float64 {
	scores := make([]float64, len(lat))
	mx := math.Inf(-1)
	for j := range lat {
		var s float64
		for i := range qv {
			s += float64(qv[i]) * float64(lat[j][i])
		}
		for i := range qpe {
			s += float64(qpe[i]) * float64(kpe[j][i])
		}
		scores[j] = s * scale
		mx = math.Max(mx, scores[j])
	}
	var sum float64
	for j := range scores {
		scores[j] = math.Exp(scores[j] - mx)
		sum += scores[j]
	}
	out := make([]float64, len(qv))
	for j := range lat {
		for i := range out {
			out[i] += scores[j] / sum * float64(lat[j][i])
		}
	}
	return out
}

// Three sequences share one batch (a prefill chunk that continues cached
// positions, a single decode token, and a fresh prompt) over scattered
// blocks of one pool; each row's attention must equal the plain definition
// over its own sequence's positions.
func TestPagedLatentAttention(t *testing.T) {
	for _, threads := range []int{1, 3, 16} {
		testPagedLatentAttention(t, threads)
	}
}

func testPagedLatentAttention(t *testing.T, threads int) {
	const bs, blocks = 4, 16
	s := backend.MLAShape{Heads: 3, NopeDim: 8, RopeDim: 4, VDim: 8, Rank: 16}
	r := rand.New(rand.NewPCG(7, 8))
	b := New(Options{Threads: threads})
	p, err := b.NewCachePool(2, blocks, bs, s.Rank, s.RopeDim, backend.CacheF32)
	if err != nil {
		t.Fatal(err)
	}
	type seqSpec struct {
		cached, new int
		blocks      []int32
	}
	specs := []seqSpec{{cached: 5, new: 6, blocks: []int32{9, 2, 14}}, {cached: 7, new: 1, blocks: []int32{0, 11}}, {cached: 0, new: 3, blocks: []int32{5}}}
	// Host copies of every sequence's cache, by position.
	lat := make([][][]float32, len(specs))
	kpe := make([][][]float32, len(specs))
	for i, sp := range specs {
		for j := 0; j < sp.cached+sp.new; j++ {
			lat[i] = append(lat[i], randMat(r, s.Rank, 1))
			kpe[i] = append(kpe[i], randMat(r, s.RopeDim, 1))
		}
	}
	// Write the cached positions in a step of their own.
	pre := &backend.Batch{}
	for _, sp := range specs {
		if sp.cached == 0 {
			continue
		}
		pre.Seqs = append(pre.Seqs, backend.Seq{Start: len(pre.Tokens), Len: sp.cached, Blocks: sp.blocks})
		for j := 0; j < sp.cached; j++ {
			pre.Tokens = append(pre.Tokens, 0)
			pre.Positions = append(pre.Positions, int32(j))
		}
	}
	if err := pre.Validate(1, blocks, bs); err != nil {
		t.Fatal(err)
	}
	b.SetBatch(pre, p)
	var pl, pk []float32
	for i, sp := range specs {
		for j := 0; j < sp.cached; j++ {
			pl = append(pl, lat[i][j]...)
			pk = append(pk, kpe[i][j]...)
		}
	}
	lt, kt := b.NewTensor(pre.Rows(), s.Rank), b.NewTensor(pre.Rows(), s.RopeDim)
	b.Upload(lt, pl)
	b.Upload(kt, pk)
	b.CacheWrite(1, lt, kt)

	// The step under test: new tokens of all three sequences.
	step := &backend.Batch{}
	var nl, nk []float32
	for i, sp := range specs {
		step.Seqs = append(step.Seqs, backend.Seq{Start: len(step.Tokens), Len: sp.new, Blocks: sp.blocks})
		for j := sp.cached; j < sp.cached+sp.new; j++ {
			step.Tokens = append(step.Tokens, 0)
			step.Positions = append(step.Positions, int32(j))
			nl = append(nl, lat[i][j]...)
			nk = append(nk, kpe[i][j]...)
		}
	}
	if err := step.Validate(1, blocks, bs); err != nil {
		t.Fatal(err)
	}
	b.SetBatch(step, p)
	T := step.Rows()
	lt, kt = b.NewTensor(T, s.Rank), b.NewTensor(T, s.RopeDim)
	b.Upload(lt, nl)
	b.Upload(kt, nk)
	b.CacheWrite(1, lt, kt)
	qlat, q := randMat(r, T*s.Heads*s.Rank, 1), randMat(r, T*s.Heads*(s.NopeDim+s.RopeDim), 1)
	qlt, qt := b.NewTensor(T, s.Heads*s.Rank), b.NewTensor(T, s.Heads*(s.NopeDim+s.RopeDim))
	b.Upload(qlt, qlat)
	b.Upload(qt, q)
	out := b.NewTensor(T, s.Heads*s.Rank)
	const scale = 0.3
	b.LatentAttention(out, qlt, qt, 1, s, scale)
	if err := b.Sync(); err != nil {
		t.Fatal(err)
	}
	got := b.Download(out)
	var worst float64
	for i, sp := range specs {
		for j := 0; j < sp.new; j++ {
			row := step.Seqs[i].Start + j
			pos := sp.cached + j
			for h := 0; h < s.Heads; h++ {
				qv := qlat[(row*s.Heads+h)*s.Rank : (row*s.Heads+h+1)*s.Rank]
				qk := s.NopeDim + s.RopeDim
				qpe := q[row*s.Heads*qk+h*qk+s.NopeDim : row*s.Heads*qk+(h+1)*qk]
				want := naiveAttention(qv, qpe, lat[i][:pos+1], kpe[i][:pos+1], scale)
				g := got[(row*s.Heads+h)*s.Rank : (row*s.Heads+h+1)*s.Rank]
				for k := range want {
					worst = math.Max(worst, math.Abs(float64(g[k])-want[k]))
				}
			}
		}
	}
	if worst > 1e-5 {
		t.Errorf("threads=%d: paged attention differs from the definition by %.2e", threads, worst)
	}
}

// Ops record errors instead of panicking; Sync returns the first and
// clears it.
func TestOpsRecordErrors(t *testing.T) {
	b := New(Options{Threads: 1})
	w, err := b.NewWeight(backend.HostWeight{Name: "w", N: 4, K: 3, Dense: make([]float32, 12)})
	if err != nil {
		t.Fatal(err)
	}
	b.SetBatch(&backend.Batch{Tokens: []int32{1, 9}, Positions: []int32{0, 1}, Seqs: []backend.Seq{{Len: 2, Blocks: []int32{0}}}}, nil)
	b.MatMul(b.NewTensor(2, 5), b.NewTensor(2, 3), w) // wrong output width
	b.Embed(b.NewTensor(2, 3), w)                     // id 9 outside 4 rows
	err = b.Sync()
	if err == nil || !strings.Contains(err.Error(), "matmul out") {
		t.Fatalf("first error %v, want the matmul shape", err)
	}
	if err := b.Sync(); err != nil {
		t.Fatalf("Sync did not clear the error: %v", err)
	}
	b.Embed(b.NewTensor(2, 3), w)
	if err := b.Sync(); err == nil || !strings.Contains(err.Error(), "token id 9") {
		t.Fatalf("embed of id 9: %v", err)
	}
	b.CacheWrite(0, b.NewTensor(2, 4), b.NewTensor(2, 2))
	if err := b.Sync(); err == nil {
		t.Fatal("cache write without a pool went unreported")
	}
}

// The arena hands out zeroed tensors, and a second step of the same shape
// reuses the first step's memory instead of allocating.
func TestArenaReuse(t *testing.T) {
	b := New(Options{Threads: 1})
	batch := &backend.Batch{Tokens: []int32{0}, Positions: []int32{0}, Seqs: []backend.Seq{{Len: 1, Blocks: []int32{0}}}}
	step := func() *mat {
		b.SetBatch(batch, nil)
		var last *mat
		for i := 0; i < 40; i++ {
			last = asMat(b.NewTensor(7, 1000))
			for j := range last.data {
				if last.data[j] != 0 {
					t.Fatal("arena tensor not zeroed")
				}
				last.data[j] = 1
			}
		}
		return last
	}
	step()
	first := &step().data[0]
	if allocs := testing.AllocsPerRun(5, func() { step() }); allocs > 41 {
		t.Errorf("%.0f allocations per step of 40 tensors: the arena does not reuse memory", allocs)
	}
	if &step().data[0] != first {
		t.Error("the same step got a different address")
	}
}
