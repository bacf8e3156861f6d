package tokenizer

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

func TestEncodeRejectsInvalidUTF8(t *testing.T) {
	tok := loadTokenizer(t, "glm")
	if _, err := tok.Encode("ok\xffno", false); err == nil {
		t.Fatal("invalid UTF-8 must be an error")
	}
}

func TestDecodeRejectsOutOfRange(t *testing.T) {
	tok := loadTokenizer(t, "glm")
	for _, id := range []int{-1, tok.VocabSize(), 1 << 40} {
		if _, err := tok.Decode([]int{0, id}); err == nil {
			t.Errorf("Decode of id %d must be an error", id)
		}
		if _, err := tok.NewStreamDecoder().Add(id); err == nil {
			t.Errorf("StreamDecoder.Add(%d) must be an error", id)
		}
	}
}

func TestEOSIDs(t *testing.T) {
	for _, name := range realTokenizers {
		tok := loadTokenizer(t, name)
		f := readFixture(t, name)
		if f.EOSTokenID == nil {
			t.Fatalf("%s: fixture has no eos_token_id", name)
		}
		if !slices.Contains(tok.EOSIDs(), *f.EOSTokenID) {
			t.Errorf("%s: EOSIDs %v lack %d", name, tok.EOSIDs(), *f.EOSTokenID)
		}
	}
}

// TestStreamDecoder feeds every fixture's ids one at a time: each piece
// must be valid UTF-8 and the pieces must add up to Decode's text.
func TestStreamDecoder(t *testing.T) {
	for _, name := range append(slices.Clone(realTokenizers), "glm") {
		tok := loadTokenizer(t, name)
		for _, c := range readFixture(t, name).Cases {
			want, err := tok.Decode(c.IDs)
			if err != nil {
				t.Fatal(err)
			}
			d := tok.NewStreamDecoder()
			var got strings.Builder
			for _, id := range c.IDs {
				piece, err := d.Add(id)
				if err != nil {
					t.Fatal(err)
				}
				if !utf8.ValidString(piece) {
					t.Errorf("%s/%s: piece %q is not valid UTF-8", name, c.Name, piece)
				}
				if strings.Contains(piece, "\uFFFD") && !strings.Contains(want, "\uFFFD") {
					t.Errorf("%s/%s: piece %q cuts a character", name, c.Name, piece)
				}
				got.WriteString(piece)
			}
			got.WriteString(d.Flush())
			if got.String() != want {
				t.Errorf("%s/%s: stream gave %q, Decode %q", name, c.Name, got.String(), want)
			}
		}
	}
}

func TestStreamHoldsBackPartialCharacters(t *testing.T) {
	tok := loadTokenizer(t, "glm")
	// The GLM vocab has no merges for this emoji: its four bytes are four
	// tokens, and nothing may come out before the last one.
	ids, err := tok.Encode("😀", false)
	if err != nil || len(ids) != 4 {
		t.Fatalf("Encode = %v %v, want 4 byte tokens", ids, err)
	}
	d := tok.NewStreamDecoder()
	for i, id := range ids {
		piece, err := d.Add(id)
		if err != nil {
			t.Fatal(err)
		}
		if i < 3 && piece != "" {
			t.Errorf("token %d gave %q before the character was complete", i, piece)
		}
		if i == 3 && piece != "😀" {
			t.Errorf("last token gave %q, want the emoji", piece)
		}
	}
	// A cut character is flushed as U+FFFD.
	d = tok.NewStreamDecoder()
	d.Add(ids[0])
	if got := d.Flush(); got != "\uFFFD" {
		t.Errorf("Flush = %q, want U+FFFD", got)
	}
}

