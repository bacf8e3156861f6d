package kvcache

import (
	"errors"
	"math/rand/v2"
	"slices"
	"testing"
)

func seqTokens(n int, base int32) []int32 {
	t := make([]int32, n)
	for i := range t {
		t[i] = base + int32(i)
	}
	return t
}

func mustCheck(t *testing.T, m *Manager, seqs ...*Seq) {
	t.Helper()
	if err := m.Check(seqs...); err != nil {
		t.Fatal(err)
	}
}

func TestGrowAllOrNothing(t *testing.T) {
	m := New(4, 4)
	var a, b Seq
	if err := m.Grow(&a, 9); err != nil { // 3 blocks
		t.Fatal(err)
	}
	if len(a.Blocks) != 3 || m.Available() != 1 || m.Used() != 3 {
		t.Fatalf("after 9 tokens: %d blocks, %d available", len(a.Blocks), m.Available())
	}
	if err := m.Grow(&b, 5); !errors.Is(err, ErrNoBlocks) {
		t.Fatalf("2 blocks out of 1: %v", err)
	}
	if len(b.Blocks) != 0 || m.Available() != 1 {
		t.Fatal("a failed Grow allocated blocks")
	}
	if err := m.Grow(&a, 12); err != nil || len(a.Blocks) != 3 {
		t.Fatalf("growing within the last block allocated: %v %v", a.Blocks, err)
	}
	mustCheck(t, m, &a, &b)
	m.Release(&a)
	if m.Available() != 4 || m.Used() != 0 {
		t.Fatalf("after release: %d available", m.Available())
	}
	mustCheck(t, m, &a, &b)
}

// A second sequence with the same prefix reuses its full, computed blocks,
// shares them while both run, and leaves at least the tokens it is told to
// compute.
func TestPrefixReuseAndRefcounts(t *testing.T) {
	m := New(8, 4)
	prompt := seqTokens(10, 100) // blocks [0,4) [4,8) full, [8,10) partial
	var a Seq
	if got := m.Reuse(&a, prompt, len(prompt)-1); got != 0 {
		t.Fatalf("empty cache reused %d tokens", got)
	}
	if err := m.Grow(&a, len(prompt)); err != nil {
		t.Fatal(err)
	}
	m.Commit(&a, prompt, 6) // only the first block is computed so far
	var b Seq
	if got := m.Reuse(&b, prompt, 9); got != 4 {
		t.Fatalf("reused %d tokens after one computed block, want 4", got)
	}
	m.Release(&b)
	m.Commit(&a, prompt, 10)
	if got := m.Reuse(&b, prompt, 9); got != 8 || !slices.Equal(b.Blocks, a.Blocks[:2]) {
		t.Fatalf("reused %d tokens in blocks %v, want 8 in %v", got, b.Blocks, a.Blocks[:2])
	}
	mustCheck(t, m, &a, &b)
	// The limit is in whole blocks: 7 tokens allow one block.
	var c Seq
	if got := m.Reuse(&c, prompt, 7); got != 4 {
		t.Fatalf("limit 7 reused %d tokens, want 4", got)
	}
	// A different token in the first block changes every later hash.
	other := slices.Clone(prompt)
	other[1] = 999
	var d Seq
	if got := m.Reuse(&d, other, 9); got != 0 {
		t.Fatalf("changed prefix reused %d tokens", got)
	}
	mustCheck(t, m, &a, &b, &c, &d)
	m.Release(&a)
	m.Release(&c)
	mustCheck(t, m, &b)
	// b still holds the two blocks; the unshared third block of a is free.
	if m.Used() != 2 || m.Cached() != 0 {
		t.Fatalf("used %d, cached %d; want 2 held, 0 cached", m.Used(), m.Cached())
	}
	m.Release(&b)
	if m.Cached() != 2 || m.Available() != 8 {
		t.Fatalf("after all released: %d cached, %d available", m.Cached(), m.Available())
	}
	if m.Queries != 9+9+9+7+9 || m.Hits != 4+8+4 {
		t.Errorf("counters: %d queried, %d hit", m.Queries, m.Hits)
	}
	mustCheck(t, m)
}

// Cached blocks are evicted only when free ones run out, least recently
// released first, and within one sequence its last blocks first.
func TestLRUEviction(t *testing.T) {
	m := New(4, 2)
	pa, pb := seqTokens(4, 0), seqTokens(4, 50)
	var a, b Seq
	for _, x := range []struct {
		s *Seq
		p []int32
	}{{&a, pa}, {&b, pb}} {
		if err := m.Grow(x.s, 4); err != nil {
			t.Fatal(err)
		}
		m.Commit(x.s, x.p, 4)
	}
	m.Release(&a) // a's blocks are older
	m.Release(&b)
	if m.Cached() != 4 {
		t.Fatalf("%d cached blocks, want 4", m.Cached())
	}
	var c Seq
	if err := m.Grow(&c, 2); err != nil { // evicts a's second block
		t.Fatal(err)
	}
	mustCheck(t, m, &c)
	var probe Seq
	if got := m.Reuse(&probe, pa, 4); got != 2 {
		t.Fatalf("a's prefix after one eviction: %d tokens reusable, want 2", got)
	}
	m.Release(&probe)
	if got := m.Reuse(&probe, pb, 4); got != 4 {
		t.Fatalf("b's prefix was evicted first (%d tokens left)", got)
	}
	m.Release(&probe)
	mustCheck(t, m, &c)
}

// Random operations from many sequences keep the invariants, and releasing
// everything returns every block.
func TestRandomOperationsKeepInvariants(t *testing.T) {
	r := rand.New(rand.NewPCG(11, 12))
	m := New(24, 4)
	type live struct {
		s      *Seq
		tokens []int32
		done   int
	}
	var seqs []*live
	prompts := [][]int32{seqTokens(13, 0), seqTokens(9, 0), seqTokens(17, 300), seqTokens(6, 500)}
	for step := 0; step < 3000; step++ {
		switch op := r.IntN(10); {
		case op < 3 && len(seqs) < 8:
			p := slices.Clone(prompts[r.IntN(len(prompts))])
			l := &live{s: &Seq{}, tokens: p}
			l.done = m.Reuse(l.s, p, len(p)-1)
			if m.Grow(l.s, len(p)) != nil {
				m.Release(l.s)
				continue
			}
			seqs = append(seqs, l)
		case op < 8 && len(seqs) > 0:
			l := seqs[r.IntN(len(seqs))]
			if l.done < len(l.tokens) {
				l.done = len(l.tokens)
			} else {
				l.tokens = append(l.tokens, int32(r.IntN(4)))
				if m.Grow(l.s, len(l.tokens)) != nil {
					l.tokens = l.tokens[:len(l.tokens)-1]
					continue
				}
			}
			m.Commit(l.s, l.tokens, l.done)
		case len(seqs) > 0:
			i := r.IntN(len(seqs))
			m.Release(seqs[i].s)
			seqs = slices.Delete(seqs, i, i+1)
		}
		if step%50 == 0 {
			var ss []*Seq
			for _, l := range seqs {
				ss = append(ss, l.s)
			}
			mustCheck(t, m, ss...)
		}
	}
	for _, l := range seqs {
		m.Release(l.s)
	}
	mustCheck(t, m)
	if m.Used() != 0 || m.Available() != m.NumBlocks() {
		t.Fatalf("after releasing all: %d used, %d available of %d", m.Used(), m.Available(), m.NumBlocks())
	}
	if m.Hits == 0 {
		t.Error("no prefix was ever reused")
	}
	t.Logf("prefix cache: %d of %d tokens hit", m.Hits, m.Queries)
}
