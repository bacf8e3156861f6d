package tokenizer

import (
	"errors"
	"fmt"
	"math"
	"math/bits"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/ardanlabs/jinja"
)

// A chat template comes with the model, so it is input like any other
// file: a hostile one must fail, not take the process down. The engine has
// no limits and no hooks of its own, so the template is rewritten
// (jinjaexpr.go) to run every construct that can build a large value, loop
// or recurse through the functions below, which count and check:
//
//   - the output (all bytes written, those of macros and set blocks
//     included), and the printed size of every value that a literal, an
//     operator, set or one of our filters builds, against renderLimits.size;
//   - the bytes that variables hold, against held: each set target (a name
//     at a macro depth, or a namespace attribute) counts with the size of
//     its last value, so that many variables, or a recursive macro that
//     keeps a large value at each level, cannot pile up memory;
//   - loop iterations and macro calls against steps, and the wall time
//     against timeout (checked at every loop iteration, macro call and
//     output);
//   - macro calls in progress against depth, and the nesting of values
//     against valueDepth (the engine recurses on both);
//   - the items of every list we build (a string's characters included)
//     against items, so that no list costs much more memory than its
//     printed size; loops are given at most items values to go over;
//   - range() against rangeItems, HF's sandbox limit.
//
// The engine's own filters (sort, unique, map, ...) build values at most a
// small factor larger than their input, which is bounded in turn. What
// stays unbounded: the sum of values held at once by loop iterables,
// macro arguments and literals (each is bounded), and the time of one
// engine filter on a large value (bounded by its size, not the clock).
type renderLimits struct {
	size       int
	held       int
	items      int
	steps      int
	depth      int
	valueDepth int
	rangeItems int
	timeout    time.Duration
}

var defaultRenderLimits = renderLimits{
	size:       64 << 20,
	held:       256 << 20,
	items:      1_000_000,
	steps:      1_000_000,
	depth:      100,
	valueDepth: 1000,
	rangeItems: 100_000, // jinja2.sandbox.MAX_RANGE
	timeout:    10 * time.Second,
}

// renderGuard keeps the counts of one rendering.
type renderGuard struct {
	lim      renderLimits
	deadline time.Time
	written  int
	steps    int
	depth    int

	held      map[heldKey]int // size of the last value of each set target
	heldTotal int
}

// heldKey names a set target: a variable at a macro depth (calls at the
// same depth follow each other, so a new one replaces the last), or a
// namespace's attribute.
type heldKey struct {
	depth int
	ns    *jinja.Dict
	name  string
}

func newRenderGuard(lim renderLimits) *renderGuard {
	return &renderGuard{lim: lim, deadline: time.Now().Add(lim.timeout), held: map[heldKey]int{}}
}

type jinjaFunc = func(args []jinja.Value, kwargs map[string]jinja.Value) (jinja.Value, error)

// functions are the variables the rewritten template calls. range,
// namespace and dict replace the engine's globals of those names.
func (g *renderGuard) functions() map[string]jinja.Value {
	fns := map[string]jinjaFunc{
		"str": g.str, "tick": g.tick, "enter": g.enter, "leave": g.leave, "val": g.val,
		"list": g.list, "dict": g.dict, "add": g.add, "concat": g.concat, "mul": g.mul, "pow": g.pow,
		"slice": g.slice, "split": g.split, "replace": g.replace, "format": g.format,
		"join": g.join, "indent": g.indent, "tojson": g.tojson, "unsafe": unsafeMethod,
		"iter": g.iter, "tolist": g.tolist,
	}
	vars := make(map[string]jinja.Value, len(fns)+3)
	for name, fn := range fns {
		vars[reservedPrefix+name] = jinja.NewCallable(name, func(args []jinja.Value, kwargs map[string]jinja.Value) (jinja.Value, error) {
			v, err := fn(args, kwargs)
			if err == errArgs {
				err = fmt.Errorf("%s: %w", name, err)
			}
			return v, err
		})
	}
	vars["range"] = jinja.NewCallable("range", g.rangeFunc)
	vars["namespace"] = jinja.NewCallable("namespace", g.namespace)
	vars["dict"] = jinja.NewCallable("dict", g.namespace)
	return vars
}

var errArgs = errors.New("wrong number of arguments")

// checkTime fails once the rendering has run past its time limit.
func (g *renderGuard) checkTime() error {
	if time.Now().After(g.deadline) {
		return fmt.Errorf("rendering took longer than %v", g.lim.timeout)
	}
	return nil
}

