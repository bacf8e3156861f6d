package constrain

import (
	"bytes"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/mmfp4/mmfp4/tokenizer"
)

// The tiny built-in test model's tokenizer is GLM-style; the real ones are
// fetched by tools/fetch_tokenizers.sh (git-ignored) and skipped, with a
// message, when absent.
var (
	tinyDir = filepath.Join("..", "testdata", "glm4moelite-tiny")
	realDir = filepath.Join("..", "testdata", "tokenizers")
)

var (
	tokMu    sync.Mutex
	tokCache = map[string]*tokenizer.Tokenizer{}
)

func loadTok(t testing.TB, dir string) *tokenizer.Tokenizer {
	t.Helper()
	tokMu.Lock()
	defer tokMu.Unlock()
	if tok := tokCache[dir]; tok != nil {
		return tok
	}
	if _, err := os.Stat(filepath.Join(dir, "tokenizer.json")); err != nil {
		t.Skipf("%s is missing: run tools/fetch_tokenizers.sh", dir)
	}
	tok, err := tokenizer.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	tokCache[dir] = tok
	return tok
}

func vocabOf(t testing.TB, tok *tokenizer.Tokenizer) *Vocab {
	t.Helper()
	eos := tok.EOSIDs()
	if len(eos) == 0 {
		t.Fatal("the tokenizer has no end-of-output id")
	}
	v, err := VocabOf(tok, eos)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// The bytes found for each token concatenate back to the text that was
// encoded (for SentencePiece, after the space the normalizer adds).
func TestTokenBytesRoundTrip(t *testing.T) {
	texts := []string{
		`{"name": "Zoë", "tags": ["a\tb", "✓ done"], "n": -12.5e3}`,
		"Hello, world! 你好世界 😀 emoji\n\n  indented",
		"<think>reason</think><tool_call>f<arg_key>k</arg_key><arg_value>v</arg_value></tool_call>",
	}
	// Byte-level (qwen3) and SentencePiece with byte fallback (llama2);
	// the other real files repeat these kinds at a high loading cost.
	dirs := []string{tinyDir, filepath.Join(realDir, "qwen3"), filepath.Join(realDir, "llama2")}
	for _, dir := range dirs {
		t.Run(filepath.Base(dir), func(t *testing.T) {
			tok := loadTok(t, dir)
			v := vocabOf(t, tok)
			for _, text := range texts {
				ids, err := tok.Encode(text, false)
				if err != nil {
					t.Fatal(err)
				}
				var got []byte
				for _, id := range ids {
					got = append(got, v.tokens[id]...)
				}
				if !bytes.Equal(got, []byte(text)) && !bytes.Equal(got, []byte(" "+text)) {
					t.Errorf("%q: token bytes join to %q", text, got)
				}
			}
		})
	}
}

func TestTrieHoldsEveryOrdinaryToken(t *testing.T) {
	tok := loadTok(t, tinyDir)
	v := vocabOf(t, tok)
	tr := v.trie
	found := map[int32]bool{}
	// Rebuild each node's path from the depth-first order and check it.
	path := []byte{}
	for n := 1; n < len(tr.label); n++ {
		path = append(path[:tr.depth[n]-1], tr.label[n])
		if f := tr.first[n]; f >= 0 {
			for _, id := range tr.ids[f : f+int32(tr.count[n])] {
				if !bytes.Equal(v.tokens[id], path) {
					t.Fatalf("token %d %q sits at %q", id, v.tokens[id], path)
				}
				found[id] = true
			}
		}
	}
	for id, b := range v.tokens {
		want := len(b) > 0 && !v.special[id] && !v.isEOS[id]
		if found[int32(id)] != want {
			t.Errorf("token %d %q: in trie %v, want %v", id, b, found[int32(id)], want)
		}
	}
}
