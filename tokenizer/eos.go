package tokenizer

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// StopIDs resolves the token ids that end generation for the model in dir,
// in the order transformers' generate uses: eos_token_id of
// generation_config.json, else eos_token_id of config.json, else the id of
// tok's eos_token (tokenizer_config.json). tok may be nil, for a directory
// without tokenizer files; then only the two JSON files count. The result
// is nil when nothing names an end id. Every caller (the tokenizer, the
// model, the engine's tests) resolves the ids here, so they agree.
func StopIDs(dir string, tok *Tokenizer) ([]int, error) {
	for _, file := range []string{"generation_config.json", "config.json"} {
		ids, err := fileEOS(filepath.Join(dir, file))
		if err != nil || len(ids) > 0 {
			if err == nil && tok != nil {
				err = tok.checkIDs(filepath.Join(dir, file), ids)
			}
			return ids, err
		}
	}
	if tok == nil || tok.eosToken == "" {
		return nil, nil
	}
	id, ok := tok.TokenID(tok.eosToken)
	if !ok {
		return nil, fmt.Errorf("%s: field eos_token: %q is not a token", filepath.Join(dir, "tokenizer_config.json"), tok.eosToken)
	}
	return []int{id}, nil
}

// fileEOS reads the eos_token_id field of a JSON file; nil when the file or
// the field is missing or null (an empty list names no id either).
func fileEOS(path string) ([]int, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var f struct {
		EOS json.RawMessage `json:"eos_token_id"`
	}
	if err := json.Unmarshal(data, &f); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if f.EOS == nil {
		return nil, nil
	}
	ids, err := ParseTokenIDs(f.EOS)
	if err != nil {
		return nil, fmt.Errorf("%s: field eos_token_id: %w", path, err)
	}
	return ids, nil
}

// ParseTokenIDs reads a token id field that holds an integer, a list of
// integers or null, as eos_token_id does in config.json and
// generation_config.json. Negative ids are refused.
func ParseTokenIDs(raw json.RawMessage) ([]int, error) {
	if isNull(raw) {
		return nil, nil
	}
	var ids []int
	var one int
	if err := json.Unmarshal(raw, &one); err == nil {
		ids = []int{one}
	} else if err := json.Unmarshal(raw, &ids); err != nil {
		return nil, fmt.Errorf("want an integer or a list of integers, got %s", raw)
	}
	for _, id := range ids {
		if id < 0 {
			return nil, fmt.Errorf("id %d is negative", id)
		}
	}
	return ids, nil
}

// checkIDs refuses end ids outside the vocabulary.
func (t *Tokenizer) checkIDs(path string, ids []int) error {
	for _, id := range ids {
		if id >= t.VocabSize() {
			return fmt.Errorf("%s: field eos_token_id: id %d is out of range (vocabulary size %d)", path, id, t.VocabSize())
		}
	}
	return nil
}
