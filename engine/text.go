package engine

import (
	"strings"

	"github.com/mmfp4/mmfp4/tokenizer"
)

// TextStream turns generated ids into text as they come: it never splits
// a UTF-8 character, and it holds back text that may be the start of a stop
// string, so that a stop string never reaches the reader. The CLI and the
// server both stream text through it (via the engine).
type TextStream struct {
	tok         *tokenizer.Tokenizer
	dec         *tokenizer.StreamDecoder
	stops       []string
	skipSpecial bool
	pending     string // decoded but not yet emitted
}

// NewTextStream starts a stream. With skipSpecial, special tokens (chat
// markers) produce no text.
func NewTextStream(tok *tokenizer.Tokenizer, stops []string, skipSpecial bool) *TextStream {
	return &TextStream{tok: tok, dec: tok.NewStreamDecoder(), stops: stops, skipSpecial: skipSpecial}
}

// Add takes the next id and returns the text that is now final. stopped
// reports that a stop string appeared: the text before it is returned, and
// the stream should end.
func (t *TextStream) Add(id int) (text string, stopped bool, err error) {
	if id >= t.tok.VocabSize() || (t.skipSpecial && t.tok.IsSpecial(id)) {
		// Padding rows of the embedding, and skipped special tokens, have
		// no text.
		return "", false, nil
	}
	piece, err := t.dec.Add(id)
	if err != nil {
		return "", false, err
	}
	t.pending += piece
	if len(t.stops) == 0 {
		out := t.pending
		t.pending = ""
		return out, false, nil
	}
	if i := firstStop(t.pending, t.stops); i >= 0 {
		out := t.pending[:i]
		t.pending = ""
		return out, true, nil
	}
	keep := heldBack(t.pending, t.stops)
	out := t.pending[:len(t.pending)-keep]
	t.pending = t.pending[len(t.pending)-keep:]
	return out, false, nil
}

// Flush returns the text still held back, when the stream ends for another
// reason than a stop string.
func (t *TextStream) Flush() string {
	out := t.pending + t.dec.Flush()
	t.pending = ""
	if i := firstStop(out, t.stops); i >= 0 {
		out = out[:i]
	}
	return out
}

// firstStop is the index of the earliest stop string in s, or -1.
func firstStop(s string, stops []string) int {
	best := -1
	for _, st := range stops {
		if i := strings.Index(s, st); i >= 0 && (best < 0 || i < best) {
			best = i
		}
	}
	return best
}

// heldBack is the length of the longest suffix of s that is a proper
// prefix of a stop string: text that a later token may turn into a stop.
func heldBack(s string, stops []string) int {
	keep := 0
	for _, st := range stops {
		for n := min(len(st)-1, len(s)); n > keep; n-- {
			if strings.HasSuffix(s, st[:n]) {
				keep = n
				break
			}
		}
	}
	return keep
}
