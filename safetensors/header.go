package safetensors

import (
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/bits"
	"slices"
)

// maxHeaderSize bounds the JSON header; real headers are well under a few
// MB, and a garbage length must not make us parse gigabytes.
const maxHeaderSize = 100 << 20

const metadataKey = "__metadata__"

// Entry is one tensor as described by a header. Begin and End are byte
// offsets relative to the start of the data section.
type Entry struct {
	Name       string
	DType      DType
	Shape      []int
	Begin, End int64
}

// ParseHeader parses and validates a header (the JSON bytes) for a file whose
// data section has dataLen bytes. The entries come back sorted by Begin.
// Errors do not name the file; Open adds that.
func ParseHeader(header []byte, dataLen int64) (entries []Entry, metadata map[string]string, err error) {
	if dataLen < 0 {
		return nil, nil, fmt.Errorf("negative data length %d", dataLen)
	}
	fields, err := decodeObject(header)
	if err != nil {
		return nil, nil, fmt.Errorf("header: %w", err)
	}
	metadata = map[string]string{}
	for _, fld := range fields {
		if fld.key == metadataKey {
			if metadata, err = parseMetadata(fld.value); err != nil {
				return nil, nil, fmt.Errorf("header: %s: %w", metadataKey, err)
			}
			continue
		}
		e, err := parseEntry(fld.key, fld.value, dataLen)
		if err != nil {
			return nil, nil, fmt.Errorf("tensor %s: %w", fld.key, err)
		}
		entries = append(entries, e)
	}

	// Sorted by Begin (then End, so that an empty tensor sitting where the
	// next one starts is not mistaken for an overlap), each tensor must
	// start at or after the end of the one before. Gaps are allowed.
	slices.SortFunc(entries, func(a, b Entry) int {
		return cmp.Or(cmp.Compare(a.Begin, b.Begin), cmp.Compare(a.End, b.End))
	})
	for i := 1; i < len(entries); i++ {
		prev, e := entries[i-1], entries[i]
		if e.Begin < prev.End {
			return nil, nil, fmt.Errorf("tensor %s: data_offsets [%d, %d] overlap tensor %s [%d, %d]",
				e.Name, e.Begin, e.End, prev.Name, prev.Begin, prev.End)
		}
	}
	return entries, metadata, nil
}

type field struct {
	key   string
	value json.RawMessage
}

// decodeObject splits a JSON object into its members, in order. Unlike
// unmarshalling into a map it can reject duplicate keys, which would
// otherwise silently hide a tensor.
func decodeObject(b []byte) ([]field, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	tok, err := dec.Token()
	if err != nil {
		return nil, fmt.Errorf("invalid JSON: %w", err)
	}
	if tok != json.Delim('{') {
		return nil, errors.New("not a JSON object")
	}
	var out []field
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, fmt.Errorf("invalid JSON: %w", err)
		}
		key, ok := tok.(string)
		if !ok {
			return nil, errors.New("invalid JSON: object key is not a string")
		}
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, fmt.Errorf("invalid JSON: %w", err)
		}
		if seen[key] {
			return nil, fmt.Errorf("duplicate key %q", key)
		}
		seen[key] = true
		out = append(out, field{key, v})
	}
	if _, err := dec.Token(); err != nil { // the closing '}'
		return nil, fmt.Errorf("invalid JSON: %w", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("invalid JSON: data after the object")
	}
	return out, nil
}

// rawEntry mirrors one tensor's JSON; pointers tell a missing key from a
// zero value.
type rawEntry struct {
	DType       *DType   `json:"dtype"`
	Shape       *[]int   `json:"shape"`
	DataOffsets *[]int64 `json:"data_offsets"`
}

func parseEntry(name string, raw json.RawMessage, dataLen int64) (Entry, error) {
	var r rawEntry
	if err := json.Unmarshal(raw, &r); err != nil {
		return Entry{}, fmt.Errorf("invalid entry: %w", err)
	}
	switch {
	case r.DType == nil:
		return Entry{}, errors.New("missing dtype")
	case r.Shape == nil:
		return Entry{}, errors.New("missing shape")
	case r.DataOffsets == nil:
		return Entry{}, errors.New("missing data_offsets")
	}
	e := Entry{Name: name, DType: *r.DType, Shape: *r.Shape}
	if e.Shape == nil {
		e.Shape = []int{} // "shape": [] is a scalar; keep it non-nil
	}
	if e.DType.Size() == 0 {
		return Entry{}, fmt.Errorf("unknown dtype %q", e.DType)
	}
	for _, d := range e.Shape {
		if d < 0 {
			return Entry{}, fmt.Errorf("negative dimension in shape %v", e.Shape)
		}
	}
	offs := *r.DataOffsets
	if len(offs) != 2 {
		return Entry{}, fmt.Errorf("data_offsets has %d elements, want 2", len(offs))
	}
	e.Begin, e.End = offs[0], offs[1]
	switch {
	case e.Begin < 0:
		return Entry{}, fmt.Errorf("negative data_offsets begin %d", e.Begin)
	case e.Begin > e.End:
		return Entry{}, fmt.Errorf("data_offsets begin %d > end %d", e.Begin, e.End)
	case e.End > dataLen:
		return Entry{}, fmt.Errorf("data_offsets end %d is beyond the %d-byte data section", e.End, dataLen)
	}
	n, ok := byteSize(e.DType, e.Shape)
	if !ok || n != e.End-e.Begin {
		return Entry{}, fmt.Errorf("shape %v of %s does not match data_offsets [%d, %d] (%d bytes)",
			e.Shape, e.DType, e.Begin, e.End, e.End-e.Begin)
	}
	return e, nil
}

// byteSize returns the byte size of a tensor; ok is false if it overflows
// int64. Dimensions must be non-negative.
func byteSize(dtype DType, shape []int) (n int64, ok bool) {
	if slices.Contains(shape, 0) {
		return 0, true // even if the other dimensions would overflow
	}
	size := uint64(dtype.Size())
	for _, d := range shape {
		hi, lo := bits.Mul64(size, uint64(d))
		if hi != 0 || lo > math.MaxInt64 {
			return 0, false
		}
		size = lo
	}
	return int64(size), true
}

// parseMetadata accepts an object of strings (or null, which some writers
// emit for "no metadata").
func parseMetadata(raw json.RawMessage) (map[string]string, error) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, errors.New("not an object of strings")
	}
	out := make(map[string]string, len(m))
	for k, v := range m {
		// Unmarshalling null into a string is silently a no-op, so check
		// that the value really is a string.
		if len(v) == 0 || v[0] != '"' {
			return nil, fmt.Errorf("value of %q is not a string", k)
		}
		var s string
		if err := json.Unmarshal(v, &s); err != nil {
			return nil, fmt.Errorf("value of %q: %w", k, err)
		}
		out[k] = s
	}
	return out, nil
}
