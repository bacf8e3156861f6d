package tokenizer

import (
	"strings"
	"testing"
)

// TestHostileIDs: ids far beyond the vocabulary are an error naming the
// field, not a panic or an allocation the size of the id.
func TestHostileIDs(t *testing.T) {
	for _, id := range []string{"9223372036854775807", "4611686018427387904", "2000000000", "1000000000000", "2e9", "1e12", "-1", "1100"} {
		vocab := `{"type":"BPE","vocab":{"a":0,"b":` + id + `},"merges":[]}`
		added := `{"type":"BPE","vocab":{"a":0,"b":1},"merges":[]}`
		for _, c := range []struct{ name, json, field string }{
			{"vocab", `{"model":` + vocab + `}`, "vocab"},
			{"added_tokens", `{"added_tokens":[{"id":` + id + `,"content":"<x>"}],"model":` + added + `}`, "added_tokens"},
			{"post_processor", `{"post_processor":{"type":"TemplateProcessing","single":[{"SpecialToken":{"id":"<s>"}},{"Sequence":{"id":"A"}}],` +
				`"special_tokens":{"<s>":{"ids":[` + id + `]}}},"model":` + added + `}`, "post_processor"},
		} {
			_, err := parseTokenizerJSON([]byte(c.json))
			if err == nil {
				t.Errorf("%s id %s: no error", c.name, id)
				continue
			}
			if !strings.Contains(err.Error(), c.field) {
				t.Errorf("%s id %s: error %q does not name %q", c.name, id, err, c.field)
			}
		}
	}
}

// TestSparseIDsAccepted: gaps in the ids are fine within the bound.
func TestSparseIDsAccepted(t *testing.T) {
	tok, err := parseTokenizerJSON([]byte(`{"added_tokens":[{"id":1027,"content":"<x>"}],"model":{"type":"BPE","vocab":{"a":0,"b":1000},"merges":[]}}`))
	if err != nil {
		t.Fatal(err)
	}
	if tok.VocabSize() != 1028 || tok.Token(1000) != "b" || tok.Token(1027) != "<x>" {
		t.Errorf("VocabSize %d, tokens %q %q", tok.VocabSize(), tok.Token(1000), tok.Token(1027))
	}
}
