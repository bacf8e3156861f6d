package tokenizer

import (
	"fmt"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

// The Jinja engine (github.com/ardanlabs/jinja) evaluates chat templates
// well but differs from Python jinja2 in its lexer: its whitespace control
// reaches past {{ }} tags to trim text that jinja2 leaves alone, it lacks
// "+" modifiers, some string escapes and "x.0" item access, and it prints
// None and floats unlike Python. rewriteTemplate fixes that at the source:
// it applies jinja2's whitespace rules with HF's settings (trim_blocks,
// lstrip_blocks, no trailing newline) itself, turns each text run into a
// {{ '...' }} literal so that the engine has no text left to trim, and
// routes printed values and tojson through Python-exact helpers. Line
// numbers are kept: every newline of the source stays on its line.

const (
	lineFunc   = "mmfp4_line"   // records the line of the tag being run
	strFunc    = "mmfp4_str"    // Python str() of a printed value
	tojsonFunc = "mmfp4_tojson" // HF's tojson filter
)

type tagKind int

const (
	tagText    tagKind = iota
	tagExpr            // {{ }}
	tagStmt            // {% %}
	tagComment         // {# #}
)

type piece struct {
	kind        tagKind
	text        string // text, or the inside of a tag without delimiters and modifiers
	left, right byte   // '-', '+' or 0
	line        int    // line of the tag's start
	drop        bool   // {% raw %} and {% endraw %}: whitespace rules only
}

// lexTemplate cuts the source into text and tags.
func lexTemplate(src string) ([]piece, error) {
	var out []piece
	line := 1
	for i := 0; i < len(src); {
		j := nextTagStart(src, i)
		if j > i {
			out = append(out, piece{kind: tagText, text: src[i:j], line: line})
			line += strings.Count(src[i:j], "\n")
		}
		if j == len(src) {
			break
		}
		kind := map[byte]tagKind{'{': tagExpr, '%': tagStmt, '#': tagComment}[src[j+1]]
		p := piece{kind: kind, line: line}
		k := j + 2
		if k < len(src) && (src[k] == '-' || src[k] == '+') {
			p.left = src[k]
			k++
		}
		end, err := tagEnd(src, k, kind)
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", line, err)
		}
		inner := src[k:end]
		if n := len(inner); n > 0 && (inner[n-1] == '-' || inner[n-1] == '+') {
			p.right = inner[n-1]
			inner = inner[:n-1]
		}
		p.text = inner
		line += strings.Count(src[j:end+2], "\n")
		i = end + 2
		if kind == tagStmt {
			// transformers' AssistantTracker tags only mark their body.
			switch strings.TrimSpace(inner) {
			case "generation", "endgeneration":
				p.drop = true
			}
		}
		if kind == tagStmt && strings.TrimSpace(inner) == "raw" {
			// Everything up to {% endraw %} is text. jinja2 applies
			// trim_blocks after {% endraw %} but not after {% raw %}.
			body, next, err := rawBody(src, i)
			if err != nil {
				return nil, fmt.Errorf("line %d: %w", p.line, err)
			}
			p.drop = true
			if p.right == 0 {
				p.right = '+'
			}
			out = append(out, p, piece{kind: tagText, text: body.text, line: line})
			line += strings.Count(body.text, "\n")
			out = append(out, piece{kind: tagStmt, left: body.left, right: body.right, line: line, drop: true})
			line += strings.Count(src[body.endStart:next], "\n")
			i = next
			continue
		}
		out = append(out, p)
	}
	return out, nil
}

func nextTagStart(src string, i int) int {
	for {
		k := strings.IndexByte(src[i:], '{')
		if k < 0 || i+k+1 >= len(src) {
			return len(src)
		}
		if c := src[i+k+1]; c == '{' || c == '%' || c == '#' {
			return i + k
		}
		i += k + 1
	}
}

// tagEnd finds the closing delimiter of a tag whose inside starts at k,
// skipping string literals and nested brackets.
func tagEnd(src string, k int, kind tagKind) (int, error) {
	if kind == tagComment {
		e := strings.Index(src[k:], "#}")
		if e < 0 {
			return 0, fmt.Errorf("unclosed comment")
		}
		return k + e, nil
	}
	closer := byte('}')
	if kind == tagStmt {
		closer = '%'
	}
	depth := 0
	for i := k; i < len(src); i++ {
		switch c := src[i]; c {
		case '\'', '"':
			for i++; i < len(src) && src[i] != c; i++ {
				if src[i] == '\\' {
					i++
				}
			}
		case '(', '[', '{':
			depth++
		case ')', ']':
			depth--
		case '}', '%':
			if c == closer && depth <= 0 && i+1 < len(src) && src[i+1] == '}' {
				return i, nil
			}
			if c == '}' {
				depth--
			}
		}
	}
	return 0, fmt.Errorf("unclosed tag")
}

