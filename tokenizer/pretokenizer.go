package tokenizer

import (
	"encoding/json"
	"fmt"
	"strings"
	"unicode"
)

// A preTokenizer cuts normalized text into words; BPE then runs on each
// word alone. It takes and returns the list of pieces so that Sequence can
// chain steps, as in the reference.
type preTokenizer interface {
	split(pieces []string) []string
}

// splitBehavior says where the matched text goes.
type splitBehavior int

const (
	removed            splitBehavior = iota // matches are dropped
	isolated                                // matches become their own pieces
	mergedWithPrevious                      // a match joins the piece before it
	mergedWithNext                          // a match joins the piece after it
	contiguous                              // adjacent matches join into one piece
)

var behaviors = map[string]splitBehavior{
	"Removed": removed, "Isolated": isolated, "MergedWithPrevious": mergedWithPrevious,
	"MergedWithNext": mergedWithNext, "Contiguous": contiguous,
}

type splitPre struct {
	pattern  pattern
	behavior splitBehavior
	invert   bool
}

func (p splitPre) split(pieces []string) []string {
	out := make([]string, 0, 2*len(pieces))
	for _, s := range pieces {
		out = splitBy(out, s, p.pattern.findAll(s), p.behavior, p.invert)
	}
	return out
}

// splitBy cuts s at the match spans and appends the pieces to out,
// following the behavior. invert swaps which parts count as matches.
func splitBy(out []string, s string, matches []span, b splitBehavior, invert bool) []string {
	if b == isolated {
		// The common case, without building the parts list.
		last := 0
		for _, m := range matches {
			if m.start > last {
				out = append(out, s[last:m.start])
			}
			out = append(out, s[m.start:m.end])
			last = m.end
		}
		if last < len(s) {
			out = append(out, s[last:])
		}
		return out
	}
	// Cover s with alternating parts, each marked as a match or not.
	type part struct {
		span
		match bool
	}
	parts := make([]part, 0, 2*len(matches)+1)
	last := 0
	for _, m := range matches {
		if m.start > last {
			parts = append(parts, part{span{last, m.start}, invert})
		}
		parts = append(parts, part{m, !invert})
		last = m.end
	}
	if last < len(s) {
		parts = append(parts, part{span{last, len(s)}, invert})
	}

	switch b {
	case removed:
		for _, p := range parts {
			if !p.match {
				out = append(out, s[p.start:p.end])
			}
		}
	case isolated:
		for _, p := range parts {
			out = append(out, s[p.start:p.end])
		}
	case mergedWithPrevious:
		// A match closes the piece that is open; other text opens one.
		start, open := 0, false
		for _, p := range parts {
			if p.match {
				out = append(out, s[start:p.end])
				start, open = p.end, false
			} else if !open {
				start, open = p.start, true
			}
		}
		if open {
			out = append(out, s[start:])
		}
	case mergedWithNext:
		// The mirror of mergedWithPrevious: walking from the end, a match
		// joins the piece after it unless that piece began with a match.
		var rev []span
		prevMatch := false
		for i := len(parts) - 1; i >= 0; i-- {
			p := parts[i]
			if p.match && !prevMatch && len(rev) > 0 {
				rev[len(rev)-1].start = p.start
			} else {
				rev = append(rev, p.span)
			}
			prevMatch = p.match
		}
		for i := len(rev) - 1; i >= 0; i-- {
			out = append(out, s[rev[i].start:rev[i].end])
		}
	case contiguous:
		start, prevMatch := 0, false
		for i, p := range parts {
			if i > 0 && !(p.match && prevMatch) {
				out = append(out, s[start:p.start])
				start = p.start
			}
			prevMatch = p.match
		}
		if len(parts) > 0 {
			out = append(out, s[start:])
		}
	}
	return out
}

// digitsPre splits runs of digits from other text, or every digit alone.
type digitsPre struct{ individual bool }

func (d digitsPre) split(pieces []string) []string {
	var out []string
	for _, s := range pieces {
		var matches []span
		for i, r := range s {
			if !unicode.IsNumber(r) {
				continue
			}
			end := i + runeLen(r)
			if !d.individual && len(matches) > 0 && matches[len(matches)-1].end == i {
				matches[len(matches)-1].end = end
				continue
			}
			matches = append(matches, span{i, end})
		}
		out = splitBy(out, s, matches, isolated, false)
	}
	return out
}

// gpt2Pattern is the word split that ByteLevel applies when use_regex is on.
const gpt2Pattern = `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`

// byteLevelPre maps each piece to the byte-level alphabet, after an
// optional leading space and the optional GPT-2 word split.
type byteLevelPre struct {
	addPrefixSpace bool
	re             *pattern
}

