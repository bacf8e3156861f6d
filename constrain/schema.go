package constrain

import (
	"bytes"
	"errors"
	"fmt"
	"math/big"
	"slices"
	"strconv"
	"strings"

	"github.com/santhosh-tekuri/jsonschema/v6"
)

// SchemaOptions shape the JSON a schema compiles to.
type SchemaOptions struct {
	// MaxDepth bounds the nesting where the schema leaves it open: the
	// depth of objects and arrays in a free JSON value, and how many
	// times a recursive $ref unfolds; default 8.
	MaxDepth int
	// MaxIndent is the most spaces or tabs after a newline between JSON
	// tokens; default 16. Between tokens the output may have nothing, one
	// space, or a newline and an indent: enough for compact and pretty
	// JSON, and never an endless run of whitespace.
	MaxIndent int
}

func (o SchemaOptions) withDefaults() SchemaOptions {
	if o.MaxDepth <= 0 {
		o.MaxDepth = 8
	}
	if o.MaxIndent <= 0 {
		o.MaxIndent = 16
	}
	return o
}

// Bounds on what is unrolled into the automaton.
const (
	maxLengthBound = 1024 // minLength, maxLength
	maxItemsBound  = 64   // minItems, maxItems
	maxRefHops     = 32   // $ref to $ref without nesting
	maxNesting     = 64   // objects and arrays written out in a schema
	maxStates      = 1 << 17
)

// JSONSchema compiles a JSON schema into the language of the JSON texts
// that it accepts (and that the generator can write), optionally preceded
// by whitespace.
//
// The schema is first checked with a JSON Schema validator (draft 2020-12
// unless $schema says otherwise). Supported: type (and lists of types),
// properties (generated in the schema's order; required ones always,
// others optionally), required, additionalProperties, items, minItems,
// maxItems, minLength, maxLength, enum, const, anyOf, oneOf (when no
// value can match two branches: they differ in type, in const values, or
// in the const value of a required property), allOf with one schema, and
// local $ref. Annotations (title, description, default, examples,
// format, ...) are ignored. Other assertions (pattern, minimum, ...) are
// refused with an error naming them, since the output could break them.
func JSONSchema(schema []byte, opt SchemaOptions) (Expr, error) {
	return JSONSchemaAt(schema, "#", opt)
}

// JSONSchemaAt is JSONSchema for the part of schema at a JSON pointer
// ("#/properties/city"), with $ref resolved against the whole schema.
func JSONSchemaAt(schema []byte, pointer string, opt SchemaOptions) (Expr, error) {
	if _, err := NewValidator(schema); err != nil {
		return nil, err
	}
	root, err := parseOrdered(schema)
	if err != nil {
		return nil, fmt.Errorf("json schema: %w", err)
	}
	c := &schemaCompiler{root: root, opt: opt.withDefaults()}
	c.ws = wsSlot(c.opt.MaxIndent)
	at, err := c.resolve(pointer)
	if err != nil {
		return nil, fmt.Errorf("json schema: %w", err)
	}
	e, err := c.value(at, 0, 0, 0, pointer)
	if err != nil {
		return nil, err
	}
	if isNever(e) {
		return nil, errors.New("json schema: no JSON value satisfies the schema (within the nesting bound)")
	}
	if n := size(e); n > maxStates {
		return nil, fmt.Errorf("json schema: too large for constrained output (about %d automaton states, at most %d)", n, maxStates)
	}
	return Seq(c.ws, e), nil
}

// AnyJSON is any JSON value of the given kind ("object", "array", ... or
// "" for any), optionally preceded by whitespace: response_format
// json_object is AnyJSON("object").
func AnyJSON(kind string, opt SchemaOptions) (Expr, error) {
	schema := "{}"
	if kind != "" {
		schema = fmt.Sprintf(`{"type": %q}`, kind)
	}
	return JSONSchema([]byte(schema), opt)
}

// Validator checks JSON documents against a schema.
type Validator struct{ s *jsonschema.Schema }

// refuseLoader keeps schemas from reading files or the network through
// $ref.
type refuseLoader struct{}

func (refuseLoader) Load(url string) (any, error) {
	return nil, fmt.Errorf("$ref to %q: only references inside the schema are allowed", url)
}