// str prints a value as Python's str() and counts the output.
func (g *renderGuard) str(args []jinja.Value, _ map[string]jinja.Value) (jinja.Value, error) {
	if len(args) != 1 {
		return jinja.Undefined(), errArgs
	}
	if err := g.checkTime(); err != nil {
		return jinja.Undefined(), err
	}
	s, err := g.print(args[0])
	if err != nil {
		return jinja.Undefined(), err
	}
	g.written += len(s)
	if g.written > g.lim.size {
		return jinja.Undefined(), fmt.Errorf("the output is longer than %d bytes", g.lim.size)
	}
	return jinja.NewString(s), nil
}

// print is str(v), after checking that it is not too large to make.
func (g *renderGuard) print(v jinja.Value) (string, error) {
	if v.IsString() {
		return v.AsString(), nil
	}
	if err := g.fits(v); err != nil {
		return "", err
	}
	return pyStr(v), nil
}

// tick counts one loop iteration or macro call.
func (g *renderGuard) tick(_ []jinja.Value, _ map[string]jinja.Value) (jinja.Value, error) {
	g.steps++
	if g.steps > g.lim.steps {
		return jinja.Undefined(), fmt.Errorf("more than %d loop iterations and macro calls", g.lim.steps)
	}
	return jinja.NewString(""), g.checkTime()
}

// enter and leave bracket the body of every macro.
func (g *renderGuard) enter(args []jinja.Value, kwargs map[string]jinja.Value) (jinja.Value, error) {
	g.depth++
	if g.depth > g.lim.depth {
		return jinja.Undefined(), fmt.Errorf("macro calls nested more than %d deep (a macro that calls itself without end?)", g.lim.depth)
	}
	return g.tick(args, kwargs)
}

func (g *renderGuard) leave(_ []jinja.Value, _ map[string]jinja.Value) (jinja.Value, error) {
	g.depth--
	return jinja.NewString(""), nil
}

// size estimates the printed size of v (its repr), stopping early once it
// passes the limit, so that it also ends on values that share parts.
func (g *renderGuard) size(v jinja.Value) (int, error) {
	n := 0
	var walk func(v jinja.Value, depth int) error
	walk = func(v jinja.Value, depth int) error {
		if depth > g.lim.valueDepth {
			return fmt.Errorf("a value nested more than %d deep", g.lim.valueDepth)
		}
		switch {
		case v.IsString():
			n += len(v.AsString()) + 2
		case v.IsList():
			n += 2
			for _, it := range v.AsList().Items {
				if n > g.lim.size {
					return nil
				}
				n += 2
				if err := walk(it, depth+1); err != nil {
					return err
				}
			}
		case v.IsDict():
			d := v.AsDict()
			n += 2
			for _, k := range d.Keys {
				if n > g.lim.size {
					return nil
				}
				n += len(k) + 6
				val, _ := d.Get(k)
				if err := walk(val, depth+1); err != nil {
					return err
				}
			}
		default:
			n += 8
		}
		return nil
	}
	err := walk(v, 0)
	return n, err
}

// fits fails for a value too large or too deep to print.
func (g *renderGuard) fits(v jinja.Value) error {
	n, err := g.size(v)
	if err != nil {
		return err
	}
	if n > g.lim.size {
		return g.tooLarge("a value", n)
	}
	return nil
}

func (g *renderGuard) tooLarge(what string, n int) error {
	return fmt.Errorf("%s of %d bytes or more: a chat template may build at most %d", what, n, g.lim.size)
}

// val checks the value of a set statement: val(v, name) for "set name =
// v", val(v, attr, ns) for "set ns.attr = v", which also keeps ns out of v
// so that no value contains itself.
func (g *renderGuard) val(args []jinja.Value, _ map[string]jinja.Value) (jinja.Value, error) {
	if len(args) < 2 || len(args) > 3 || !args[1].IsString() {
		return jinja.Undefined(), errArgs
	}
	v := args[0]
	n, err := g.size(v)
	if err != nil {
		return jinja.Undefined(), err
	}
	if n > g.lim.size {
		return jinja.Undefined(), g.tooLarge("a value", n)
	}
	key := heldKey{depth: g.depth, name: args[1].AsString()}
	if len(args) == 3 && args[2].IsDict() {
		ns := args[2].AsDict()
		if contains(v, ns) {
			return jinja.Undefined(), errors.New("set: a namespace cannot hold itself")
		}
		key = heldKey{ns: ns, name: key.name}
	}
	g.heldTotal += n - g.held[key]
	g.held[key] = n
	if g.heldTotal > g.lim.held {
		return jinja.Undefined(), fmt.Errorf("the template's variables hold more than %d bytes", g.lim.held)
	}
	return v, nil
}