func writeFiles(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

const tinyTokenizer = `{"added_tokens":[{"id":3,"content":"<eos>","special":true}],"normalizer":null,
	"pre_tokenizer":null,"post_processor":null,"decoder":null,
	"model":{"type":"BPE","vocab":{"a":0,"b":1,"ab":2},"merges":["a b"]}}`

func TestLoadErrorsNameFileAndField(t *testing.T) {
	cases := []struct {
		files map[string]string
		want  []string
	}{
		{map[string]string{}, []string{"tokenizer.json"}},
		{map[string]string{"tokenizer.json": `{"model":{"type":"BPE","vocab":{"a":0},"merges":["a q"]}}`},
			[]string{"tokenizer.json", "merges[0]"}},
		{map[string]string{"tokenizer.json": strings.Replace(tinyTokenizer, `"normalizer":null`, `"normalizer":{"type":"Weird"}`, 1)},
			[]string{"tokenizer.json", "normalizer", "Weird"}},
		{map[string]string{"tokenizer.json": tinyTokenizer, "tokenizer_config.json": `{"eos_token": 5}`},
			[]string{"tokenizer_config.json", "eos_token"}},
		{map[string]string{"tokenizer.json": tinyTokenizer, "generation_config.json": `{"eos_token_id": "x"}`},
			[]string{"generation_config.json", "eos_token_id"}},
		{map[string]string{"tokenizer.json": tinyTokenizer, "chat_template.jinja": "{% if x %}"},
			[]string{"chat_template.jinja"}},
	}
	for _, c := range cases {
		_, err := Load(writeFiles(t, c.files))
		if err == nil {
			t.Errorf("%v: want an error", c.files)
			continue
		}
		for _, w := range c.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("error %q does not name %q", err, w)
			}
		}
	}
}

func TestLoadMinimal(t *testing.T) {
	dir := writeFiles(t, map[string]string{
		"tokenizer.json":         tinyTokenizer,
		"tokenizer_config.json":  `{"eos_token": {"content": "<eos>", "__type": "AddedToken"}, "chat_template": [{"name": "default", "template": "{{ messages[0].content }}"}]}`,
		"generation_config.json": `{"eos_token_id": [1, 3]}`,
	})
	tok, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got, w := tok.EOSIDs(), []int{1, 3}; !slices.Equal(got, w) {
		t.Errorf("EOSIDs = %v, want %v", got, w)
	}
	if tok.VocabSize() != 4 {
		t.Errorf("VocabSize = %d, want 4", tok.VocabSize())
	}
	// No pre-tokenizer: the whole text is one word; <eos> is cut out first.
	if got, err := tok.Encode("abab<eos>a", false); err != nil || !slices.Equal(got, []int{2, 2, 3, 0}) {
		t.Errorf("Encode = %v %v", got, err)
	}
	// Without a decoder, tokens are joined with spaces (as the reference).
	if got, _ := tok.Decode([]int{2, 0}); got != "ab a" {
		t.Errorf("Decode = %q", got)
	}
	if got, err := tok.ApplyChatTemplate([]Message{{Role: "user", Content: "hey"}}, ChatOptions{}); err != nil || got != "hey" {
		t.Errorf("template from a list = %q %v", got, err)
	}
}

func TestMessageJSON(t *testing.T) {
	in := `[{"role":"assistant","content":null,"tool_calls":[{"type":"function","function":{"name":"f","arguments":"{\"a\": 1}"}}]},
		{"role":"user","content":[{"type":"text","text":"hi"}],"custom":7},{"role":"user","content":"plain"}]`
	var msgs []Message
	if err := json.Unmarshal([]byte(in), &msgs); err != nil {
		t.Fatal(err)
	}
	if !msgs[0].ContentNull || msgs[1].ContentParts == nil || string(msgs[1].Extra["custom"]) != "7" || msgs[2].Content != "plain" {
		t.Fatalf("decoded %+v", msgs)
	}
	out, err := json.Marshal(msgs)
	if err != nil {
		t.Fatal(err)
	}
	var back []Message
	if err := json.Unmarshal(out, &back); err != nil {
		t.Fatal(err)
	}
	again, _ := json.Marshal(back)
	if string(again) != string(out) {
		t.Errorf("round trip changed:\n%s\n%s", out, again)
	}
	if !strings.HasPrefix(string(out), `[{"role":"assistant","content":null,"tool_calls"`) {
		t.Errorf("marshal = %s", out)
	}
}

func TestStrftimeNow(t *testing.T) {
	dir := writeFiles(t, map[string]string{
		"tokenizer.json":      tinyTokenizer,
		"chat_template.jinja": `{{ strftime_now("%d %b %Y, %A %-d %B, %H:%M:%S %p %I %j %%") }}`,
	})
	tok, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2024, time.July, 5, 14, 3, 9, 0, time.UTC)
	got, err := tok.ApplyChatTemplate(nil, ChatOptions{Now: now})
	if want := "05 Jul 2024, Friday 5 July, 14:03:09 PM 02 187 %"; err != nil || got != want {
		t.Errorf("got %q %v, want %q", got, err, want)
	}
}
