package tokenizer

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

// The inside of each {{ }} and {% %} tag is parsed with jinja2's grammar
// and written back for the engine fully parenthesized, so that jinja2's
// precedence holds (-2.5|abs is abs(-2.5)), and with the operations that
// can build large values or that the engine gets wrong routed through our
// functions (jinjaguard.go): +, ~, *, ** and slices, list and dict
// literals, range and namespace, the values of set, the string methods
// split, replace and format, the join, replace, indent, tojson and list
// filters, and the iterables of for loops. The methods that modify lists and dicts fail, as in HF's
// immutable sandbox. The functions are named with a prefix that templates
// may not use.

const reservedPrefix = "mmfp4_"

// Limits on the template source itself: the engine parses and runs
// templates recursively.
const (
	maxExprDepth  = 100 // nested brackets and operators in one tag
	maxBlockDepth = 100 // nested block statements
)

type jtokKind int

const (
	jName jtokKind = iota
	jInt
	jFloat
	jString
	jOp
	jEOF
)

type jtok struct {
	kind jtokKind
	text string // name, operator, number without "_", or a string's value
}

// lexExpr cuts the inside of a tag into tokens.
func lexExpr(s string) ([]jtok, error) {
	var out []jtok
	for i := 0; i < len(s); {
		c := s[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r':
			i++
		case c == '\'' || c == '"':
			val, n, ok := readPyString(s[i:])
			if !ok {
				return nil, fmt.Errorf("unclosed string literal")
			}
			out = append(out, jtok{jString, val})
			i += n
		case isDigit(c):
			j := i
			digits := func() {
				for j < len(s) && (isDigit(s[j]) || (s[j] == '_' && j+1 < len(s) && isDigit(s[j+1]))) {
					j++
				}
			}
			digits()
			kind := jInt
			// After "x." only an integer follows ("x.0.1" is two items).
			afterDot := len(out) > 0 && out[len(out)-1].kind == jOp && out[len(out)-1].text == "."
			if !afterDot {
				if j+1 < len(s) && s[j] == '.' && isDigit(s[j+1]) {
					j++
					digits()
					kind = jFloat
				}
				if j < len(s) && (s[j] == 'e' || s[j] == 'E') {
					k := j + 1
					if k < len(s) && (s[k] == '+' || s[k] == '-') {
						k++
					}
					if k < len(s) && isDigit(s[k]) {
						j = k
						digits()
						kind = jFloat
					}
				}
			}
			out = append(out, jtok{kind, strings.ReplaceAll(s[i:j], "_", "")})
			i = j
		case c == '_' || isASCIILetter(c):
			j := i
			for j < len(s) && (s[j] == '_' || isASCIILetter(s[j]) || isDigit(s[j])) {
				j++
			}
			out = append(out, jtok{jName, s[i:j]})
			i = j
		default:
			if i+1 < len(s) {
				switch two := s[i : i+2]; two {
				case "**", "//", "==", "!=", "<=", ">=":
					out = append(out, jtok{jOp, two})
					i += 2
					continue
				}
			}
			if !strings.ContainsRune("+-*/%~|.,:()[]{}<>=", rune(c)) {
				return nil, fmt.Errorf("unexpected character %q", c)
			}
			out = append(out, jtok{jOp, string(c)})
			i++
		}
	}
	return append(out, jtok{kind: jEOF}), nil
}

// exprParser translates tokens to engine syntax as it parses (there is no
// tree: each method returns the text of what it parsed).
type exprParser struct {
	toks  []jtok
	pos   int
	depth int
}

func newExprParser(src string) (*exprParser, error) {
	toks, err := lexExpr(src)
	if err != nil {
		return nil, err
	}
	return &exprParser{toks: toks}, nil
}