// contains reports whether d is v or inside it (v has been size-checked,
// so the walk is bounded).
func contains(v jinja.Value, d *jinja.Dict) bool {
	switch {
	case v.IsList():
		for _, it := range v.AsList().Items {
			if contains(it, d) {
				return true
			}
		}
	case v.IsDict():
		if v.AsDict() == d {
			return true
		}
		for _, val := range v.AsDict().Data {
			if contains(val, d) {
				return true
			}
		}
	}
	return false
}

func (g *renderGuard) list(args []jinja.Value, _ map[string]jinja.Value) (jinja.Value, error) {
	l := jinja.NewList(append([]jinja.Value(nil), args...))
	return l, g.fits(l)
}

// dict builds a dict literal from key, value, key, value, ...
func (g *renderGuard) dict(args []jinja.Value, _ map[string]jinja.Value) (jinja.Value, error) {
	if len(args)%2 != 0 {
		return jinja.Undefined(), errArgs
	}
	d := jinja.NewDict()
	for i := 0; i < len(args); i += 2 {
		k, err := g.print(args[i])
		if err != nil {
			return jinja.Undefined(), err
		}
		d.AsDict().Set(k, args[i+1])
	}
	return d, g.fits(d)
}

// namespace is namespace(...) and dict(...): dicts given by position,
// then keywords (in sorted order: the engine passes them as a map).
func (g *renderGuard) namespace(args []jinja.Value, kwargs map[string]jinja.Value) (jinja.Value, error) {
	d := jinja.NewDict()
	for _, a := range args {
		if !a.IsDict() {
			return jinja.Undefined(), fmt.Errorf("namespace: want a dict or keywords, got %s", pyType(a))
		}
		for _, k := range a.AsDict().Keys {
			v, _ := a.AsDict().Get(k)
			d.AsDict().Set(k, v)
		}
	}
	keys := make([]string, 0, len(kwargs))
	for k := range kwargs {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		d.AsDict().Set(k, kwargs[k])
	}
	return d, g.fits(d)
}

// pyType is the Python type name of v, for error messages.
func pyType(v jinja.Value) string {
	switch {
	case v.IsUndefined():
		return "Undefined"
	case v.IsNone():
		return "NoneType"
	case v.IsBool():
		return "bool"
	case v.IsInt():
		return "int"
	case v.IsFloat():
		return "float"
	case v.IsString():
		return "str"
	case v.IsList():
		return "list"
	case v.IsDict():
		return "dict"
	}
	return "function"
}

// asInt reads an int (or a bool, which Python counts as one).
func asInt(v jinja.Value) (int64, bool) {
	switch {
	case v.IsInt():
		return v.AsInt(), true
	case v.IsBool():
		if v.AsBool() {
			return 1, true
		}
		return 0, true
	}
	return 0, false
}

func isNum(v jinja.Value) bool { return v.IsInt() || v.IsFloat() || v.IsBool() }

func asFloat(v jinja.Value) float64 {
	if v.IsFloat() {
		return v.AsFloat()
	}
	n, _ := asInt(v)
	return float64(n)
}

func operandError(op string, a, b jinja.Value) error {
	return fmt.Errorf("unsupported operand types for %s: '%s' and '%s'", op, pyType(a), pyType(b))
}

// add is Python's +: numbers, strings or lists.
func (g *renderGuard) add(args []jinja.Value, _ map[string]jinja.Value) (jinja.Value, error) {
	if len(args) != 2 {
		return jinja.Undefined(), errArgs
	}
	a, b := args[0], args[1]
	switch {
	case isNum(a) && isNum(b):
		x, okx := asInt(a)
		y, oky := asInt(b)
		if okx && oky {
			s := x + y
			if (s > x) != (y > 0) {
				return jinja.Undefined(), fmt.Errorf("%d + %d does not fit in 64 bits", x, y)
			}
			return jinja.NewInt(s), nil
		}
		return jinja.NewFloat(asFloat(a) + asFloat(b)), nil
	case a.IsString() && b.IsString():
		if n := len(a.AsString()) + len(b.AsString()); n > g.lim.size {
			return jinja.Undefined(), g.tooLarge("a string", n)
		}
		return jinja.NewString(a.AsString() + b.AsString()), nil
	case a.IsList() && b.IsList():
		if n := a.AsList().Len() + b.AsList().Len(); n > g.lim.items {
			return jinja.Undefined(), g.tooManyItems(n)
		}
		return g.list(append(append([]jinja.Value(nil), a.AsList().Items...), b.AsList().Items...), nil)
	}
	return jinja.Undefined(), operandError("+", a, b)
}

