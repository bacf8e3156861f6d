package tokenizer

import (
	"strings"
	"testing"
	"time"
)

// TestRegexBacktrackingFails: a pre-tokenizer, normalizer or decoder regex
// that backtracks catastrophically gives an error naming the pattern
// (after regexTimeout) instead of hanging.
func TestRegexBacktrackingFails(t *testing.T) {
	// A shorter limit only makes the test quicker: these patterns would
	// run for hours.
	defer func(d time.Duration) { regexTimeout = d }(regexTimeout)
	regexTimeout = 100 * time.Millisecond
	text := strings.Repeat("a", 40) + "b"
	for _, re := range []string{`(a+)+$`, `(a|aa)*c`} {
		q := quoteJSON(re)
		model := `"model":{"type":"BPE","vocab":{"a":0,"b":1,"\u2581":2,"` + text + `":3},"merges":[]}`
		for _, c := range []struct{ where, json string }{
			{"pre_tokenizer", `{"pre_tokenizer":{"type":"Split","pattern":{"Regex":` + q + `},"behavior":"Isolated"},` + model + `}`},
			{"normalizer", `{"normalizer":{"type":"Replace","pattern":{"Regex":` + q + `},"content":"a"},` + model + `}`},
			{"decoder", `{"decoder":{"type":"Replace","pattern":{"Regex":` + q + `},"content":"a"},` + model + `}`},
		} {
			tok, err := parseTokenizerJSON([]byte(c.json))
			if err != nil {
				t.Fatalf("%s %s: %v", c.where, re, err)
			}
			if c.where == "decoder" {
				_, err = tok.Decode([]int{3}) // the decoder sees one token at a time
			} else {
				_, err = tok.Encode(text, false)
			}
			if err == nil || !strings.Contains(err.Error(), re) {
				t.Errorf("%s %s: error %v, want one naming the pattern", c.where, re, err)
			}
		}
	}
}
