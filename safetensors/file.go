package safetensors

import (
	"encoding/binary"
	"fmt"
	"maps"
	"math"
	"os"
	"slices"
)

// File is one open safetensors file. Tensor may be called from several
// goroutines at once, but not concurrently with Close.
type File struct {
	path     string
	data     []byte       // the whole file, memory-mapped; nil once closed
	unmap    func() error // releases data
	dataOff  int64        // start of the data section within data
	entries  map[string]Entry
	names    []string
	metadata map[string]string
}

// Open memory-maps a safetensors file read-only and validates its header.
// The file must not be modified while it is open.
func Open(path string) (*File, error) {
	fd, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	// The mapping stays valid after the descriptor is closed.
	defer fd.Close()
	st, err := fd.Stat()
	if err != nil {
		return nil, err
	}
	size := st.Size()
	if size < 8 {
		return nil, fmt.Errorf("%s: file is %d bytes, too short for a safetensors header", path, size)
	}
	if size > math.MaxInt {
		return nil, fmt.Errorf("%s: file of %d bytes is too large to map", path, size)
	}
	data, unmap, err := mapFile(fd, int(size))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	f, err := parseFile(path, data)
	if err != nil {
		unmap()
		return nil, err
	}
	f.unmap = unmap
	return f, nil
}

// parseFile validates the framing and header of the file contents in data.
func parseFile(path string, data []byte) (*File, error) {
	size := int64(len(data))
	n := binary.LittleEndian.Uint64(data)
	// Compare as uint64 first: a huge n would turn negative as int64.
	if n > maxHeaderSize {
		return nil, fmt.Errorf("%s: header length %d exceeds the %d-byte limit", path, n, maxHeaderSize)
	}
	if int64(n) > size-8 {
		return nil, fmt.Errorf("%s: header length %d exceeds the file size %d", path, n, size)
	}
	dataOff := 8 + int64(n)
	entries, metadata, err := ParseHeader(data[8:dataOff], size-dataOff)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	f := &File{
		path:     path,
		data:     data,
		dataOff:  dataOff,
		entries:  make(map[string]Entry, len(entries)),
		metadata: metadata,
	}
	for _, e := range entries {
		f.entries[e.Name] = e
		f.names = append(f.names, e.Name)
	}
	slices.Sort(f.names)
	return f, nil
}

// Path returns the path the file was opened with.
func (f *File) Path() string { return f.path }

// Names returns the tensor names, sorted.
func (f *File) Names() []string { return slices.Clone(f.names) }

// Metadata returns a copy of the header's __metadata__ (empty if absent).
func (f *File) Metadata() map[string]string {
	m := make(map[string]string, len(f.metadata))
	maps.Copy(m, f.metadata)
	return m
}

// Tensor returns the named tensor; its Data aliases the mapping and is
// valid until Close.
func (f *File) Tensor(name string) (*Tensor, error) {
	if f.data == nil {
		return nil, fmt.Errorf("%s: file is closed", f.path)
	}
	e, ok := f.entries[name]
	if !ok {
		return nil, fmt.Errorf("%s: no tensor %s", f.path, name)
	}
	lo, hi := f.dataOff+e.Begin, f.dataOff+e.End
	return &Tensor{
		Name:  name,
		DType: e.DType,
		Shape: slices.Clone(e.Shape),
		// Cap the slice so an append cannot touch the neighbouring tensor.
		Data: f.data[lo:hi:hi],
		File: f.path,
	}, nil
}

// Prefault maps every page of the file into the process ahead of use (see
// prefault), so the first pass over its tensors takes no page faults. It
// must not run concurrently with Close.
func (f *File) Prefault() error {
	if f.data == nil {
		return fmt.Errorf("%s: prefault of a closed file", f.path)
	}
	if err := prefault(f.data); err != nil {
		return fmt.Errorf("%s: mapping the pages: %w", f.path, err)
	}
	return nil
}

// Close unmaps the file. Tensors obtained from it must no longer be used.
// Closing twice is harmless.
func (f *File) Close() error {
	if f.data == nil {
		return nil
	}
	f.data = nil
	if err := f.unmap(); err != nil {
		return fmt.Errorf("%s: %w", f.path, err)
	}
	return nil
}
