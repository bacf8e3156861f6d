package tokenizer

import (
	"unicode"
	"unicode/utf8"
)

// addedToken is an entry of tokenizer.json's "added_tokens": text that is
// always one token and is cut out of the input before anything else runs.
type addedToken struct {
	ID         int    `json:"id"`
	Content    string `json:"content"`
	SingleWord bool   `json:"single_word"`
	LStrip     bool   `json:"lstrip"`
	RStrip     bool   `json:"rstrip"`
	Normalized bool   `json:"normalized"`
	Special    bool   `json:"special"`
}

// trie finds added tokens in text: at each position the longest token that
// starts there, scanning left to right (leftmost-longest, like the
// reference's Aho-Corasick matcher).
type trie struct {
	next  map[byte]*trie
	token *addedToken
	first [256]bool // bytes that start some token (root only)
}

func (t *trie) insert(tok *addedToken) {
	t.first[tok.Content[0]] = true
	n := t
	for i := 0; i < len(tok.Content); i++ {
		c := tok.Content[i]
		if n.next == nil {
			n.next = map[byte]*trie{}
		}
		child := n.next[c]
		if child == nil {
			child = &trie{}
			n.next[c] = child
		}
		n = child
	}
	n.token = tok
}

// longest returns the longest token that s starts with, or nil.
func (t *trie) longest(s string) *addedToken {
	var best *addedToken
	n := t
	for i := 0; i < len(s); i++ {
		n = n.next[s[i]]
		if n == nil {
			break
		}
		if n.token != nil {
			best = n.token
		}
	}
	return best
}

// segment is a stretch of input: either an added token or plain text.
type segment struct {
	text  string
	token *addedToken // nil for plain text
}

// splitAdded cuts the added tokens of t out of s. Matches honour
// single_word (not inside a word) and lstrip/rstrip (the match swallows
// the whitespace beside it).
func splitAdded(t *trie, s string) []segment {
	if t.next == nil {
		return []segment{{text: s}}
	}
	var out []segment
	last := 0 // start of the pending plain text
	for i := 0; i < len(s); {
		if !t.first[s[i]] {
			i++
			continue
		}
		tok := t.longest(s[i:])
		if tok == nil || (tok.SingleWord && !wordBoundaries(s, i, i+len(tok.Content))) {
			i++
			continue
		}
		start, end := i, i+len(tok.Content)
		if tok.LStrip {
			for start > last {
				r, size := utf8.DecodeLastRuneInString(s[last:start])
				if !isSpace(r) {
					break
				}
				start -= size
			}
		}
		if tok.RStrip {
			for end < len(s) {
				r, size := utf8.DecodeRuneInString(s[end:])
				if !isSpace(r) {
					break
				}
				end += size
			}
		}
		if start > last {
			out = append(out, segment{text: s[last:start]})
		}
		out = append(out, segment{text: s[start:end], token: tok})
		last, i = end, end
	}
	if last < len(s) || len(out) == 0 {
		out = append(out, segment{text: s[last:]})
	}
	return out
}

// wordBoundaries reports whether s[start:end] is not glued to word
// characters on either side.
func wordBoundaries(s string, start, end int) bool {
	if start > 0 {
		r, _ := utf8.DecodeLastRuneInString(s[:start])
		if isWordChar(r) {
			return false
		}
	}
	if end < len(s) {
		r, _ := utf8.DecodeRuneInString(s[end:])
		if isWordChar(r) {
			return false
		}
	}
	return true
}

func isWordChar(r rune) bool {
	return r == '_' || unicode.IsLetter(r) || unicode.IsDigit(r) || unicode.Is(unicode.Mn, r)
}
