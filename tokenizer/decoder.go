package tokenizer

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"unicode/utf8"
)

// A decoder turns the token strings of some ids back into text. Like the
// reference, decoders pass a list of strings along a chain; ByteLevel may
// leave raw bytes that are not valid UTF-8 yet, which the caller fixes
// up (Decode) or holds back (StreamDecoder).
type decoder interface {
	decodeChain(tokens []string) []string
}

// byteLevelDec joins the tokens and maps byte-level runes back to bytes.
type byteLevelDec struct{}

func (byteLevelDec) decodeChain(tokens []string) []string {
	var buf []byte
	for _, t := range tokens {
		buf = byteLevelDecodeToken(buf, t)
	}
	return []string{string(buf)}
}

type replaceDec struct {
	pattern pattern
	content string
}

func (r replaceDec) decodeChain(tokens []string) []string {
	for i, t := range tokens {
		tokens[i] = r.pattern.replaceAll(t, r.content)
	}
	return tokens
}

// byteFallbackDec turns runs of "<0xAB>" tokens into their bytes; a run that
// is not valid UTF-8 becomes one U+FFFD per byte, as in the reference.
type byteFallbackDec struct{}

func (byteFallbackDec) decodeChain(tokens []string) []string {
	out := make([]string, 0, len(tokens))
	var pending []byte
	flush := func() {
		if len(pending) == 0 {
			return
		}
		if utf8.Valid(pending) {
			out = append(out, string(pending))
		} else {
			for range pending {
				out = append(out, "\uFFFD")
			}
		}
		pending = pending[:0]
	}
	for _, t := range tokens {
		if b, ok := parseByteToken(t); ok {
			pending = append(pending, b)
			continue
		}
		flush()
		out = append(out, t)
	}
	flush()
	return out
}

// parseByteToken reads "<0xAB>".
func parseByteToken(t string) (byte, bool) {
	if len(t) != 6 || !strings.HasPrefix(t, "<0x") || t[5] != '>' {
		return 0, false
	}
	v, err := strconv.ParseUint(t[3:5], 16, 8)
	return byte(v), err == nil
}

type fuseDec struct{}

func (fuseDec) decodeChain(tokens []string) []string {
	return []string{strings.Join(tokens, "")}
}

// stripDec removes up to start/stop copies of content from each token's ends.
type stripDec struct {
	content     string
	start, stop int
}

func (s stripDec) decodeChain(tokens []string) []string {
	for i, t := range tokens {
		for k := 0; k < s.start && strings.HasPrefix(t, s.content); k++ {
			t = t[len(s.content):]
		}
		for k := 0; k < s.stop && strings.HasSuffix(t, s.content); k++ {
			t = t[:len(t)-len(s.content)]
		}
		tokens[i] = t
	}
	return tokens
}

// metaspaceDec turns "▁" back into spaces and drops the one that the
// pre-tokenizer prepended to the first word.
type metaspaceDec struct {
	replacement string
	prepend     string
}

func (m metaspaceDec) decodeChain(tokens []string) []string {
	for i, t := range tokens {
		t = strings.ReplaceAll(t, m.replacement, " ")
		if i == 0 && m.prepend != "never" {
			t = strings.TrimPrefix(t, " ")
		}
		tokens[i] = t
	}
	return tokens
}

type decSequence []decoder

func (q decSequence) decodeChain(tokens []string) []string {
	for _, d := range q {
		tokens = d.decodeChain(tokens)
	}
	return tokens
}

type decoderJSON struct {
	Type           string            `json:"type"`
	Decoders       []json.RawMessage `json:"decoders"`
	Pattern        json.RawMessage   `json:"pattern"`
	Content        string            `json:"content"`
	Start          int               `json:"start"`
	Stop           int               `json:"stop"`
	Replacement    string            `json:"replacement"`
	PrependScheme  string            `json:"prepend_scheme"`
	AddPrefixSpace *bool             `json:"add_prefix_space"`
}

func parseDecoder(raw json.RawMessage) (decoder, error) {
	if isNull(raw) {
		return nil, nil
	}
	var j decoderJSON
	if err := json.Unmarshal(raw, &j); err != nil {
		return nil, err
	}
	switch j.Type {
	case "ByteLevel":
		return byteLevelDec{}, nil
	case "Replace":
		p, err := parsePattern(j.Pattern)
		if err != nil {
			return nil, fmt.Errorf("Replace: %w", err)
		}
		return replaceDec{p, j.Content}, nil
	case "ByteFallback":
		return byteFallbackDec{}, nil
	case "Fuse":
		return fuseDec{}, nil
	case "Strip":
		return stripDec{j.Content, j.Start, j.Stop}, nil
	case "Metaspace":
		m := metaspaceDec{}
		m.replacement, m.prepend = metaspaceSettings(j.Replacement, j.PrependScheme, j.AddPrefixSpace)
		return m, nil
	case "Sequence":
		var seq decSequence
		for i, r := range j.Decoders {
			d, err := parseDecoder(r)
			if err != nil {
				return nil, fmt.Errorf("Sequence[%d]: %w", i, err)
			}
			if d != nil {
				seq = append(seq, d)
			}
		}
		return seq, nil
	}
	return nil, fmt.Errorf("unsupported decoder type %q", j.Type)
}