func (p *exprParser) peek() jtok        { return p.toks[p.pos] }
func (p *exprParser) peekAt(k int) jtok { return p.toks[min(p.pos+k, len(p.toks)-1)] }
func (p *exprParser) next() jtok {
	t := p.toks[p.pos]
	if t.kind != jEOF {
		p.pos++
	}
	return t
}
func (p *exprParser) isOp(op string) bool     { return p.peek().kind == jOp && p.peek().text == op }
func (p *exprParser) isName(name string) bool { return p.peek().kind == jName && p.peek().text == name }
func (p *exprParser) atEnd() bool             { return p.peek().kind == jEOF }

func (p *exprParser) expectOp(op string) error {
	if !p.isOp(op) {
		return p.unexpected("expected %q", op)
	}
	p.next()
	return nil
}

func (p *exprParser) expectName() (string, error) {
	if p.peek().kind != jName {
		return "", p.unexpected("expected a name")
	}
	return p.next().text, nil
}

func (p *exprParser) unexpected(format string, args ...any) error {
	t := p.peek()
	got := t.text
	switch t.kind {
	case jEOF:
		got = "end of tag"
	case jString:
		got = "string " + strconv.Quote(t.text)
	}
	return fmt.Errorf(format+", got %s", append(args, got)...)
}

// enter bounds the parser's (and so the engine's) recursion.
func (p *exprParser) enter() error {
	p.depth++
	if p.depth > maxExprDepth {
		return fmt.Errorf("expression nested more than %d deep", maxExprDepth)
	}
	return nil
}

// end checks that the whole tag was read.
func (p *exprParser) end() error {
	if !p.atEnd() {
		return p.unexpected("expected the end of the tag")
	}
	return nil
}

// tuple is jinja2's parse_tuple: an expression, or several separated by
// commas, which make a tuple (a list for the engine).
func (p *exprParser) tuple(withCond bool) (string, error) {
	first, err := p.expr(withCond)
	if err != nil || !p.isOp(",") {
		return first, err
	}
	items := []string{first}
	for p.isOp(",") {
		p.next()
		if p.atEnd() || p.isName("recursive") || p.isName("if") {
			break
		}
		e, err := p.expr(withCond)
		if err != nil {
			return "", err
		}
		items = append(items, e)
	}
	return call("list", items...), nil
}

// expr is an expression; withCond allows "a if b else c" at the top.
func (p *exprParser) expr(withCond bool) (string, error) {
	if err := p.enter(); err != nil {
		return "", err
	}
	defer func() { p.depth-- }()
	e, err := p.or()
	if err != nil || !withCond {
		return e, err
	}
	for p.isName("if") {
		p.next()
		c, err := p.or()
		if err != nil {
			return "", err
		}
		if !p.isName("else") {
			e = "(" + e + " if " + c + ")"
			continue
		}
		p.next()
		f, err := p.expr(true)
		if err != nil {
			return "", err
		}
		e = "(" + e + " if " + c + " else " + f + ")"
	}
	return e, nil
}

func (p *exprParser) or() (string, error) {
	l, err := p.and()
	for err == nil && p.isName("or") {
		p.next()
		var r string
		if r, err = p.and(); err == nil {
			l = "(" + l + " or " + r + ")"
		}
	}
	return l, err
}

func (p *exprParser) and() (string, error) {
	l, err := p.not()
	for err == nil && p.isName("and") {
		p.next()
		var r string
		if r, err = p.not(); err == nil {
			l = "(" + l + " and " + r + ")"
		}
	}
	return l, err
}

func (p *exprParser) not() (string, error) {
	if !p.isName("not") {
		return p.compare()
	}
	p.next()
	if err := p.enter(); err != nil {
		return "", err
	}
	defer func() { p.depth-- }()
	e, err := p.not()
	return "(not " + e + ")", err
}