// NewValidator checks schema against the JSON Schema meta-schema.
func NewValidator(schema []byte) (*Validator, error) {
	doc, err := jsonschema.UnmarshalJSON(bytes.NewReader(schema))
	if err != nil {
		return nil, fmt.Errorf("json schema: %w", err)
	}
	c := jsonschema.NewCompiler()
	c.UseLoader(refuseLoader{})
	const url = "urn:response-schema"
	if err := c.AddResource(url, doc); err != nil {
		return nil, fmt.Errorf("json schema: %w", err)
	}
	s, err := c.Compile(url)
	if err != nil {
		return nil, fmt.Errorf("json schema: %w", err)
	}
	return &Validator{s}, nil
}

// Validate checks one JSON document.
func (v *Validator) Validate(doc []byte) error {
	inst, err := jsonschema.UnmarshalJSON(bytes.NewReader(doc))
	if err != nil {
		return err
	}
	return v.s.Validate(inst)
}

type schemaCompiler struct {
	root *jv
	opt  SchemaOptions
	ws   Expr
}

// Keywords that assert something this compiler cannot guarantee.
var unsupportedKeywords = []string{
	"pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
	"minProperties", "maxProperties", "patternProperties", "propertyNames",
	"dependentRequired", "dependentSchemas", "dependencies", "if", "then", "else", "not",
	"contains", "minContains", "maxContains", "prefixItems", "additionalItems",
	"unevaluatedItems", "unevaluatedProperties", "$dynamicRef", "$recursiveRef",
}

// Keywords that assert something; a $ref or anyOf may not have them
// beside it.
var assertionKeywords = []string{
	"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
	"minLength", "maxLength", "enum", "const", "anyOf", "oneOf", "allOf", "$ref",
}

// value compiles schema s at nesting depth depth; refs counts the $ref
// followed on the way (recursion), hops those since the last nesting.
func (c *schemaCompiler) value(s *jv, depth, refs, hops int, path string) (Expr, error) {
	switch s.kind {
	case 'b':
		if s.b {
			return c.any(depth), nil
		}
		return Never, nil
	case 'o':
	default:
		return nil, fmt.Errorf("json schema %s: a schema must be an object or a boolean", path)
	}
	for _, k := range unsupportedKeywords {
		if s.get(k) != nil {
			return nil, fmt.Errorf("json schema %s: %q is not supported for constrained output", path, k)
		}
	}
	if u := s.get("uniqueItems"); u != nil && u.kind == 'b' && u.b {
		return nil, fmt.Errorf("json schema %s: \"uniqueItems\" is not supported for constrained output", path)
	}
	alone := func(kw string) error {
		for _, k := range assertionKeywords {
			if k != kw && s.get(k) != nil {
				return fmt.Errorf("json schema %s: %q together with %q is not supported", path, kw, k)
			}
		}
		return nil
	}
	if ref := s.get("$ref"); ref != nil {
		if err := alone("$ref"); err != nil {
			return nil, err
		}
		if hops >= maxRefHops {
			return nil, fmt.Errorf("json schema %s: $ref chain does not end", path)
		}
		if refs >= c.opt.MaxDepth {
			return Never, nil // recursion deeper than the bound
		}
		target, err := c.resolve(ref.str)
		if err != nil {
			return nil, fmt.Errorf("json schema %s: %w", path, err)
		}
		return c.value(target, depth, refs+1, hops+1, ref.str)
	}
	for _, kw := range []string{"anyOf", "oneOf", "allOf"} {
		list := s.get(kw)
		if list == nil {
			continue
		}
		if err := alone(kw); err != nil {
			return nil, err
		}
		if kw == "allOf" && len(list.vals) != 1 {
			return nil, fmt.Errorf("json schema %s: allOf with more than one schema is not supported", path)
		}
		if kw == "oneOf" {
			if err := c.disjoint(list.vals); err != nil {
				return nil, fmt.Errorf("json schema %s: oneOf %w", path, err)
			}
		}
		var alts []Expr
		for i, b := range list.vals {
			e, err := c.value(b, depth, refs, hops, fmt.Sprintf("%s/%s/%d", path, kw, i))
			if err != nil {
				return nil, err
			}
			alts = append(alts, e)
		}
		return Alt(alts...), nil
	}
	types, err := c.types(s, path)
	if err != nil {
		return nil, err
	}
	if e := s.get("const"); e != nil {
		return c.literals([]*jv{e}, types), nil
	}
	if e := s.get("enum"); e != nil {
		return c.literals(e.vals, types), nil
	}
	var alts []Expr
	for _, t := range types {
		var e Expr
		switch t {
		case "null":
			e = Lit("null")
		case "boolean":
			e = Alt(Lit("true"), Lit("false"))
		case "integer":
			e = jsonInteger
		case "number":
			e = jsonNumber
		case "string":
			lo, hi, err := bounds(s, "minLength", "maxLength", maxLengthBound, path)
			if err != nil {
				return nil, err
			}
			e = Seq(Lit(`"`), Rep(jsonChar, lo, hi), Lit(`"`))
		case "array":
			e, err = c.array(s, depth, refs, path)
		case "object":
			e, err = c.object(s, depth, refs, path)
		}
		if err != nil {
			return nil, err
		}
		alts = append(alts, e)
	}
	return Alt(alts...), nil
}

