package safetensors

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

type testTensor struct {
	info TensorInfo
	data []byte
}

// pattern returns n deterministic, position-dependent bytes so that
// swapped or shifted tensors are noticed.
func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7) ^ seed
	}
	return b
}

// tensor makes a testTensor whose data has the right length for its shape.
func tensor(name string, dtype DType, seed byte, shape ...int) testTensor {
	n := dtype.Size()
	for _, d := range shape {
		n *= d
	}
	return testTensor{TensorInfo{name, dtype, shape}, pattern(n, seed)}
}

func writeTensors(t *testing.T, path string, ts []testTensor, meta map[string]string) {
	t.Helper()
	infos := make([]TensorInfo, len(ts))
	for i, tt := range ts {
		infos[i] = tt.info
	}
	w, err := Create(path, infos, meta)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Abort()
	for _, tt := range ts {
		if err := w.Write(tt.info.Name, tt.data); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
}

// rawFile writes a file made of a header length, the header and data.
func rawFile(t *testing.T, path, header string, data []byte) {
	t.Helper()
	var b bytes.Buffer
	binary.Write(&b, binary.LittleEndian, uint64(len(header)))
	b.WriteString(header)
	b.Write(data)
	if err := os.WriteFile(path, b.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

func openT(t *testing.T, path string) *File {
	t.Helper()
	f, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func allDTypes() []DType {
	return []DType{BF16, F16, F32, F64, U8, I8, I16, I32, I64, F8E4M3, BOOL}
}

func TestDTypeSize(t *testing.T) {
	want := map[DType]int{BF16: 2, F16: 2, F32: 4, F64: 8, U8: 1, I8: 1, I16: 2, I32: 4, I64: 8, F8E4M3: 1, BOOL: 1, "Q4": 0, "": 0}
	for d, n := range want {
		if got := d.Size(); got != n {
			t.Errorf("%q.Size() = %d, want %d", d, got, n)
		}
	}
}

func TestRoundTrip(t *testing.T) {
	shapes := [][]int{{2, 3}, {}, {0}, {3, 0, 2}, {1, 1, 1, 5}, {7}}
	var ts []testTensor
	for i, d := range allDTypes() {
		for j, s := range shapes {
			ts = append(ts, tensor(fmt.Sprintf("t%d.%s.%d", len(ts), d, j), d, byte(i*16+j), s...))
		}
	}
	path := filepath.Join(t.TempDir(), "all.safetensors")
	meta := map[string]string{"format": "pt", "note": "quotes \" and <html>"}
	writeTensors(t, path, ts, meta)

	f := openT(t, path)
	if f.Path() != path {
		t.Errorf("Path() = %q, want %q", f.Path(), path)
	}
	var names []string
	for _, tt := range ts {
		names = append(names, tt.info.Name)
	}
	slices.Sort(names)
	if got := f.Names(); !slices.Equal(got, names) {
		t.Errorf("Names() = %v, want %v", got, names)
	}
	for _, tt := range ts {
		x, err := f.Tensor(tt.info.Name)
		if err != nil {
			t.Fatal(err)
		}
		if x.Name != tt.info.Name || x.DType != tt.info.DType || x.File != path {
			t.Errorf("tensor %s: got name %q dtype %s file %q", tt.info.Name, x.Name, x.DType, x.File)
		}
		if !slices.Equal(x.Shape, tt.info.Shape) || x.Shape == nil {
			t.Errorf("tensor %s: shape %v, want %v", tt.info.Name, x.Shape, tt.info.Shape)
		}
		if !bytes.Equal(x.Data, tt.data) {
			t.Errorf("tensor %s: data differs", tt.info.Name)
		}
		if want := len(tt.data) / tt.info.DType.Size(); x.NumElements() != want {
			t.Errorf("tensor %s: NumElements() = %d, want %d", tt.info.Name, x.NumElements(), want)
		}
		if err := x.Check(tt.info.DType, tt.info.Shape...); err != nil {
			t.Error(err)
		}
	}
	if got := f.Metadata(); len(got) != len(meta) || got["format"] != "pt" || got["note"] != meta["note"] {
		t.Errorf("Metadata() = %v, want %v", got, meta)
	}
	if _, err := f.Tensor("nope"); err == nil || !strings.Contains(err.Error(), "nope") || !strings.Contains(err.Error(), path) {
		t.Errorf("missing tensor: err = %v", err)
	}
}

// The writer lays tensors out contiguously in declared order, after a
// header padded with spaces to a multiple of 8.
func TestWriterLayout(t *testing.T) {
	ts := []testTensor{
		tensor("z", F32, 1, 3),
		tensor("a", U8, 2, 5),
		tensor("empty", I64, 3, 0, 4),
		tensor("m", BF16, 4, 2, 2),
	}
	path := filepath.Join(t.TempDir(), "layout.safetensors")
	writeTensors(t, path, ts, nil)
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	n := int(binary.LittleEndian.Uint64(raw))
	if n%8 != 0 {
		t.Errorf("header length %d is not a multiple of 8", n)
	}
	header := raw[8 : 8+n]
	trimmed := bytes.TrimRight(header, " ")
	if !bytes.HasSuffix(trimmed, []byte("}")) || len(header)-len(trimmed) >= 8 {
		t.Errorf("header %q is not an object padded with fewer than 8 spaces", header)
	}
	if bytes.Contains(header, []byte("__metadata__")) {
		t.Errorf("empty metadata was written: %s", header)
	}
	entries, _, err := ParseHeader(header, int64(len(raw)-8-n))
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]Entry{}
	for _, e := range entries {
		byName[e.Name] = e
	}
	var off int64
	for _, tt := range ts {
		e := byName[tt.info.Name]
		if e.Begin != off || e.End != off+int64(len(tt.data)) {
			t.Errorf("tensor %s at [%d, %d], want [%d, %d]", e.Name, e.Begin, e.End, off, off+int64(len(tt.data)))
		}
		if !bytes.Equal(raw[8+n+int(e.Begin):8+n+int(e.End)], tt.data) {
			t.Errorf("tensor %s: bytes at its offsets differ", e.Name)
		}
		off = e.End
	}
	if int(off) != len(raw)-8-n {
		t.Errorf("data section is %d bytes, tensors cover %d", len(raw)-8-n, off)
	}
}

func TestFloat32(t *testing.T) {
	want := []float32{1, -2, 0.5, 3.140625}
	bf := []uint16{0x3F80, 0xC000, 0x3F00, 0x4049}
	hf := []uint16{0x3C00, 0xC000, 0x3800, 0x4248} // 0x4248 = 2 * (1 + 584/1024)
	var bfData, hfData, f32Data []byte
	for i := range want {
		bfData = binary.LittleEndian.AppendUint16(bfData, bf[i])
		hfData = binary.LittleEndian.AppendUint16(hfData, hf[i])
		f32Data = binary.LittleEndian.AppendUint32(f32Data, math.Float32bits(want[i]))
	}
	ts := []testTensor{
		{TensorInfo{"bf", BF16, []int{2, 2}}, bfData},
		{TensorInfo{"hf", F16, []int{4}}, hfData},
		{TensorInfo{"f32", F32, []int{4, 1}}, f32Data},
		tensor("ints", I32, 0, 4),
	}
	path := filepath.Join(t.TempDir(), "floats.safetensors")
	writeTensors(t, path, ts, nil)
	f := openT(t, path)
	for _, name := range []string{"bf", "hf", "f32"} {
		x, err := f.Tensor(name)
		if err != nil {
			t.Fatal(err)
		}
		got, err := x.Float32()
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, want) {
			t.Errorf("%s: Float32() = %v, want %v", name, got, want)
		}
	}
	x, err := f.Tensor("ints")
	if err != nil {
		t.Fatal(err)
	}
	_, err = x.Float32()
	for _, s := range []string{path, "ints", "I32"} {
		if err == nil || !strings.Contains(err.Error(), s) {
			t.Errorf("Float32 of I32: err = %v, want it to mention %q", err, s)
		}
	}
}

func TestCheck(t *testing.T) {
	x := &Tensor{Name: "w", DType: BF16, Shape: []int{2, 3}, File: "m.safetensors"}
	if err := x.Check(BF16, 2, 3); err != nil {
		t.Errorf("Check matching: %v", err)
	}
	err := x.Check(F32, 2, 3)
	if want := "m.safetensors: tensor w: dtype BF16, want F32"; err == nil || err.Error() != want {
		t.Errorf("Check dtype: err = %v, want %q", err, want)
	}
	err = x.Check(BF16, 3, 2)
	if want := "m.safetensors: tensor w: shape [2 3], want [3 2]"; err == nil || err.Error() != want {
		t.Errorf("Check shape: err = %v, want %q", err, want)
	}
	if err := x.Check(BF16, 2, 3, 1); err == nil {
		t.Error("Check with an extra dimension passed")
	}
	scalar := &Tensor{Name: "s", DType: F32, Shape: []int{}}
	if err := scalar.Check(F32); err != nil {
		t.Errorf("scalar Check: %v", err)
	}
	if scalar.NumElements() != 1 {
		t.Errorf("scalar NumElements() = %d, want 1", scalar.NumElements())
	}
}

// Every invalid header is rejected, and the error says which file and,
// where there is one, which tensor.
func TestRejectHeader(t *testing.T) {
	data := make([]byte, 32)
	cases := []struct {
		name, header string
		want         []string // substrings of the error besides the path
	}{
		{"notjson", `{"a": {"dtype": "F32"`, []string{"JSON"}},
		{"trailing", `{} x`, []string{"JSON"}},
		{"array", `[1, 2]`, []string{"object"}},
		{"string", `"hello"`, []string{"object"}},
		{"empty", ``, []string{"JSON"}},
		{"entrynotobject", `{"w": 5}`, []string{"w"}},
		{"nodtype", `{"w": {"shape": [2], "data_offsets": [0, 8]}}`, []string{"w", "dtype"}},
		{"noshape", `{"w": {"dtype": "F32", "data_offsets": [0, 8]}}`, []string{"w", "shape"}},
		{"nooffsets", `{"w": {"dtype": "F32", "shape": [2]}}`, []string{"w", "data_offsets"}},
		{"nulloffsets", `{"w": {"dtype": "F32", "shape": [2], "data_offsets": null}}`, []string{"w", "data_offsets"}},
		{"unknowndtype", `{"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}`, []string{"w", "Q4"}},
		{"negdim", `{"w": {"dtype": "U8", "shape": [-2, -4], "data_offsets": [0, 8]}}`, []string{"w", "negative"}},
		{"fracdim", `{"w": {"dtype": "U8", "shape": [1.5], "data_offsets": [0, 1]}}`, []string{"w"}},
		{"sizemismatch", `{"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}`, []string{"w", "shape"}},
		// 2^62 * 4 * 4 bytes wraps to 0 in 64-bit arithmetic.
		{"overflow", `{"w": {"dtype": "F32", "shape": [4611686018427387904, 4], "data_offsets": [0, 0]}}`, []string{"w"}},
		{"beginafterend", `{"w": {"dtype": "U8", "shape": [0], "data_offsets": [8, 4]}}`, []string{"w", "begin"}},
		{"negbegin", `{"w": {"dtype": "U8", "shape": [4], "data_offsets": [-4, 0]}}`, []string{"w", "negative"}},
		{"threeoffsets", `{"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4, 8]}}`, []string{"w", "data_offsets"}},
		{"pastend", `{"w": {"dtype": "F32", "shape": [10], "data_offsets": [0, 40]}}`, []string{"w", "40"}},
		{"overlap", `{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}`, []string{"overlap", "a", "b"}},
		{"overlapreversed", `{"b": {"dtype": "U8", "shape": [8], "data_offsets": [16, 24]}, "a": {"dtype": "U8", "shape": [20], "data_offsets": [0, 20]}}`, []string{"overlap"}},
		{"emptyinside", `{"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}, "z": {"dtype": "U8", "shape": [0], "data_offsets": [4, 4]}}`, []string{"overlap", "z"}},
		{"duplicate", `{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "w": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}`, []string{"duplicate", "w"}},
		{"metanumber", `{"__metadata__": {"k": 1}}`, []string{"__metadata__", "k"}},
		{"metanull", `{"__metadata__": {"k": null}}`, []string{"__metadata__", "k"}},
		{"metaobject", `{"__metadata__": {"k": {"x": "y"}}}`, []string{"__metadata__", "k"}},
		{"metastring", `{"__metadata__": "k"}`, []string{"__metadata__"}},
	}
	dir := t.TempDir()
	for _, c := range cases {
		path := filepath.Join(dir, "bad_"+c.name+".safetensors")
		rawFile(t, path, c.header, data)
		f, err := Open(path)
		if err == nil {
			f.Close()
			t.Errorf("%s: Open accepted %s", c.name, c.header)
			continue
		}
		for _, s := range append([]string{path}, c.want...) {
			if !strings.Contains(err.Error(), s) {
				t.Errorf("%s: error %q does not mention %q", c.name, err, s)
			}
		}
	}
}

func TestAcceptHeader(t *testing.T) {
	data := pattern(32, 9)
	cases := []struct{ name, header string }{
		{"gaps", `{"a": {"dtype": "U8", "shape": [8], "data_offsets": [8, 16]}, "b": {"dtype": "U8", "shape": [4], "data_offsets": [20, 24]}}`},
		{"emptyatboundary", `{"b": {"dtype": "U8", "shape": [8], "data_offsets": [8, 16]}, "z": {"dtype": "U8", "shape": [0], "data_offsets": [8, 8]}, "a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}}`},
		{"emptyatend", `{"z": {"dtype": "F64", "shape": [3, 0], "data_offsets": [32, 32]}}`},
		{"nometadata", `{"__metadata__": null}`},
		{"nothing", `{}`},
	}
	dir := t.TempDir()
	for _, c := range cases {
		path := filepath.Join(dir, c.name+".safetensors")
		rawFile(t, path, c.header, data)
		f, err := Open(path)
		if err != nil {
			t.Errorf("%s: %v", c.name, err)
			continue
		}
		f.Close()
	}
	// Tensor data comes from the right place despite gaps.
	path := filepath.Join(dir, "gaps.safetensors")
	f := openT(t, path)
	b, err := f.Tensor("b")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b.Data, data[20:24]) {
		t.Errorf("tensor b = %v, want %v", b.Data, data[20:24])
	}
}

func TestRejectFraming(t *testing.T) {
	dir := t.TempDir()
	check := func(path string, want string) {
		t.Helper()
		f, err := Open(path)
		if err == nil {
			f.Close()
			t.Errorf("Open(%s) succeeded", path)
			return
		}
		if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), want) {
			t.Errorf("Open(%s): error %q does not mention the file and %q", path, err, want)
		}
	}

	short := filepath.Join(dir, "short.safetensors")
	os.WriteFile(short, []byte{2, 0, 0, 0, 0}, 0o644)
	check(short, "short")

	empty := filepath.Join(dir, "empty.safetensors")
	os.WriteFile(empty, nil, 0o644)
	check(empty, "short")

	long := filepath.Join(dir, "longheader.safetensors")
	var b []byte
	b = binary.LittleEndian.AppendUint64(b, 1000)
	b = append(b, "{}"...)
	os.WriteFile(long, b, 0o644)
	check(long, "file size")

	huge := filepath.Join(dir, "hugelength.safetensors")
	os.WriteFile(huge, binary.LittleEndian.AppendUint64(nil, math.MaxUint64), 0o644)
	check(huge, "limit")

	// A header length over the limit is rejected even when the file is
	// big enough to hold it (sparse, so this costs no disk).
	absurd := filepath.Join(dir, "absurd.safetensors")
	os.WriteFile(absurd, binary.LittleEndian.AppendUint64(nil, 150<<20), 0o644)
	if err := os.Truncate(absurd, 200<<20); err != nil {
		t.Fatal(err)
	}
	check(absurd, "limit")
}