// compare handles ==, !=, <, >, <=, >=, in and not in; a chain such as
// a < b < c means a < b and b < c, as in Python.
func (p *exprParser) compare() (string, error) {
	l, err := p.math1()
	if err != nil {
		return "", err
	}
	var parts []string
	for {
		var op string
		switch t := p.peek(); {
		case t.kind == jOp && (t.text == "==" || t.text == "!=" || t.text == "<" || t.text == ">" || t.text == "<=" || t.text == ">="):
			op = t.text
			p.next()
		case p.isName("in"):
			op = "in"
			p.next()
		case p.isName("not") && p.peekAt(1).kind == jName && p.peekAt(1).text == "in":
			op = "not in"
			p.next()
			p.next()
		}
		if op == "" {
			break
		}
		r, err := p.math1()
		if err != nil {
			return "", err
		}
		parts = append(parts, "("+l+" "+op+" "+r+")")
		l = r
	}
	switch len(parts) {
	case 0:
		return l, nil
	case 1:
		return parts[0], nil
	}
	return "(" + strings.Join(parts, " and ") + ")", nil
}

// math1 is + and -; + goes through our function (strings and lists).
func (p *exprParser) math1() (string, error) {
	l, err := p.concat()
	for err == nil && (p.isOp("+") || p.isOp("-")) {
		op := p.next().text
		var r string
		if r, err = p.concat(); err != nil {
			break
		}
		if op == "+" {
			l = call("add", l, r)
		} else {
			l = "(" + l + " - " + r + ")"
		}
	}
	return l, err
}

// concat is ~, which binds tighter than + in jinja2.
func (p *exprParser) concat() (string, error) {
	first, err := p.math2()
	if err != nil || !p.isOp("~") {
		return first, err
	}
	args := []string{first}
	for p.isOp("~") {
		p.next()
		e, err := p.math2()
		if err != nil {
			return "", err
		}
		args = append(args, e)
	}
	return call("concat", args...), nil
}

// math2 is *, /, // and %.
func (p *exprParser) math2() (string, error) {
	l, err := p.pow()
	for err == nil && (p.isOp("*") || p.isOp("/") || p.isOp("//") || p.isOp("%")) {
		op := p.next().text
		var r string
		if r, err = p.pow(); err != nil {
			break
		}
		if op == "*" {
			l = call("mul", l, r)
		} else {
			l = "(" + l + " " + op + " " + r + ")"
		}
	}
	return l, err
}

// pow is **, left-associative in jinja2.
func (p *exprParser) pow() (string, error) {
	l, err := p.unary(true)
	for err == nil && p.isOp("**") {
		p.next()
		var r string
		if r, err = p.unary(true); err == nil {
			l = call("pow", l, r)
		}
	}
	return l, err
}

// unary is jinja2's parse_unary: a sign applies to the operand without
// its filters; filters and tests apply to the signed value.
func (p *exprParser) unary(withFilter bool) (string, error) {
	if err := p.enter(); err != nil {
		return "", err
	}
	defer func() { p.depth-- }()
	var e string
	var err error
	if p.isOp("-") || p.isOp("+") {
		sign := p.next().text
		var operand string
		if operand, err = p.unary(false); err != nil {
			return "", err
		}
		e = "(" + sign + operand + ")"
	} else if e, err = p.primary(); err != nil {
		return "", err
	}
	if e, err = p.postfix(e); err != nil || !withFilter {
		return e, err
	}
	return p.filters(e)
}

