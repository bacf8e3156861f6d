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
// translates the inside of each tag with jinja2's grammar (jinjaexpr.go).
// Printed values go through a Python-exact str(). Line numbers are kept:
// every newline of the source stays on its line.

const lineFunc = reservedPrefix + "line" // records the line of the tag being run

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
	var blocks []string // open block statements
	lastLine := 0
	for i, p := range ps {
		gone := strings.Repeat("\n", removed[i])
		switch p.kind {
		case tagText:
			if p.text != "" || gone != "" {
				b.WriteString("{{ " + call("str", quoteLiteral(p.text, false)) + gone + " }}")
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
			nl := strings.Repeat("\n", strings.Count(p.text, "\n"))
			var err error
			if p.kind == tagExpr {
				var inner string
				if inner, err = translateOutput(p.text); err == nil {
					b.WriteString("{{ " + call("str", inner) + nl + " }}")
				}
			} else {
				var st translatedStmt
				if st, err = translateStmt(p.text, &blocks); err == nil {
					b.WriteString(st.before + "{%" + st.tag + nl + "%}" + st.after)
				}
			}
			if err != nil {
				return "", fmt.Errorf("line %d: %w", p.line, err)
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

func isASCIILetter(c byte) bool { return (c|0x20) >= 'a' && (c|0x20) <= 'z' }
func isDigit(c byte) bool       { return c >= '0' && c <= '9' }

// readPyString reads a quoted Python string literal at the start of s and
// returns its value and length; ok is false if it is not closed.
func readPyString(s string) (val string, n int, ok bool) {
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
	if i >= len(s) {
		return "", 0, false
	}
	return b.String(), i + 1, true
}

// translateOutput translates the inside of {{ }}.
func translateOutput(src string) (string, error) {
	p, err := newExprParser(src)
	if err != nil {
		return "", err
	}
	e, err := p.tuple(true)
	if err != nil {
		return "", err
	}
	return e, p.end()
}

// translatedStmt is a statement tag for the engine, with tags to put
// before and after it.
type translatedStmt struct {
	before, tag, after string
}

// blockEnds maps the statements that open a block to the one that closes it.
var blockEnds = map[string]string{
	"if": "endif", "for": "endfor", "macro": "endmacro", "call": "endcall", "filter": "endfilter", "set": "endset",
}

// translateStmt translates the inside of {% %}. blocks is the stack of
// open blocks: macros are bracketed by enter and leave, loop bodies start
// with tick, and nesting is bounded.
func translateStmt(src string, blocks *[]string) (translatedStmt, error) {
	p, err := newExprParser(src)
	if err != nil {
		return translatedStmt{}, err
	}
	if p.peek().kind != jName {
		return translatedStmt{}, p.unexpected("expected a statement")
	}
	kw := p.next().text
	open := func() error {
		*blocks = append(*blocks, kw)
		if len(*blocks) > maxBlockDepth {
			return fmt.Errorf("blocks nested more than %d deep", maxBlockDepth)
		}
		return nil
	}
	closeBlock := func() error {
		n := len(*blocks)
		if n == 0 || blockEnds[(*blocks)[n-1]] != kw {
			return fmt.Errorf("unexpected {%% %s %%}", kw)
		}
		*blocks = (*blocks)[:n-1]
		return p.end()
	}
	var st translatedStmt
	switch kw {
	case "if", "elif":
		cond, err := p.tuple(false)
		if err == nil {
			err = p.end()
		}
		if err == nil && kw == "if" {
			err = open()
		}
		st.tag = " " + kw + " " + cond + " "
		return st, err
	case "else", "break", "continue":
		st.tag = " " + kw + " "
		return st, p.end()
	case "endif", "endfor", "endcall", "endfilter", "endset":
		st.tag = " " + kw + " "
		return st, closeBlock()
	case "endmacro":
		st.before = "{{ " + call("leave") + " }}"
		st.tag = " endmacro "
		return st, closeBlock()
	case "for":
		return translateFor(p, open)
	case "set":
		return translateSet(p, open)
	case "macro":
		return translateMacro(p, open)
	case "call":
		st.tag = " call"
		if p.isOp("(") {
			p.next()
			var params []string
			for !p.isOp(")") {
				if len(params) > 0 {
					if err := p.expectOp(","); err != nil {
						return st, err
					}
				}
				name, err := p.expectName()
				if err != nil {
					return st, err
				}
				params = append(params, name)
			}
			p.next()
			st.tag += "(" + strings.Join(params, ", ") + ")"
		}
		e, err := p.expr(true)
		if err == nil {
			err = p.end()
		}
		if err == nil {
			err = open()
		}
		st.tag += " " + e + " "
		return st, err
	case "filter":
		// The engine applies only a filter given by its bare name, which
		// cannot take arguments; the body is bounded like any output.
		name, err := p.expectName()
		if err == nil {
			err = p.end()
		}
		if err == nil {
			err = open()
		}
		st.tag = " filter " + name + " "
		return st, err
	}
	// Anything else the engine rejects on its own.
	st.tag = src
	return st, nil
}

// translateFor: for TARGETS in ITER [if COND] [recursive]; each iteration
// is counted.
func translateFor(p *exprParser, open func() error) (translatedStmt, error) {
	var st translatedStmt
	paren := p.isOp("(")
	if paren {
		p.next()
	}
	var targets []string
	for {
		name, err := p.expectName()
		if err != nil {
			return st, err
		}
		targets = append(targets, name)
		if !p.isOp(",") {
			break
		}
		p.next()
	}
	if paren {
		if err := p.expectOp(")"); err != nil {
			return st, err
		}
	}
	if !p.isName("in") {
		return st, p.unexpected("expected \"in\"")
	}
	p.next()
	iter, err := p.tuple(false)
	if err != nil {
		return st, err
	}
	st.tag = " for " + strings.Join(targets, ", ") + " in " + call("iter", iter)
	if p.isName("if") {
		p.next()
		cond, err := p.expr(true)
		if err != nil {
			return st, err
		}
		st.tag += " if " + cond
	}
	if p.isName("recursive") {
		p.next()
		st.tag += " recursive"
	}
	st.tag += " "
	st.after = "{{ " + call("tick") + " }}"
	if err := p.end(); err != nil {
		return st, err
	}
	return st, open()
}

// translateSet: set NAME = VALUE, set NS.ATTR = VALUE, or a set block;
// values are checked (size, the bytes variables hold, and a namespace may
// not hold itself).
func translateSet(p *exprParser, open func() error) (translatedStmt, error) {
	var st translatedStmt
	name, err := p.expectName()
	if err != nil {
		return st, err
	}
	if strings.HasPrefix(name, reservedPrefix) {
		return st, fmt.Errorf("the name %q is reserved", name)
	}
	target, ns, attr := name, "", ""
	if p.isOp(".") {
		p.next()
		var err error
		if attr, err = p.expectName(); err != nil {
			return st, err
		}
		target, ns = name+"."+attr, name
	}
	if p.atEnd() && ns == "" {
		st.tag = " set " + name + " "
		return st, open()
	}
	if err := p.expectOp("="); err != nil {
		return st, err
	}
	v, err := p.tuple(true)
	if err != nil {
		return st, err
	}
	if ns != "" {
		v = call("val", v, quoteLiteral(attr, true), ns)
	} else {
		v = call("val", v, quoteLiteral(name, true))
	}
	st.tag = " set " + target + " = " + v + " "
	return st, p.end()
}

// translateMacro: macro NAME(PARAMS). Defaults are set at the top of the
// body (the engine splits its parameter list at every comma), and the
// body is bracketed by enter and leave to bound the depth of calls.
func translateMacro(p *exprParser, open func() error) (translatedStmt, error) {
	var st translatedStmt
	name, err := p.expectName()
	if err != nil {
		return st, err
	}
	if strings.HasPrefix(name, reservedPrefix) {
		return st, fmt.Errorf("the name %q is reserved", name)
	}
	if err := p.expectOp("("); err != nil {
		return st, err
	}
	var params []string
	var defaults strings.Builder
	for !p.isOp(")") {
		if len(params) > 0 {
			if err := p.expectOp(","); err != nil {
				return st, err
			}
			if p.isOp(")") {
				break
			}
		}
		param, err := p.expectName()
		if err != nil {
			return st, err
		}
		params = append(params, param)
		if p.isOp("=") {
			p.next()
			def, err := p.expr(true)
			if err != nil {
				return st, err
			}
			fmt.Fprintf(&defaults, "{%% if %s is not defined %%}{%% set %s = %s %%}{%% endif %%}", param, param, call("val", def, quoteLiteral(param, true)))
		}
	}
	p.next()
	if err := p.end(); err != nil {
		return st, err
	}
	st.tag = " macro " + name + "(" + strings.Join(params, ", ") + ") "
	st.after = "{{ " + call("enter") + " }}" + defaults.String()
	return st, open()
}
