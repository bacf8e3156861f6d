package glm4moelite

import (
	"slices"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/backend/cpu"
	"github.com/mmfp4/mmfp4/safetensors"
)

// The bf16 embedding is kept in its stored form and widened per lookup; the
// logits must be bit for bit those of the former path, a float32 copy of
// the whole table made at load.
func TestBF16EmbeddingMatchesFloat32Table(t *testing.T) {
	b := cpu.New(cpu.Options{})
	m, err := Load(fixtureDir, b, LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	set, err := safetensors.OpenDir(fixtureDir)
	if err != nil {
		t.Fatal(err)
	}
	defer set.Close()
	tn, err := set.Tensor("model.embed_tokens.weight")
	if err != nil {
		t.Fatal(err)
	}
	if tn.DType != safetensors.BF16 {
		t.Fatalf("fixture embedding is %s; this test needs bf16", tn.DType)
	}
	vals, err := tn.Float32()
	if err != nil {
		t.Fatal(err)
	}
	// Held as bf16: a lookup reads 2 bytes per value, not 4.
	before := b.BytesRead()
	b.SetBatch(&backend.Batch{Tokens: []int32{3}, Positions: []int32{0}, Seqs: []backend.Seq{{Len: 1}}}, nil)
	b.Embed(b.NewTensor(1, tn.Shape[1]), m.Embed)
	if err := b.Sync(); err != nil {
		t.Fatal(err)
	}
	if n := b.BytesRead() - before; n != int64(2*tn.Shape[1]) {
		t.Fatalf("one embedding row read %d bytes, want %d: the table is not held as bf16", n, 2*tn.Shape[1])
	}
	ids := []int{248, 475, 240, 439, 34, 19, 502, 0, 511}
	got, err := m.ForwardSeq(newState(t, m, len(ids)), ids, true)
	if err != nil {
		t.Fatal(err)
	}
	old, err := b.NewWeight(backend.HostWeight{Name: tn.Name, N: tn.Shape[0], K: tn.Shape[1], Dense: vals})
	if err != nil {
		t.Fatal(err)
	}
	m.Embed = old
	want, err := m.ForwardSeq(newState(t, m, len(ids)), ids, true)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, want) {
		t.Error("logits with the in-place bf16 embedding differ from those with the float32 table")
	}
}
