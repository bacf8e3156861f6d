package tokenizer

import (
	"unicode"
	"unicode/utf8"
)

// Most BPE tokenizers split words with one of a few well-known patterns.
// regexp2 runs them at a few MB/s, so these patterns get hand-written
// matchers that do what the backtracking engine does, alternative by
// alternative. FuzzFastSplit checks them against regexp2.

const (
	// cl100kPattern with \p{N}{1,3}: Llama 3, GLM-4 and others.
	cl100kPattern = `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
	// qwen2Pattern is the same with single digits: Qwen 2 and 3.
	qwen2Pattern = `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
	// o200kPattern splits CamelCase words apart: gpt-oss and others.
	// The three splits of DeepSeek V3: digits, CJK runs, then words.
	digits3Pattern  = `\p{N}{1,3}`
	cjkPattern      = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
	deepseekPattern = "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"
	o200kPattern    = `[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+`
)

// fastMatcher returns a matcher for a known pattern, or nil. A matcher
// returns the length in bytes of the match at s[i:], or 0 for none.
func fastMatcher(pattern string) func(s string, i int) int {
	switch pattern {
	case cl100kPattern:
		return func(s string, i int) int { return matchCL100K(s, i, 3) }
	case qwen2Pattern:
		return func(s string, i int) int { return matchCL100K(s, i, 1) }
	case gpt2Pattern:
		return matchGPT2
	case o200kPattern:
		return matchO200K
	case digits3Pattern:
		return func(s string, i int) int { return numbers(s, i, 3) - i }
	case cjkPattern:
		return func(s string, i int) int { return runOf(s, i, isDeepSeekCJK) - i }
	case deepseekPattern:
		return matchDeepSeek
	}
	return nil
}

// findAllWith runs a matcher over s like a regex find-all: where nothing
// matches, one character is skipped.
func findAllWith(match func(string, int) int, s string) []span {
	out := make([]span, 0, len(s)/4+1)
	for i := 0; i < len(s); {
		if n := match(s, i); n > 0 {
			out = append(out, span{i, i + n})
			i += n
			continue
		}
		_, size := utf8.DecodeRuneInString(s[i:])
		i += size
	}
	return out
}

func isLetter(r rune) bool {
	if r < 0x80 {
		return (r|0x20) >= 'a' && (r|0x20) <= 'z'
	}
	return unicode.IsLetter(r)
}

func isNumber(r rune) bool {
	if r < 0x80 {
		return r >= '0' && r <= '9'
	}
	return unicode.IsNumber(r)
}

// isWS is \s: Unicode White_Space (the same set in .NET and Oniguruma).
func isWS(r rune) bool {
	if r < 0x80 {
		return r == ' ' || (r >= '\t' && r <= '\r')
	}
	return isSpace(r)
}

func runeAt(s string, i int) (rune, int) {
	if i >= len(s) {
		return -1, 0
	}
	if c := s[i]; c < utf8.RuneSelf {
		return rune(c), 1
	}
	return utf8.DecodeRuneInString(s[i:])
}

// contraction matches (?i:'s|'t|'re|'ve|'m|'ll|'d) at s[i:].
func contraction(s string, i int) int {
	if i >= len(s) || s[i] != '\'' || i+1 >= len(s) {
		return 0
	}
	switch s[i+1] | 0x20 {
	case 's', 't', 'm', 'd':
		return 2
	}
	if i+2 < len(s) {
		a, b := s[i+1]|0x20, s[i+2]|0x20
		if (a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l') {
			return 3
		}
	}
	return 0
}

// runOf returns the end of the run of runes in s[i:] that satisfy f.
func runOf(s string, i int, f func(rune) bool) int {
	for i < len(s) {
		r, size := runeAt(s, i)
		if !f(r) {
			break
		}
		i += size
	}
	return i
}

func isOther(r rune) bool { return !isWS(r) && !isLetter(r) && !isNumber(r) }

// matchWhitespace runs the three whitespace alternatives shared by the
// patterns: \s*[\r\n]+ | \s+(?!\S) | \s+ (withNewline false drops the first).
func matchWhitespace(s string, i int, withNewline bool) int {
	end := i
	lastNL, lastStart, count := -1, i, 0
	for end < len(s) {
		r, size := runeAt(s, end)
		if !isWS(r) {
			break
		}
		if r == '\r' || r == '\n' {
			lastNL = end
		}
		lastStart = end
		end += size
		count++
	}
	if count == 0 {
		return 0
	}
	if withNewline && lastNL >= 0 {
		// \s* backs off to the last newline, which [\r\n]+ then takes.
		return lastNL + 1 - i
	}
	if end == len(s) || count == 1 {
		return end - i // \s+(?!\S) at the end, or \s+ for a single space
	}
	return lastStart - i // leave the last space to start the next word
}

// matchCL100K: (?i:'s|'t|'re|'ve|'m|'ll|'d) | [^\r\n\p{L}\p{N}]?\p{L}+ |
// \p{N}{1,maxDigits} | ' '?[^\s\p{L}\p{N}]+[\r\n]* | whitespace.
func matchCL100K(s string, i, maxDigits int) int {
	if n := contraction(s, i); n > 0 {
		return n
	}
	r, size := runeAt(s, i)
	if isLetter(r) {
		return runOf(s, i+size, isLetter) - i
	}
	if r != '\r' && r != '\n' && !isNumber(r) {
		if r2, _ := runeAt(s, i+size); r2 >= 0 && isLetter(r2) {
			return runOf(s, i+size, isLetter) - i
		}
	}
	if isNumber(r) {
		return numbers(s, i, maxDigits) - i
	}
	j := i
	if r == ' ' {
		j++
	}
	if r2, _ := runeAt(s, j); r2 >= 0 && isOther(r2) {
		j = runOf(s, j, isOther)
		return runOf(s, j, func(r rune) bool { return r == '\r' || r == '\n' }) - i
	}
	return matchWhitespace(s, i, true)
}