type rawText struct {
	text        string
	left, right byte // modifiers of the {% endraw %} tag
	endStart    int  // index of that tag
}

// rawBody returns the text up to {% endraw %} and the index after the tag.
func rawBody(src string, i int) (rawText, int, error) {
	for k := i; ; {
		j := strings.Index(src[k:], "{%")
		if j < 0 {
			return rawText{}, 0, fmt.Errorf("unclosed raw block")
		}
		j += k
		e := strings.Index(src[j:], "%}")
		if e < 0 {
			return rawText{}, 0, fmt.Errorf("unclosed raw block")
		}
		inner := src[j+2 : j+e]
		r := rawText{text: src[i:j], endStart: j}
		if strings.HasPrefix(inner, "-") || strings.HasPrefix(inner, "+") {
			r.left, inner = inner[0], inner[1:]
		}
		if strings.HasSuffix(inner, "-") || strings.HasSuffix(inner, "+") {
			r.right, inner = inner[len(inner)-1], inner[:len(inner)-1]
		}
		if strings.TrimSpace(inner) == "endraw" {
			return r, j + e + 2, nil
		}
		k = j + 2
	}
}

// applyWhitespace applies jinja2's whitespace control to the text pieces:
// "-" strips all whitespace on its side, lstrip_blocks strips the
// indentation before a block or comment tag that starts a line, and
// trim_blocks removes the newline right after one. It returns, per piece,
// how many newlines were removed (to keep line numbers).
func applyWhitespace(ps []piece) []int {
	removed := make([]int, len(ps))
	cut := func(i int, kept string) {
		removed[i] += strings.Count(ps[i].text, "\n") - strings.Count(kept, "\n")
		ps[i].text = kept
	}
	lineStarting := true // jinja2 counts the template start as a line start
	for i := range ps {
		p := &ps[i]
		if p.kind == tagText {
			continue
		}
		block := p.kind == tagStmt || p.kind == tagComment
		// Left side: the text before this tag.
		if i > 0 && ps[i-1].kind == tagText {
			prev := ps[i-1].text
			switch {
			case p.left == '-':
				cut(i-1, strings.TrimRightFunc(prev, pySpace))
			case p.left != '+' && block:
				l := strings.LastIndexByte(prev, '\n') + 1
				if (l > 0 || lineStarting) && strings.Trim(prev[l:], " \t") == "" {
					cut(i-1, prev[:l])
				}
			}
		}
		// Right side: the text after this tag.
		lineStarting = false
		if i+1 < len(ps) && ps[i+1].kind == tagText {
			next := ps[i+1].text
			switch {
			case p.right == '-':
				kept := strings.TrimLeftFunc(next, pySpace)
				lineStarting = strings.HasSuffix(next[:len(next)-len(kept)], "\n")
				cut(i+1, kept)
			case p.right != '+' && block && strings.HasPrefix(next, "\n"):
				cut(i+1, next[1:])
				lineStarting = true
			}
		}
	}
	return removed
}

// pySpace is Python's str.isspace, which jinja2's "-" stripping uses.
func pySpace(r rune) bool {
	return unicode.IsSpace(r) || (r >= 0x1c && r <= 0x1f)
}

// rewriteTemplate returns the source for the engine (see the file comment).
func rewriteTemplate(src string) (string, error) {
	// jinja2 reads "\r\n" and "\r" as "\n" and drops one trailing newline.
	src = strings.ReplaceAll(src, "\r\n", "\n")
	src = strings.ReplaceAll(src, "\r", "\n")
	src = strings.TrimSuffix(src, "\n")
	ps, err := lexTemplate(src)
	if err != nil {
		return "", err
	}
	removed := applyWhitespace(ps)
	var b strings.Builder
	lastLine := 0
	for i, p := range ps {
		gone := strings.Repeat("\n", removed[i])
		switch p.kind {
		case tagText:
			if p.text != "" || gone != "" {
				b.WriteString("{{ " + quoteLiteral(p.text, false) + gone + " }}")
			}
		case tagComment:
			if n := strings.Count(p.text, "\n"); n > 0 {
				b.WriteString("{{ ''" + strings.Repeat("\n", n) + " }}")
			}
		case tagExpr, tagStmt:
			if p.drop {
				if n := strings.Count(p.text, "\n"); n > 0 {
					b.WriteString("{{ ''" + strings.Repeat("\n", n) + " }}")
				}
				continue
			}
			if p.line != lastLine {
				fmt.Fprintf(&b, "{{ %s(%d) }}", lineFunc, p.line)
				lastLine = p.line
			}
			inner := rewriteExpr(p.text)
			if p.kind == tagExpr {
				b.WriteString("{{ " + strFunc + "(" + inner + ") }}")
			} else {
				b.WriteString("{%" + inner + "%}")
			}
		}
	}
	return b.String(), nil
}

