package tokenizer

import (
	"os"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/mmfp4/mmfp4/internal/benchmode"
)

// byteLevelTokenizers are lossless: Decode(Encode(s)) gives back s after
// the normalizer. llama2's decoder is not the inverse of its normalizer
// (it turns a literal "▁" into a space and strips the leading one), so it
// is only checked for panics and errors.
var byteLevelTokenizers = []string{"qwen3", "llama3", "deepseek_v3", "gptoss", "glm"}

// FuzzRoundTrip: for any valid UTF-8, Decode(Encode(s)) == normalize(s).
// Run it with: go test -fuzz FuzzRoundTrip ./tokenizer/
func FuzzRoundTrip(f *testing.F) {
	for _, name := range append(byteLevelTokenizers, "llama2") {
		for _, c := range readFixture(f, name).Cases {
			f.Add(c.Text)
		}
	}
	f.Add("<|im_start|>user\n<think>x</think><|im_end|>  \t\r\n")
	f.Add("[gMASK]<sop><|user|>é\u0301 👩‍👩‍👧 12345  ")
	toks := map[string]*Tokenizer{}
	for _, name := range append(byteLevelTokenizers, "llama2") {
		toks[name] = loadTokenizer(f, name)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if !utf8.ValidString(s) {
			if _, err := toks["glm"].Encode(s, false); err == nil {
				t.Fatal("invalid UTF-8 was accepted")
			}
			return
		}
		for _, name := range byteLevelTokenizers {
			tok := toks[name]
			ids, err := tok.Encode(s, false)
			if err != nil {
				t.Fatalf("%s: Encode: %v", name, err)
			}
			got, err := tok.Decode(ids)
			if err != nil {
				t.Fatalf("%s: Decode: %v", name, err)
			}
			if want := tok.normalized(s); got != want {
				t.Fatalf("%s: Decode(Encode(%q)) = %q, want %q", name, s, got, want)
			}
		}
		ids, err := toks["llama2"].Encode(s, true)
		if err != nil {
			t.Fatalf("llama2: Encode: %v", err)
		}
		if _, err := toks["llama2"].Decode(ids); err != nil {
			t.Fatalf("llama2: Decode: %v", err)
		}
	})
}

// BenchmarkEncode reports encode throughput on about 1 MB of mixed text
// (the fixtures' texts repeated).
func BenchmarkEncode(b *testing.B) {
	benchmode.Check(b)
	var parts []string
	for _, c := range readFixture(b, "qwen3").Cases {
		parts = append(parts, c.Text)
	}
	// Vary the text so that the word cache does not see only repeats.
	var sb strings.Builder
	for i := 0; sb.Len() < 1<<20; i++ {
		sb.WriteString(parts[i%len(parts)])
		sb.WriteString(" ")
		sb.WriteString(strings.Repeat("x", i%7))
		sb.WriteString(itoa(i))
		sb.WriteString("\n")
	}
	text := sb.String()
	if s := os.Getenv("MMFP4_BENCH_TEXT"); s != "" {
		data, err := os.ReadFile(s)
		if err != nil {
			b.Fatal(err)
		}
		text = string(data)
	}
	for _, name := range []string{"qwen3", "llama3", "gptoss", "deepseek_v3", "llama2", "glm"} {
		tok := loadTokenizer(b, name)
		b.Run(name, func(b *testing.B) {
			b.SetBytes(int64(len(text)))
			for b.Loop() {
				if _, err := tok.Encode(text, false); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func itoa(i int) string {
	const digits = "0123456789"
	if i == 0 {
		return "0"
	}
	var buf []byte
	for ; i > 0; i /= 10 {
		buf = append([]byte{digits[i%10]}, buf...)
	}
	return string(buf)
}
