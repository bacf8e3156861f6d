package constrain

import "strings"

// Expr is a language over bytes: the texts a constrained output may be.
// Build one with the functions of this package (or from a JSON schema)
// and compile it with Compile.
//
// Every Expr other than Never matches at least one text, and the
// constructors keep it so (a sequence with a Never in it is Never, and so
// on): then every state of the automaton can still reach an accepted end,
// and a constrained generation can always finish.
type Expr interface {
	// build adds the states that lead from state from to state to
	// through the language.
	build(b *builder, from, to int32)
}

// never matches nothing.
type never struct{}

func (never) build(*builder, int32, int32) {}

// Never is the empty language.
var Never Expr = never{}

func isNever(e Expr) bool { _, ok := e.(never); return ok }

// lit is a fixed text.
type lit string

func (l lit) build(b *builder, from, to int32) {
	if len(l) == 0 {
		b.eps(from, to)
		return
	}
	s := from
	for i := 0; i < len(l)-1; i++ {
		n := b.state()
		b.litEdge(s, l[i], n)
		s = n
	}
	b.litEdge(s, l[len(l)-1], to)
}

// Lit is the text s, byte for byte.
func Lit(s string) Expr { return lit(s) }

// byteRange is an inclusive range of byte values.
type byteRange struct{ lo, hi byte }

// class is one byte out of a set.
type class []byteRange

func (c class) build(b *builder, from, to int32) {
	for _, r := range c {
		b.edge(from, r.lo, r.hi, to)
	}
}

// Bytes is one byte in [lo, hi].
func Bytes(lo, hi byte) Expr { return class{{lo, hi}} }

// anyOf is one byte of the given ones.
func anyOf(chars string) Expr {
	var c class
	for i := 0; i < len(chars); i++ {
		c = append(c, byteRange{chars[i], chars[i]})
	}
	return c
}

type seq []Expr

func (s seq) build(b *builder, from, to int32) {
	cur := from
	for i, e := range s {
		next := to
		if i < len(s)-1 {
			next = b.state()
		}
		e.build(b, cur, next)
		cur = next
	}
}

// Seq is the concatenation of es.
func Seq(es ...Expr) Expr {
	var out seq
	for _, e := range es {
		switch e := e.(type) {
		case never:
			return Never
		case seq:
			out = append(out, e...)
		case lit:
			if len(e) == 0 {
				continue
			}
			if n := len(out); n > 0 {
				if prev, ok := out[n-1].(lit); ok {
					out[n-1] = prev + e
					continue
				}
			}
			out = append(out, e)
		default:
			out = append(out, e)
		}
	}
	switch len(out) {
	case 0:
		return lit("")
	case 1:
		return out[0]
	}
	return out
}

type alt []Expr

func (a alt) build(b *builder, from, to int32) {
	for _, e := range a {
		// Each alternative gets its own entry and exit states, so that
		// loops inside one cannot lead into another.
		in, out := b.state(), b.state()
		b.eps(from, in)
		e.build(b, in, out)
		b.eps(out, to)
	}
}

// Alt is the union of es.
func Alt(es ...Expr) Expr {
	var out alt
	for _, e := range es {
		switch e := e.(type) {
		case never:
		case alt:
			out = append(out, e...)
		default:
			out = append(out, e)
		}
	}
	switch len(out) {
	case 0:
		return Never
	case 1:
		return out[0]
	}
	return out
}

// Opt is e or nothing.
func Opt(e Expr) Expr { return Alt(lit(""), e) }

type rep struct {
	e        Expr
	min, max int // max < 0: unbounded
}

func (r rep) build(b *builder, from, to int32) {
	cur := from
	for range r.min {
		next := b.state()
		r.e.build(b, cur, next)
		cur = next
	}
	if r.max < 0 {
		// A fresh loop state, so that the loop does not run through
		// states that other paths use.
		loop := b.state()
		b.eps(cur, loop)
		back := b.state()
		r.e.build(b, loop, back)
		b.eps(back, loop)
		b.eps(loop, to)
		return
	}
	for range r.max - r.min {
		next := b.state()
		b.eps(cur, to)
		r.e.build(b, cur, next)
		cur = next
	}
	b.eps(cur, to)
}