// concat is ~: the str() of each operand, joined.
func (g *renderGuard) concat(args []jinja.Value, _ map[string]jinja.Value) (jinja.Value, error) {
	var b strings.Builder
	for _, a := range args {
		s, err := g.print(a)
		if err != nil {
			return jinja.Undefined(), err
		}
		if b.Len()+len(s) > g.lim.size {
			return jinja.Undefined(), g.tooLarge("a string", b.Len()+len(s))
		}
		b.WriteString(s)
	}
	return jinja.NewString(b.String()), nil
}

// mul is Python's *: numbers, or a string or list repeated.
func (g *renderGuard) mul(args []jinja.Value, _ map[string]jinja.Value) (jinja.Value, error) {
	if len(args) != 2 {
		return jinja.Undefined(), errArgs
	}
	a, b := args[0], args[1]
	if isNum(a) && isNum(b) {
		x, okx := asInt(a)
		y, oky := asInt(b)
		if !okx || !oky {
			return jinja.NewFloat(asFloat(a) * asFloat(b)), nil
		}
		hi, lo := bits.Mul64(uint64(abs64(x)), uint64(abs64(y)))
		if hi != 0 || lo > math.MaxInt64 || x == math.MinInt64 || y == math.MinInt64 {
			return jinja.Undefined(), fmt.Errorf("%d * %d does not fit in 64 bits", x, y)
		}
		return jinja.NewInt(x * y), nil
	}
	seq, n := a, b
	if _, ok := asInt(a); ok {
		seq, n = b, a
	}
	times, ok := asInt(n)
	if !ok || !(seq.IsString() || seq.IsList()) {
		return jinja.Undefined(), operandError("*", a, b)
	}
	if seq.IsString() {
		s := seq.AsString()
		if times <= 0 || s == "" {
			return jinja.NewString(""), nil
		}
		if times > int64(g.lim.size/len(s)) {
			return jinja.Undefined(), fmt.Errorf("a string of %d bytes repeated %d times: a chat template may build at most %d bytes", len(s), times, g.lim.size)
		}
		return jinja.NewString(strings.Repeat(s, int(times))), nil
	}
	items := seq.AsList().Items
	if times <= 0 || len(items) == 0 {
		return jinja.NewList(nil), nil
	}
	if times > int64(g.lim.items/len(items)) {
		return jinja.Undefined(), fmt.Errorf("a list of %d items repeated %d times: a chat template may build lists of at most %d items", len(items), times, g.lim.items)
	}
	size, err := g.size(seq)
	if err != nil {
		return jinja.Undefined(), err
	}
	if times > int64(g.lim.size/size) {
		return jinja.Undefined(), fmt.Errorf("a list of %d bytes repeated %d times: a chat template may build at most %d bytes", size, times, g.lim.size)
	}
	out := make([]jinja.Value, 0, len(items)*int(times))
	for range times {
		out = append(out, items...)
	}
	return jinja.NewList(out), nil
}

func abs64(x int64) int64 {
	if x < 0 {
		return -x
	}
	return x
}

// pow is Python's **: an int for ints with a non-negative exponent.
func (g *renderGuard) pow(args []jinja.Value, _ map[string]jinja.Value) (jinja.Value, error) {
	if len(args) != 2 {
		return jinja.Undefined(), errArgs
	}
	a, b := args[0], args[1]
	if !isNum(a) || !isNum(b) {
		return jinja.Undefined(), operandError("**", a, b)
	}
	x, okx := asInt(a)
	y, oky := asInt(b)
	if !okx || !oky || y < 0 {
		if asFloat(a) == 0 && asFloat(b) < 0 {
			return jinja.Undefined(), errors.New("0 cannot be raised to a negative power")
		}
		r := math.Pow(asFloat(a), asFloat(b))
		if math.IsNaN(r) && !math.IsNaN(asFloat(a)) && !math.IsNaN(asFloat(b)) {
			return jinja.Undefined(), errors.New("** of a negative number to a fractional power is complex")
		}
		return jinja.NewFloat(r), nil
	}
	r := int64(1)
	for base, e := x, y; e > 0; e >>= 1 {
		if e&1 == 1 {
			hi, lo := bits.Mul64(uint64(abs64(r)), uint64(abs64(base)))
			if hi != 0 || lo > math.MaxInt64 || base == math.MinInt64 {
				return jinja.Undefined(), fmt.Errorf("%d ** %d does not fit in 64 bits", x, y)
			}
			r *= base
		}
		if e > 1 {
			hi, lo := bits.Mul64(uint64(abs64(base)), uint64(abs64(base)))
			if hi != 0 || lo > math.MaxInt64 || base == math.MinInt64 {
				return jinja.Undefined(), fmt.Errorf("%d ** %d does not fit in 64 bits", x, y)
			}
			base *= base
		}
	}
	return jinja.NewInt(r), nil
}

