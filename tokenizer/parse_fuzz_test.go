package tokenizer

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/ardanlabs/jinja"
)

// The fuzz targets of this file take the parts that hostile files vary as
// separate arguments (ids, regexes, template pieces and numbers), so that
// the fuzzer mutates them directly instead of hoping to hit them inside a
// whole file. How to run them: docs/testing.md.
//
// Numbers come as bytes (fuzzInt): Go's fuzzer moves an int64 argument
// by at most 100 per mutation, so it would take it ages to reach the ids
// and counts that break things, while one changed byte of a []byte can
// make a number of any size.

// fuzzInt reads up to 8 little-endian bytes as an int64.
func fuzzInt(b []byte) int64 {
	var x uint64
	for i, c := range b[:min(len(b), 8)] {
		x |= uint64(c) << (8 * i)
	}
	return int64(x)
}

// fuzzBytes is the inverse of fuzzInt for seeds.
func fuzzBytes(n int64) []byte {
	var b []byte
	for x := uint64(n); x != 0; x >>= 8 {
		b = append(b, byte(x))
	}
	return b
}

// watchdog, while fuzzing, crashes the process if stop is not called
// within d: Go's fuzzer reports a crash with the input that caused it,
// but does not notice an input that runs for ever. Plain test runs never
// time anything.
func watchdog(what string, d time.Duration) (stop func()) {
	if fl := flag.Lookup("test.fuzz"); fl == nil || fl.Value.String() == "" {
		return func() {}
	}
	t := time.AfterFunc(d, func() { panic(fmt.Sprintf("%s ran for more than %v", what, d)) })
	return func() { t.Stop() }
}

// readSeed reads a committed seed file; a missing one fails the target.
func readSeed(f *testing.F, path string) []byte {
	f.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		f.Fatalf("seed: %v", err)
	}
	return data
}

