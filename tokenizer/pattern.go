package tokenizer

import (
	"encoding/json"
	"fmt"
	"strings"
	"time"
	"unicode"

	"github.com/dlclark/regexp2"
)

// A pattern is the {"String": ...} or {"Regex": ...} object that Split,
// Replace and the Replace decoder take. Regexes use lookahead such as
// \s+(?!\S), which Go's regexp cannot run, so they go to regexp2.
type pattern struct {
	literal string
	re      *regexp2.Regexp
	fast    func(s string, i int) int // hand-written matcher for re, if known
}

func parsePattern(raw json.RawMessage) (pattern, error) {
	var j struct {
		String *string `json:"String"`
		Regex  *string `json:"Regex"`
	}
	if err := json.Unmarshal(raw, &j); err != nil {
		return pattern{}, fmt.Errorf("pattern: %w", err)
	}
	switch {
	case j.String != nil:
		if *j.String == "" {
			return pattern{}, fmt.Errorf("pattern: empty string")
		}
		return pattern{literal: *j.String}, nil
	case j.Regex != nil:
		re, err := regexp2.Compile(*j.Regex, regexp2.None)
		if err != nil {
			return pattern{}, fmt.Errorf("pattern: regex %q: %w", *j.Regex, err)
		}
		re.MatchTimeout = regexTimeout
		return pattern{re: re, fast: fastMatcher(*j.Regex)}, nil
	}
	return pattern{}, fmt.Errorf("pattern: need String or Regex")
}

// regexTimeout bounds one regex match, so that a pattern that backtracks
// catastrophically on some text, such as (a+)+$ on "aaa...ab", fails
// instead of running for ever. Real pre-tokenizer patterns take
// microseconds per match.
var regexTimeout = time.Second

// regexError is a regex match that failed (ran past regexTimeout). The
// interfaces that run patterns return no error, so findAll panics with it
// and Encode and Decode turn it back into their error (catchRegexError).
type regexError struct {
	pattern string
	err     error
}

func (e *regexError) Error() string {
	return fmt.Sprintf("tokenizer: regex %q: %v (the pattern backtracks too much on this text)", e.pattern, e.err)
}

// catchRegexError, deferred, returns a regexError raised below as *err.
func catchRegexError(err *error) {
	if r := recover(); r != nil {
		re, ok := r.(*regexError)
		if !ok {
			panic(r)
		}
		*err = re
	}
}

// span is a half-open byte range of a match.
type span struct{ start, end int }

// findAll returns the non-overlapping matches in s, leftmost first.
func (p pattern) findAll(s string) []span {
	if p.re == nil {
		var out []span
		for i := 0; ; {
			j := strings.Index(s[i:], p.literal)
			if j < 0 {
				return out
			}
			out = append(out, span{i + j, i + j + len(p.literal)})
			i += j + len(p.literal)
		}
	}
	if s == "" {
		return nil
	}
	if p.fast != nil {
		return findAllWith(p.fast, s)
	}
	return p.findAllRegexp(s)
}

// findAllRegexp is findAll through regexp2.
func (p pattern) findAllRegexp(s string) []span {
	// regexp2 reports rune positions; map them back to bytes.
	runes := []rune(s)
	offs := make([]int, len(runes)+1)
	b := 0
	for i, r := range runes {
		offs[i] = b
		b += runeLen(r)
	}
	offs[len(runes)] = b
	var out []span
	m, err := p.re.FindRunesMatch(runes)
	for err == nil && m != nil {
		if m.Length > 0 {
			out = append(out, span{offs[m.Index], offs[m.Index+m.Length]})
		}
		m, err = p.re.FindNextMatch(m)
	}
	if err != nil {
		panic(&regexError{p.re.String(), err})
	}
	return out
}

func (p pattern) replaceAll(s, with string) string {
	if p.re == nil {
		return strings.ReplaceAll(s, p.literal, with)
	}
	var b strings.Builder
	last := 0
	for _, m := range p.findAll(s) {
		b.WriteString(s[last:m.start])
		b.WriteString(with)
		last = m.end
	}
	b.WriteString(s[last:])
	return b.String()
}

func runeLen(r rune) int {
	switch {
	case r < 0x80:
		return 1
	case r < 0x800:
		return 2
	case r < 0x10000:
		return 3
	}
	return 4
}

// isSpace matches Rust's char::is_whitespace (Unicode White_Space), which
// the reference uses for Strip and for lstrip/rstrip of added tokens.
func isSpace(r rune) bool { return unicode.Is(unicode.White_Space, r) }