var allTypes = []string{"null", "boolean", "integer", "number", "string", "array", "object"}

// types lists the JSON types s allows: its "type", or what its keywords
// imply (an object for "properties", ...), or all.
func (c *schemaCompiler) types(s *jv, path string) ([]string, error) {
	t := s.get("type")
	var types []string
	switch {
	case t == nil:
		switch {
		case s.get("properties") != nil || s.get("required") != nil || s.get("additionalProperties") != nil:
			return []string{"object"}, nil
		case s.get("items") != nil || s.get("minItems") != nil || s.get("maxItems") != nil:
			return []string{"array"}, nil
		case s.get("minLength") != nil || s.get("maxLength") != nil:
			return []string{"string"}, nil
		}
		return allTypes, nil
	case t.kind == 's':
		types = []string{t.str}
	case t.kind == 'a':
		for _, x := range t.vals {
			types = append(types, x.str)
		}
	default:
		return nil, fmt.Errorf("json schema %s: \"type\" must be a string or a list", path)
	}
	if slices.Contains(types, "number") {
		// Numbers include the integers.
		types = slices.DeleteFunc(types, func(s string) bool { return s == "integer" })
	}
	return types, nil
}

// literals is one of the given values, written compactly, of the allowed
// types.
func (c *schemaCompiler) literals(vals []*jv, types []string) Expr {
	var alts []Expr
	for _, v := range vals {
		if typeMatches(v, types) {
			alts = append(alts, Lit(v.compactString()))
		}
	}
	return Alt(alts...)
}

func typeMatches(v *jv, types []string) bool {
	for _, t := range types {
		switch {
		case t == "null" && v.kind == 'z', t == "boolean" && v.kind == 'b', t == "string" && v.kind == 's',
			t == "array" && v.kind == 'a', t == "object" && v.kind == 'o', t == "number" && v.kind == 'n':
			return true
		case t == "integer" && v.kind == 'n':
			if f, ok := new(big.Float).SetString(v.str); ok && f.IsInt() {
				return true
			}
		}
	}
	return false
}

// bounds reads a pair of count keywords.
func bounds(s *jv, minKw, maxKw string, limit int, path string) (lo, hi int, err error) {
	read := func(kw string, def int) (int, error) {
		v := s.get(kw)
		if v == nil {
			return def, nil
		}
		n, err := strconv.Atoi(v.str)
		if v.kind != 'n' || err != nil || n < 0 {
			return 0, fmt.Errorf("json schema %s: %q must be a non-negative integer", path, kw)
		}
		if n > limit {
			return 0, fmt.Errorf("json schema %s: %q above %d is not supported for constrained output", path, kw, limit)
		}
		return n, nil
	}
	if lo, err = read(minKw, 0); err != nil {
		return
	}
	hi, err = read(maxKw, -1)
	return
}

// resolve follows a local JSON pointer ("#/$defs/node").
func (c *schemaCompiler) resolve(ref string) (*jv, error) {
	if !strings.HasPrefix(ref, "#") {
		return nil, fmt.Errorf("$ref %q: only references inside the schema (#/...) are supported", ref)
	}
	v := c.root
	ptr := strings.TrimPrefix(ref, "#")
	if ptr == "" {
		return v, nil
	}
	if !strings.HasPrefix(ptr, "/") {
		return nil, fmt.Errorf("$ref %q: anchors are not supported", ref)
	}
	for _, tok := range strings.Split(ptr[1:], "/") {
		tok = strings.ReplaceAll(strings.ReplaceAll(tok, "~1", "/"), "~0", "~")
		switch {
		case v != nil && v.kind == 'o':
			v = v.get(tok)
		case v != nil && v.kind == 'a':
			i, err := strconv.Atoi(tok)
			if err != nil || i < 0 || i >= len(v.vals) {
				return nil, fmt.Errorf("$ref %q: no item %q", ref, tok)
			}
			v = v.vals[i]
		default:
			v = nil
		}
		if v == nil {
			return nil, fmt.Errorf("$ref %q does not resolve", ref)
		}
	}
	return v, nil
}

