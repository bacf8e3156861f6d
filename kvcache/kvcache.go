// Package kvcache is the host-side bookkeeping of the paged latent cache:
// which of the backend's fixed-size cache blocks belong to which sequence,
// reference counts, and automatic prefix reuse. The block storage itself
// belongs to the backend (backend.CachePool); this package only hands out
// block numbers.
//
// Prefix reuse: once a block is full, it is keyed by a hash of its tokens
// and of all tokens before it. A new sequence whose prompt starts with the
// same tokens takes those blocks instead of computing them again. Blocks
// that no sequence uses but that hold a cached prefix stay in the cache
// until their space is needed; then the least recently used go first.
//
// A Manager is not safe for concurrent use: one goroutine (the engine's)
// owns it.
package kvcache

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
)

// Hash identifies the contents of a full block: its tokens and, through the
// parent hash, every token before it. SHA-256, so that one user cannot
// craft a prompt that collides with another's cached prefix.
type Hash [sha256.Size]byte

// blockHash chains parent and the block's tokens.
func blockHash(parent Hash, tokens []int32) Hash {
	buf := make([]byte, len(parent)+4*len(tokens))
	copy(buf, parent[:])
	for i, t := range tokens {
		binary.LittleEndian.PutUint32(buf[len(parent)+4*i:], uint32(t))
	}
	return sha256.Sum256(buf)
}

// ErrNoBlocks means the pool has too few free blocks for a request; the
// caller waits or preempts.
var ErrNoBlocks = errors.New("kvcache: not enough free blocks")

// Manager allocates the blocks of one cache pool.
type Manager struct {
	blockSize int

	ref    []int32 // sequences using each block
	hashed []bool  // the block holds a registered prefix (key in hash)
	hash   []Hash
	byHash map[Hash]int32

	free []int32 // unused blocks holding nothing reusable

	// Unused blocks that hold a registered prefix, least recently released
	// first: a doubly linked list through prev/next (-1 ends it).
	lruHead, lruTail int32
	prev, next       []int32
	inLRU            []bool
	evictable        int

	// Prefix cache counters, in tokens: looked up and found.
	Queries, Hits int64
}

// New returns a manager of blocks blocks of blockSize token slots.
func New(blocks, blockSize int) *Manager {
	m := &Manager{
		blockSize: blockSize,
		ref:       make([]int32, blocks),
		hashed:    make([]bool, blocks),
		hash:      make([]Hash, blocks),
		byHash:    make(map[Hash]int32),
		prev:      make([]int32, blocks),
		next:      make([]int32, blocks),
		inLRU:     make([]bool, blocks),
		lruHead:   -1,
		lruTail:   -1,
	}
	for b := blocks - 1; b >= 0; b-- {
		m.free = append(m.free, int32(b))
	}
	return m
}

// BlockSize is the number of token slots per block.
func (m *Manager) BlockSize() int { return m.blockSize }

// NumBlocks is the size of the pool.
func (m *Manager) NumBlocks() int { return len(m.ref) }

// Available is the number of blocks that can be allocated now: free ones
// and unused cached ones, which are evicted on demand.
func (m *Manager) Available() int { return len(m.free) + m.evictable }

// Used is the number of blocks that some sequence holds.
func (m *Manager) Used() int { return len(m.ref) - m.Available() }

// Cached is the number of unused blocks that hold a reusable prefix.
func (m *Manager) Cached() int { return m.evictable }

// BlocksFor is the number of blocks that n tokens occupy.
func (m *Manager) BlocksFor(n int) int { return (n + m.blockSize - 1) / m.blockSize }

// Seq is one sequence's block table and the hashes of its full blocks.
type Seq struct {
	Blocks []int32
	hashes []Hash // of Blocks[:len(hashes)], each full and computed
}

// Reuse attaches to an empty seq the cached blocks that hold the longest
// prefix of tokens, at most maxTokens tokens (whole blocks only), and
// returns how many tokens they hold. The caller leaves at least the last
// prompt token out of maxTokens, since its logits must be computed.
func (m *Manager) Reuse(s *Seq, tokens []int32, maxTokens int) int {
	if len(s.Blocks) != 0 {
		panic("kvcache: Reuse on a sequence that has blocks")
	}
	maxTokens = min(maxTokens, len(tokens))
	m.Queries += int64(maxTokens)
	var parent Hash
	for i := 0; (i+1)*m.blockSize <= maxTokens; i++ {
		h := blockHash(parent, tokens[i*m.blockSize:(i+1)*m.blockSize])
		b, ok := m.byHash[h]
		if !ok {
			break
		}
		if m.ref[b] == 0 {
			m.lruRemove(b)
		}
		m.ref[b]++
		s.Blocks = append(s.Blocks, b)
		s.hashes = append(s.hashes, h)
		parent = h
	}
	n := len(s.Blocks) * m.blockSize
	m.Hits += int64(n)
	return n
}

// Grow gives s blocks for positions up to n-1. It allocates all of them or
// none, and returns ErrNoBlocks when too few are available.
func (m *Manager) Grow(s *Seq, n int) error {
	need := m.BlocksFor(n) - len(s.Blocks)
	if need <= 0 {
		return nil
	}
	if need > m.Available() {
		return ErrNoBlocks
	}
	for i := 0; i < need; i++ {
		s.Blocks = append(s.Blocks, m.alloc())
	}
	return nil
}

