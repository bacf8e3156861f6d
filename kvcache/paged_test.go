package kvcache_test

import (
	"encoding/binary"
	"math"
	"path/filepath"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/backend/cpu"
	"github.com/mmfp4/mmfp4/kvcache"
	"github.com/mmfp4/mmfp4/model/glm4moelite"
	"github.com/mmfp4/mmfp4/safetensors"
)

const (
	fixtureDir = "../testdata/glm4moelite-tiny"
	refDir     = "../testdata/glm4moelite-tiny-ref"
)

// golden returns the reference sequence (prompt and greedy continuation)
// and its logits from HF transformers.
func golden(t *testing.T) ([]int32, []float32) {
	f, err := safetensors.Open(filepath.Join(refDir, "reference.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var seq []int32
	for _, name := range []string{"prompt_ids", "greedy_ids"} {
		tn, err := f.Tensor(name)
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < tn.NumElements(); i++ {
			seq = append(seq, int32(binary.LittleEndian.Uint64(tn.Data[8*i:])))
		}
	}
	tn, err := f.Tensor("logits")
	if err != nil {
		t.Fatal(err)
	}
	logits, err := tn.Float32()
	if err != nil {
		t.Fatal(err)
	}
	return seq, logits
}

type runner struct {
	m    *glm4moelite.Model
	pool backend.CachePool
	kv   *kvcache.Manager
}

type seqRun struct {
	s      kvcache.Seq
	tokens []int32
	done   int       // tokens in the cache
	logits []float32 // of positions [first, done)
	first  int
}

// step runs the next chunk of each sequence in one batch and collects the
// logits of every row.
func (r *runner) step(t *testing.T, seqs []*seqRun, chunk int) {
	t.Helper()
	b := &backend.Batch{}
	var rows []int
	for _, sr := range seqs {
		n := min(chunk, len(sr.tokens)-sr.done)
		if n == 0 {
			continue
		}
		if err := r.kv.Grow(&sr.s, sr.done+n); err != nil {
			t.Fatal(err)
		}
		b.Seqs = append(b.Seqs, backend.Seq{Start: len(b.Tokens), Len: n, Blocks: sr.s.Blocks})
		for p := sr.done; p < sr.done+n; p++ {
			b.Outputs = append(b.Outputs, int32(len(b.Tokens)))
			b.Tokens = append(b.Tokens, sr.tokens[p])
			b.Positions = append(b.Positions, int32(p))
		}
		rows = append(rows, n)
	}
	out, err := r.m.Forward(b, r.pool)
	if err != nil {
		t.Fatal(err)
	}
	V := r.m.Config.VocabSize
	i := 0
	for _, sr := range seqs {
		n := min(chunk, len(sr.tokens)-sr.done)
		if n == 0 {
			continue
		}
		sr.logits = append(sr.logits, out[i*V:(i+n)*V]...)
		i += n
		sr.done += n
		r.kv.Commit(&sr.s, sr.tokens, sr.done)
	}
}

func relMaxErr(ref, got []float32) float64 {
	var num, den float64
	for i := range ref {
		num = math.Max(num, math.Abs(float64(got[i]-ref[i])))
		den = math.Max(den, math.Abs(float64(ref[i])))
	}
	return num / den
}

func argmax(v []float32) int {
	best := 0
	for i, x := range v {
		if x > v[best] {
			best = i
		}
	}
	return best
}

// The paged forward pass at bf16 cache precision against the HF logits:
// the reference sequence runs in chunks of 5 beside another sequence in
// the same batches, over scattered blocks of 4 tokens; then again with its
// first 16 tokens taken from the prefix cache. Both must meet the bounds of
// the float32-cache golden test (relative error < 1e-2, same argmax).
func TestPagedBF16CacheMatchesReference(t *testing.T) {
	seq, ref := golden(t)
	m, err := glm4moelite.Load(fixtureDir, cpu.New(cpu.Options{}), glm4moelite.LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	V := m.Config.VocabSize
	pool, err := m.NewCachePool(64, 4, backend.CacheBF16)
	if err != nil {
		t.Fatal(err)
	}
	r := &runner{m: m, pool: pool, kv: kvcache.New(64, 4)}
	check := func(name string, sr *seqRun) {
		t.Helper()
		want := ref[sr.first*V : len(seq)*V]
		e := relMaxErr(want, sr.logits)
		t.Logf("%s: positions [%d, %d), max|ours-ref|/max|ref| = %.2e", name, sr.first, len(seq), e)
		if e >= 1e-2 {
			t.Errorf("%s: relative error %.3e >= 1e-2", name, e)
		}
		for p := sr.first; p < len(seq); p++ {
			i := p - sr.first
			if a, b := argmax(sr.logits[i*V:(i+1)*V]), argmax(ref[p*V:(p+1)*V]); a != b {
				t.Errorf("%s: position %d: argmax %d, reference %d", name, p, a, b)
			}
		}
	}

	// Occupy a few blocks first, so the sequence's blocks are not 0, 1, 2...
	filler := &seqRun{tokens: []int32{7, 8, 9, 10, 11, 12, 13, 14, 15}}
	r.step(t, []*seqRun{filler}, 9)
	cold := &seqRun{tokens: seq}
	other := &seqRun{tokens: []int32{3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5}}
	for cold.done < len(seq) {
		r.step(t, []*seqRun{other, cold}, 5)
	}
	check("no prefix reuse", cold)

	warm := &seqRun{tokens: seq}
	warm.done = r.kv.Reuse(&warm.s, seq, 17)
	warm.first = warm.done
	if warm.done != 16 {
		t.Fatalf("prefix cache gave %d tokens, want 16", warm.done)
	}
	r.m.Forward(&backend.Batch{}, pool) // an invalid batch changes nothing
	for warm.done < len(seq) {
		r.step(t, []*seqRun{warm}, 7)
	}
	check("16 tokens from the prefix cache", warm)
	// Rows do not depend on their batch on the CPU backend, so the reused
	// blocks must give exactly the logits of the cold run.
	for i, v := range warm.logits {
		if v != cold.logits[16*V+i] {
			t.Fatalf("warm and cold runs differ at position %d", 16+i/V)
		}
	}

	for _, sr := range []*seqRun{filler, cold, other, warm} {
		r.kv.Release(&sr.s)
	}
	if err := r.kv.Check(); err != nil {
		t.Fatal(err)
	}
	if r.kv.Used() != 0 {
		t.Errorf("%d blocks still held", r.kv.Used())
	}
}

func meanKL(ref, got []float32, vocab int) float64 {
	logSoftmax := func(v []float32) []float64 {
		mx := math.Inf(-1)
		for _, x := range v {
			mx = math.Max(mx, float64(x))
		}
		var s float64
		for _, x := range v {
			s += math.Exp(float64(x) - mx)
		}
		out := make([]float64, len(v))
		for i, x := range v {
			out[i] = float64(x) - mx - math.Log(s)
		}
		return out
	}
	rows := len(ref) / vocab
	var total float64
	for r := 0; r < rows; r++ {
		p, q := logSoftmax(ref[r*vocab:(r+1)*vocab]), logSoftmax(got[r*vocab:(r+1)*vocab])
		for i := range p {
			total += math.Exp(p[i]) * (p[i] - q[i])
		}
	}
	return total / float64(rows)
}

// Each cache dtype on the reference sequence: mean KL from the reference
// logits, bounded near what it measures. On this random model small
// perturbations flip expert choices, so single logits move a lot; KL
// averages that out (as the weight quantization tests do).
func TestPagedCacheDTypesKL(t *testing.T) {
	seq, ref := golden(t)
	m, err := glm4moelite.Load(fixtureDir, cpu.New(cpu.Options{}), glm4moelite.LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	V := m.Config.VocabSize
	for _, c := range []struct {
		dtype backend.CacheDType
		maxKL float64
	}{{backend.CacheF32, 1e-9}, {backend.CacheBF16, 1e-5}, {backend.CacheFP8, 0.02}, {backend.CacheFP4, 0.05}} {
		pool, err := m.NewCachePool(8, 4, c.dtype)
		if err != nil {
			t.Fatal(err)
		}
		r := &runner{m: m, pool: pool, kv: kvcache.New(8, 4)}
		sr := &seqRun{tokens: seq}
		r.step(t, []*seqRun{sr}, len(seq))
		agree := 0
		for p := range seq {
			if argmax(sr.logits[p*V:(p+1)*V]) == argmax(ref[p*V:(p+1)*V]) {
				agree++
			}
		}
		kl := meanKL(ref, sr.logits, V)
		t.Logf("%v cache (%d bytes per token per layer at GLM-4.7-Flash's shapes): mean KL %.2e, argmax agreement %.3f",
			c.dtype, backend.CacheBytesPerToken(512, 64, c.dtype), kl, float64(agree)/float64(len(seq)))
		if kl > c.maxKL {
			t.Errorf("%v: mean KL %.2e > %.0e", c.dtype, kl, c.maxKL)
		}
	}
}