// primary is a literal, a name, or a bracketed expression.
func (p *exprParser) primary() (string, error) {
	t := p.peek()
	switch t.kind {
	case jName:
		p.next()
		switch t.text {
		case "true", "True":
			return "true", nil
		case "false", "False":
			return "false", nil
		case "none", "None":
			return "none", nil
		}
		if strings.HasPrefix(t.text, reservedPrefix) {
			return "", fmt.Errorf("the name %q is reserved", t.text)
		}
		return t.text, nil
	case jString:
		// Adjacent literals join, as in Python.
		var b strings.Builder
		for p.peek().kind == jString {
			b.WriteString(p.next().text)
		}
		return quoteLiteral(b.String(), true), nil
	case jInt:
		p.next()
		n, err := strconv.ParseInt(t.text, 10, 64)
		if err != nil {
			return "", fmt.Errorf("integer literal %s is too large", t.text)
		}
		return strconv.FormatInt(n, 10), nil
	case jFloat:
		p.next()
		f, err := strconv.ParseFloat(t.text, 64)
		if err != nil || math.IsInf(f, 0) {
			return "", fmt.Errorf("float literal %s is out of range", t.text)
		}
		return engineFloat(f), nil
	}
	switch {
	case p.isOp("("):
		p.next()
		if p.isOp(")") {
			p.next()
			return call("list"), nil
		}
		e, err := p.expr(true)
		if err != nil {
			return "", err
		}
		if p.isOp(",") {
			items := []string{e}
			if items, err = p.items(items, ")"); err != nil {
				return "", err
			}
			return call("list", items...), nil
		}
		if err := p.expectOp(")"); err != nil {
			return "", err
		}
		return "(" + e + ")", nil
	case p.isOp("["):
		p.next()
		items, err := p.items(nil, "]")
		if err != nil {
			return "", err
		}
		return call("list", items...), nil
	case p.isOp("{"):
		p.next()
		var kv []string
		for !p.isOp("}") {
			if len(kv) > 0 {
				if err := p.expectOp(","); err != nil {
					return "", err
				}
				if p.isOp("}") {
					break
				}
			}
			k, err := p.expr(true)
			if err != nil {
				return "", err
			}
			if err := p.expectOp(":"); err != nil {
				return "", err
			}
			v, err := p.expr(true)
			if err != nil {
				return "", err
			}
			kv = append(kv, k, v)
		}
		p.next()
		return call("dict", kv...), nil
	}
	return "", p.unexpected("expected an expression")
}

// items reads comma-separated expressions up to the closing bracket
// (a trailing comma is allowed); items already read are kept.
func (p *exprParser) items(items []string, closing string) ([]string, error) {
	for !p.isOp(closing) {
		if len(items) > 0 {
			if err := p.expectOp(","); err != nil {
				return nil, err
			}
			if p.isOp(closing) {
				break
			}
		}
		e, err := p.expr(true)
		if err != nil {
			return nil, err
		}
		items = append(items, e)
	}
	p.next()
	return items, nil
}

// stringMethods are rewritten as calls of our functions; mutators fail
// as in HF's ImmutableSandboxedEnvironment.
var (
	routedMethods = map[string]string{"split": "split", "replace": "replace", "format": "format"}
	mutators      = map[string]bool{
		"append": true, "extend": true, "insert": true, "pop": true, "remove": true, "clear": true,
		"sort": true, "reverse": true, "update": true, "setdefault": true, "popitem": true,
	}
	routedFilters = map[string]string{"tojson": "tojson", "join": "join", "replace": "replace", "indent": "indent", "list": "tolist"}
)

// postfix reads .attr, [index], [slice] and (call) after e.
func (p *exprParser) postfix(e string) (string, error) {
	for {
		switch {
		case p.isOp("."):
			p.next()
			t := p.next()
			if t.kind == jInt {
				e += "[" + t.text + "]"
				continue
			}
			if t.kind != jName {
				p.pos--
				return "", p.unexpected("expected an attribute name")
			}
			if !p.isOp("(") {
				e += "." + t.text
				continue
			}
			p.next()
			args, err := p.callArgs()
			if err != nil {
				return "", err
			}
			switch {
			case mutators[t.text]:
				e = call("unsafe", e, quoteLiteral(t.text, true))
			case routedMethods[t.text] != "":
				e += "|" + reservedPrefix + routedMethods[t.text] + "(" + args + ")"
			default:
				e += "." + t.text + "(" + args + ")"
			}
		case p.isOp("["):
			p.next()
			var err error
			if e, err = p.subscript(e); err != nil {
				return "", err
			}
		case p.isOp("("):
			p.next()
			args, err := p.callArgs()
			if err != nil {
				return "", err
			}
			e += "(" + args + ")"
		default:
			return e, nil
		}
	}
}

