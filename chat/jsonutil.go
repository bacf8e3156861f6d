package chat

import (
	"bytes"
	"encoding/json"
	"strings"
	"unicode/utf8"
)

// writeJSONString writes s as a JSON string literal.
func writeJSONString(b *strings.Builder, s string) {
	b.WriteByte('"')
	writeJSONStringBody(b, s)
	b.WriteByte('"')
}

// writeJSONStringBody writes s escaped for the inside of a JSON string.
// Escaping goes character by character, so the escapes of the pieces of a
// text concatenate to the escape of the text (for pieces cut between
// characters). HTML characters are left alone, unlike encoding/json.
func writeJSONStringBody(b *strings.Builder, s string) {
	const hex = "0123456789abcdef"
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			switch {
			case c == '"':
				b.WriteString(`\"`)
			case c == '\\':
				b.WriteString(`\\`)
			case c == '\n':
				b.WriteString(`\n`)
			case c == '\r':
				b.WriteString(`\r`)
			case c == '\t':
				b.WriteString(`\t`)
			case c < 0x20:
				b.WriteString(`\u00`)
				b.WriteByte(hex[c>>4])
				b.WriteByte(hex[c&0xf])
			default:
				b.WriteByte(c)
			}
			i++
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b.WriteString(`\ufffd`)
		} else {
			b.WriteString(s[i : i+size])
		}
		i += size
	}
}

// compactJSON writes valid JSON src without insignificant whitespace.
func compactJSON(b *strings.Builder, src string) {
	var buf bytes.Buffer
	if json.Compact(&buf, []byte(src)) != nil {
		b.WriteString(src)
		return
	}
	b.Write(buf.Bytes())
}
