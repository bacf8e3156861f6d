package backend

import (
	"strings"
	"testing"
)

func TestBatchValidate(t *testing.T) {
	good := func() *Batch {
		return &Batch{
			Tokens:    []int32{5, 6, 7, 8},
			Positions: []int32{3, 4, 5, 0},
			Seqs:      []Seq{{Start: 0, Len: 3, Blocks: []int32{2, 0}}, {Start: 3, Len: 1, Blocks: []int32{1}}},
			Outputs:   []int32{2, 3},
		}
	}
	if err := good().Validate(10, 3, 4); err != nil {
		t.Fatalf("valid batch rejected: %v", err)
	}
	for _, c := range []struct {
		name, want string
		edit       func(b *Batch)
	}{
		{"empty", "no tokens", func(b *Batch) { *b = Batch{} }},
		{"positions", "positions for", func(b *Batch) { b.Positions = b.Positions[:3] }},
		{"vocab", "outside the vocabulary", func(b *Batch) { b.Tokens[1] = 10 }},
		{"negative id", "outside the vocabulary", func(b *Batch) { b.Tokens[1] = -1 }},
		{"gap", "covers rows", func(b *Batch) { b.Seqs[1].Start = 2 }},
		{"uncovered", "cover 3 of 4", func(b *Batch) { b.Seqs = b.Seqs[:1] }},
		{"not consecutive", "want 4", func(b *Batch) { b.Positions[1] = 7 }},
		{"table short", "needs block table entry", func(b *Batch) { b.Positions = []int32{6, 7, 8, 0} }},
		{"block range", "outside the pool", func(b *Batch) { b.Seqs[1].Blocks[0] = 3 }},
		{"output", "output row", func(b *Batch) { b.Outputs[0] = 4 }},
		{"sample entries", "2 outputs", func(b *Batch) { b.Sample = []*SampleParams{nil} }},
	} {
		b := good()
		c.edit(b)
		err := b.Validate(10, 3, 4)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want one containing %q", c.name, err, c.want)
		}
	}
}

func TestParseCacheDType(t *testing.T) {
	for _, s := range []string{"bf16", "f32", "fp8", "fp4"} {
		d, err := ParseCacheDType(s)
		if err != nil || d.String() != s {
			t.Errorf("%s: %v %v", s, d, err)
		}
	}
	if _, err := ParseCacheDType("int4"); err == nil {
		t.Error("int4 accepted")
	}
	if n := CacheBytesPerToken(512, 64, CacheBF16); n != 1152 {
		t.Errorf("bf16 token at GLM-4.7-Flash's shapes: %d bytes, want 1152", n)
	}
}