// Rep is e repeated min to max times (max < 0: no upper bound).
func Rep(e Expr, min, max int) Expr {
	if max >= 0 && max < min {
		return Never
	}
	if isNever(e) {
		if min == 0 {
			return lit("")
		}
		return Never
	}
	if max == 0 {
		return lit("")
	}
	if min == 1 && max == 1 {
		return e
	}
	return rep{e, min, max}
}

// lazy builds its language only when the automaton first reaches it, so
// that deeply nested grammars (any JSON value) cost only what is used.
// make must not return Never.
type lazy struct{ make func() Expr }

func (l lazy) build(b *builder, from, to int32) {
	s := b.state()
	b.eps(from, s)
	b.pending[s] = func() { l.make().build(b, s, to) }
}

// textWithout is UTF-8 text in which stop does not occur.
type textWithout string

// TextWithout is any UTF-8 text that does not contain stop (which must be
// ASCII), such as free reasoning before "</think>".
func TextWithout(stop string) Expr {
	if stop == "" || strings.IndexFunc(stop, func(r rune) bool { return r >= 0x80 }) >= 0 {
		return Never
	}
	return textWithout(stop)
}

func (t textWithout) build(b *builder, from, to int32) {
	stop := string(t)
	n := len(stop)
	// k[i]: the text so far ends in stop[:i] (i < n), at a character
	// boundary. Each is an end of the text.
	k := make([]int32, n)
	for i := range k {
		k[i] = b.state()
		b.eps(k[i], to)
	}
	b.eps(from, k[0])
	fail := kmpFailure(stop)
	for i := 0; i < n; i++ {
		for c := 0; c < 0x80; c++ {
			j := i
			for j > 0 && stop[j] != byte(c) {
				j = fail[j-1]
			}
			if stop[j] == byte(c) {
				j++
			}
			if j < n {
				b.edge(k[i], byte(c), byte(c), k[j])
			}
		}
		// A multi-byte character cannot be part of the ASCII stop.
		utf8Multi.build(b, k[i], k[0])
	}
}

// kmpFailure is the Knuth-Morris-Pratt failure function of s.
func kmpFailure(s string) []int {
	f := make([]int, len(s))
	for i, j := 1, 0; i < len(s); i++ {
		for j > 0 && s[i] != s[j] {
			j = f[j-1]
		}
		if s[i] == s[j] {
			j++
		}
		f[i] = j
	}
	return f
}

// utf8Multi is one well-formed UTF-8 character of two to four bytes
// (no surrogates, no overlong forms), as in the Unicode standard's table.
var utf8Multi = func() Expr {
	cont := Bytes(0x80, 0xBF)
	return Alt(
		Seq(Bytes(0xC2, 0xDF), cont),
		Seq(Bytes(0xE0, 0xE0), Bytes(0xA0, 0xBF), cont),
		Seq(class{{0xE1, 0xEC}, {0xEE, 0xEF}}, cont, cont),
		Seq(Bytes(0xED, 0xED), Bytes(0x80, 0x9F), cont),
		Seq(Bytes(0xF0, 0xF0), Bytes(0x90, 0xBF), cont, cont),
		Seq(Bytes(0xF1, 0xF3), cont, cont, cont),
		Seq(Bytes(0xF4, 0xF4), Bytes(0x80, 0x8F), cont, cont),
	)
}()

// size estimates how many automaton states e builds eagerly (lazy parts
// count as one), to refuse grammars too large to compile quickly.
func size(e Expr) int {
	switch e := e.(type) {
	case lit:
		return len(e)
	case class:
		return 1
	case seq:
		n := 0
		for _, x := range e {
			n += size(x)
		}
		return n
	case alt:
		n := 0
		for _, x := range e {
			n += size(x) + 2
		}
		return n
	case rep:
		k := e.max
		if k < 0 {
			k = e.min + 1
		}
		return k*size(e.e) + k + 2
	case textWithout:
		return 20 * len(e)
	case *objExpr:
		n := 2 * len(e.names)
		for i := range e.names {
			n += size(e.keys[i]) + size(e.vals[i]) + 4*size(e.ws)
		}
		return n
	}
	return 1
}
