package glm4moelite

import (
	"fmt"

	"github.com/mmfp4/mmfp4/backend"
)

// stateBlockSize is the block size of a State's private cache.
const stateBlockSize = 64

// State is one sequence with a private cache pool: the simplest way to run
// the model on a single sequence (tests, logits of a prompt). Serving runs
// many sequences over one shared pool through package engine instead.
type State struct {
	pool     backend.CachePool
	blocks   []int32
	capacity int
	Pos      int // next position

	// Interrupt, if set, is called before each layer; an error from it
	// abandons the pass (Pos stays where it was) and ForwardSeq returns it.
	Interrupt func() error
}

// NewState allocates the cache of one sequence of up to capacity tokens.
func (m *Model) NewState(capacity int, dtype backend.CacheDType) (*State, error) {
	if capacity <= 0 {
		return nil, fmt.Errorf("state of capacity %d", capacity)
	}
	n := (capacity + stateBlockSize - 1) / stateBlockSize
	pool, err := m.NewCachePool(n, stateBlockSize, dtype)
	if err != nil {
		return nil, err
	}
	s := &State{pool: pool, capacity: capacity}
	for i := 0; i < n; i++ {
		s.blocks = append(s.blocks, int32(i))
	}
	return s, nil
}

// Capacity is the number of positions the state can hold.
func (s *State) Capacity() int { return s.capacity }

// ForwardSeq runs ids at positions s.Pos, s.Pos+1, ... as one batch and
// returns the logits: of every position (len(ids) rows of VocabSize) when
// allLogits, else of the last one only.
func (m *Model) ForwardSeq(s *State, ids []int, allLogits bool) ([]float32, error) {
	T := len(ids)
	if T == 0 {
		return nil, fmt.Errorf("forward: no tokens")
	}
	if s.Pos+T > s.Capacity() {
		return nil, fmt.Errorf("context full: %d cached + %d new tokens exceed the context of %d", s.Pos, T, s.Capacity())
	}
	batch := &backend.Batch{Seqs: []backend.Seq{{Start: 0, Len: T, Blocks: s.blocks}}, Interrupt: s.Interrupt}
	for i, id := range ids {
		if id < 0 || id > 1<<31-1 {
			return nil, fmt.Errorf("token id %d at position %d is outside the vocabulary [0, %d)", id, s.Pos+i, m.Config.VocabSize)
		}
		batch.Tokens = append(batch.Tokens, int32(id))
		batch.Positions = append(batch.Positions, int32(s.Pos+i))
	}
	if allLogits {
		for t := 0; t < T; t++ {
			batch.Outputs = append(batch.Outputs, int32(t))
		}
	} else {
		batch.Outputs = []int32{int32(T - 1)}
	}
	out, err := m.Forward(batch, s.pool)
	if err != nil {
		return nil, err
	}
	if err := checkFinite(out, m.Config.VocabSize); err != nil {
		return nil, fmt.Errorf("logits at position %d: %w (run with --debug-nan to find the layer)", int(batch.Positions[batch.Outputs[err.(nonFinite).row]]), err)
	}
	s.Pos += T
	return out, nil
}