// FuzzParseTokenizerJSON: a malformed tokenizer.json gives an error, never a
// panic, and what loads has a bounded id table.
func FuzzParseTokenizerJSON(f *testing.F) {
	f.Add(readSeed(f, "../testdata/tokenizer/glm/tokenizer.json"))
	f.Add([]byte(`{"model":{"type":"BPE","vocab":{"a":0,"b":1,"ab":2},"merges":["a b"]}}`))
	f.Add([]byte(`{"model":{"type":"BPE","vocab":{"a":0},"merges":[["a","a"]]},"pre_tokenizer":{"type":"Split","pattern":{"Regex":"(?!x)"},"behavior":"Isolated"}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		defer shortRegexTimeout()()
		defer watchdog("a tokenizer.json", 30*time.Second)()
		tok, err := parseTokenizerJSON(data)
		if err != nil {
			return
		}
		if tok.VocabSize() > maxTokenIDs {
			t.Fatalf("id table of %d entries", tok.VocabSize())
		}
		for _, s := range []string{"ab", "hello world", "", "ä😀"} {
			if ids, err := tok.Encode(s, true); err == nil {
				_, _ = tok.Decode(ids)
			}
		}
	})
}

// FuzzTokenizerIDs: any vocab, added-token or post-processor id is either
// rejected or fits a table bounded by the number of tokens.
func FuzzTokenizerIDs(f *testing.F) {
	f.Add(fuzzBytes(2), fuzzBytes(3), fuzzBytes(3), "<eos>")
	f.Add(fuzzBytes(5), fuzzBytes(1000), fuzzBytes(0), "<|x|>")
	f.Fuzz(func(t *testing.T, vocabBytes, addedBytes, postBytes []byte, content string) {
		vocabID, addedID, postID := fuzzInt(vocabBytes), fuzzInt(addedBytes), fuzzInt(postBytes)
		src := `{"added_tokens":[{"id":` + strconv.FormatInt(addedID, 10) + `,"content":` + quoteJSON(content) + `,"special":true}],` +
			`"post_processor":{"type":"TemplateProcessing","single":[{"Sequence":{"id":"A"}},{"SpecialToken":{"id":"e"}}],` +
			`"special_tokens":{"e":{"ids":[` + strconv.FormatInt(postID, 10) + `]}}},` +
			`"model":{"type":"BPE","vocab":{"a":0,"b":1,"ab":` + strconv.FormatInt(vocabID, 10) + `},"merges":["a b"]}}`
		tok, err := parseTokenizerJSON([]byte(src))
		if err != nil {
			return
		}
		if n := tok.VocabSize(); n > idLimit(4) {
			t.Fatalf("ids %d %d %d: id table of %d entries", vocabID, addedID, postID, n)
		}
		ids, err := tok.Encode("ab"+content+"ba", true)
		if err != nil {
			if !utf8.ValidString(content) {
				return
			}
			t.Fatalf("Encode: %v", err)
		}
		_, _ = tok.Decode(ids)
	})
}

// FuzzTokenizerRegex: a pattern in a Split pre-tokenizer, a Replace
// normalizer or a Replace decoder either fails to compile, or runs on any
// text, or fails with an error naming the pattern (a match that backtracks
// past the time limit); it never hangs or panics. The text is a unit
// repeated and a tail, the shape of inputs that make patterns backtrack.
func FuzzTokenizerRegex(f *testing.F) {
	f.Add(uint8(0), `\s+(?!\S)|\s+`, " ", uint8(3), "hello   world  ")
	f.Add(uint8(1), `(a|aa)*c`, "a", uint8(10), "b")
	f.Add(uint8(2), `(x+)+y`, "x", uint8(8), "")
	f.Add(uint8(0), `(?i:'s|'t|'re)|\p{L}+|\p{N}{1,3}`, "It's ", uint8(2), "12345 DON'T")
	f.Fuzz(func(t *testing.T, where uint8, pattern, unit string, repeat uint8, tail string) {
		text := strings.Repeat(unit, int(repeat)) + tail
		defer shortRegexTimeout()()
		q := quoteJSON(pattern)
		// The decoder sees one token at a time: the text is token 6 too.
		vocab := `{"a":0,"b":1,"c":2,"x":3,"y":4,"abc":5}`
		if text != "" && !strings.Contains(`{"a":0,"b":1,"c":2,"x":3,"y":4,"abc":5}`, quoteJSON(text)+":") {
			vocab = `{"a":0,"b":1,"c":2,"x":3,"y":4,"abc":5,` + quoteJSON(text) + `:6}`
		}
		model := `"model":{"type":"BPE","vocab":` + vocab + `,"merges":[]}`
		var src string
		switch where % 3 {
		case 0:
			src = `{"pre_tokenizer":{"type":"Split","pattern":{"Regex":` + q + `},"behavior":"Isolated"},` + model + `}`
		case 1:
			src = `{"normalizer":{"type":"Replace","pattern":{"Regex":` + q + `},"content":"a"},` + model + `}`
		default:
			src = `{"decoder":{"type":"Replace","pattern":{"Regex":` + q + `},"content":"b"},` + model + `}`
		}
		defer watchdog("a regex", 30*time.Second)()
		tok, err := parseTokenizerJSON([]byte(src))
		if err != nil {
			return
		}
		ids, err := tok.Encode(text, false)
		if err == nil {
			ids = append(ids, 5)
			if tok.Token(6) != "" {
				ids = append(ids, 6)
			}
			_, err = tok.Decode(ids)
		}
		var re *regexError
		if err != nil && errors.As(err, &re) && !strings.Contains(err.Error(), strconv.Quote(pattern)) {
			t.Fatalf("error %q does not name the pattern", err)
		}
	})
}

// shortRegexTimeout lowers the regex match limit while fuzzing, so that a
// backtracking pattern costs milliseconds per input; it returns the undo.
func shortRegexTimeout() func() {
	old := regexTimeout
	regexTimeout = 5 * time.Millisecond
	return func() { regexTimeout = old }
}

// fuzzLimits are the template limits while fuzzing: smaller than the
// defaults, so that an input that runs up to a limit stays quick.
var fuzzLimits = renderLimits{size: 1 << 20, held: 4 << 20, steps: 20_000, depth: 100, valueDepth: 1000, rangeItems: 100_000, timeout: 5 * time.Second}

// checkRender renders a compiled template with a few messages within
// fuzzLimits: an error is fine, but not a panic of the engine, and the
// output stays within the limit.
func checkRender(t *testing.T, ct *chatTemplate) {
	defer watchdog("a template", 2*fuzzLimits.timeout)()
	msgs, err := valueOf([]Message{{Role: "system", Content: "s"}, {Role: "user", Content: "u"}})
	if err != nil {
		t.Fatal(err)
	}
	out, err := ct.renderLimited(map[string]jinja.Value{"messages": msgs, "add_generation_prompt": jinja.NewBool(true)}, fuzzLimits)
	var ef *engineFailure
	if errors.As(err, &ef) {
		t.Fatalf("%v", err)
	}
	if len(out) > fuzzLimits.size {
		t.Fatalf("output of %d bytes", len(out))
	}
}

// FuzzChatTemplate: any template source either fails to compile or renders
// (or fails) with an error, never a panic.
func FuzzChatTemplate(f *testing.F) {
	f.Add(string(readSeed(f, "../testdata/tokenizer/glm/chat_template.jinja")))
	f.Add(string(readSeed(f, "../testdata/glm4moelite-tiny/chat_template.jinja")))
	f.Add(`{% for m in messages %}{{ m.role }}: {{ m.content | tojson }}{% endfor %}`)
	f.Add(`{{ raise_exception("x") }}{%- if a is defined -%}{{ a[1:2] }}{%+ endif %}`)
	f.Add(`{% macro f(n, s=', ') %}{{ n }}{% if n > 0 %}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(3) ~ 'x' * 2 ** 2 }}`)
	f.Fuzz(func(t *testing.T, src string) {
		ct, err := compileChatTemplate(src)
		if err != nil {
			return
		}
		checkRender(t, ct)
	})
}

// templateSkeletons are chat-template shapes with holes: V a value, OP an
// operator, N and M numbers, B a template body, F a filter.
var templateSkeletons = []string{
	`{{ V OP N }}`,
	`{{ N OP V }}`,
	`{{ range(N) | length }}{{ (V OP M) | F }}`,
	`{% for i in range(N) %}{% for j in range(M) %}B{% endfor %}{% endfor %}`,
	`{% macro f(n) %}B{% endmacro %}{{ f(N) }}`,
	`{% set ns = namespace(v=V) %}{% for i in range(N) %}{% set ns.v = ns.v OP ns.v %}{% endfor %}{{ ns.v | F }}`,
	`{{ V[N:M] }}{{ V[M] }}{{ V | F(N) }}`,
	`{% for m in messages %}{% if loop.index OP N %}B{% endif %}{% endfor %}`,
}

var (
	fuzzOps     = []string{"*", "**", "+", "~", "-", "/", "//", "%", "==", "<", "in", "and", "|"}
	fuzzFilters = []string{"string", "tojson", "join", "length", "list", "indent", "replace('x', 'yy')", "unique", "sort", "first", "trim", "batch"}
)

// FuzzChatTemplateParts builds templates from skeletons, so that the
// fuzzer varies numbers, operators and bodies where they matter (huge
// repeats, ranges, loops and recursion).
func FuzzChatTemplateParts(f *testing.F) {
	f.Add(uint8(0), `"x"`, uint8(0), fuzzBytes(3), fuzzBytes(2), `{{ i }}`, uint8(0))
	f.Add(uint8(2), `[1, 2]`, uint8(0), fuzzBytes(5), fuzzBytes(2), ``, uint8(2))
	f.Add(uint8(3), `"ab"`, uint8(3), fuzzBytes(3), fuzzBytes(4), `{{ i * j }}`, uint8(1))
	f.Add(uint8(4), `none`, uint8(2), fuzzBytes(3), fuzzBytes(0), `{{ n }}{% if n > 0 %}{{ f(n - 1) }}{% endif %}`, uint8(0))
	f.Add(uint8(5), `"x"`, uint8(3), fuzzBytes(4), fuzzBytes(1), ``, uint8(5))
	f.Add(uint8(6), `"hello"`, uint8(0), fuzzBytes(1), fuzzBytes(-1), ``, uint8(5))
	f.Add(uint8(7), `{'a': [1, 'b']}`, uint8(9), fuzzBytes(1), fuzzBytes(1), `{{ m.content ~ V }}`, uint8(1))
	f.Fuzz(func(t *testing.T, shape uint8, value string, op uint8, nBytes, mBytes []byte, body string, filter uint8) {
		n, m := fuzzInt(nBytes), fuzzInt(mBytes)
		src := strings.NewReplacer(
			"V", value,
			"OP", fuzzOps[int(op)%len(fuzzOps)],
			"N", strconv.FormatInt(n, 10),
			"M", strconv.FormatInt(m, 10),
			"B", body,
			"F", fuzzFilters[int(filter)%len(fuzzFilters)],
		).Replace(templateSkeletons[int(shape)%len(templateSkeletons)])
		ct, err := compileChatTemplate(src)
		if err != nil {
			return
		}
		checkRender(t, ct)
	})
}