// subscript reads what follows "[": an index or a slice.
func (p *exprParser) subscript(e string) (string, error) {
	var parts [3]string
	n := 0 // colons seen
	for {
		if !p.isOp(":") && !p.isOp("]") {
			x, err := p.expr(true)
			if err != nil {
				return "", err
			}
			parts[n] = x
		}
		if p.isOp("]") {
			p.next()
			break
		}
		if n == 2 || !p.isOp(":") {
			return "", p.unexpected("expected \":\" or \"]\"")
		}
		p.next()
		n++
	}
	if n == 0 {
		if parts[0] == "" {
			return "", fmt.Errorf("empty subscript")
		}
		return e + "[" + parts[0] + "]", nil
	}
	for i := range parts {
		if parts[i] == "" {
			parts[i] = "none"
		}
	}
	return call("slice", e, parts[0], parts[1], parts[2]), nil
}

// callArgs reads the arguments after "(" up to ")".
func (p *exprParser) callArgs() (string, error) {
	var args []string
	for !p.isOp(")") {
		if len(args) > 0 {
			if err := p.expectOp(","); err != nil {
				return "", err
			}
			if p.isOp(")") {
				break
			}
		}
		if p.isOp("*") || p.isOp("**") {
			return "", fmt.Errorf("*args and **kwargs are not supported")
		}
		if p.peek().kind == jName && p.peekAt(1).kind == jOp && p.peekAt(1).text == "=" {
			name := p.next().text
			p.next()
			v, err := p.expr(true)
			if err != nil {
				return "", err
			}
			args = append(args, name+"="+v)
			continue
		}
		v, err := p.expr(true)
		if err != nil {
			return "", err
		}
		args = append(args, v)
	}
	p.next()
	return strings.Join(args, ", "), nil
}

// filters reads |filter(args) and "is [not] test" after e.
func (p *exprParser) filters(e string) (string, error) {
	for {
		switch {
		case p.isOp("|"):
			p.next()
			name, err := p.expectName()
			if err != nil {
				return "", err
			}
			if strings.HasPrefix(name, reservedPrefix) {
				return "", fmt.Errorf("the name %q is reserved", name)
			}
			if r, ok := routedFilters[name]; ok {
				name = reservedPrefix + r
			}
			e += "|" + name
			if p.isOp("(") {
				p.next()
				args, err := p.callArgs()
				if err != nil {
					return "", err
				}
				e += "(" + args + ")"
			}
		case p.isName("is"):
			p.next()
			not := ""
			if p.isName("not") {
				p.next()
				not = "not "
			}
			name, err := p.expectName()
			if err != nil {
				return "", err
			}
			test := name
			switch t := p.peek(); {
			case p.isOp("("):
				p.next()
				args, err := p.callArgs()
				if err != nil {
					return "", err
				}
				test += "(" + args + ")"
			case (t.kind == jName && !testArgStops[t.text]) ||
				t.kind == jString || t.kind == jInt || t.kind == jFloat || p.isOp("[") || p.isOp("{"):
				// jinja2 takes one argument without brackets: x is sameas none.
				arg, err := p.primary()
				if err != nil {
					return "", err
				}
				if arg, err = p.postfix(arg); err != nil {
					return "", err
				}
				test += "(" + arg + ")"
			}
			e = "(" + e + " is " + not + test + ")"
		default:
			return e, nil
		}
	}
}

// testArgStops are the names after a test that do not start its
// argument ("x is defined and y"): jinja2's list, plus the keywords that
// cannot start an expression.
var testArgStops = map[string]bool{"else": true, "or": true, "and": true, "is": true, "if": true, "in": true, "not": true, "recursive": true}

// call writes a call of one of our functions.
func call(name string, args ...string) string {
	return reservedPrefix + name + "(" + strings.Join(args, ", ") + ")"
}

// engineFloat writes f so that the engine reads it back as a float: its
// lexer wants digits, a point and digits, then an optional exponent.
func engineFloat(f float64) string {
	s := strconv.FormatFloat(f, 'e', -1, 64)
	mant, exp, _ := strings.Cut(s, "e")
	if !strings.Contains(mant, ".") {
		mant += ".0"
	}
	return mant + "e" + exp
}
