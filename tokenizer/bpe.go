package tokenizer

import (
	"container/heap"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"unicode/utf8"
)

// bpe is the byte-pair-encoding model: a word starts as single characters
// (or byte-level runes) and the pair with the lowest merge rank is merged
// until no ranked pair is left.
type bpe struct {
	vocab  map[string]int
	merges map[[2]int32]merge // pair of ids -> what it merges into

	unk          int // -1 when the model has no unknown token
	fuseUnk      bool
	byteFallback bool
	ignoreMerges bool // a word found whole in the vocab is not split
	prefix       string
	suffix       string

	// byteIDs maps a byte-level rune's byte to its id, to skip map lookups
	// for the common case; -1 where absent.
	byteIDs [256]int32

	mu    sync.RWMutex
	cache map[string][]int
}

type merge struct {
	rank int32
	id   int32
}

// cacheLimit bounds the word cache; it is cleared when full. Long words are
// not cached at all.
const (
	cacheLimit   = 1 << 17
	cacheWordLen = 64
)

type bpeJSON struct {
	Type                    string            `json:"type"`
	Vocab                   map[string]int    `json:"vocab"`
	Merges                  []json.RawMessage `json:"merges"`
	UnkToken                *string           `json:"unk_token"`
	FuseUnk                 bool              `json:"fuse_unk"`
	ByteFallback            bool              `json:"byte_fallback"`
	IgnoreMerges            bool              `json:"ignore_merges"`
	ContinuingSubwordPrefix *string           `json:"continuing_subword_prefix"`
	EndOfWordSuffix         *string           `json:"end_of_word_suffix"`
	Dropout                 *float64          `json:"dropout"`
}

func parseBPE(raw json.RawMessage) (*bpe, error) {
	var j bpeJSON
	if err := json.Unmarshal(raw, &j); err != nil {
		return nil, err
	}
	if j.Type != "" && j.Type != "BPE" {
		return nil, fmt.Errorf("unsupported model type %q (only BPE)", j.Type)
	}
	if j.Dropout != nil && *j.Dropout > 0 {
		return nil, fmt.Errorf("BPE dropout %v is not supported", *j.Dropout)
	}
	m := &bpe{
		vocab: j.Vocab, unk: -1, fuseUnk: j.FuseUnk, byteFallback: j.ByteFallback,
		ignoreMerges: j.IgnoreMerges, cache: map[string][]int{},
	}
	if j.ContinuingSubwordPrefix != nil {
		m.prefix = *j.ContinuingSubwordPrefix
	}
	if j.EndOfWordSuffix != nil {
		m.suffix = *j.EndOfWordSuffix
	}
	if j.UnkToken != nil {
		id, ok := m.vocab[*j.UnkToken]
		if !ok {
			return nil, fmt.Errorf("unk_token %q is not in the vocab", *j.UnkToken)
		}
		m.unk = id
	}
	for b := 0; b < 256; b++ {
		m.byteIDs[b] = -1
		if id, ok := m.vocab[byteToStr[b]]; ok {
			m.byteIDs[b] = int32(id)
		}
	}

	m.merges = make(map[[2]int32]merge, len(j.Merges))
	for rank, r := range j.Merges {
		a, b, err := parseMerge(r)
		if err != nil {
			return nil, fmt.Errorf("merges[%d]: %w", rank, err)
		}
		ia, oka := m.vocab[a]
		ib, okb := m.vocab[b]
		merged := a + strings.TrimPrefix(b, m.prefix)
		id, okm := m.vocab[merged]
		if !oka || !okb || !okm {
			return nil, fmt.Errorf("merges[%d]: %q + %q uses a token missing from the vocab", rank, a, b)
		}
		key := [2]int32{int32(ia), int32(ib)}
		if _, dup := m.merges[key]; !dup { // the first (lowest) rank wins
			m.merges[key] = merge{int32(rank), int32(id)}
		}
	}
	return m, nil
}

// parseMerge accepts both published forms: "a b" and ["a", "b"].
func parseMerge(raw json.RawMessage) (string, string, error) {
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		a, b, ok := strings.Cut(s, " ")
		if !ok {
			return "", "", fmt.Errorf("merge %q has no space", s)
		}
		return a, b, nil
	}
	var pair []string
	if err := json.Unmarshal(raw, &pair); err != nil || len(pair) != 2 {
		return "", "", fmt.Errorf("merge %s is neither \"a b\" nor [a, b]", raw)
	}
	return pair[0], pair[1], nil
}

// encode appends the ids of one pre-tokenized word to dst.
func (m *bpe) encode(dst []int, word string) []int {
	if word == "" {
		return dst
	}
	if m.ignoreMerges {
		if id, ok := m.vocab[word]; ok {
			return append(dst, id)
		}
	}
	cacheable := len(word) <= cacheWordLen
	if cacheable {
		m.mu.RLock()
		ids, ok := m.cache[word]
		m.mu.RUnlock()
		if ok {
			return append(dst, ids...)
		}
	}
	ids := m.mergeWord(word)
	if cacheable {
		m.mu.Lock()
		if len(m.cache) >= cacheLimit {
			clear(m.cache)
		}
		m.cache[word] = ids
		m.mu.Unlock()
	}
	return append(dst, ids...)
}

