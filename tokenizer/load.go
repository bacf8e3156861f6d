package tokenizer

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// Load reads a model directory: tokenizer.json (required) and, when
// present, tokenizer_config.json and chat_template.jinja; the end ids come
// from StopIDs. Errors name the file and the field.
func Load(dir string) (*Tokenizer, error) {
	tj, err := os.ReadFile(filepath.Join(dir, "tokenizer.json"))
	if err != nil {
		return nil, fmt.Errorf("tokenizer: %w", err)
	}
	t, err := parseTokenizerJSON(tj)
	if err != nil {
		return nil, fmt.Errorf("tokenizer: tokenizer.json: %w", err)
	}
	cfg, err := readOptionalJSON(filepath.Join(dir, "tokenizer_config.json"))
	if err != nil {
		return nil, err
	}
	if err := t.applyConfig(cfg); err != nil {
		return nil, fmt.Errorf("tokenizer: tokenizer_config.json: %w", err)
	}
	if t.eosToken != "" {
		if _, ok := t.TokenID(t.eosToken); !ok {
			return nil, fmt.Errorf("tokenizer: tokenizer_config.json: eos_token %q is not a token", t.eosToken)
		}
	}
	if t.eosIDs, err = StopIDs(dir, t); err != nil {
		return nil, fmt.Errorf("tokenizer: %w", err)
	}
	// A separate chat_template.jinja wins over the config's template, as in
	// transformers.
	src, err := os.ReadFile(filepath.Join(dir, "chat_template.jinja"))
	switch {
	case err == nil:
		if t.chatTemplate, err = compileChatTemplate(string(src)); err != nil {
			return nil, fmt.Errorf("tokenizer: chat_template.jinja: %w", err)
		}
	case !errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("tokenizer: %w", err)
	default:
		if src, ok, err := configTemplate(cfg); err != nil {
			return nil, fmt.Errorf("tokenizer: tokenizer_config.json: chat_template: %w", err)
		} else if ok {
			if t.chatTemplate, err = compileChatTemplate(src); err != nil {
				return nil, fmt.Errorf("tokenizer: tokenizer_config.json: chat_template: %w", err)
			}
		}
	}
	return t, nil
}

type tokenizerJSON struct {
	AddedTokens   []addedToken    `json:"added_tokens"`
	Normalizer    json.RawMessage `json:"normalizer"`
	PreTokenizer  json.RawMessage `json:"pre_tokenizer"`
	PostProcessor json.RawMessage `json:"post_processor"`
	Decoder       json.RawMessage `json:"decoder"`
	Model         json.RawMessage `json:"model"`
}

func parseTokenizerJSON(data []byte) (*Tokenizer, error) {
	var j tokenizerJSON
	if err := json.Unmarshal(data, &j); err != nil {
		return nil, err
	}
	if isNull(j.Model) {
		return nil, fmt.Errorf("model: missing")
	}
	t := &Tokenizer{rawTrie: &trie{}, normTrie: &trie{}}
	var err error
	if t.model, err = parseBPE(j.Model); err != nil {
		return nil, fmt.Errorf("model: %w", err)
	}
	if t.norm, err = parseNormalizer(j.Normalizer); err != nil {
		return nil, fmt.Errorf("normalizer: %w", err)
	}
	if t.pre, err = parsePreTokenizer(j.PreTokenizer); err != nil {
		return nil, fmt.Errorf("pre_tokenizer: %w", err)
	}
	if t.post, err = parsePostProcessor(j.PostProcessor); err != nil {
		return nil, fmt.Errorf("post_processor: %w", err)
	}
	if t.dec, err = parseDecoder(j.Decoder); err != nil {
		return nil, fmt.Errorf("decoder: %w", err)
	}

	// Bound every id before the id table is sized from them, so that a
	// hostile id is an error and not a huge allocation.
	limit := idLimit(len(t.model.vocab) + len(j.AddedTokens))
	size := 0
	for tok, id := range t.model.vocab {
		if id < 0 || id >= limit {
			return nil, fmt.Errorf("model: vocab: token %q has id %d, want 0 <= id < %d (%s)", tok, id, limit, idLimitRule)
		}
		size = max(size, id+1)
	}
	for i := range j.AddedTokens {
		a := &j.AddedTokens[i]
		if a.Content == "" {
			return nil, fmt.Errorf("added_tokens[%d]: empty content", i)
		}
		if a.ID < 0 || a.ID >= limit {
			return nil, fmt.Errorf("added_tokens[%d] (%q): id %d, want 0 <= id < %d (%s)", i, a.Content, a.ID, limit, idLimitRule)
		}
		size = max(size, a.ID+1)
		t.added = append(t.added, a)
		if a.Normalized {
			t.normTrie.insert(a)
		} else {
			t.rawTrie.insert(a)
		}
	}
	if err := checkPostIDs(t.post, size); err != nil {
		return nil, fmt.Errorf("post_processor: %w", err)
	}
	t.idToToken = make([]string, size)
	t.special = make([]bool, size)
	for tok, id := range t.model.vocab {
		t.idToToken[id] = tok
	}
	for _, a := range t.added {
		t.idToToken[a.ID] = a.Content
		t.special[a.ID] = a.Special
	}
	return t, nil
}

