package constrain

import (
	"encoding/json"
	"math/rand/v2"
	"strings"
	"testing"
	"unicode/utf8"
)

// automaton compiles e without a vocabulary, for byte-level checks.
func automaton(e Expr) *dfa {
	b := newBuilder()
	e.build(b, nfaStart, nfaAccept)
	return newDFA(b)
}

func accepts(d *dfa, s string) bool {
	st := d.walk(start, []byte(s))
	return st != 0 && d.states[st].accept
}

func TestExprBasics(t *testing.T) {
	cases := []struct {
		e   Expr
		yes []string
		no  []string
	}{
		{Lit("abc"), []string{"abc"}, []string{"", "ab", "abcd"}},
		{Seq(Lit("a"), Opt(Lit("b")), Lit("c")), []string{"ac", "abc"}, []string{"abbc", "a"}},
		{Alt(Lit("x"), Lit("xy")), []string{"x", "xy"}, []string{"y", ""}},
		{Rep(Lit("ab"), 2, 3), []string{"abab", "ababab"}, []string{"ab", "abababab"}},
		{Rep(Lit("a"), 0, -1), []string{"", "a", "aaaa"}, []string{"b"}},
		{Seq(Rep(Alt(Lit("a"), Lit("")), 0, -1), Lit("b")), []string{"b", "aab"}, []string{"a"}},
		{TextWithout("</x>"), []string{"", "a</", "</y>", "é✓😀"}, []string{"</x>", "a</x>b", "\xff", "\xc3"}},
		{Seq(TextWithout("</think>"), Lit("</think>"), Lit("{}")),
			[]string{"</think>{}", "hmm <</think>{}"}, []string{"a</think>b</think>{}", "{}"}},
		{Never, nil, []string{"", "a"}},
	}
	for i, c := range cases {
		d := automaton(c.e)
		for _, s := range c.yes {
			if !accepts(d, s) {
				t.Errorf("case %d: %q refused", i, s)
			}
		}
		for _, s := range c.no {
			if accepts(d, s) {
				t.Errorf("case %d: %q accepted", i, s)
			}
		}
	}
}

// The UTF-8 part accepts exactly the valid encodings: every one-, two-
// and three-byte sequence, checked against the standard library.
func TestUTF8Exact(t *testing.T) {
	d := automaton(Rep(Alt(Bytes(0, 0x7f), utf8Multi), 0, -1))
	check := func(b []byte) {
		if got, want := accepts(d, string(b)), utf8.Valid(b); got != want {
			t.Fatalf("% x: accepted %v, valid UTF-8 %v", b, got, want)
		}
	}
	for a := 0; a < 256; a++ {
		check([]byte{byte(a)})
		for b := 0; b < 256; b++ {
			check([]byte{byte(a), byte(b)})
		}
	}
	r := rand.New(rand.NewPCG(1, 2))
	for range 200000 {
		n := 3 + r.IntN(2)
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(r.IntN(256))
			if r.IntN(2) == 0 {
				b[i] = 0x80 | byte(r.IntN(64)) // continuation bytes are the interesting ones
			}
		}
		check(b)
	}
}

func anyJSON(t testing.TB) *dfa {
	e, err := AnyJSON("", SchemaOptions{MaxDepth: 4})
	if err != nil {
		t.Fatal(err)
	}
	return automaton(e)
}

func TestAnyJSONAcceptsJSON(t *testing.T) {
	d := anyJSON(t)
	for _, s := range []string{
		`0`, `-12.5e+10`, `"a\"\\\u00e9\n"`, `true`, `null`, `[]`, `{}`, `[1, "x", {"a": [null]}]`,
		"{\n  \"a\": 1,\n  \"b\": [\n    true\n  ]\n}", ` {"k":"v"}`, `"é✓😀"`,
	} {
		if !accepts(d, s) {
			t.Errorf("%q refused", s)
		}
	}
	for _, s := range []string{
		`01`, `1.`, `.5`, `"\x"`, `"a`, `{"a"}`, `[1,]`, `{,}`, `tru`, "\"a\x01\"", `"\ud800"`,
		`[[[[[1]]]]]`,  // deeper than MaxDepth 4
		"{  \"a\": 1}", // two spaces: not a whitespace form we write
		`1e123`,        // three exponent digits
	} {
		if accepts(d, s) {
			t.Errorf("%q accepted", s)
		}
	}
}

// Soundness on random byte strings built from JSON-ish pieces: whatever
// the grammar accepts is valid JSON.
func TestAnyJSONSound(t *testing.T) {
	d := anyJSON(t)
	pieces := []string{"{", "}", "[", "]", ",", ":", `"`, `\`, "u", "0", "1", "9", "-", ".", "e", "+", " ", "\n",
		"true", "null", "a", "é", "\xff", "\x01", `"k"`, `"x":`}
	r := rand.New(rand.NewPCG(3, 4))
	accepted := 0
	for range 300000 {
		var b strings.Builder
		for n := 1 + r.IntN(8); n > 0; n-- {
			b.WriteString(pieces[r.IntN(len(pieces))])
		}
		s := b.String()
		if accepts(d, s) {
			accepted++
			if !json.Valid([]byte(s)) {
				t.Fatalf("accepted %q, which is not JSON", s)
			}
		}
	}
	if accepted < 1000 {
		t.Errorf("only %d random strings accepted: the test checks little", accepted)
	}
}
