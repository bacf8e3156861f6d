package tokenizer

import (
	"os"
	"testing"
)

// FuzzParseTokenizerJSON: a malformed tokenizer.json gives an error, never a
// panic.
func FuzzParseTokenizerJSON(f *testing.F) {
	if data, err := os.ReadFile("../testdata/tokenizer/glm/tokenizer.json"); err == nil {
		f.Add(data)
	}
	f.Add([]byte(`{"model":{"type":"BPE","vocab":{"a":0,"b":1,"ab":2},"merges":["a b"]}}`))
	f.Add([]byte(`{"model":{"type":"BPE","vocab":{"a":0},"merges":[["a","a"]]},"pre_tokenizer":{"type":"Split","pattern":{"Regex":"(?!x)"},"behavior":"Isolated"}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		tok, err := parseTokenizerJSON(data)
		if err != nil {
			return
		}
		for _, s := range []string{"ab", "hello world", "", "ä😀"} {
			if ids, err := tok.Encode(s, true); err == nil {
				_, _ = tok.Decode(ids)
			}
		}
	})
}

// FuzzChatTemplate: any template source either fails to compile or renders
// (or fails) with an error, never a panic.
func FuzzChatTemplate(f *testing.F) {
	if data, err := os.ReadFile("../testdata/tokenizer/glm/chat_template.jinja"); err == nil {
		f.Add(string(data))
	}
	f.Add(`{% for m in messages %}{{ m.role }}: {{ m.content | tojson }}{% endfor %}`)
	f.Add(`{{ raise_exception("x") }}{%- if a is defined -%}{{ a[1:2] }}{%+ endif %}`)
	msgs := []Message{{Role: "system", Content: "s"}, {Role: "user", Content: "u"}}
	f.Fuzz(func(t *testing.T, src string) {
		ct, err := compileChatTemplate(src)
		if err != nil {
			return
		}
		tok := &Tokenizer{chatTemplate: ct}
		_, _ = tok.ApplyChatTemplate(msgs, ChatOptions{AddGenerationPrompt: true})
	})
}