// matchGPT2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|
// \s+(?!\S)|\s+ (case-sensitive contractions).
func matchGPT2(s string, i int) int {
	if i+1 < len(s) && s[i] == '\'' {
		switch s[i+1] {
		case 's', 't', 'm', 'd':
			return 2
		}
		if i+2 < len(s) {
			switch s[i+1 : i+3] {
			case "re", "ve", "ll":
				return 3
			}
		}
	}
	j := i
	if s[i] == ' ' {
		j++
	}
	if r, _ := runeAt(s, j); r >= 0 {
		switch {
		case isLetter(r):
			return runOf(s, j, isLetter) - i
		case isNumber(r):
			return runOf(s, j, isNumber) - i
		case isOther(r):
			return runOf(s, j, isOther) - i
		}
	}
	return matchWhitespace(s, i, false)
}

// upperish is [\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}], lowerish [\p{Ll}\p{Lm}\p{Lo}\p{M}].
func upperish(r rune) bool {
	if r < 0x80 {
		return r >= 'A' && r <= 'Z'
	}
	return unicode.In(r, unicode.Lu, unicode.Lt, unicode.Lm, unicode.Lo, unicode.M)
}

func lowerish(r rune) bool {
	if r < 0x80 {
		return r >= 'a' && r <= 'z'
	}
	return unicode.In(r, unicode.Ll, unicode.Lm, unicode.Lo, unicode.M)
}

// o200kWord matches upperish* lowerish+ at s[p:] and returns its end, or
// -1. When the upperish run is not followed by a lowerish rune, the
// engine backs off to the last rune of the run that is also lowerish.
func o200kWord(s string, p int) int {
	q, lastLower := p, -1
	for q < len(s) {
		r, size := runeAt(s, q)
		if !upperish(r) {
			break
		}
		q += size
		if lowerish(r) {
			lastLower = q
		}
	}
	if r, _ := runeAt(s, q); r >= 0 && lowerish(r) {
		return runOf(s, q, lowerish)
	}
	return lastLower
}

// o200kCaps matches upperish+ lowerish* at s[p:], or returns -1.
func o200kCaps(s string, p int) int {
	q := runOf(s, p, upperish)
	if q == p {
		return -1
	}
	return runOf(s, q, lowerish)
}

// matchO200K: two word alternatives, each with an optional leading
// [^\r\n\p{L}\p{N}] and an optional contraction after, then \p{N}{1,3},
// ' '?[^\s\p{L}\p{N}]+[\r\n/]*, and the whitespace alternatives.
func matchO200K(s string, i int) int {
	r, size := runeAt(s, i)
	prefix := r != '\r' && r != '\n' && !isLetter(r) && !isNumber(r)
	for _, word := range []func(string, int) int{o200kWord, o200kCaps} {
		if prefix {
			if e := word(s, i+size); e >= 0 {
				return e + contraction(s, e) - i
			}
		}
		if e := word(s, i); e >= 0 {
			return e + contraction(s, e) - i
		}
	}
	if isNumber(r) {
		return numbers(s, i, 3) - i
	}
	j := i
	if r == ' ' {
		j++
	}
	if r2, _ := runeAt(s, j); r2 >= 0 && isOther(r2) {
		j = runOf(s, j, isOther)
		return runOf(s, j, func(r rune) bool { return r == '\r' || r == '\n' || r == '/' }) - i
	}
	return matchWhitespace(s, i, true)
}

// numbers returns the end of up to max numeric runes at s[i:].
func numbers(s string, i, max int) int {
	for k := 0; k < max; k++ {
		r, size := runeAt(s, i)
		if r < 0 || !isNumber(r) {
			break
		}
		i += size
	}
	return i
}

func isDeepSeekCJK(r rune) bool {
	return (r >= 0x4e00 && r <= 0x9fa5) || (r >= 0x3040 && r <= 0x309f) || (r >= 0x30a0 && r <= 0x30ff)
}

func isASCIIPunct(r rune) bool {
	return (r >= '!' && r <= '/') || (r >= ':' && r <= '@') || (r >= '[' && r <= '`') || (r >= '{' && r <= '~')
}

func isASCIILetterRune(r rune) bool { return r < 0x80 && isASCIILetter(byte(r)) }

func isPS(r rune) bool { return unicode.IsPunct(r) || unicode.IsSymbol(r) }

func isLM(r rune) bool { return isLetter(r) || unicode.Is(unicode.M, r) }

// matchDeepSeek: ASCII punctuation + ASCII letters | [^\r\n\p{L}\p{P}\p{S}]?
// [\p{L}\p{M}]+ | ' '?[\p{P}\p{S}]+[\r\n]* | whitespace.
func matchDeepSeek(s string, i int) int {
	r, size := runeAt(s, i)
	r2, _ := runeAt(s, i+size)
	if isASCIIPunct(r) && r2 >= 0 && isASCIILetterRune(r2) {
		return runOf(s, i+size, isASCIILetterRune) - i
	}
	if r != '\r' && r != '\n' && !isLetter(r) && !isPS(r) && r2 >= 0 && isLM(r2) {
		return runOf(s, i+size, isLM) - i
	}
	if isLM(r) {
		return runOf(s, i, isLM) - i
	}
	j := i
	if r == ' ' {
		j++
	}
	if r3, _ := runeAt(s, j); r3 >= 0 && isPS(r3) {
		j = runOf(s, j, isPS)
		return runOf(s, j, func(r rune) bool { return r == '\r' || r == '\n' }) - i
	}
	return matchWhitespace(s, i, true)
}