// maxTokenIDs caps the id table whatever the file says: published
// vocabularies have at most a few hundred thousand ids.
const maxTokenIDs = 1 << 24

const idLimitRule = "ids must stay below twice the number of tokens plus 1024, and below 2^24"

// idLimit is one past the largest id accepted for a file with n tokens.
// Ids may leave gaps, but not so many that the id table would be much
// larger than the file.
func idLimit(n int) int { return min(2*n+1024, maxTokenIDs) }

// readOptionalJSON returns nil for a missing file.
func readOptionalJSON(path string) (map[string]json.RawMessage, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("tokenizer: %w", err)
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(data, &m); err != nil {
		return nil, fmt.Errorf("tokenizer: %s: %w", filepath.Base(path), err)
	}
	return m, nil
}

// applyConfig takes bos/eos from tokenizer_config.json.
func (t *Tokenizer) applyConfig(cfg map[string]json.RawMessage) error {
	var err error
	if t.bosToken, err = tokenString(cfg["bos_token"]); err != nil {
		return fmt.Errorf("bos_token: %w", err)
	}
	if t.eosToken, err = tokenString(cfg["eos_token"]); err != nil {
		return fmt.Errorf("eos_token: %w", err)
	}
	if t.padToken, err = tokenString(cfg["pad_token"]); err != nil {
		return fmt.Errorf("pad_token: %w", err)
	}
	if t.unkToken, err = tokenString(cfg["unk_token"]); err != nil {
		return fmt.Errorf("unk_token: %w", err)
	}
	return nil
}

// tokenString reads a special token given as "text" or as an AddedToken
// object {"content": "text", ...}; null gives "".
func tokenString(raw json.RawMessage) (string, error) {
	if isNull(raw) {
		return "", nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		return s, nil
	}
	var obj struct {
		Content *string `json:"content"`
	}
	if err := json.Unmarshal(raw, &obj); err != nil || obj.Content == nil {
		return "", fmt.Errorf("want a string or {\"content\": ...}, got %s", raw)
	}
	return *obj.Content, nil
}

// configTemplate reads tokenizer_config.json's chat_template: a string, or
// a list of {"name", "template"} from which "default" is taken.
func configTemplate(cfg map[string]json.RawMessage) (string, bool, error) {
	raw, ok := cfg["chat_template"]
	if !ok || isNull(raw) {
		return "", false, nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		return s, true, nil
	}
	var list []struct {
		Name     string `json:"name"`
		Template string `json:"template"`
	}
	if err := json.NewDecoder(bytes.NewReader(raw)).Decode(&list); err != nil {
		return "", false, fmt.Errorf("want a string or a list of {name, template}")
	}
	for _, e := range list {
		if e.Name == "default" {
			return e.Template, true, nil
		}
	}
	return "", false, fmt.Errorf("no template named \"default\" in the list")
}
