package tokenizer

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"

	"github.com/ardanlabs/jinja"
)

// Python's str() and repr() and json.dumps() of template values, so that
// printed values and tojson match what transformers renders.

// pyStr is str(v); undefined prints as nothing, as in jinja2.
func pyStr(v jinja.Value) string {
	switch {
	case v.IsUndefined():
		return ""
	case v.IsString():
		return v.AsString()
	}
	return pyRepr(v)
}

func pyRepr(v jinja.Value) string {
	switch {
	case v.IsUndefined():
		return ""
	case v.IsNone():
		return "None"
	case v.IsBool():
		if v.AsBool() {
			return "True"
		}
		return "False"
	case v.IsInt():
		return strconv.FormatInt(v.AsInt(), 10)
	case v.IsFloat():
		return pyFloat(v.AsFloat())
	case v.IsString():
		return pyQuote(v.AsString())
	case v.IsList():
		items := v.AsList().Items
		parts := make([]string, len(items))
		for i, it := range items {
			parts[i] = pyRepr(it)
		}
		return "[" + strings.Join(parts, ", ") + "]"
	case v.IsDict():
		d := v.AsDict()
		parts := make([]string, 0, d.Len())
		for _, k := range d.Keys {
			val, _ := d.Get(k)
			parts = append(parts, pyQuote(k)+": "+pyRepr(val))
		}
		return "{" + strings.Join(parts, ", ") + "}"
	}
	return v.String()
}

// pyFloat is Python's float repr: the shortest digits that round-trip,
// positional for exponents -4..15, else scientific with 2+ exponent digits.
func pyFloat(f float64) string {
	switch {
	case math.IsInf(f, 1):
		return "inf"
	case math.IsInf(f, -1):
		return "-inf"
	case math.IsNaN(f):
		return "nan"
	}
	e := strconv.FormatFloat(f, 'e', -1, 64)
	exp, _ := strconv.Atoi(e[strings.IndexByte(e, 'e')+1:])
	if exp < -4 || exp >= 16 {
		return e
	}
	s := strconv.FormatFloat(f, 'f', -1, 64)
	if !strings.ContainsAny(s, ".") {
		s += ".0"
	}
	return s
}

// pyQuote is Python's repr of a str: single quotes unless the text holds
// a single quote and no double quote.
func pyQuote(s string) string {
	q := byte('\'')
	if strings.IndexByte(s, '\'') >= 0 && strings.IndexByte(s, '"') < 0 {
		q = '"'
	}
	var b strings.Builder
	b.WriteByte(q)
	for _, r := range s {
		switch {
		case r == rune(q) || r == '\\':
			b.WriteByte('\\')
			b.WriteRune(r)
		case r == '\n':
			b.WriteString(`\n`)
		case r == '\r':
			b.WriteString(`\r`)
		case r == '\t':
			b.WriteString(`\t`)
		case r < 0x20 || r == 0x7f:
			fmt.Fprintf(&b, `\x%02x`, r)
		default:
			b.WriteRune(r)
		}
	}
	b.WriteByte(q)
	return b.String()
}

// jsonOptions are the arguments of HF's tojson filter.
type jsonOptions struct {
	ensureASCII bool
	indent      int // < 0: none
	itemSep     string
	keySep      string
	sortKeys    bool
	limit       int // most bytes to write; 0: no limit
}

// pyJSON is json.dumps(v, ...) with Python's formatting.
func pyJSON(v jinja.Value, o jsonOptions) (string, error) {
	var b strings.Builder
	if err := writePyJSON(&b, v, o, 0); err != nil {
		return "", err
	}
	if o.limit > 0 && b.Len() > o.limit {
		return "", fmt.Errorf("tojson: output longer than %d bytes", o.limit)
	}
	return b.String(), nil
}

