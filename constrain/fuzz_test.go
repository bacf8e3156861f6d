package constrain

import (
	"encoding/json"
	"math/rand/v2"
	"testing"
)

// completion returns, for each state of the nondeterministic automaton
// built so far, the fewest bytes that lead from it to the end (-1: none
// yet), by a breadth-first search backwards from the end in which
// epsilon moves cost nothing.
func completion(b *builder) []int {
	// Build the lazy parts first: a completion may have to write a value
	// that is not built yet. (Bounded: the tests use a small MaxDepth.)
	for len(b.pending) > 0 {
		for s, f := range b.pending {
			delete(b.pending, s)
			f()
		}
	}
	n := len(b.eps0)
	type back struct {
		from int32
		cost int
	}
	rev := make([][]back, n)
	for s := range n {
		for _, t := range b.eps0[s] {
			rev[t] = append(rev[t], back{int32(s), 0})
		}
		for _, e := range b.edges[s] {
			rev[e.to] = append(rev[e.to], back{int32(s), 1})
		}
	}
	dist := make([]int, n)
	for i := range dist {
		dist[i] = -1
	}
	// Level by level; epsilon moves stay within a level.
	level := []int32{nfaAccept}
	dist[nfaAccept] = 0
	for d := 0; len(level) > 0; d++ {
		var next []int32
		for i := 0; i < len(level); i++ {
			s := level[i]
			if dist[s] != d {
				continue // reached at a lower cost already
			}
			for _, r := range rev[s] {
				if c := d + r.cost; dist[r.from] < 0 || c < dist[r.from] {
					dist[r.from] = c
					if r.cost == 0 {
						level = append(level, r.from)
					} else {
						next = append(next, r.from)
					}
				}
			}
		}
		level = next
	}
	return dist
}

// randomText walks the automaton byte by byte at random, and after
// steps bytes takes the shortest way to the end. ok is false if a state
// turns out to be a dead end.
func randomText(d *dfa, r *rand.Rand, steps int) (string, bool) {
	var out []byte
	var dist []int
	s := int32(start)
	for i := 0; ; i++ {
		var choices []int
		for c, t := range d.next(s) {
			if t != 0 {
				choices = append(choices, c)
			}
		}
		acc := d.states[s].accept
		if len(choices) == 0 {
			return string(out), acc
		}
		if acc && (i >= steps || r.IntN(8) == 0) {
			return string(out), true
		}
		c := choices[r.IntN(len(choices))]
		if i >= steps {
			if len(dist) != len(d.nfa.eps0) || len(d.nfa.pending) > 0 {
				dist = completion(d.nfa)
			}
			best := -1
			for _, x := range choices {
				for _, n := range d.states[d.next(s)[x]].set {
					if dn := dist[n]; dn >= 0 && (best < 0 || dn < best) {
						best, c = dn, x
					}
				}
			}
			if best < 0 {
				return string(out), false
			}
		}
		out = append(out, byte(c))
		s = d.next(s)[c]
	}
}

// FuzzSchemaCompiler compiles any schema the validator accepts; whatever
// it compiles to, random texts of the language are JSON that validates,
// and no state is a dead end.
func FuzzSchemaCompiler(f *testing.F) {
	for _, s := range testSchemas {
		f.Add(s.schema, uint64(1))
	}
	for _, s := range []string{
		`{"type": ["integer", "string"], "maxLength": 2}`,
		`{"anyOf": [{"const": 1}, {"enum": [1.5, "x", [1, {"a": null}]]}, {"type": "boolean"}]}`,
		`{"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}, "c": {"type": "null"}}, "required": ["b"]}`,
		`{"items": {"type": "array", "items": {"type": "array", "maxItems": 1}}, "minItems": 2}`,
		`{"properties": {"x": {"$ref": "#"}}, "additionalProperties": false}`,
		`true`,
		`{"type": "string", "minLength": 3, "maxLength": 3}`,
		`{"type": "object", "properties": {"\u00e9\n\"": {}}, "required": ["\u00e9\n\""]}`,
	} {
		f.Add(s, uint64(2))
	}
	f.Fuzz(func(t *testing.T, schema string, seed uint64) {
		if _, err := NewValidator([]byte(schema)); err != nil {
			return
		}
		e, err := JSONSchema([]byte(schema), SchemaOptions{MaxDepth: 4, MaxIndent: 2})
		if err != nil {
			return // refused with an error: fine
		}
		val, _ := NewValidator([]byte(schema))
		d := automaton(e)
		r := rand.New(rand.NewPCG(seed, 5))
		for range 5 {
			text, ok := randomText(d, r, 40)
			if !ok {
				t.Fatalf("dead end after %q", text)
			}
			if !json.Valid([]byte(text)) {
				t.Fatalf("%q is not JSON", text)
			}
			if err := val.Validate([]byte(text)); err != nil {
				t.Fatalf("%q does not validate: %v", text, err)
			}
		}
	})
}