// rangeFunc is range() with at most rangeItems items.
func (g *renderGuard) rangeFunc(args []jinja.Value, _ map[string]jinja.Value) (jinja.Value, error) {
	var n [3]int64
	for i, a := range args {
		if i >= 3 {
			return jinja.Undefined(), fmt.Errorf("range expected at most 3 arguments, got %d", len(args))
		}
		v, ok := asInt(a)
		if !ok {
			return jinja.Undefined(), fmt.Errorf("range: '%s' object cannot be interpreted as an integer", pyType(a))
		}
		n[i] = v
	}
	start, stop, step := int64(0), int64(0), int64(1)
	switch len(args) {
	case 0:
		return jinja.Undefined(), errors.New("range expected at least 1 argument, got 0")
	case 1:
		stop = n[0]
	default:
		start, stop = n[0], n[1]
		if len(args) == 3 {
			step = n[2]
		}
	}
	var count uint64
	switch {
	case step == 0:
		return jinja.Undefined(), errors.New("range() arg 3 must not be zero")
	case step > 0 && start < stop:
		count = (uint64(stop)-uint64(start)-1)/uint64(step) + 1
	case step < 0 && start > stop:
		count = (uint64(start)-uint64(stop)-1)/(uint64(-(step+1))+1) + 1
	}
	if count > uint64(g.lim.rangeItems) {
		return jinja.Undefined(), fmt.Errorf("range of %d items: a chat template may make ranges of at most %d", count, g.lim.rangeItems)
	}
	items := make([]jinja.Value, count)
	for i := range items {
		items[i] = jinja.NewInt(start + int64(i)*step)
	}
	return jinja.NewList(items), nil
}

// slice is Python's x[start:stop:step] on a list or a string.
func (g *renderGuard) slice(args []jinja.Value, _ map[string]jinja.Value) (jinja.Value, error) {
	if len(args) != 4 {
		return jinja.Undefined(), errArgs
	}
	x := args[0]
	var idx [3]*int64
	for i, a := range args[1:] {
		if a.IsNone() || a.IsUndefined() {
			continue
		}
		v, ok := asInt(a)
		if !ok {
			return jinja.Undefined(), errors.New("slice indices must be integers or None")
		}
		idx[i] = &v
	}
	step := int64(1)
	if idx[2] != nil {
		step = *idx[2]
	}
	if step == 0 {
		return jinja.Undefined(), errors.New("slice step cannot be zero")
	}
	var n int
	var runes []rune
	switch {
	case x.IsList():
		n = x.AsList().Len()
	case x.IsString():
		runes = []rune(x.AsString())
		n = len(runes)
	default:
		return jinja.Undefined(), fmt.Errorf("'%s' object is not subscriptable", pyType(x))
	}
	// As CPython's PySlice_AdjustIndices.
	adjust := func(p *int64, def int64) int64 {
		if p == nil {
			return def
		}
		v := *p
		lo, hi := int64(0), int64(n)
		if step < 0 {
			lo, hi = -1, int64(n)-1
		}
		if v < 0 {
			v += int64(n)
			if v < 0 {
				return lo
			}
		} else if v > hi {
			return hi
		}
		return v
	}
	var start, stop int64
	if step > 0 {
		start, stop = adjust(idx[0], 0), adjust(idx[1], int64(n))
	} else {
		start, stop = adjust(idx[0], int64(n)-1), adjust(idx[1], -1)
	}
	var picks []int
	for i := start; (step > 0 && i < stop) || (step < 0 && i > stop); i += step {
		picks = append(picks, int(i))
	}
	if x.IsString() {
		out := make([]rune, len(picks))
		for i, k := range picks {
			out[i] = runes[k]
		}
		return jinja.NewString(string(out)), nil
	}
	items := x.AsList().Items
	out := make([]jinja.Value, len(picks))
	for i, k := range picks {
		out[i] = items[k]
	}
	return jinja.NewList(out), nil
}