func writePyJSON(b *strings.Builder, v jinja.Value, o jsonOptions, depth int) error {
	tooLong := func() error { return fmt.Errorf("tojson: output longer than %d bytes", o.limit) }
	if o.limit > 0 && b.Len() > o.limit {
		return tooLong()
	}
	newline := func(d int) error {
		if o.indent < 0 {
			return nil
		}
		if o.limit > 0 && b.Len()+1+o.indent*d > o.limit {
			return tooLong()
		}
		b.WriteByte('\n')
		b.WriteString(strings.Repeat(" ", o.indent*d))
		return nil
	}
	switch {
	case v.IsUndefined():
		return fmt.Errorf("tojson: Undefined is not JSON serializable")
	case v.IsNone():
		b.WriteString("null")
	case v.IsBool():
		b.WriteString(map[bool]string{true: "true", false: "false"}[v.AsBool()])
	case v.IsInt():
		b.WriteString(strconv.FormatInt(v.AsInt(), 10))
	case v.IsFloat():
		f := v.AsFloat()
		switch {
		case math.IsInf(f, 1):
			b.WriteString("Infinity")
		case math.IsInf(f, -1):
			b.WriteString("-Infinity")
		case math.IsNaN(f):
			b.WriteString("NaN")
		default:
			b.WriteString(pyFloat(f))
		}
	case v.IsString():
		writeJSONString(b, v.AsString(), o.ensureASCII)
	case v.IsList():
		items := v.AsList().Items
		if len(items) == 0 {
			b.WriteString("[]")
			return nil
		}
		b.WriteByte('[')
		for i, it := range items {
			if i > 0 {
				b.WriteString(o.itemSep)
			}
			if err := newline(depth + 1); err != nil {
				return err
			}
			if err := writePyJSON(b, it, o, depth+1); err != nil {
				return err
			}
		}
		if err := newline(depth); err != nil {
			return err
		}
		b.WriteByte(']')
	case v.IsDict():
		d := v.AsDict()
		keys := d.OrderedKeys()
		if o.sortKeys {
			sort.Strings(keys)
		}
		if len(keys) == 0 {
			b.WriteString("{}")
			return nil
		}
		b.WriteByte('{')
		for i, k := range keys {
			if i > 0 {
				b.WriteString(o.itemSep)
			}
			if err := newline(depth + 1); err != nil {
				return err
			}
			writeJSONString(b, k, o.ensureASCII)
			b.WriteString(o.keySep)
			val, _ := d.Get(k)
			if err := writePyJSON(b, val, o, depth+1); err != nil {
				return err
			}
		}
		if err := newline(depth); err != nil {
			return err
		}
		b.WriteByte('}')
	default:
		return fmt.Errorf("tojson: %s is not JSON serializable", v.String())
	}
	return nil
}

// writeJSONString escapes like Python's json module: the short escapes,
// \u00XX for other control characters, and \uXXXX (with surrogate pairs)
// for non-ASCII when ensureASCII is set. "<", ">" and "&" stay as they are.
func writeJSONString(b *strings.Builder, s string, ensureASCII bool) {
	b.WriteByte('"')
	for _, r := range s {
		switch r {
		case '"':
			b.WriteString(`\"`)
		case '\\':
			b.WriteString(`\\`)
		case '\n':
			b.WriteString(`\n`)
		case '\r':
			b.WriteString(`\r`)
		case '\t':
			b.WriteString(`\t`)
		case '\b':
			b.WriteString(`\b`)
		case '\f':
			b.WriteString(`\f`)
		default:
			switch {
			case r < 0x20 || (ensureASCII && r == 0x7f):
				fmt.Fprintf(b, `\u%04x`, r)
			case ensureASCII && r > 0x7f:
				if r > 0xFFFF {
					r -= 0x10000
					fmt.Fprintf(b, `\u%04x\u%04x`, 0xD800+(r>>10), 0xDC00+(r&0x3FF))
				} else {
					fmt.Fprintf(b, `\u%04x`, r)
				}
			default:
				b.WriteRune(r)
			}
		}
	}
	b.WriteByte('"')
}

// valueFromJSON decodes JSON into a template value, keeping the key order
// of objects and whether a number was written as an int or a float.
func valueFromJSON(data []byte) (jinja.Value, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	v, err := decodeValue(dec)
	if err != nil {
		return jinja.Undefined(), err
	}
	if dec.More() {
		return jinja.Undefined(), fmt.Errorf("trailing data after JSON value")
	}
	return v, nil
}

func decodeValue(dec *json.Decoder) (jinja.Value, error) {
	tok, err := dec.Token()
	if err != nil {
		return jinja.Undefined(), err
	}
	switch t := tok.(type) {
	case json.Delim:
		if t == '[' {
			items := []jinja.Value{}
			for dec.More() {
				it, err := decodeValue(dec)
				if err != nil {
					return jinja.Undefined(), err
				}
				items = append(items, it)
			}
			_, err := dec.Token()
			return jinja.NewList(items), err
		}
		d := jinja.NewDict()
		for dec.More() {
			k, err := dec.Token()
			if err != nil {
				return jinja.Undefined(), err
			}
			val, err := decodeValue(dec)
			if err != nil {
				return jinja.Undefined(), err
			}
			d.AsDict().Set(k.(string), val)
		}
		_, err := dec.Token()
		return d, err
	case json.Number:
		s := string(t)
		if !strings.ContainsAny(s, ".eE") {
			if i, err := strconv.ParseInt(s, 10, 64); err == nil {
				return jinja.NewInt(i), nil
			}
		}
		f, err := strconv.ParseFloat(s, 64)
		return jinja.NewFloat(f), err
	case string:
		return jinja.NewString(t), nil
	case bool:
		return jinja.NewBool(t), nil
	case nil:
		return jinja.None(), nil
	}
	return jinja.Undefined(), fmt.Errorf("unexpected JSON token %v", tok)
}

// valueOf converts a Go value through its JSON form (struct field order and
// json.RawMessage order are kept; Go maps come out with sorted keys).
func valueOf(x any) (jinja.Value, error) {
	data, err := json.Marshal(x)
	if err != nil {
		return jinja.Undefined(), err
	}
	return valueFromJSON(data)
}
