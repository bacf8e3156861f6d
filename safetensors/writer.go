package safetensors

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"unicode/utf8"
)

// TensorInfo declares one tensor for Create.
type TensorInfo struct {
	Name  string
	DType DType
	Shape []int
}

// Writer streams a safetensors file. All tensors are declared up front,
// because the header holds every offset, and their data is then written in
// declared order, so a large model never has to sit in memory.
//
// Typical use: w, err := Create(...); defer w.Abort(); w.Write(...)...;
// return w.Close(). Abort after a successful Close does nothing.
type Writer struct {
	path    string // final path
	tmp     string // path being written, renamed to path on Close
	f       *os.File
	bw      *bufio.Writer
	tensors []TensorInfo
	sizes   []int64
	next    int   // index of the next tensor to write
	err     error // first I/O error; the file is unusable after it
}

// Create starts writing a safetensors file with the given tensors and
// metadata. Data goes to path+".tmp", which Close renames to path.
func Create(path string, tensors []TensorInfo, metadata map[string]string) (*Writer, error) {
	header, sizes, err := buildHeader(tensors, metadata)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	w := &Writer{path: path, tmp: path + ".tmp", tensors: tensors, sizes: sizes}
	if w.f, err = os.Create(w.tmp); err != nil {
		return nil, err
	}
	w.bw = bufio.NewWriterSize(w.f, 1<<20)
	var n [8]byte
	binary.LittleEndian.PutUint64(n[:], uint64(len(header)))
	w.bw.Write(n[:]) // bufio keeps the first error, so checking the next write is enough
	if _, err := w.bw.Write(header); err != nil {
		w.Abort()
		return nil, err
	}
	return w, nil
}

// headerEntry is one tensor in the header, fields in the usual order.
type headerEntry struct {
	DType       DType    `json:"dtype"`
	Shape       []int    `json:"shape"`
	DataOffsets [2]int64 `json:"data_offsets"`
}

// buildHeader lays the tensors out contiguously in declared order and
// returns the padded JSON header and each tensor's byte size.
func buildHeader(tensors []TensorInfo, metadata map[string]string) ([]byte, []int64, error) {
	var buf bytes.Buffer
	buf.WriteByte('{')
	if len(metadata) > 0 {
		m, err := json.Marshal(metadata)
		if err != nil {
			return nil, nil, err
		}
		fmt.Fprintf(&buf, "%q:%s", metadataKey, m)
	}
	sizes := make([]int64, len(tensors))
	seen := map[string]bool{}
	var off int64
	for i, t := range tensors {
		if t.Name == metadataKey || seen[t.Name] {
			return nil, nil, fmt.Errorf("tensor %s: duplicate or reserved name", t.Name)
		}
		seen[t.Name] = true
		if !utf8.ValidString(t.Name) {
			// JSON would replace the bad bytes, and the name would not read back.
			return nil, nil, fmt.Errorf("tensor %q: name is not valid UTF-8", t.Name)
		}
		if t.DType.Size() == 0 {
			return nil, nil, fmt.Errorf("tensor %s: unknown dtype %q", t.Name, t.DType)
		}
		shape := []int{} // a nil shape would marshal as null
		for _, d := range t.Shape {
			if d < 0 {
				return nil, nil, fmt.Errorf("tensor %s: negative dimension in shape %v", t.Name, t.Shape)
			}
			shape = append(shape, d)
		}
		n, ok := byteSize(t.DType, shape)
		if !ok || n > math.MaxInt64-off {
			return nil, nil, fmt.Errorf("tensor %s: shape %v is too large", t.Name, t.Shape)
		}
		sizes[i] = n
		name, err := json.Marshal(t.Name)
		if err != nil {
			return nil, nil, err
		}
		ent, err := json.Marshal(headerEntry{t.DType, shape, [2]int64{off, off + n}})
		if err != nil {
			return nil, nil, err
		}
		if buf.Len() > 1 {
			buf.WriteByte(',')
		}
		buf.Write(name)
		buf.WriteByte(':')
		buf.Write(ent)
		off += n
	}
	buf.WriteByte('}')
	// Pad with spaces (valid JSON whitespace) so the data section starts
	// 8-byte aligned, as the Hugging Face writer does.
	for buf.Len()%8 != 0 {
		buf.WriteByte(' ')
	}
	return buf.Bytes(), sizes, nil
}

// Write writes the data of the next declared tensor; name and byte length
// must match the declaration.
func (w *Writer) Write(name string, data []byte) error {
	switch {
	case w.f == nil:
		return fmt.Errorf("%s: write to a closed writer", w.path)
	case w.err != nil:
		return w.err
	case w.next >= len(w.tensors):
		return fmt.Errorf("%s: tensor %s: all %d declared tensors are already written", w.path, name, len(w.tensors))
	case name != w.tensors[w.next].Name:
		return fmt.Errorf("%s: tensor %s written out of order, want %s next", w.path, name, w.tensors[w.next].Name)
	case int64(len(data)) != w.sizes[w.next]:
		return fmt.Errorf("%s: tensor %s: got %d bytes, want %d", w.path, name, len(data), w.sizes[w.next])
	}
	if _, err := w.bw.Write(data); err != nil {
		w.err = fmt.Errorf("%s: %w", w.tmp, err)
		return w.err
	}
	w.next++
	return nil
}

// Close finishes the file: it fails (and removes the temporary file) unless
// every declared tensor was written, then syncs and renames it into place.
func (w *Writer) Close() error {
	if w.f == nil {
		return fmt.Errorf("%s: writer already closed", w.path)
	}
	err := w.err
	if err == nil && w.next < len(w.tensors) {
		err = fmt.Errorf("%s: only %d of %d tensors written, next is %s",
			w.path, w.next, len(w.tensors), w.tensors[w.next].Name)
	}
	if err == nil {
		err = w.bw.Flush()
	}
	if err == nil {
		err = w.f.Sync() // the data must be on disk before the rename makes it visible
	}
	if err != nil {
		w.Abort()
		return err
	}
	err = w.f.Close()
	w.f = nil
	if err == nil {
		err = os.Rename(w.tmp, w.path)
	}
	if err != nil {
		os.Remove(w.tmp)
	}
	return err
}

// Abort discards the file being written. It does nothing after Close.
func (w *Writer) Abort() {
	if w.f == nil {
		return
	}
	w.f.Close()
	w.f = nil
	os.Remove(w.tmp)
}

// WriteIndex writes dir/model.safetensors.index.json the way Hugging Face
// does: {"metadata": {"total_size": N, ...}, "weight_map": {tensor: file}}.
func WriteIndex(dir string, weightMap map[string]string, totalSize int64, metadata map[string]string) error {
	meta := map[string]any{}
	for k, v := range metadata {
		meta[k] = v
	}
	meta["total_size"] = totalSize
	if weightMap == nil {
		weightMap = map[string]string{} // {} rather than null
	}
	b, err := json.MarshalIndent(struct {
		Metadata  map[string]any    `json:"metadata"`
		WeightMap map[string]string `json:"weight_map"`
	}{meta, weightMap}, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(filepath.Join(dir, indexName), append(b, '\n'))
}

// writeFileAtomic writes via a temporary file and a rename so that readers
// never see a half-written file.
func writeFileAtomic(path string, data []byte) error {
	tmp := path + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
	}
	return err
}