func (c *schemaCompiler) array(s *jv, depth, refs int, path string) (Expr, error) {
	if depth >= maxNesting {
		return nil, fmt.Errorf("json schema %s: nested deeper than %d", path, maxNesting)
	}
	lo, hi, err := bounds(s, "minItems", "maxItems", maxItemsBound, path)
	if err != nil {
		return nil, err
	}
	item := c.any(depth + 1)
	if it := s.get("items"); it != nil {
		if item, err = c.value(it, depth+1, refs, 0, path+"/items"); err != nil {
			return nil, err
		}
	}
	return jsonArray(item, lo, hi, c.ws), nil
}

// jsonArray is [item, item, ...] with lo to hi items (hi < 0: any).
func jsonArray(item Expr, lo, hi int, ws Expr) Expr {
	more := func(n int) int {
		if n < 0 {
			return -1
		}
		return max(n-1, 0)
	}
	items := Seq(item, Rep(Seq(ws, Lit(","), ws, item), max(lo-1, 0), more(hi)))
	if hi == 0 {
		items = Never
	}
	body := Seq(items, ws)
	if lo == 0 {
		body = Opt(body)
	}
	return Seq(Lit("["), ws, body, Lit("]"))
}

func (c *schemaCompiler) object(s *jv, depth, refs int, path string) (Expr, error) {
	if depth >= maxNesting {
		return nil, fmt.Errorf("json schema %s: nested deeper than %d", path, maxNesting)
	}
	var extra Expr // the values of properties not listed; nil: none allowed
	if ap := s.get("additionalProperties"); ap == nil {
		extra = c.any(depth + 1)
	} else {
		var err error
		if extra, err = c.value(ap, depth+1, refs, 0, path+"/additionalProperties"); err != nil {
			return nil, err
		}
		if isNever(extra) {
			extra = nil
		}
	}
	o := &objExpr{ws: c.ws}
	if props := s.get("properties"); props != nil {
		if props.kind != 'o' {
			return nil, fmt.Errorf("json schema %s: \"properties\" must be an object", path)
		}
		for i, k := range props.keys {
			e, err := c.value(props.vals[i], depth+1, refs, 0, path+"/properties/"+k)
			if err != nil {
				return nil, err
			}
			o.add(k, e)
		}
	}
	if req := s.get("required"); req != nil {
		for _, r := range req.vals {
			i := slices.Index(o.names, r.str)
			if i < 0 {
				if extra == nil {
					return nil, fmt.Errorf("json schema %s: required property %q is not in properties, and additionalProperties is false", path, r.str)
				}
				o.add(r.str, extra)
				i = len(o.names) - 1
			}
			o.required[i] = true
		}
	}
	for i, e := range o.vals {
		if isNever(e) {
			if o.required[i] {
				return Never, nil // a required property that cannot be written
			}
		}
	}
	if len(o.names) == 0 && extra != nil {
		// No properties listed: any keys, with values of extra.
		member := Seq(jsonString, c.ws, Lit(":"), c.ws, extra)
		members := Seq(member, Rep(Seq(c.ws, Lit(","), c.ws, member), 0, -1), c.ws)
		return Seq(Lit("{"), c.ws, Opt(members), Lit("}")), nil
	}
	return o, nil
}

// objExpr is an object with the listed properties in order: each
// required one always, each optional one or not.
type objExpr struct {
	names    []string
	keys     []Expr // the key as a JSON string literal
	vals     []Expr
	required []bool
	ws       Expr
}

func (o *objExpr) add(name string, val Expr) {
	var b strings.Builder
	writeJSONString(&b, name)
	o.names = append(o.names, name)
	o.keys = append(o.keys, Lit(b.String()))
	o.vals = append(o.vals, val)
	o.required = append(o.required, false)
}