// Cutting a valid file anywhere gives an error, never a panic.
func TestTruncated(t *testing.T) {
	dir := t.TempDir()
	full := filepath.Join(dir, "full.safetensors")
	writeTensors(t, full, []testTensor{
		tensor("a", F32, 1, 2, 3),
		tensor("empty", BF16, 2, 0),
		tensor("b", U8, 3, 5),
	}, map[string]string{"k": "v"})
	raw, err := os.ReadFile(full)
	if err != nil {
		t.Fatal(err)
	}
	for cut := range len(raw) {
		path := filepath.Join(dir, fmt.Sprintf("cut%d.safetensors", cut))
		if err := os.WriteFile(path, raw[:cut], 0o644); err != nil {
			t.Fatal(err)
		}
		f, err := Open(path)
		if err == nil {
			f.Close()
			t.Errorf("file cut to %d of %d bytes was accepted", cut, len(raw))
		} else if !strings.Contains(err.Error(), path) {
			t.Errorf("cut %d: error %q does not name the file", cut, err)
		}
	}
}

func TestClose(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.safetensors")
	writeTensors(t, path, []testTensor{tensor("a", U8, 1, 4)}, nil)
	f, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := f.Tensor("a"); err == nil {
		t.Error("Tensor after Close succeeded")
	}
}

func TestOpenMissing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "missing.safetensors")
	if _, err := Open(path); err == nil || !strings.Contains(err.Error(), path) {
		t.Errorf("Open of a missing file: err = %v", err)
	}
}
