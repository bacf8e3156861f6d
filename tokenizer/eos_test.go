package tokenizer

import (
	"slices"
	"strings"
	"testing"
)

// StopIDs takes generation_config.json's ids, else config.json's, else the
// tokenizer's eos_token, as transformers' generate does; the tokenizer
// reports the same ids.
func TestStopIDs(t *testing.T) {
	const cfgEOS = `{"eos_token": "<eos>"}`
	for _, c := range []struct {
		name  string
		files map[string]string
		want  []int
	}{
		{"generation_config first", map[string]string{"generation_config.json": `{"eos_token_id": [1, 2]}`, "config.json": `{"eos_token_id": 0}`}, []int{1, 2}},
		{"then config.json", map[string]string{"generation_config.json": `{"eos_token_id": null}`, "config.json": `{"eos_token_id": 2}`}, []int{2}},
		{"an empty list names none", map[string]string{"generation_config.json": `{"eos_token_id": []}`, "config.json": `{"eos_token_id": 1}`}, []int{1}},
		{"then eos_token", map[string]string{"generation_config.json": `{}`}, []int{3}},
	} {
		c.files["tokenizer.json"] = tinyTokenizer
		c.files["tokenizer_config.json"] = cfgEOS
		dir := writeFiles(t, c.files)
		tok, err := Load(dir)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		got, err := StopIDs(dir, tok)
		if err != nil || !slices.Equal(got, c.want) || !slices.Equal(tok.EOSIDs(), c.want) {
			t.Errorf("%s: StopIDs = %v (%v), EOSIDs = %v, want %v", c.name, got, err, tok.EOSIDs(), c.want)
		}
		// Without the tokenizer only the JSON files count.
		got, err = StopIDs(dir, nil)
		if want := c.want; c.name == "then eos_token" {
			if err != nil || got != nil {
				t.Errorf("%s without a tokenizer: %v (%v), want none", c.name, got, err)
			}
		} else if err != nil || !slices.Equal(got, want) {
			t.Errorf("%s without a tokenizer: %v (%v), want %v", c.name, got, err, want)
		}
	}
}

func TestStopIDsErrors(t *testing.T) {
	for _, c := range []struct {
		files map[string]string
		want  []string
	}{
		{map[string]string{"config.json": `{"eos_token_id": "x"}`}, []string{"config.json", "eos_token_id"}},
		{map[string]string{"generation_config.json": `{"eos_token_id": [1, -2]}`}, []string{"generation_config.json", "eos_token_id", "-2"}},
		{map[string]string{"generation_config.json": `{"eos_token_id": 9}`}, []string{"generation_config.json", "eos_token_id", "9", "out of range"}},
		{map[string]string{"config.json": `{"eos_token_id": `}, []string{"config.json"}},
	} {
		c.files["tokenizer.json"] = tinyTokenizer
		dir := writeFiles(t, c.files)
		_, err := Load(dir)
		if err == nil {
			t.Errorf("%v: Load accepted it", c.files)
			continue
		}
		for _, w := range c.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%v: error %q does not name %q", c.files, err, w)
			}
		}
	}
}