func (o *objExpr) build(b *builder, from, to int32) {
	n := len(o.names)
	// after[i]: property i and the whitespace after it are written (i = -1:
	// none yet, after "{" and whitespace). before[j]: property j comes
	// next, its separator written.
	before := make([]int32, n)
	for j := range before {
		before[j] = b.state()
	}
	after := make([]int32, n+1) // after[i+1] for i = -1..n-1
	for i := range after {
		after[i] = b.state()
	}
	open := b.state()
	Lit("{").build(b, from, open)
	o.ws.build(b, open, after[0])
	for i := -1; i < n; i++ {
		// The candidates for the next property: up to and including the
		// first required one.
		var next []int32
		for j := i + 1; j < n; j++ {
			if !isNever(o.vals[j]) {
				next = append(next, before[j])
			}
			if o.required[j] {
				break
			}
		}
		at := after[i+1]
		if len(next) > 0 {
			// A comma only where a property can follow it, so that no
			// state is a dead end.
			sep := at
			if i >= 0 {
				sep = b.state()
				Seq(Lit(","), o.ws).build(b, at, sep)
			}
			for _, s := range next {
				b.eps(sep, s)
			}
		}
		if !slices.Contains(o.required[i+1:], true) {
			Lit("}").build(b, at, to)
		}
	}
	for j := range n {
		if isNever(o.vals[j]) {
			continue
		}
		Seq(o.keys[j], o.ws, Lit(":"), o.ws, o.vals[j], o.ws).build(b, before[j], after[j+1])
	}
}

// any is any JSON value at nesting depth depth; deeper containers are
// built only when reached.
func (c *schemaCompiler) any(depth int) Expr {
	scalars := []Expr{Lit("null"), Lit("true"), Lit("false"), jsonNumber, jsonString}
	if depth >= c.opt.MaxDepth {
		return Alt(scalars...)
	}
	inner := lazy{func() Expr { return c.any(depth + 1) }}
	member := Seq(jsonString, c.ws, Lit(":"), c.ws, inner)
	members := Seq(member, Rep(Seq(c.ws, Lit(","), c.ws, member), 0, -1), c.ws)
	object := Seq(Lit("{"), c.ws, Opt(members), Lit("}"))
	return Alt(append(scalars, object, jsonArray(inner, 0, -1, c.ws))...)
}

// wsSlot is the whitespace allowed between JSON tokens: nothing, a space,
// or a newline and up to indent spaces or tabs.
func wsSlot(indent int) Expr {
	return Opt(Alt(Lit(" "), Seq(Lit("\n"), Rep(anyOf(" \t"), 0, indent))))
}

var (
	digit    = Bytes('0', '9')
	hexDigit = class{{'0', '9'}, {'a', 'f'}, {'A', 'F'}}
	// jsonInteger: at most 19 digits, so that it fits an int64-sized
	// reader and a runaway model cannot write digits forever.
	jsonInteger = Seq(Opt(Lit("-")), Alt(Lit("0"), Seq(Bytes('1', '9'), Rep(digit, 0, 18))))
	// jsonNumber adds at most 16 fraction digits and a two-digit
	// exponent (a float64 reads every such number).
	jsonNumber = Seq(jsonInteger,
		Opt(Seq(Lit("."), Rep(digit, 1, 16))),
		Opt(Seq(anyOf("eE"), Opt(anyOf("+-")), Rep(digit, 1, 2))))
	// jsonChar is one character of a JSON string: unescaped (not a quote,
	// backslash or control character), a UTF-8 character, or an escape.
	// \u escapes of surrogates are left out, so that every escape is one
	// character (for minLength and maxLength) and no lone surrogate is
	// written.
	jsonChar = Alt(
		class{{0x20, 0x21}, {0x23, 0x5B}, {0x5D, 0x7F}},
		utf8Multi,
		Seq(Lit(`\`), Alt(anyOf(`"\/bfnrt`), Seq(Lit("u"),
			Alt(Seq(class{{'0', '9'}, {'a', 'c'}, {'A', 'C'}, {'e', 'f'}, {'E', 'F'}}, hexDigit),
				Seq(anyOf("dD"), Bytes('0', '7'))),
			hexDigit, hexDigit))),
	)
	jsonString = Seq(Lit(`"`), Rep(jsonChar, 0, -1), Lit(`"`))
)