func (p byteLevelPre) split(pieces []string) []string {
	out := make([]string, 0, len(pieces))
	for _, s := range pieces {
		if p.addPrefixSpace && !strings.HasPrefix(s, " ") {
			s = " " + s
		}
		if p.re == nil {
			out = append(out, byteLevelEncode(s))
			continue
		}
		for _, w := range splitBy(nil, s, p.re.findAll(s), isolated, false) {
			out = append(out, byteLevelEncode(w))
		}
	}
	return out
}

// whitespaceSplit splits on whitespace and drops it.
type whitespaceSplit struct{}

func (whitespaceSplit) split(pieces []string) []string {
	var out []string
	for _, s := range pieces {
		out = append(out, strings.FieldsFunc(s, isSpace)...)
	}
	return out
}

// metaspacePre replaces spaces with the replacement rune (▁), optionally
// prepends one, and optionally splits before each replacement rune.
type metaspacePre struct {
	replacement string
	prepend     string // "always", "first" or "never"
	splitWords  bool
}

func (m metaspacePre) splitPieces(pieces []string, first bool) []string {
	var out []string
	for i, s := range pieces {
		s = strings.ReplaceAll(s, " ", m.replacement)
		if (m.prepend == "always" || (m.prepend == "first" && first && i == 0)) && !strings.HasPrefix(s, m.replacement) {
			s = m.replacement + s
		}
		if !m.splitWords {
			out = append(out, s)
			continue
		}
		var matches []span
		for j := 0; ; {
			k := strings.Index(s[j:], m.replacement)
			if k < 0 {
				break
			}
			matches = append(matches, span{j + k, j + k + len(m.replacement)})
			j += k + len(m.replacement)
		}
		out = splitBy(out, s, matches, mergedWithNext, false)
	}
	return out
}

func (m metaspacePre) split(pieces []string) []string { return m.splitPieces(pieces, true) }

type preSequence []preTokenizer

func (q preSequence) split(pieces []string) []string {
	for _, p := range q {
		pieces = p.split(pieces)
	}
	return pieces
}

type preTokenizerJSON struct {
	Type           string            `json:"type"`
	Pretokenizers  []json.RawMessage `json:"pretokenizers"`
	Pattern        json.RawMessage   `json:"pattern"`
	Behavior       string            `json:"behavior"`
	Invert         bool              `json:"invert"`
	AddPrefixSpace *bool             `json:"add_prefix_space"`
	UseRegex       *bool             `json:"use_regex"`
	Individual     bool              `json:"individual_digits"`
	Replacement    string            `json:"replacement"`
	PrependScheme  string            `json:"prepend_scheme"`
	Split          *bool             `json:"split"`
}

func parsePreTokenizer(raw json.RawMessage) (preTokenizer, error) {
	if isNull(raw) {
		return nil, nil
	}
	var j preTokenizerJSON
	if err := json.Unmarshal(raw, &j); err != nil {
		return nil, err
	}
	switch j.Type {
	case "Split":
		p, err := parsePattern(j.Pattern)
		if err != nil {
			return nil, fmt.Errorf("Split: %w", err)
		}
		b, ok := behaviors[j.Behavior]
		if !ok {
			return nil, fmt.Errorf("Split: unknown behavior %q", j.Behavior)
		}
		return splitPre{p, b, j.Invert}, nil
	case "ByteLevel":
		p := byteLevelPre{addPrefixSpace: j.AddPrefixSpace == nil || *j.AddPrefixSpace}
		if j.UseRegex == nil || *j.UseRegex {
			re, err := parsePattern(json.RawMessage(`{"Regex":` + quoteJSON(gpt2Pattern) + `}`))
			if err != nil {
				return nil, err
			}
			p.re = &re
		}
		return p, nil
	case "Digits":
		return digitsPre{j.Individual}, nil
	case "WhitespaceSplit":
		return whitespaceSplit{}, nil
	case "Metaspace":
		m := metaspacePre{splitWords: j.Split == nil || *j.Split}
		m.replacement, m.prepend = metaspaceSettings(j.Replacement, j.PrependScheme, j.AddPrefixSpace)
		return m, nil
	case "Sequence":
		var seq preSequence
		for i, r := range j.Pretokenizers {
			p, err := parsePreTokenizer(r)
			if err != nil {
				return nil, fmt.Errorf("Sequence[%d]: %w", i, err)
			}
			if p != nil {
				seq = append(seq, p)
			}
		}
		return seq, nil
	}
	return nil, fmt.Errorf("unsupported pre_tokenizer type %q", j.Type)
}

func quoteJSON(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

// metaspaceSettings fills in the Metaspace defaults shared by the
// pre-tokenizer and the decoder: replacement "▁", and a prepend scheme of
// "always" unless the older add_prefix_space field turns it off.
func metaspaceSettings(replacement, prepend string, addPrefixSpace *bool) (string, string) {
	if replacement == "" {
		replacement = "▁"
	}
	if prepend == "" {
		prepend = "always"
		if addPrefixSpace != nil && !*addPrefixSpace {
			prepend = "never"
		}
	}
	return replacement, prepend
}