// positional returns argument i (after the value), or keyword name.
func positional(args []jinja.Value, kwargs map[string]jinja.Value, i int, name string) (jinja.Value, bool) {
	if v, ok := kwargs[name]; ok {
		return v, true
	}
	if i+1 < len(args) {
		return args[i+1], true
	}
	return jinja.Undefined(), false
}

// split is str.split(sep=None, maxsplit=-1).
func (g *renderGuard) split(args []jinja.Value, kwargs map[string]jinja.Value) (jinja.Value, error) {
	if len(args) < 1 || len(args) > 3 {
		return jinja.Undefined(), errArgs
	}
	if !args[0].IsString() {
		return jinja.Undefined(), fmt.Errorf("'%s' object has no attribute 'split'", pyType(args[0]))
	}
	s := args[0].AsString()
	maxsplit := int64(-1)
	if v, ok := positional(args, kwargs, 1, "maxsplit"); ok {
		if maxsplit, ok = asInt(v); !ok {
			return jinja.Undefined(), fmt.Errorf("split: maxsplit must be an integer, not '%s'", pyType(v))
		}
	}
	var parts []string
	sep, ok := positional(args, kwargs, 0, "sep")
	switch {
	case !ok || sep.IsNone():
		if parts = splitWhitespace(s, maxsplit, g.lim.items); len(parts) > g.lim.items {
			return jinja.Undefined(), g.tooManyItems(len(parts))
		}
	case !sep.IsString():
		return jinja.Undefined(), fmt.Errorf("split: must be str or None, not '%s'", pyType(sep))
	case sep.AsString() == "":
		return jinja.Undefined(), errors.New("split: empty separator")
	default:
		n := int64(strings.Count(s, sep.AsString())) + 1
		if maxsplit >= 0 {
			n = min(n, maxsplit+1)
		}
		if n > int64(g.lim.items) {
			return jinja.Undefined(), g.tooManyItems(int(min(n, math.MaxInt32)))
		}
		parts = strings.SplitN(s, sep.AsString(), int(n))
	}
	items := make([]jinja.Value, len(parts))
	for i, p := range parts {
		items[i] = jinja.NewString(p)
	}
	return jinja.NewList(items), nil
}

// splitWhitespace is str.split() without a separator: runs of whitespace
// separate, and the rest after maxsplit splits keeps its trailing space.
// It stops after more than limit parts.
func splitWhitespace(s string, maxsplit int64, limit int) []string {
	var out []string
	i := 0
	for len(out) <= limit {
		for i < len(s) {
			r, n := utf8.DecodeRuneInString(s[i:])
			if !pySpace(r) {
				break
			}
			i += n
		}
		if i == len(s) {
			return out
		}
		if maxsplit >= 0 && int64(len(out)) == maxsplit {
			return append(out, s[i:])
		}
		j := i
		for j < len(s) {
			r, n := utf8.DecodeRuneInString(s[j:])
			if pySpace(r) {
				break
			}
			j += n
		}
		out = append(out, s[i:j])
		i = j
	}
	return out
}

// replace is str.replace(old, new, count=-1) and the replace filter.
func (g *renderGuard) replace(args []jinja.Value, kwargs map[string]jinja.Value) (jinja.Value, error) {
	if len(args) < 3 || len(args) > 4 {
		return jinja.Undefined(), fmt.Errorf("replace: want (old, new[, count]), got %d arguments", len(args)-1)
	}
	var strs [3]string
	for i := range strs {
		var err error
		if strs[i], err = g.print(args[i]); err != nil {
			return jinja.Undefined(), err
		}
	}
	s, old, repl := strs[0], strs[1], strs[2]
	count := int64(-1)
	if v, ok := positional(args, kwargs, 2, "count"); ok && !v.IsNone() {
		if count, ok = asInt(v); !ok {
			return jinja.Undefined(), fmt.Errorf("replace: count must be an integer, not '%s'", pyType(v))
		}
	}
	n := int64(strings.Count(s, old)) // for "", one more than the characters
	if count >= 0 && count < n {
		n = count
	}
	if grow := int64(len(repl) - len(old)); grow > 0 && n > (int64(g.lim.size)-int64(len(s)))/grow {
		return jinja.Undefined(), g.tooLarge("a string", len(s)+int(min(n, math.MaxInt32))*int(grow))
	}
	return jinja.NewString(strings.Replace(s, old, repl, int(n))), nil
}

