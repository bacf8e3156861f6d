// Package tokenizer turns text into token ids and back the way Hugging Face
// tokenizers does for a tokenizer.json (byte-level and SentencePiece-style
// BPE), and renders chat messages into a prompt with the model's Jinja
// chat template.
//
// Encoding runs, in order: cut added/special tokens out of the text,
// normalize the rest, pre-tokenize it into words, BPE each word, and (on
// request) let the post-processor add BOS/EOS. Decoding maps ids to token
// strings and runs the decoder chain.
//
// The files are input like any other: ids are bounded before the id table
// is sized, regex matches time out, and chat templates render within
// bounds on output, loops, recursion and time (jinjaguard.go).
package tokenizer

import (
	"fmt"
	"strings"
	"unicode/utf8"
)

// Tokenizer is safe for concurrent use.
type Tokenizer struct {
	model *bpe
	norm  normalizer    // may be nil
	pre   preTokenizer  // may be nil
	post  postProcessor // may be nil
	dec   decoder       // may be nil

	added    []*addedToken
	rawTrie  *trie // added tokens matched on the input text
	normTrie *trie // added tokens matched on normalized text

	idToToken []string // "" for ids that have no token
	special   []bool

	bosToken, eosToken string
	padToken, unkToken string
	eosIDs             []int
	chatTemplate       *chatTemplate // nil when the files carry none
}

// Encode returns the token ids of text. Special and added tokens written
// in the text are recognised. With addSpecial the post-processor adds its
// tokens (BOS/EOS) as the reference's add_special_tokens=True does.
func (t *Tokenizer) Encode(text string, addSpecial bool) (_ []int, err error) {
	defer catchRegexError(&err)
	if !utf8.ValidString(text) {
		return nil, fmt.Errorf("tokenizer: input is not valid UTF-8")
	}
	ids := make([]int, 0, len(text)/4+2)
	for _, seg := range t.segments(text) {
		if seg.token != nil {
			ids = append(ids, seg.token.ID)
			continue
		}
		words := []string{seg.text}
		if t.pre != nil {
			words = t.pre.split(words)
		}
		for _, w := range words {
			ids = t.model.encode(ids, w)
		}
	}
	if addSpecial && t.post != nil {
		ids = t.post.process(ids)
	}
	return ids, nil
}

// segments cuts the added tokens out of text and normalizes the rest:
// first tokens matched on the raw text, then, inside each normalized
// stretch, tokens marked "normalized".
func (t *Tokenizer) segments(text string) []segment {
	var out []segment
	for _, seg := range splitAdded(t.rawTrie, text) {
		if seg.token != nil {
			out = append(out, seg)
			continue
		}
		s := seg.text
		if t.norm != nil {
			s = t.norm.normalize(s)
		}
		for _, sub := range splitAdded(t.normTrie, s) {
			if sub.token != nil || sub.text != "" {
				out = append(out, sub)
			}
		}
	}
	return out
}

// normalized returns text as the tokenizer sees it after normalization,
// with added tokens left as written: what Decode(Encode(text)) gives back
// for lossless (byte-level) tokenizers.
func (t *Tokenizer) normalized(text string) string {
	var b strings.Builder
	for _, seg := range t.segments(text) {
		b.WriteString(seg.text)
	}
	return b.String()
}

// Decode returns the text of ids, special tokens included. Bytes that do
// not form valid UTF-8 come out as U+FFFD.
func (t *Tokenizer) Decode(ids []int) (string, error) {
	b, err := t.decodeBytes(ids)
	if err != nil {
		return "", err
	}
	return lossyUTF8(b), nil
}

// decodeBytes runs the decoder chain without fixing up invalid UTF-8.
func (t *Tokenizer) decodeBytes(ids []int) (_ []byte, err error) {
	defer catchRegexError(&err)
	tokens := make([]string, len(ids))
	for i, id := range ids {
		if id < 0 || id >= len(t.idToToken) || t.idToToken[id] == "" {
			return nil, fmt.Errorf("tokenizer: id %d is out of range (vocab size %d)", id, len(t.idToToken))
		}
		tokens[i] = t.idToToken[id]
	}
	if t.dec == nil {
		return []byte(strings.Join(tokens, " ")), nil
	}
	return []byte(strings.Join(t.dec.decodeChain(tokens), "")), nil
}

// VocabSize is one past the largest id, added tokens included.
func (t *Tokenizer) VocabSize() int { return len(t.idToToken) }

// EOSIDs lists the ids that end generation, as StopIDs resolved them when
// the tokenizer was loaded.
func (t *Tokenizer) EOSIDs() []int { return append([]int(nil), t.eosIDs...) }

// TokenID returns the id of a token string (added tokens included).
func (t *Tokenizer) TokenID(token string) (int, bool) {
	for _, a := range t.added {
		if a.Content == token {
			return a.ID, true
		}
	}
	id, ok := t.model.vocab[token]
	return id, ok
}

// Token returns the token string of id, or "" if there is none.
func (t *Tokenizer) Token(id int) string {
	if id < 0 || id >= len(t.idToToken) {
		return ""
	}
	return t.idToToken[id]
}

// IsSpecial reports whether id is an added token marked special.
func (t *Tokenizer) IsSpecial(id int) bool {
	return id >= 0 && id < len(t.special) && t.special[id]
}

// BOSToken and EOSToken are the strings from tokenizer_config.json.
func (t *Tokenizer) BOSToken() string { return t.bosToken }
func (t *Tokenizer) EOSToken() string { return t.eosToken }
