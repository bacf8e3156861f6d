package cpu

import (
	"encoding/binary"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/safetensors"
)

// bf16Table returns random bf16 bytes and their exact float32 values: the
// stored form and what the loader used to hold in memory.
func bf16Table(r *rand.Rand, n, k int) ([]byte, []float32) {
	raw := make([]byte, 2*n*k)
	vals := make([]float32, n*k)
	for i := range vals {
		h := safetensors.Float32ToBF16(float32(r.NormFloat64()))
		binary.LittleEndian.PutUint16(raw[2*i:], h)
		vals[i] = safetensors.BF16ToFloat32(h)
	}
	return raw, vals
}

// A bf16 embedding looked up in place gives the rows the float32 table
// gave, bit for bit, and so does a (tied lm_head) product with it.
func TestBF16WeightMatchesFloat32(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	const N, K = 50, 96
	raw, vals := bf16Table(r, N, K)
	b := New(Options{})
	wb, err := b.NewWeight(backend.HostWeight{Name: "embed", N: N, K: K, BF16: raw})
	if err != nil {
		t.Fatal(err)
	}
	wf, err := b.NewWeight(backend.HostWeight{Name: "embed", N: N, K: K, Dense: vals})
	if err != nil {
		t.Fatal(err)
	}
	ids := []int{0, 49, 7, 7, 23}
	b.SetBatch(tokenBatch(ids), nil)
	got, want := b.NewTensor(len(ids), K), b.NewTensor(len(ids), K)
	b.Embed(got, wb)
	b.Embed(want, wf)
	if err := b.Sync(); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(b.Download(got), b.Download(want)) {
		t.Error("bf16 embedding rows differ from the float32 table's")
	}
	b.SetBatch(tokenBatch([]int{N}), nil)
	b.Embed(b.NewTensor(1, K), wb)
	if err := b.Sync(); err == nil {
		t.Error("id outside the vocabulary accepted")
	}

	b.SetBatch(tokenBatch([]int{0, 1, 2}), nil)
	x := b.NewTensor(3, K)
	b.Upload(x, randMat(r, 3*K, 1))
	mb, mf := b.NewTensor(3, N), b.NewTensor(3, N)
	b.MatMul(mb, x, wb)
	b.MatMul(mf, x, wf)
	if !slices.Equal(b.Download(mb), b.Download(mf)) {
		t.Error("bf16 matmul differs from the float32 one")
	}
}

func TestNewWeightBF16Errors(t *testing.T) {
	b := New(Options{})
	raw := make([]byte, 2*4*8)
	if _, err := b.NewWeight(backend.HostWeight{Name: "w", N: 4, K: 9, BF16: raw}); err == nil {
		t.Error("wrong bf16 length accepted")
	}
	if _, err := b.NewWeight(backend.HostWeight{Name: "w", N: 4, K: 8, BF16: raw, Dense: make([]float32, 32)}); err == nil {
		t.Error("two data forms accepted")
	}
	if _, err := b.NewWeight(backend.HostWeight{Name: "w", N: 4, K: 8}); err == nil {
		t.Error("no data accepted")
	}
}

// The byte counter adds, per op, the stored size of what the op reads.
func TestBytesReadPerOp(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	b := New(Options{})
	raw, _ := bf16Table(r, 10, 64)
	emb, err := b.NewWeight(backend.HostWeight{Name: "e", N: 10, K: 64, BF16: raw})
	if err != nil {
		t.Fatal(err)
	}
	b.SetBatch(tokenBatch([]int{1, 2, 3}), nil)
	x := b.NewTensor(3, 64)
	before := b.BytesRead()
	b.Embed(x, emb)
	if err := b.Sync(); err != nil {
		t.Fatal(err)
	}
	if got := b.BytesRead() - before; got != 3*64*2 {
		t.Errorf("embed of 3 bf16 rows counted %d bytes, want %d", got, 3*64*2)
	}
	w, err := b.NewWeight(backend.HostWeight{Name: "w", N: 5, K: 64, Dense: randMat(r, 5*64, 1)})
	if err != nil {
		t.Fatal(err)
	}
	before = b.BytesRead()
	b.MatMul(b.NewTensor(3, 5), x, w)
	if got := b.BytesRead() - before; got != 5*64*4 {
		t.Errorf("dense matmul counted %d bytes, want %d (once per op, not per token)", got, 5*64*4)
	}
}

// tokenBatch is one sequence of ids at positions 0, 1, ...
func tokenBatch(ids []int) *backend.Batch {
	batch := &backend.Batch{Seqs: []backend.Seq{{Len: len(ids)}}}
	for i, id := range ids {
		batch.Tokens = append(batch.Tokens, int32(id))
		batch.Positions = append(batch.Positions, int32(i))
	}
	return batch
}