// alloc takes a free block, evicting the least recently used cached one
// when none is free.
func (m *Manager) alloc() int32 {
	var b int32
	if n := len(m.free); n > 0 {
		b = m.free[n-1]
		m.free = m.free[:n-1]
	} else {
		b = m.lruHead
		m.lruRemove(b)
		delete(m.byHash, m.hash[b])
		m.hashed[b] = false
	}
	m.ref[b] = 1
	return b
}

// Commit registers the blocks of s that tokens[:computed] now fill
// completely, so later sequences can reuse them. tokens are all of the
// sequence's tokens from position 0.
func (m *Manager) Commit(s *Seq, tokens []int32, computed int) {
	for i := len(s.hashes); (i+1)*m.blockSize <= computed && i < len(s.Blocks); i++ {
		var parent Hash
		if i > 0 {
			parent = s.hashes[i-1]
		}
		h := blockHash(parent, tokens[i*m.blockSize:(i+1)*m.blockSize])
		s.hashes = append(s.hashes, h)
		b := s.Blocks[i]
		if _, dup := m.byHash[h]; dup || m.hashed[b] {
			// Another block holds the same prefix (two sequences computed
			// it at once): keep that one; this block is freed normally.
			continue
		}
		m.byHash[h] = b
		m.hash[b] = h
		m.hashed[b] = true
	}
}

// Release drops s's hold on its blocks. Blocks no one else holds become
// free, or, when they hold a registered prefix, evictable. A sequence's
// later blocks are released first, so they are evicted before its earlier
// ones: a prefix is useless without its start.
func (m *Manager) Release(s *Seq) {
	for i := len(s.Blocks) - 1; i >= 0; i-- {
		b := s.Blocks[i]
		m.ref[b]--
		switch {
		case m.ref[b] > 0:
		case m.hashed[b]:
			m.lruPush(b)
		default:
			m.free = append(m.free, b)
		}
	}
	s.Blocks, s.hashes = s.Blocks[:0], s.hashes[:0]
}

func (m *Manager) lruPush(b int32) {
	m.prev[b], m.next[b] = m.lruTail, -1
	if m.lruTail >= 0 {
		m.next[m.lruTail] = b
	} else {
		m.lruHead = b
	}
	m.lruTail = b
	m.inLRU[b] = true
	m.evictable++
}

func (m *Manager) lruRemove(b int32) {
	p, n := m.prev[b], m.next[b]
	if p >= 0 {
		m.next[p] = n
	} else {
		m.lruHead = n
	}
	if n >= 0 {
		m.prev[n] = p
	} else {
		m.lruTail = p
	}
	m.inLRU[b] = false
	m.evictable--
}

// Check verifies the manager's invariants against the sequences that hold
// blocks (for tests): every block is exactly one of held (reference count =
// the sequences holding it), free (unheld, no prefix), or evictable
// (unheld, with a prefix, in the LRU list); the hash index matches.
func (m *Manager) Check(seqs ...*Seq) error {
	holds := make([]int32, len(m.ref))
	for _, s := range seqs {
		for _, b := range s.Blocks {
			holds[b]++
		}
	}
	isFree := make([]bool, len(m.ref))
	for _, b := range m.free {
		if isFree[b] {
			return fmt.Errorf("block %d is on the free list twice", b)
		}
		isFree[b] = true
	}
	lru := 0
	for b := m.lruHead; b >= 0; b = m.next[b] {
		if !m.inLRU[b] {
			return fmt.Errorf("block %d is linked but not marked evictable", b)
		}
		lru++
		if lru > len(m.ref) {
			return errors.New("the LRU list has a cycle")
		}
	}
	if lru != m.evictable {
		return fmt.Errorf("LRU list has %d blocks, count says %d", lru, m.evictable)
	}
	for b := range m.ref {
		switch {
		case m.ref[b] != holds[b]:
			return fmt.Errorf("block %d: reference count %d, held by %d sequences", b, m.ref[b], holds[b])
		case m.ref[b] > 0 && (isFree[b] || m.inLRU[b]):
			return fmt.Errorf("block %d is held and also free or evictable", b)
		case m.ref[b] == 0 && isFree[b] == m.inLRU[b]:
			return fmt.Errorf("block %d is unheld: free %v, evictable %v", b, isFree[b], m.inLRU[b])
		case m.inLRU[b] && !m.hashed[b]:
			return fmt.Errorf("block %d is evictable without a prefix", b)
		case isFree[b] && m.hashed[b]:
			return fmt.Errorf("block %d is free but still indexed", b)
		}
		if m.hashed[b] && m.byHash[m.hash[b]] != int32(b) {
			return fmt.Errorf("block %d: hash index points to %d", b, m.byHash[m.hash[b]])
		}
	}
	if len(m.byHash) != countTrue(m.hashed) {
		return fmt.Errorf("hash index has %d entries for %d hashed blocks", len(m.byHash), countTrue(m.hashed))
	}
	return nil
}

func countTrue(v []bool) int {
	n := 0
	for _, x := range v {
		if x {
			n++
		}
	}
	return n
}
