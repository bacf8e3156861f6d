package tokenizer

import "bytes"

// StreamDecoder turns ids into text one at a time, as a model generates
// them. It returns only complete UTF-8: a character whose bytes are spread
// over several tokens comes out once its last token arrives.
//
// Each step decodes the new ids together with the previous token, so that
// decoders that treat the start of the text specially (stripping the
// leading space of SentencePiece models) see the new token mid-text, and
// emits the part of the text that is new.
type StreamDecoder struct {
	t      *Tokenizer
	ids    []int
	prefix int // start of the ids that are decoded for context
	read   int // ids before this are emitted
}

// maxPending bounds how many ids wait for a character to complete before
// the text is emitted anyway (with U+FFFD for what is broken).
const maxPending = 8

// NewStreamDecoder starts an empty stream.
func (t *Tokenizer) NewStreamDecoder() *StreamDecoder { return &StreamDecoder{t: t} }

// Add takes the next id and returns the text that is now complete, which
// may be empty.
func (d *StreamDecoder) Add(id int) (string, error) {
	if id < 0 || id >= len(d.t.idToToken) || d.t.idToToken[id] == "" {
		_, err := d.t.decodeBytes([]int{id})
		return "", err
	}
	d.ids = append(d.ids, id)
	prev, err := d.t.decodeBytes(d.ids[d.prefix:d.read])
	if err != nil {
		return "", err
	}
	cur, err := d.t.decodeBytes(d.ids[d.prefix:])
	if err != nil {
		return "", err
	}
	if len(cur) <= len(prev) || !bytes.HasPrefix(cur, prev) {
		if len(d.ids)-d.read < maxPending {
			return "", nil
		}
	}
	var fresh []byte
	if bytes.HasPrefix(cur, prev) {
		fresh = cur[len(prev):]
	}
	if len(d.ids)-d.read < maxPending && (incompleteTail(fresh) > 0 || bytes.HasSuffix(fresh, []byte("\uFFFD"))) {
		// Wait: the last character is not finished (byte-level models
		// leave a partial sequence, byte-fallback models a U+FFFD).
		return "", nil
	}
	d.prefix, d.read = d.read, len(d.ids)
	return lossyUTF8(fresh), nil
}

// Flush returns what is still held back, broken characters as U+FFFD,
// and resets the stream.
func (d *StreamDecoder) Flush() string {
	var out string
	if d.read < len(d.ids) {
		prev, err1 := d.t.decodeBytes(d.ids[d.prefix:d.read])
		cur, err2 := d.t.decodeBytes(d.ids[d.prefix:])
		if err1 == nil && err2 == nil && bytes.HasPrefix(cur, prev) {
			out = lossyUTF8(cur[len(prev):])
		}
	}
	d.ids, d.prefix, d.read = d.ids[:0], 0, 0
	return out
}