// disjoint checks that no JSON value can satisfy two of the schemas, so
// that oneOf can be generated as anyOf: each pair must differ in type,
// be constants with no value in common, or be objects that require a
// property whose constant values differ (a discriminator).
func (c *schemaCompiler) disjoint(branches []*jv) error {
	type info struct {
		types  map[string]bool
		values map[string]bool            // const/enum branches: the values
		disc   map[string]map[string]bool // required property -> its const values
	}
	infos := make([]info, len(branches))
	for i, b := range branches {
		b = c.deref(b)
		infos[i] = info{types: c.typeSet(b, 0), values: constValues(b), disc: map[string]map[string]bool{}}
		if props := b.get("properties"); props != nil && b.get("required") != nil {
			for _, r := range b.get("required").vals {
				if p := props.get(r.str); p != nil {
					if vals := constValues(c.deref(p)); vals != nil {
						infos[i].disc[r.str] = vals
					}
				}
			}
		}
	}
	apart := func(a, b map[string]bool) bool {
		for k := range a {
			if b[k] {
				return false
			}
		}
		return true
	}
	for i := range infos {
		for j := range i {
			a, b := infos[i], infos[j]
			overlapTypes := !apart(a.types, b.types) ||
				a.types["integer"] && b.types["number"] || a.types["number"] && b.types["integer"]
			if !overlapTypes {
				continue
			}
			if a.values != nil && b.values != nil && apart(a.values, b.values) {
				continue
			}
			split := false
			for p, va := range a.disc {
				if vb, ok := b.disc[p]; ok && apart(va, vb) {
					split = true
					break
				}
			}
			if !split {
				return fmt.Errorf("branches %d and %d may both match a value; use anyOf, or a required property with different const values", j, i)
			}
		}
	}
	return nil
}

// deref follows $ref (a bounded number of times).
func (c *schemaCompiler) deref(s *jv) *jv {
	for range maxRefHops {
		ref := s.get("$ref")
		if ref == nil {
			return s
		}
		t, err := c.resolve(ref.str)
		if err != nil {
			return s
		}
		s = t
	}
	return s
}

// typeSet is the JSON types schema s may match (all when unknown).
func (c *schemaCompiler) typeSet(s *jv, hops int) map[string]bool {
	all := map[string]bool{}
	for _, t := range allTypes {
		all[t] = true
	}
	if hops > maxRefHops {
		return all
	}
	s = c.deref(s)
	if s.kind == 'b' {
		if s.b {
			return all
		}
		return map[string]bool{}
	}
	if vals := s.get("const"); vals != nil {
		return map[string]bool{jsonType(vals): true}
	}
	if vals := s.get("enum"); vals != nil {
		out := map[string]bool{}
		for _, v := range vals.vals {
			out[jsonType(v)] = true
		}
		return out
	}
	for _, kw := range []string{"anyOf", "oneOf", "allOf"} {
		if list := s.get(kw); list != nil {
			out := map[string]bool{}
			for _, b := range list.vals {
				for t := range c.typeSet(b, hops+1) {
					out[t] = true
				}
			}
			return out
		}
	}
	types, err := c.types(s, "")
	if err != nil {
		return all
	}
	out := map[string]bool{}
	for _, t := range types {
		out[t] = true
	}
	return out
}

// jsonType names the type of a value; integral numbers are "integer".
func jsonType(v *jv) string {
	switch v.kind {
	case 'o':
		return "object"
	case 'a':
		return "array"
	case 's':
		return "string"
	case 'b':
		return "boolean"
	case 'z':
		return "null"
	}
	if f, ok := new(big.Float).SetString(v.str); ok && f.IsInt() {
		return "integer"
	}
	return "number"
}

// constValues is the set of values a const/enum schema allows, in a
// canonical form (numbers by value), or nil for other schemas.
func constValues(s *jv) map[string]bool {
	var vals []*jv
	if v := s.get("const"); v != nil {
		vals = []*jv{v}
	} else if v := s.get("enum"); v != nil {
		vals = v.vals
	} else {
		return nil
	}
	out := map[string]bool{}
	for _, v := range vals {
		key := v.compactString()
		if v.kind == 'n' {
			if f, ok := new(big.Float).SetString(v.str); ok {
				key = f.Text('g', -1)
			}
		}
		out[key] = true
	}
	return out
}
