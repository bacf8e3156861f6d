package tokenizer

import (
	"encoding/json"
	"slices"
	"testing"
)

// Expected values here are written from the documented behaviour of each
// component (Hugging Face tokenizers' docs and Unicode), not from this code.

func TestNormalizers(t *testing.T) {
	cases := []struct {
		json, in, want string
	}{
		{`{"type":"NFC"}`, "e\u0301A\u030a", "\u00e9\u00c5"},
		{`{"type":"NFD"}`, "\u00e9", "e\u0301"},
		{`{"type":"NFKC"}`, "\ufb01ne \u2460 \uff21", "fine 1 A"},
		{`{"type":"NFKD"}`, "\u00e9\u00b2", "e\u03012"},
		{`{"type":"Lowercase"}`, "HeLLo ÄÖ", "hello äö"},
		{`{"type":"Prepend","prepend":"▁"}`, "hi", "▁hi"},
		{`{"type":"Prepend","prepend":"▁"}`, "", ""},
		{`{"type":"Replace","pattern":{"String":" "},"content":"▁"}`, "a b  c", "a▁b▁▁c"},
		{`{"type":"Replace","pattern":{"Regex":"\\s+"},"content":" "}`, "a \t\n b", "a b"},
		{`{"type":"Strip","left":true,"right":false}`, "  x  ", "x  "},
		{`{"type":"Sequence","normalizers":[{"type":"Prepend","prepend":"▁"},{"type":"Replace","pattern":{"String":" "},"content":"▁"}]}`, "a b", "▁a▁b"},
		{`{"type":"Sequence","normalizers":[]}`, "x y", "x y"},
	}
	for _, c := range cases {
		n, err := parseNormalizer(json.RawMessage(c.json))
		if err != nil {
			t.Fatalf("%s: %v", c.json, err)
		}
		if got := n.normalize(c.in); got != c.want {
			t.Errorf("%s(%q) = %q, want %q", c.json, c.in, got, c.want)
		}
	}
	if _, err := parseNormalizer(json.RawMessage(`{"type":"Nope"}`)); err == nil {
		t.Error("an unknown normalizer type must be an error")
	}
}

func TestSplitBehaviors(t *testing.T) {
	// The example of the tokenizers documentation for SplitDelimiterBehavior.
	const in = "the-final--countdown"
	want := map[string][]string{
		"Removed":            {"the", "final", "countdown"},
		"Isolated":           {"the", "-", "final", "-", "-", "countdown"},
		"MergedWithPrevious": {"the-", "final-", "-", "countdown"},
		"MergedWithNext":     {"the", "-final", "-", "-countdown"},
		"Contiguous":         {"the", "-", "final", "--", "countdown"},
	}
	for behavior, w := range want {
		for _, pat := range []string{`{"String":"-"}`, `{"Regex":"-"}`} {
			p, err := parsePreTokenizer(json.RawMessage(`{"type":"Split","pattern":` + pat + `,"behavior":"` + behavior + `","invert":false}`))
			if err != nil {
				t.Fatal(err)
			}
			if got := p.split([]string{in}); !slices.Equal(got, w) {
				t.Errorf("%s %s: got %q, want %q", behavior, pat, got, w)
			}
		}
	}
	// invert: the pattern marks what to keep; Removed then drops the rest.
	p, _ := parsePreTokenizer(json.RawMessage(`{"type":"Split","pattern":{"Regex":"[a-z]+"},"behavior":"Removed","invert":true}`))
	if got, w := p.split([]string{"ab, cd!"}), []string{"ab", "cd"}; !slices.Equal(got, w) {
		t.Errorf("invert: got %q, want %q", got, w)
	}
}

func TestSplitLookahead(t *testing.T) {
	// \s+(?!\S) leaves the last space to start the next word: the reason
	// for a regex engine with lookahead.
	p, err := parsePreTokenizer(json.RawMessage(`{"type":"Split","pattern":{"Regex":"\\s+(?!\\S)|\\s+|\\S+"},"behavior":"Isolated","invert":false}`))
	if err != nil {
		t.Fatal(err)
	}
	if got, w := p.split([]string{"a   b"}), []string{"a", "  ", " ", "b"}; !slices.Equal(got, w) {
		t.Errorf("got %q, want %q", got, w)
	}
}