// quoteLiteral writes s as a single-quoted literal the engine reads back
// exactly. Newlines are escaped inside tags; in template text they stay
// raw so that lines keep their numbers.
func quoteLiteral(s string, escapeNewlines bool) string {
	var b strings.Builder
	b.WriteByte('\'')
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case '\\', '\'':
			b.WriteByte('\\')
			b.WriteByte(c)
		case '\t':
			b.WriteString(`\t`)
		case '\n':
			if escapeNewlines {
				b.WriteString(`\n`)
			} else {
				b.WriteByte(c)
			}
		default:
			b.WriteByte(c)
		}
	}
	b.WriteByte('\'')
	return b.String()
}

// rewriteExpr edits the inside of a tag, outside string literals:
// Python escapes in literals are resolved, "x.0" becomes "x[0]", and the
// tojson filter is swapped for HF's.
func rewriteExpr(s string) string {
	var b strings.Builder
	prev := byte(0)    // last significant byte written
	prevIdent := false // the last token was a name, ')' or ']'
	for i := 0; i < len(s); {
		c := s[i]
		switch {
		case c == '\'' || c == '"':
			lit, n := readPyString(s[i:])
			b.WriteString(quoteLiteral(lit, true))
			i += n
			prev, prevIdent = '\'', false
		case c == '_' || isASCIILetter(c):
			j := i
			for j < len(s) && (s[j] == '_' || isASCIILetter(s[j]) || isDigit(s[j])) {
				j++
			}
			name := s[i:j]
			if name == "tojson" && prev == '|' {
				name = tojsonFunc
			}
			b.WriteString(name)
			i = j
			prev, prevIdent = 'a', true
		case isDigit(c):
			j := i
			for j < len(s) && (isDigit(s[j]) || s[j] == '.' || s[j] == 'e' || s[j] == 'E' || s[j] == '_' ||
				((s[j] == '+' || s[j] == '-') && (s[j-1] == 'e' || s[j-1] == 'E'))) {
				j++
			}
			b.WriteString(s[i:j])
			i = j
			prev, prevIdent = '0', false
		case c == '.' && prevIdent && i+1 < len(s) && isDigit(s[i+1]):
			j := i + 1
			for j < len(s) && isDigit(s[j]) {
				j++
			}
			b.WriteString("[" + s[i+1:j] + "]")
			i = j
			prev, prevIdent = ']', true
		default:
			b.WriteByte(c)
			i++
			if c != ' ' && c != '\t' && c != '\n' {
				prev = c
				prevIdent = c == ')' || c == ']'
			}
		}
	}
	return b.String()
}

func isASCIILetter(c byte) bool { return (c|0x20) >= 'a' && (c|0x20) <= 'z' }
func isDigit(c byte) bool       { return c >= '0' && c <= '9' }

// readPyString reads a quoted Python string literal at the start of s and
// returns its value and length.
func readPyString(s string) (string, int) {
	q := s[0]
	var b strings.Builder
	i := 1
	for i < len(s) && s[i] != q {
		if s[i] != '\\' || i+1 >= len(s) {
			b.WriteByte(s[i])
			i++
			continue
		}
		c := s[i+1]
		i += 2
		switch c {
		case 'n':
			b.WriteByte('\n')
		case 't':
			b.WriteByte('\t')
		case 'r':
			b.WriteByte('\r')
		case '0':
			b.WriteByte(0)
		case 'a':
			b.WriteByte(7)
		case 'b':
			b.WriteByte(8)
		case 'f':
			b.WriteByte(12)
		case 'v':
			b.WriteByte(11)
		case '\\', '\'', '"':
			b.WriteByte(c)
		case '\n':
			// A backslash at the end of a line joins the lines.
		case 'x', 'u', 'U':
			n := map[byte]int{'x': 2, 'u': 4, 'U': 8}[c]
			if i+n <= len(s) {
				if v, err := strconv.ParseUint(s[i:i+n], 16, 32); err == nil && utf8.ValidRune(rune(v)) {
					b.WriteRune(rune(v))
					i += n
					continue
				}
			}
			b.WriteByte('\\')
			b.WriteByte(c)
		default:
			b.WriteByte('\\')
			b.WriteByte(c)
		}
	}
	return b.String(), min(i+1, len(s))
}