// format is str.format with {}, {0} and {name} fields and the !s and !r
// conversions; format specs are not supported.
func (g *renderGuard) format(args []jinja.Value, kwargs map[string]jinja.Value) (jinja.Value, error) {
	if len(args) < 1 || !args[0].IsString() {
		return jinja.Undefined(), errors.New("format: not called on a string")
	}
	s, pos := args[0].AsString(), args[1:]
	var b strings.Builder
	auto := 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c == '}' {
			if i+1 < len(s) && s[i+1] == '}' {
				i++
			} else {
				return jinja.Undefined(), errors.New("format: single '}' encountered in format string")
			}
		}
		if c != '{' {
			b.WriteByte(c)
			continue
		}
		if i+1 < len(s) && s[i+1] == '{' {
			b.WriteByte('{')
			i++
			continue
		}
		end := strings.IndexByte(s[i:], '}')
		if end < 0 {
			return jinja.Undefined(), errors.New("format: single '{' encountered in format string")
		}
		raw := s[i+1 : i+end]
		i += end
		field, conv, _ := strings.Cut(raw, "!")
		if strings.ContainsAny(field, ":[.") || (conv != "" && conv != "s" && conv != "r") {
			return jinja.Undefined(), fmt.Errorf("format: field {%s} is not supported", raw)
		}
		var v jinja.Value
		switch k, err := strconv.Atoi(field); {
		case field == "":
			if auto >= len(pos) {
				return jinja.Undefined(), fmt.Errorf("format: replacement index %d out of range", auto)
			}
			v = pos[auto]
			auto++
		case err == nil:
			if k < 0 || k >= len(pos) {
				return jinja.Undefined(), fmt.Errorf("format: replacement index %d out of range", k)
			}
			v = pos[k]
		default:
			var ok bool
			if v, ok = kwargs[field]; !ok {
				return jinja.Undefined(), fmt.Errorf("format: no argument named %q", field)
			}
		}
		if err := g.fits(v); err != nil {
			return jinja.Undefined(), err
		}
		text := pyStr(v)
		if conv == "r" {
			text = pyRepr(v)
		}
		if b.Len()+len(text) > g.lim.size {
			return jinja.Undefined(), g.tooLarge("a string", b.Len()+len(text))
		}
		b.WriteString(text)
	}
	return jinja.NewString(b.String()), nil
}

// join is jinja2's join filter: join(d=”, attribute=None).
func (g *renderGuard) join(args []jinja.Value, kwargs map[string]jinja.Value) (jinja.Value, error) {
	if len(args) < 1 || len(args) > 3 {
		return jinja.Undefined(), errArgs
	}
	sep := ""
	if v, ok := positional(args, kwargs, 0, "d"); ok {
		var err error
		if sep, err = g.print(v); err != nil {
			return jinja.Undefined(), err
		}
	}
	items, err := g.iterate(args[0])
	if err != nil {
		return jinja.Undefined(), err
	}
	attr, hasAttr := positional(args, kwargs, 1, "attribute")
	var b strings.Builder
	for i, it := range items {
		if hasAttr {
			it = getItem(it, attr)
		}
		s, err := g.print(it)
		if err != nil {
			return jinja.Undefined(), err
		}
		gap := sep
		if i == 0 {
			gap = ""
		}
		if n := b.Len() + len(gap) + len(s); n > g.lim.size {
			return jinja.Undefined(), g.tooLarge("a joined string", n)
		}
		b.WriteString(gap)
		b.WriteString(s)
	}
	return jinja.NewString(b.String()), nil
}

// iterate lists what "for x in v" and list(v) go over: a list's items, a
// dict's keys, a string's characters, nothing for undefined; at most
// lim.items of them.
func (g *renderGuard) iterate(v jinja.Value) ([]jinja.Value, error) {
	var n int
	switch {
	case v.IsUndefined():
		return nil, nil
	case v.IsList():
		n = v.AsList().Len()
	case v.IsDict():
		n = v.AsDict().Len()
	case v.IsString():
		n = utf8.RuneCountInString(v.AsString())
	default:
		return nil, fmt.Errorf("'%s' object is not iterable", pyType(v))
	}
	if n > g.lim.items {
		return nil, g.tooManyItems(n)
	}
	switch {
	case v.IsList():
		return v.AsList().Items, nil
	case v.IsDict():
		out := make([]jinja.Value, 0, n)
		for _, k := range v.AsDict().Keys {
			out = append(out, jinja.NewString(k))
		}
		return out, nil
	}
	out := make([]jinja.Value, 0, n)
	for _, r := range v.AsString() {
		out = append(out, jinja.NewString(string(r)))
	}
	return out, nil
}