func TestDigits(t *testing.T) {
	one, _ := parsePreTokenizer(json.RawMessage(`{"type":"Digits","individual_digits":true}`))
	if got, w := one.split([]string{"a123b"}), []string{"a", "1", "2", "3", "b"}; !slices.Equal(got, w) {
		t.Errorf("individual: got %q, want %q", got, w)
	}
	runs, _ := parsePreTokenizer(json.RawMessage(`{"type":"Digits","individual_digits":false}`))
	if got, w := runs.split([]string{"a123b45"}), []string{"a", "123", "b", "45"}; !slices.Equal(got, w) {
		t.Errorf("runs: got %q, want %q", got, w)
	}
}

func TestByteLevelPreTokenizer(t *testing.T) {
	// GPT-2's alphabet: space is Ġ (U+0120), newline Ċ (U+010A); printable
	// ASCII maps to itself; é (C3 A9) to Ã©.
	p, _ := parsePreTokenizer(json.RawMessage(`{"type":"ByteLevel","add_prefix_space":false,"use_regex":false}`))
	if got, w := p.split([]string{"a b\né"}), []string{"aĠbĊÃ©"}; !slices.Equal(got, w) {
		t.Errorf("no regex: got %q, want %q", got, w)
	}
	p, _ = parsePreTokenizer(json.RawMessage(`{"type":"ByteLevel","add_prefix_space":true,"use_regex":true}`))
	if got, w := p.split([]string{"Hello world's  end"}), []string{"ĠHello", "Ġworld", "'s", "Ġ", "Ġend"}; !slices.Equal(got, w) {
		t.Errorf("regex + prefix: got %q, want %q", got, w)
	}
}

func TestMetaspace(t *testing.T) {
	p, _ := parsePreTokenizer(json.RawMessage(`{"type":"Metaspace","replacement":"▁","prepend_scheme":"always","split":true}`))
	if got, w := p.split([]string{"hi there"}), []string{"▁hi", "▁there"}; !slices.Equal(got, w) {
		t.Errorf("got %q, want %q", got, w)
	}
	d, _ := parseDecoder(json.RawMessage(`{"type":"Metaspace","replacement":"▁","prepend_scheme":"always","split":true}`))
	if got := d.decodeChain([]string{"▁hi", "▁there"}); got[0]+got[1] != "hi there" {
		t.Errorf("decode: got %q", got)
	}
}

func TestDecoders(t *testing.T) {
	cases := []struct {
		json string
		in   []string
		want string
	}{
		{`{"type":"ByteLevel"}`, []string{"Hello", "Ġw", "orld", "Ċ", "Ã©"}, "Hello world\né"},
		// A token outside the byte alphabet is kept as its own text.
		{`{"type":"ByteLevel"}`, []string{"<｜User｜>", "Ġx"}, "<｜User｜> x"},
		{`{"type":"Sequence","decoders":[{"type":"Replace","pattern":{"String":"▁"},"content":" "},{"type":"ByteFallback"},{"type":"Fuse"},{"type":"Strip","content":" ","start":1,"stop":0}]}`,
			[]string{"▁Hello", "▁", "<0xE2>", "<0x82>", "<0xAC>", "!"}, "Hello €!"},
		// Bytes that are not valid UTF-8 become one U+FFFD each.
		{`{"type":"Sequence","decoders":[{"type":"ByteFallback"},{"type":"Fuse"}]}`, []string{"a", "<0xE2>", "<0x82>", "b"}, "a\uFFFD\uFFFDb"},
		{`{"type":"Strip","content":" ","start":2,"stop":1}`, []string{"   x  "}, " x "},
	}
	for _, c := range cases {
		d, err := parseDecoder(json.RawMessage(c.json))
		if err != nil {
			t.Fatalf("%s: %v", c.json, err)
		}
		got := ""
		for _, s := range d.decodeChain(slices.Clone(c.in)) {
			got += s
		}
		if got != c.want {
			t.Errorf("%s %q: got %q, want %q", c.json, c.in, got, c.want)
		}
	}
}

func TestPostProcessors(t *testing.T) {
	p, err := parsePostProcessor(json.RawMessage(`{"type":"Sequence","processors":[
		{"type":"ByteLevel","add_prefix_space":true,"trim_offsets":false,"use_regex":true},
		{"type":"TemplateProcessing","single":[{"SpecialToken":{"id":"<s>","type_id":0}},{"Sequence":{"id":"A","type_id":0}},{"SpecialToken":{"id":"</s>","type_id":0}}],
		 "pair":[],"special_tokens":{"<s>":{"id":"<s>","ids":[1],"tokens":["<s>"]},"</s>":{"id":"</s>","ids":[2],"tokens":["</s>"]}}}]}`))
	if err != nil {
		t.Fatal(err)
	}
	if got, w := p.process([]int{7, 8}), []int{1, 7, 8, 2}; !slices.Equal(got, w) {
		t.Errorf("got %v, want %v", got, w)
	}
	r, _ := parsePostProcessor(json.RawMessage(`{"type":"RobertaProcessing","sep":["</s>",2],"cls":["<s>",0]}`))
	if got, w := r.process([]int{5}), []int{0, 5, 2}; !slices.Equal(got, w) {
		t.Errorf("roberta: got %v, want %v", got, w)
	}
}

