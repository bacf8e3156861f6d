// Package constrain forces generated text into a language, token by token:
// JSON that satisfies a JSON schema (response_format json_schema and
// json_object), or any grammar built from its expressions (the tool-call
// format). An Expr compiles to an automaton over bytes; for each of its
// states the set of vocabulary tokens whose bytes keep the text inside the
// language is computed once, by walking a trie of the vocabulary, and
// cached. At each generation step the sampler's logits are masked with the
// current state's set (Constraint.Mask), and the sampled token moves the
// automaton (Constraint.Advance).
package constrain
