package tokenizer

import (
	"encoding/json"
	"slices"
	"testing"
	"unicode/utf8"
)

// FuzzFastSplit checks the hand-written matchers against regexp2 running
// the same patterns.
func FuzzFastSplit(f *testing.F) {
	for _, s := range []string{
		"Hello, world! I'm here, they'RE gone; it'LL 'x '",
		"  \n\n \t x\r\n  y   ", "a  ", " ", "\n", "12345 ٣٤٥६", "e\u0301 ñ 世界 👋🏽!!! ...\n\n",
		"  'll", "x'", "?!\r\n\r\nabc", "\u00a0\u2028z", "tab\tword\t\tx",
		"日本語のテキスト中文 ひらがな カタカナ 'hello 'héllo $x9 a\u0301b\u0301 ½² #tag ¿qué?\r\n",
		"HelloWorld XMLHttpRequest iPhone DON'T don's ǅungla ʰa a\u0301\u0301B \u0301x ' /path//x\n/",
	} {
		f.Add(s)
	}
	var pats []pattern
	for _, src := range []string{cl100kPattern, qwen2Pattern, gpt2Pattern, o200kPattern, digits3Pattern, cjkPattern, deepseekPattern} {
		p, err := parsePattern(json.RawMessage(`{"Regex":` + quoteJSON(src) + `}`))
		if err != nil || p.fast == nil {
			f.Fatalf("pattern %q: %v (fast %v)", src, err, p.fast != nil)
		}
		pats = append(pats, p)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if !utf8.ValidString(s) {
			return
		}
		for _, p := range pats {
			fast, slow := p.findAll(s), p.findAllRegexp(s)
			if !slices.Equal(fast, slow) {
				t.Fatalf("pattern %q on %q:\nfast %v\nregexp2 %v", p.re.String(), s, fast, slow)
			}
		}
	})
}
