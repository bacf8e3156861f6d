package tokenizer

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
)

// The real tokenizer files are fetched by tools/fetch_tokenizers.sh into
// testdata/tokenizers/ (not committed); the expected results, made by
// tools/tokenizer_fixtures.py with HF tokenizers/transformers, are
// committed in testdata/tokenizer/.
var (
	realTokenizers = []string{"qwen3", "llama3", "llama2", "deepseek_v3", "gptoss"}
	fetchedDir     = filepath.Join("..", "testdata", "tokenizers")
	fixtureDir     = filepath.Join("..", "testdata", "tokenizer")
)

type fixtureCase struct {
	Name           string  `json:"name"`
	Text           string  `json:"text"`
	IDs            []int   `json:"ids"`
	IDsSpecial     []int   `json:"ids_special"`
	Decoded        *string `json:"decoded"`
	DecodedSpecial *string `json:"decoded_special"`
	Error          string  `json:"error"`
}

type fixtureChat struct {
	Name                string                     `json:"name"`
	Messages            json.RawMessage            `json:"messages"`
	Tools               json.RawMessage            `json:"tools"`
	AddGenerationPrompt bool                       `json:"add_generation_prompt"`
	Extra               map[string]json.RawMessage `json:"extra"`
	Text                *string                    `json:"text"`
	Error               string                     `json:"error"`
}

type fixtureFile struct {
	Name       string        `json:"name"`
	VocabSize  int           `json:"vocab_size"`
	EOSTokenID *int          `json:"eos_token_id"`
	Cases      []fixtureCase `json:"cases"`
	Chats      []fixtureChat `json:"chats"`
}

func readFixture(t testing.TB, name string) fixtureFile {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(fixtureDir, name+".json"))
	if err != nil {
		t.Fatalf("fixture: %v", err)
	}
	var f fixtureFile
	if err := json.Unmarshal(data, &f); err != nil {
		t.Fatalf("fixture %s: %v", name, err)
	}
	return f
}

var (
	loadedMu sync.Mutex
	loaded   = map[string]*Tokenizer{}
)

// tokenizerDir is where a named tokenizer's files are.
func tokenizerDir(name string) string {
	if name == "glm" {
		return filepath.Join(fixtureDir, "glm")
	}
	return filepath.Join(fetchedDir, name)
}

// loadTokenizer loads (once) a real or committed tokenizer. Missing
// fetched files fail the test: they are part of the test data.
func loadTokenizer(t testing.TB, name string) *Tokenizer {
	t.Helper()
	loadedMu.Lock()
	defer loadedMu.Unlock()
	if tok, ok := loaded[name]; ok {
		return tok
	}
	dir := tokenizerDir(name)
	if _, err := os.Stat(filepath.Join(dir, "tokenizer.json")); err != nil {
		t.Fatalf("%s is missing: run `bash tools/fetch_tokenizers.sh` first (%v)", dir, err)
	}
	tok, err := Load(dir)
	if err != nil {
		t.Fatalf("Load(%s): %v", dir, err)
	}
	loaded[name] = tok
	return tok
}

func TestEncodeDecodeFixtures(t *testing.T) {
	for _, name := range append(slices.Clone(realTokenizers), "glm") {
		t.Run(name, func(t *testing.T) {
			tok := loadTokenizer(t, name)
			f := readFixture(t, name)
			if len(f.Cases) < 20 {
				t.Fatalf("only %d cases in the fixture", len(f.Cases))
			}
			if got := tok.VocabSize(); got != f.VocabSize {
				t.Errorf("VocabSize = %d, want %d", got, f.VocabSize)
			}
			for _, c := range f.Cases {
				if c.Error != "" {
					t.Errorf("%s: the fixture recorded an error: %s", c.Name, c.Error)
					continue
				}
				got, err := tok.Encode(c.Text, false)
				if err != nil || !slices.Equal(got, c.IDs) {
					t.Errorf("%s: Encode(%q, false)\n got %v %v\nwant %v", c.Name, c.Text, got, err, c.IDs)
				}
				got, err = tok.Encode(c.Text, true)
				if err != nil || !slices.Equal(got, c.IDsSpecial) {
					t.Errorf("%s: Encode(%q, true)\n got %v %v\nwant %v", c.Name, c.Text, got, err, c.IDsSpecial)
				}
				if c.Decoded != nil {
					if s, err := tok.Decode(c.IDs); err != nil || s != *c.Decoded {
						t.Errorf("%s: Decode\n got %q %v\nwant %q", c.Name, s, err, *c.Decoded)
					}
				}
				if c.DecodedSpecial != nil {
					if s, err := tok.Decode(c.IDsSpecial); err != nil || s != *c.DecodedSpecial {
						t.Errorf("%s: Decode(with specials)\n got %q %v\nwant %q", c.Name, s, err, *c.DecodedSpecial)
					}
				}
			}
		})
	}
}

func TestChatTemplateFixtures(t *testing.T) {
	for _, name := range []string{"qwen3", "llama3", "deepseek_v3", "glm"} {
		t.Run(name, func(t *testing.T) {
			tok := loadTokenizer(t, name)
			f := readFixture(t, name)
			if len(f.Chats) == 0 {
				t.Fatal("no chats in the fixture")
			}
			for _, c := range f.Chats {
				var msgs []Message
				if err := json.Unmarshal(c.Messages, &msgs); err != nil {
					t.Fatalf("%s: messages: %v", c.Name, err)
				}
				opt := ChatOptions{AddGenerationPrompt: c.AddGenerationPrompt}
				if c.Tools != nil {
					var tools []json.RawMessage
					if err := json.Unmarshal(c.Tools, &tools); err != nil {
						t.Fatal(err)
					}
					for _, tl := range tools {
						opt.Tools = append(opt.Tools, tl)
					}
				}
				for k, v := range c.Extra {
					if k == "enable_thinking" {
						var b bool
						if err := json.Unmarshal(v, &b); err != nil {
							t.Fatal(err)
						}
						opt.EnableThinking = &b
						continue
					}
					if opt.Extra == nil {
						opt.Extra = map[string]any{}
					}
					opt.Extra[k] = v
				}
				got, err := tok.ApplyChatTemplate(msgs, opt)
				label := c.Name
				if c.AddGenerationPrompt {
					label += "+gen"
				}
				if c.Text == nil {
					if err == nil {
						t.Errorf("%s: want an error like %q, got %q", label, c.Error, got)
					}
					continue
				}
				if err != nil || got != *c.Text {
					t.Errorf("%s:\n got %q %v\nwant %q", label, got, err, *c.Text)
				}
			}
		})
	}
}