// A hand-made BPE: merges "a b" -> ab (rank 0), "ab c" -> abc (rank 1),
// "b c" -> bc (rank 2). "abc" must become [abc]: ab merges first.
func TestBPEMergeOrder(t *testing.T) {
	m, err := parseBPE(json.RawMessage(`{"type":"BPE","vocab":{"a":0,"b":1,"c":2,"ab":3,"abc":4,"bc":5,"<unk>":6},
		"merges":["a b",["ab","c"],"b c"],"unk_token":"<unk>","fuse_unk":true}`))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		word string
		want []int
	}{
		{"abc", []int{4}},
		{"bc", []int{5}},
		{"cab", []int{2, 3}},
		{"ababc", []int{3, 4}},
		{"axxb", []int{0, 6, 1}}, // unknown characters fuse into one <unk>
	} {
		if got := m.encode(nil, c.word); !slices.Equal(got, c.want) {
			t.Errorf("%q: got %v, want %v", c.word, got, c.want)
		}
	}
}

func TestBPEByteFallbackAndPrefix(t *testing.T) {
	m, err := parseBPE(json.RawMessage(`{"type":"BPE","vocab":{"x":0,"<0xC3>":1,"<0xA9>":2,"##y":3,"x##y":4},
		"merges":[],"byte_fallback":true,"continuing_subword_prefix":"##"}`))
	if err != nil {
		t.Fatal(err)
	}
	if got, w := m.encode(nil, "xé"), []int{0, 1, 2}; !slices.Equal(got, w) {
		t.Errorf("byte fallback: got %v, want %v", got, w)
	}
	if got, w := m.encode(nil, "xy"), []int{0, 3}; !slices.Equal(got, w) {
		t.Errorf("prefix: got %v, want %v", got, w)
	}
	ig, _ := parseBPE(json.RawMessage(`{"type":"BPE","vocab":{"a":0,"b":1,"ab":2,"abb":3},"merges":["a b"],"ignore_merges":true}`))
	if got, w := ig.encode(nil, "abb"), []int{3}; !slices.Equal(got, w) {
		t.Errorf("ignore_merges: got %v, want %v", got, w)
	}
}

func TestAddedTokenSplitting(t *testing.T) {
	var root trie
	toks := []*addedToken{
		{ID: 1, Content: "<a>"},
		{ID: 2, Content: "<a><b>"},
		{ID: 3, Content: "[x]", LStrip: true, RStrip: true},
		{ID: 4, Content: "cat", SingleWord: true},
	}
	for _, tk := range toks {
		root.insert(tk)
	}
	got := splitAdded(&root, "q<a><b>r<a>s  [x]  t cat concat")
	var parts []string
	for _, s := range got {
		if s.token != nil {
			parts = append(parts, "#"+s.text)
		} else {
			parts = append(parts, s.text)
		}
	}
	want := []string{"q", "#<a><b>", "r", "#<a>", "s", "#  [x]  ", "t ", "#cat", " concat"}
	if !slices.Equal(parts, want) {
		t.Errorf("got %q, want %q", parts, want)
	}
}

func TestLossyUTF8(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"ok", "ok"},
		{"a\xe6\x97b", "a\uFFFDb"},             // a cut 3-byte sequence is one U+FFFD
		{"\xff\xfe", "\uFFFD\uFFFD"},           // two bad bytes are two
		{"\xf0\x9f\x98", "\uFFFD"},             // cut 4-byte sequence
		{"\xed\xa0\x80", "\uFFFD\uFFFD\uFFFD"}, // surrogates are not valid
	} {
		if got := lossyUTF8([]byte(c.in)); got != c.want {
			t.Errorf("%q: got %q, want %q", c.in, got, c.want)
		}
	}
	for _, c := range []struct {
		in   string
		want int
	}{{"ab", 0}, {"a\xe6\x97", 2}, {"a\xf0", 1}, {"a\xff", 0}, {"é", 0}} {
		if got := incompleteTail([]byte(c.in)); got != c.want {
			t.Errorf("incompleteTail(%q) = %d, want %d", c.in, got, c.want)
		}
	}
}
