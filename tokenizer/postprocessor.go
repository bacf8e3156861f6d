package tokenizer

import (
	"encoding/json"
	"fmt"
)

// A postProcessor adds the special tokens (BOS, EOS, ...) around an encoded
// sequence when Encode is asked to add them.
type postProcessor interface {
	process(ids []int) []int
}

// templatePost follows a TemplateProcessing "single" template: a list of
// special tokens and the place of the sequence ("$A").
type templatePost struct {
	before, after []int
}

func (p templatePost) process(ids []int) []int {
	out := make([]int, 0, len(p.before)+len(ids)+len(p.after))
	out = append(out, p.before...)
	out = append(out, ids...)
	return append(out, p.after...)
}

type postSequence []postProcessor

func (q postSequence) process(ids []int) []int {
	for _, p := range q {
		ids = p.process(ids)
	}
	return ids
}

// noPost stands for processors that change offsets only (ByteLevel).
type noPost struct{}

func (noPost) process(ids []int) []int { return ids }

type templatePieceJSON struct {
	SpecialToken *struct {
		ID string `json:"id"`
	} `json:"SpecialToken"`
	Sequence *struct {
		ID string `json:"id"`
	} `json:"Sequence"`
}

type postJSON struct {
	Type          string              `json:"type"`
	Processors    []json.RawMessage   `json:"processors"`
	Single        []templatePieceJSON `json:"single"`
	SpecialTokens map[string]struct {
		IDs []int `json:"ids"`
	} `json:"special_tokens"`
	Cls []json.RawMessage `json:"cls"` // [token, id]
	Sep []json.RawMessage `json:"sep"`
}

func parsePostProcessor(raw json.RawMessage) (postProcessor, error) {
	if isNull(raw) {
		return nil, nil
	}
	var j postJSON
	if err := json.Unmarshal(raw, &j); err != nil {
		return nil, err
	}
	switch j.Type {
	case "ByteLevel":
		return noPost{}, nil
	case "TemplateProcessing":
		var p templatePost
		seen := false
		for i, piece := range j.Single {
			switch {
			case piece.Sequence != nil:
				seen = true
			case piece.SpecialToken != nil:
				st, ok := j.SpecialTokens[piece.SpecialToken.ID]
				if !ok {
					return nil, fmt.Errorf("TemplateProcessing: single[%d]: %q not in special_tokens", i, piece.SpecialToken.ID)
				}
				if seen {
					p.after = append(p.after, st.IDs...)
				} else {
					p.before = append(p.before, st.IDs...)
				}
			default:
				return nil, fmt.Errorf("TemplateProcessing: single[%d]: unknown piece", i)
			}
		}
		return p, nil
	case "BertProcessing", "RobertaProcessing":
		cls, err1 := pairID(j.Cls)
		sep, err2 := pairID(j.Sep)
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("%s: bad cls/sep", j.Type)
		}
		return templatePost{before: []int{cls}, after: []int{sep}}, nil
	case "Sequence":
		var seq postSequence
		for i, r := range j.Processors {
			p, err := parsePostProcessor(r)
			if err != nil {
				return nil, fmt.Errorf("Sequence[%d]: %w", i, err)
			}
			if p != nil {
				seq = append(seq, p)
			}
		}
		return seq, nil
	}
	return nil, fmt.Errorf("unsupported post_processor type %q", j.Type)
}

// pairID reads the id of a [token, id] pair.
func pairID(pair []json.RawMessage) (int, error) {
	if len(pair) != 2 {
		return 0, fmt.Errorf("want [token, id]")
	}
	var id int
	err := json.Unmarshal(pair[1], &id)
	return id, err
}

// checkPostIDs makes sure that the ids a post-processor adds are in the
// vocabulary of size n.
func checkPostIDs(p postProcessor, n int) error {
	switch p := p.(type) {
	case templatePost:
		for _, id := range append(append([]int(nil), p.before...), p.after...) {
			if id < 0 || id >= n {
				return fmt.Errorf("special token id %d is outside the vocabulary of %d ids", id, n)
			}
		}
	case postSequence:
		for _, q := range p {
			if err := checkPostIDs(q, n); err != nil {
				return err
			}
		}
	}
	return nil
}
