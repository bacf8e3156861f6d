package constrain

import (
	"bytes"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/mmfp4/mmfp4/tokenizer"
)

// Vocab is what a constraint needs to know of the tokenizer: the bytes of
// every token, which tokens are special (markup rather than text: special
// tokens, and tags such as <think> that the tokenizer has as added
// tokens), and which end the output.
type Vocab struct {
	tokens  [][]byte
	special []bool
	eos     []int32
	isEOS   []bool
	trie    *trie // the ordinary tokens: not special, not EOS, not empty
}

// NewVocab makes a Vocab from each token's bytes (nil for ids that have no
// token), the special flags, and the ids that end the output.
func NewVocab(tokens [][]byte, special []bool, eos []int) (*Vocab, error) {
	if len(special) != len(tokens) {
		return nil, fmt.Errorf("constrain: %d tokens but %d special flags", len(tokens), len(special))
	}
	v := &Vocab{tokens: tokens, special: special, isEOS: make([]bool, len(tokens))}
	for _, id := range eos {
		if id < 0 || id >= len(tokens) {
			return nil, fmt.Errorf("constrain: end-of-output id %d is out of range (vocabulary of %d)", id, len(tokens))
		}
		if !v.isEOS[id] {
			v.isEOS[id] = true
			v.eos = append(v.eos, int32(id))
		}
	}
	var ordinary []int32
	for id, t := range tokens {
		if len(t) > 0 && !special[id] && !v.isEOS[id] {
			ordinary = append(ordinary, int32(id))
		}
	}
	v.trie = newTrie(tokens, ordinary)
	return v, nil
}

// Size is the number of token ids.
func (v *Vocab) Size() int { return len(v.tokens) }

var vocabCache sync.Map // vocabKey -> *vocabEntry

type vocabKey struct {
	tok *tokenizer.Tokenizer
	eos string
}

type vocabEntry struct {
	once sync.Once
	v    *Vocab
	err  error
}

// VocabOf returns the Vocab of a tokenizer with the given end-of-output
// ids (usually tok.EOSIDs()). It is made once per tokenizer and ids.
func VocabOf(tok *tokenizer.Tokenizer, eos []int) (*Vocab, error) {
	key := vocabKey{tok, fmt.Sprint(eos)}
	e, _ := vocabCache.LoadOrStore(key, &vocabEntry{})
	entry := e.(*vocabEntry)
	entry.once.Do(func() {
		tokens, special, err := tokenBytes(tok)
		if err == nil {
			entry.v, entry.err = NewVocab(tokens, special, eos)
		} else {
			entry.err = err
		}
	})
	return entry.v, entry.err
}

// tokenBytes finds the bytes of each token through the tokenizer's public
// API: the decoding of the token after a plain reference text, less the
// reference, so that decoders that treat the start of a text specially
// (SentencePiece's leading space) see the token mid-text. Tokens that
// are part of a UTF-8 character decode to U+FFFD; their bytes come from
// the token string, byte-level (GPT-2) or byte-fallback ("<0xAB>").
func tokenBytes(tok *tokenizer.Tokenizer) ([][]byte, []bool, error) {
	ref, err := tok.Encode("a", false)
	if err != nil || len(ref) == 0 {
		return nil, nil, fmt.Errorf("constrain: the tokenizer cannot encode a reference text: %v", err)
	}
	refText, err := tok.Decode(ref)
	if err != nil {
		return nil, nil, err
	}
	n := tok.VocabSize()
	tokens := make([][]byte, n)
	special := make([]bool, n)
	ids := append(slices.Clone(ref), 0)
	for id := range n {
		name := tok.Token(id)
		if name == "" {
			continue
		}
		ids[len(ids)-1] = id
		s, err := tok.Decode(ids)
		if err != nil {
			return nil, nil, fmt.Errorf("constrain: decoding token %d: %w", id, err)
		}
		if !strings.HasPrefix(s, refText) {
			return nil, nil, fmt.Errorf("constrain: token %d (%q) changes the text before it when decoded", id, name)
		}
		text := s[len(refText):]
		if strings.ContainsRune(text, '\uFFFD') {
			if b, ok := rawTokenBytes(name); ok {
				tokens[id] = b
				continue
			}
		}
		tokens[id] = []byte(text)
		special[id] = tok.IsSpecial(id) || isMarkup(tok, id, text)
	}
	return tokens, special, nil
}