// symbol is one part of a word during merging, in a doubly linked list.
type symbol struct {
	id         int32
	prev, next int32 // indices; -1 at the ends
	size       int32 // 0 once merged away
}

// mergeWord splits word into initial symbols and applies merges by rank.
func (m *bpe) mergeWord(word string) []int {
	syms := m.initialSymbols(word)
	if len(syms) > 1 {
		m.applyMerges(syms)
	}
	ids := make([]int, 0, len(syms))
	for i := 0; i >= 0 && i < len(syms); i = int(syms[i].next) {
		ids = append(ids, int(syms[i].id))
	}
	return ids
}

// initialSymbols maps each character to its id, applying the subword
// prefix/suffix, byte fallback and unknown-token rules.
func (m *bpe) initialSymbols(word string) []symbol {
	syms := make([]symbol, 0, len(word))
	affixes := m.prefix != "" || m.suffix != ""
	for i, r := range word {
		size := utf8.RuneLen(r)
		id := int32(-1)
		if !affixes && r < byteRuneLimit {
			// Fast path for byte-level runes.
			if b := runeByte[r]; b >= 0 {
				id = m.byteIDs[b]
			}
		}
		if id < 0 {
			s := word[i : i+size]
			if i > 0 {
				s = m.prefix + s
			}
			if i+size == len(word) {
				s += m.suffix
			}
			if v, ok := m.vocab[s]; ok {
				id = int32(v)
			}
		}
		if id >= 0 {
			syms = append(syms, symbol{id: id, size: int32(size)})
			continue
		}
		if fb := m.byteFallbackSymbols(word[i : i+size]); fb != nil {
			syms = append(syms, fb...)
			continue
		}
		if m.unk < 0 {
			continue // no unknown token: the character is dropped, as in the reference
		}
		if m.fuseUnk && len(syms) > 0 && syms[len(syms)-1].id == int32(m.unk) {
			syms[len(syms)-1].size += int32(size)
			continue
		}
		syms = append(syms, symbol{id: int32(m.unk), size: int32(size)})
	}
	for i := range syms {
		syms[i].prev = int32(i - 1)
		syms[i].next = int32(i + 1)
	}
	if len(syms) > 0 {
		syms[len(syms)-1].next = -1
	}
	return syms
}

// byteFallbackSymbols spells a character missing from the vocab as its
// <0xAB> byte tokens, or returns nil (no byte fallback, or a byte token
// is missing).
func (m *bpe) byteFallbackSymbols(ch string) []symbol {
	if !m.byteFallback {
		return nil
	}
	out := make([]symbol, 0, len(ch))
	for j := 0; j < len(ch); j++ {
		v, ok := m.vocab[fmt.Sprintf("<0x%02X>", ch[j])]
		if !ok {
			return nil
		}
		out = append(out, symbol{id: int32(v), size: 1})
	}
	return out
}

// candidate is a possible merge of the symbols at pos and its next.
type candidate struct {
	pos  int32
	rank int32
	id   int32
}

type candidates []candidate

func (h candidates) Len() int { return len(h) }
func (h candidates) Less(i, j int) bool {
	if h[i].rank != h[j].rank {
		return h[i].rank < h[j].rank
	}
	return h[i].pos < h[j].pos // leftmost first among equal ranks
}
func (h candidates) Swap(i, j int) { h[i], h[j] = h[j], h[i] }
func (h *candidates) Push(x any)   { *h = append(*h, x.(candidate)) }
func (h *candidates) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

// applyMerges merges pairs lowest rank first using a heap of candidates;
// stale candidates (whose symbols changed) are skipped when popped.
func (m *bpe) applyMerges(syms []symbol) {
	h := make(candidates, 0, len(syms))
	for i := 0; i+1 < len(syms); i++ {
		if mg, ok := m.merges[[2]int32{syms[i].id, syms[i+1].id}]; ok {
			h = append(h, candidate{int32(i), mg.rank, mg.id})
		}
	}
	heap.Init(&h)
	for h.Len() > 0 {
		c := heap.Pop(&h).(candidate)
		a := &syms[c.pos]
		if a.size == 0 || a.next < 0 {
			continue
		}
		b := &syms[a.next]
		mg, ok := m.merges[[2]int32{a.id, b.id}]
		if !ok || mg.id != c.id || mg.rank != c.rank {
			continue // this pair changed since the candidate was pushed
		}
		a.id = c.id
		a.size += b.size
		b.size = 0
		a.next = b.next
		if a.next >= 0 {
			syms[a.next].prev = c.pos
		}
		if a.prev >= 0 {
			p := syms[a.prev]
			if mg, ok := m.merges[[2]int32{p.id, a.id}]; ok {
				heap.Push(&h, candidate{a.prev, mg.rank, mg.id})
			}
		}
		if a.next >= 0 {
			if mg, ok := m.merges[[2]int32{a.id, syms[a.next].id}]; ok {
				heap.Push(&h, candidate{c.pos, mg.rank, mg.id})
			}
		}
	}
}