func (g *renderGuard) tooManyItems(n int) error {
	return fmt.Errorf("%d items or more: a chat template may build lists of at most %d items", n, g.lim.items)
}

// iter is the iterable of a for loop: checked, and a string turned into
// its characters here rather than by the engine.
func (g *renderGuard) iter(args []jinja.Value, _ map[string]jinja.Value) (jinja.Value, error) {
	if len(args) != 1 {
		return jinja.Undefined(), errArgs
	}
	v := args[0]
	if !v.IsList() && !v.IsDict() && !v.IsString() {
		return v, nil // the engine runs no iteration
	}
	items, err := g.iterate(v)
	if err != nil || !v.IsString() {
		return v, err
	}
	return jinja.NewList(items), nil
}

// tolist is the list filter.
func (g *renderGuard) tolist(args []jinja.Value, _ map[string]jinja.Value) (jinja.Value, error) {
	if len(args) != 1 {
		return jinja.Undefined(), errArgs
	}
	items, err := g.iterate(args[0])
	if err != nil {
		return jinja.Undefined(), err
	}
	return jinja.NewList(append([]jinja.Value(nil), items...)), nil
}

// getItem is v[key] for a dict (undefined when missing).
func getItem(v, key jinja.Value) jinja.Value {
	if v.IsDict() {
		if it, ok := v.AsDict().Get(pyStr(key)); ok {
			return it
		}
	}
	return jinja.Undefined()
}

// indent is jinja2's indent filter: indent(width=4, first=False,
// blank=False), width being a number of spaces or a string.
func (g *renderGuard) indent(args []jinja.Value, kwargs map[string]jinja.Value) (jinja.Value, error) {
	if len(args) < 1 || len(args) > 4 {
		return jinja.Undefined(), errArgs
	}
	s, err := g.print(args[0])
	if err != nil {
		return jinja.Undefined(), err
	}
	ind := "    "
	if w, ok := positional(args, kwargs, 0, "width"); ok {
		if w.IsString() {
			ind = w.AsString()
		} else if n, ok := asInt(w); ok {
			ind = ""
			if n > int64(g.lim.size) {
				return jinja.Undefined(), g.tooLarge("an indent", int(min(n, math.MaxInt32)))
			}
			if n > 0 {
				ind = strings.Repeat(" ", int(n))
			}
		} else {
			return jinja.Undefined(), fmt.Errorf("indent: width must be an integer or a string, not '%s'", pyType(w))
		}
	}
	first, _ := positional(args, kwargs, 1, "first")
	blank, _ := positional(args, kwargs, 2, "blank")
	lines := pySplitLines(s + "\n")
	if len(lines)*len(ind)+len(s) > g.lim.size {
		return jinja.Undefined(), g.tooLarge("an indented string", len(lines)*len(ind)+len(s))
	}
	var b strings.Builder
	if first.IsTruthy() {
		b.WriteString(ind)
	}
	for i, l := range lines {
		if i > 0 {
			b.WriteByte('\n')
			if l != "" || blank.IsTruthy() {
				b.WriteString(ind)
			}
		}
		b.WriteString(l)
	}
	return jinja.NewString(b.String()), nil
}

// pySplitLines is Python's str.splitlines().
func pySplitLines(s string) []string {
	var out []string
	start := 0
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		switch r {
		case '\n', '\r', '\v', '\f', 0x1c, 0x1d, 0x1e, 0x85, 0x2028, 0x2029:
			out = append(out, s[start:i])
			if r == '\r' && i+1 < len(s) && s[i+1] == '\n' {
				n++
			}
			start = i + n
		}
		i += n
	}
	if start < len(s) {
		out = append(out, s[start:])
	}
	return out
}

// tojson is HF's tojson filter, with the output bounded.
func (g *renderGuard) tojson(args []jinja.Value, kwargs map[string]jinja.Value) (jinja.Value, error) {
	if len(args) < 1 {
		return jinja.Undefined(), errors.New("tojson: missing value")
	}
	if err := g.fits(args[0]); err != nil {
		return jinja.Undefined(), err
	}
	return tojsonFilter(args, kwargs, g.lim.size)
}

// unsafeMethod stands for the methods that modify lists and dicts, which
// HF's ImmutableSandboxedEnvironment forbids.
func unsafeMethod(args []jinja.Value, _ map[string]jinja.Value) (jinja.Value, error) {
	if len(args) != 2 {
		return jinja.Undefined(), errArgs
	}
	return jinja.Undefined(), fmt.Errorf("access to attribute '%s' of '%s' object is unsafe", args[1].AsString(), pyType(args[0]))
}
