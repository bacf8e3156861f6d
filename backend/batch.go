package backend

import (
	"fmt"
	"strings"
)

// Batch is the work of one forward step: the tokens of several sequences,
// prefill chunks and single decode tokens alike, laid out sequence after
// sequence. Row t holds token Tokens[t] at position Positions[t] of its
// sequence.
type Batch struct {
	Tokens    []int32
	Positions []int32
	Seqs      []Seq
	// Outputs are the rows whose logits the step returns, in order.
	Outputs []int32
	// Sample, if not empty, has one entry per output: a non-nil entry
	// lets a backend that implements Sampler choose that output's token
	// itself, so that the step returns its id instead of its logits.
	Sample []*SampleParams
	// Interrupt, if set, is called by the model before each layer; an error
	// from it abandons the step. Backends ignore it.
	Interrupt func() error
	// Prev, if not empty, has one entry per row: where Prev[r] >= 0, row r's
	// token is the id an AsyncSampler chose for output Prev[r] of the step
	// queued just before this one (Tokens[r] is a placeholder), so that a
	// step can be queued before the ids of the one before have come back.
	Prev []int32
}

// FromPrev reports whether row r's token comes from the previous step.
func (b *Batch) FromPrev(r int) bool { return len(b.Prev) > 0 && b.Prev[r] >= 0 }

// Seq is one sequence's part of a batch.
type Seq struct {
	// Start and Len give its rows [Start, Start+Len); their positions are
	// consecutive, and every earlier position of the sequence is already in
	// the cache.
	Start, Len int
	// Blocks is the sequence's block table: position p lives in slot
	// p % blockSize of cache block Blocks[p / blockSize].
	Blocks []int32
}

// Rows is the number of tokens in the batch.
func (b *Batch) Rows() int { return len(b.Tokens) }

// Slot is the cache slot (block*blockSize + offset) of position pos of s.
func (s *Seq) Slot(pos, blockSize int) int {
	return int(s.Blocks[pos/blockSize])*blockSize + pos%blockSize
}

// Validate checks the batch against a pool of blocks blocks of blockSize
// slots and a vocabulary of vocab ids: sequences cover the rows in order,
// positions are consecutive within each, block tables cover them, and
// outputs are rows.
func (b *Batch) Validate(vocab, blocks, blockSize int) error {
	T := len(b.Tokens)
	if T == 0 {
		return fmt.Errorf("batch: no tokens")
	}
	if len(b.Positions) != T {
		return fmt.Errorf("batch: %d positions for %d tokens", len(b.Positions), T)
	}
	if len(b.Prev) != 0 && len(b.Prev) != T {
		return fmt.Errorf("batch: %d previous-step entries for %d tokens", len(b.Prev), T)
	}
	for t, id := range b.Tokens {
		if b.FromPrev(t) {
			continue
		}
		if id < 0 || int(id) >= vocab {
			return fmt.Errorf("batch: token id %d at row %d is outside the vocabulary [0, %d)", id, t, vocab)
		}
	}
	next := 0
	for i, s := range b.Seqs {
		if s.Start != next || s.Len <= 0 || s.Start+s.Len > T {
			return fmt.Errorf("batch: sequence %d covers rows [%d, %d), want a non-empty span starting at row %d within %d rows", i, s.Start, s.Start+s.Len, next, T)
		}
		next = s.Start + s.Len
		p0 := int(b.Positions[s.Start])
		if p0 < 0 {
			return fmt.Errorf("batch: sequence %d starts at position %d", i, p0)
		}
		for t := s.Start; t < next; t++ {
			if int(b.Positions[t]) != p0+t-s.Start {
				return fmt.Errorf("batch: sequence %d: row %d has position %d, want %d", i, t, b.Positions[t], p0+t-s.Start)
			}
		}
		last := p0 + s.Len - 1
		if last/blockSize >= len(s.Blocks) {
			return fmt.Errorf("batch: sequence %d: position %d needs block table entry %d, table has %d", i, last, last/blockSize, len(s.Blocks))
		}
		for _, blk := range s.Blocks[:last/blockSize+1] {
			if blk < 0 || int(blk) >= blocks {
				return fmt.Errorf("batch: sequence %d: block %d outside the pool of %d", i, blk, blocks)
			}
		}
	}
	if next != T {
		return fmt.Errorf("batch: sequences cover %d of %d rows", next, T)
	}
	for _, r := range b.Outputs {
		if r < 0 || int(r) >= T {
			return fmt.Errorf("batch: output row %d outside [0, %d)", r, T)
		}
	}
	if len(b.Sample) != 0 && len(b.Sample) != len(b.Outputs) {
		return fmt.Errorf("batch: %d sampling entries for %d outputs", len(b.Sample), len(b.Outputs))
	}
	return nil
}

// CacheDType is the storage precision of the latent cache.
type CacheDType int

const (
	// CacheBF16 stores bfloat16 values (2 bytes each).
	CacheBF16 CacheDType = iota
	// CacheF32 stores float32 values; the exact reference.
	CacheF32
	// CacheFP8 stores FP8 E4M3 values with one float32 scale per token for
	// the latent and one for k_pe.
	CacheFP8
	// CacheFP4 stores the latent as FP4 E2M1 values in groups of 32 with
	// an E4M3 scale each, relative to one float32 scale per token, and k_pe
	// as in CacheFP8 (in fp4 it alone cost most of fp4's perplexity).
	CacheFP4
)

var cacheDTypeNames = []string{"bf16", "f32", "fp8", "fp4"}

func (d CacheDType) String() string {
	if d < 0 || int(d) >= len(cacheDTypeNames) {
		return fmt.Sprintf("CacheDType(%d)", int(d))
	}
	return cacheDTypeNames[d]
}

// ParseCacheDType reads "bf16", "f32", "fp8" or "fp4".
func ParseCacheDType(s string) (CacheDType, error) {
	for i, n := range cacheDTypeNames {
		if s == n {
			return CacheDType(i), nil
		}
	}
	return 0, fmt.Errorf("unknown KV cache dtype %q: want one of %s", s, strings.Join(cacheDTypeNames, ", "))
}

// FP4Group is the number of values that share one E4M3 scale in a CacheFP4
// pool.
const FP4Group = 32

// CacheBytesPerToken is the storage of one token in one layer for a cache of
// the given shape and dtype.
func CacheBytesPerToken(rank, ropeDim int, d CacheDType) int {
	n := rank + ropeDim
	switch d {
	case CacheF32:
		return 4 * n
	case CacheFP8:
		return n + 8
	case CacheFP4:
		return rank/2 + ropeDim + (rank+FP4Group-1)/FP4Group + 8
	default:
		return 2 * n
	}
}

// CachePool is a backend's paged latent cache (see NewCachePool). The
// host-side bookkeeping of which block belongs to which sequence lives in
// package kvcache.
type CachePool interface {
	Layers() int
	Blocks() int
	BlockSize() int
	DType() CacheDType
}