// isMarkup reports whether a token is a chat-format tag that the
// tokenizer does not mark special: an added token such as GLM's <think>
// or <tool_call>, recognised by its <...> form and by encoding to itself.
func isMarkup(tok *tokenizer.Tokenizer, id int, text string) bool {
	if len(text) < 3 || text[0] != '<' || text[len(text)-1] != '>' || strings.ContainsAny(text[1:len(text)-1], "<> \t\n") {
		return false
	}
	ids, err := tok.Encode(text, false)
	return err == nil && len(ids) == 1 && ids[0] == id
}

// rawTokenBytes reads a token string as byte-fallback "<0xAB>" or as
// GPT-2 byte-level text.
func rawTokenBytes(name string) ([]byte, bool) {
	if len(name) == 6 && strings.HasPrefix(name, "<0x") && name[5] == '>' {
		v, err := strconv.ParseUint(name[3:5], 16, 8)
		return []byte{byte(v)}, err == nil
	}
	var out []byte
	for _, r := range name {
		b, ok := byteLevelRune[r]
		if !ok {
			return nil, false
		}
		out = append(out, b)
	}
	return out, true
}

// byteLevelRune maps GPT-2's byte-level alphabet back to bytes: printable
// Latin-1 bytes stand for themselves, the others were shifted to U+0100
// and up in byte order.
var byteLevelRune = func() map[rune]byte {
	m := map[rune]byte{}
	shift := rune(0)
	for b := 0; b < 256; b++ {
		printable := (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)
		if printable {
			m[rune(b)] = byte(b)
		} else {
			m[256+shift] = byte(b)
			shift++
		}
	}
	return m
}()

// trie holds token byte strings in depth-first order, so that a walk can
// skip a whole subtree (every token that starts with a refused prefix)
// by jumping over it.
type trie struct {
	label []byte   // the last byte of the node's path
	depth []uint16 // length of the path
	size  []int32  // nodes in the subtree, the node included
	first []int32  // index in ids of the first token ending here, or -1
	count []uint16 // tokens ending here
	ids   []int32
	max   int // the longest path
}

func newTrie(tokens [][]byte, ids []int32) *trie {
	ids = slices.Clone(ids)
	slices.SortFunc(ids, func(a, b int32) int { return bytes.Compare(tokens[a], tokens[b]) })
	t := &trie{ids: ids}
	add := func(label byte, depth int) int32 {
		t.label = append(t.label, label)
		t.depth = append(t.depth, uint16(depth))
		t.size = append(t.size, 1)
		t.first = append(t.first, -1)
		t.count = append(t.count, 0)
		return int32(len(t.label) - 1)
	}
	path := []int32{add(0, 0)} // the root
	var prev []byte
	closeTo := func(depth int) {
		for len(path) > depth+1 {
			n := path[len(path)-1]
			path = path[:len(path)-1]
			t.size[path[len(path)-1]] += t.size[n]
		}
	}
	for i, id := range ids {
		tok := tokens[id]
		common := 0
		for common < len(tok) && common < len(prev) && tok[common] == prev[common] {
			common++
		}
		closeTo(common)
		for d := common; d < len(tok); d++ {
			path = append(path, add(tok[d], d+1))
		}
		n := path[len(path)-1]
		if t.first[n] < 0 {
			t.first[n] = int32(i)
		}
		t.count[n]++
		t.max = max(t.max, len(tok))
		prev = tok
	}
	closeTo(0)
	return t
}
