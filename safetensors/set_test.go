package safetensors

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func openDirT(t *testing.T, dir string) *Set {
	t.Helper()
	s, err := OpenDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func wantErr(t *testing.T, err error, subs ...string) {
	t.Helper()
	if err == nil {
		t.Errorf("no error, want one mentioning %q", subs)
		return
	}
	for _, s := range subs {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error %q does not mention %q", err, s)
		}
	}
}

func TestOpenDirSharded(t *testing.T) {
	dir := t.TempDir()
	shard1 := []testTensor{tensor("embed", BF16, 1, 4, 2), tensor("layer.0.w", F32, 2, 3)}
	shard2 := []testTensor{tensor("layer.1.w", F32, 3, 3), tensor("norm", F16, 4)}
	writeTensors(t, filepath.Join(dir, "model-00001-of-00002.safetensors"), shard1, map[string]string{"format": "pt", "a": "1"})
	writeTensors(t, filepath.Join(dir, "model-00002-of-00002.safetensors"), shard2, map[string]string{"format": "pt", "b": "2"})
	// Not in the index, so it must be ignored (it would clash otherwise).
	writeTensors(t, filepath.Join(dir, "stray.safetensors"), []testTensor{tensor("embed", U8, 5, 1)}, nil)
	wm := map[string]string{
		"embed":     "model-00001-of-00002.safetensors",
		"layer.0.w": "model-00001-of-00002.safetensors",
		"layer.1.w": "model-00002-of-00002.safetensors",
		"norm":      "model-00002-of-00002.safetensors",
	}
	if err := WriteIndex(dir, wm, 1234, nil); err != nil {
		t.Fatal(err)
	}

	s := openDirT(t, dir)
	if got, want := s.Names(), []string{"embed", "layer.0.w", "layer.1.w", "norm"}; !slices.Equal(got, want) {
		t.Errorf("Names() = %v, want %v", got, want)
	}
	for _, tt := range append(shard1, shard2...) {
		if !s.Has(tt.info.Name) {
			t.Errorf("Has(%q) = false", tt.info.Name)
		}
		x, err := s.Tensor(tt.info.Name)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(x.Data, tt.data) || x.DType != tt.info.DType || !slices.Equal(x.Shape, tt.info.Shape) {
			t.Errorf("tensor %s differs", tt.info.Name)
		}
		if want := filepath.Join(dir, wm[tt.info.Name]); x.File != want {
			t.Errorf("tensor %s: File = %q, want %q", tt.info.Name, x.File, want)
		}
	}
	if s.Has("missing") {
		t.Error(`Has("missing") = true`)
	}
	_, err := s.Tensor("missing")
	wantErr(t, err, "missing", dir)
	if got := s.Metadata(); len(got) != 3 || got["format"] != "pt" || got["a"] != "1" || got["b"] != "2" {
		t.Errorf("Metadata() = %v", got)
	}
	if err := s.Close(); err != nil {
		t.Error(err)
	}
}

func TestWriteIndex(t *testing.T) {
	dir := t.TempDir()
	wm := map[string]string{"a": "s1.safetensors", "b": "s2.safetensors"}
	if err := WriteIndex(dir, wm, 1<<40, map[string]string{"format": "pt"}); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(filepath.Join(dir, "model.safetensors.index.json"))
	if err != nil {
		t.Fatal(err)
	}
	var idx struct {
		Metadata  map[string]any    `json:"metadata"`
		WeightMap map[string]string `json:"weight_map"`
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	if err := dec.Decode(&idx); err != nil {
		t.Fatal(err)
	}
	if n, ok := idx.Metadata["total_size"].(json.Number); !ok || n.String() != "1099511627776" {
		t.Errorf("total_size = %#v, want the number 1099511627776", idx.Metadata["total_size"])
	}
	if idx.Metadata["format"] != "pt" || len(idx.Metadata) != 2 {
		t.Errorf("metadata = %v", idx.Metadata)
	}
	if len(idx.WeightMap) != 2 || idx.WeightMap["a"] != "s1.safetensors" || idx.WeightMap["b"] != "s2.safetensors" {
		t.Errorf("weight_map = %v", idx.WeightMap)
	}
	if _, err := os.Stat(filepath.Join(dir, "model.safetensors.index.json.tmp")); err == nil {
		t.Error("temporary index file left behind")
	}
}

func TestOpenDirNoIndex(t *testing.T) {
	dir := t.TempDir()
	a := []testTensor{tensor("x", I8, 1, 3), tensor("y", I16, 2, 2, 2)}
	b := []testTensor{tensor("z", I64, 3)}
	writeTensors(t, filepath.Join(dir, "b.safetensors"), b, map[string]string{"k": "from b"})
	writeTensors(t, filepath.Join(dir, "a.safetensors"), a, map[string]string{"k": "from a", "only": "a"})
	os.WriteFile(filepath.Join(dir, "config.json"), []byte(`{}`), 0o644)
	os.Mkdir(filepath.Join(dir, "sub.safetensors"), 0o755)

	s := openDirT(t, dir)
	if got, want := s.Names(), []string{"x", "y", "z"}; !slices.Equal(got, want) {
		t.Errorf("Names() = %v, want %v", got, want)
	}
	for _, tt := range append(a, b...) {
		x, err := s.Tensor(tt.info.Name)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(x.Data, tt.data) {
			t.Errorf("tensor %s differs", tt.info.Name)
		}
	}
	// Files are taken in sorted order, so b's value wins.
	if got := s.Metadata(); got["k"] != "from b" || got["only"] != "a" {
		t.Errorf("Metadata() = %v", got)
	}
}

func TestOpenDirDuplicate(t *testing.T) {
	dir := t.TempDir()
	writeTensors(t, filepath.Join(dir, "a.safetensors"), []testTensor{tensor("w", U8, 1, 1)}, nil)
	writeTensors(t, filepath.Join(dir, "b.safetensors"), []testTensor{tensor("w", U8, 2, 1)}, nil)
	_, err := OpenDir(dir)
	wantErr(t, err, "w", "a.safetensors", "b.safetensors")
}

func TestOpenDirEmpty(t *testing.T) {
	dir := t.TempDir()
	_, err := OpenDir(dir)
	wantErr(t, err, dir)
}

func TestOpenDirIndexErrors(t *testing.T) {
	writeIndex := func(t *testing.T, dir, content string) string {
		path := filepath.Join(dir, "model.safetensors.index.json")
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return path
	}
	t.Run("missing shard", func(t *testing.T) {
		dir := t.TempDir()
		writeTensors(t, filepath.Join(dir, "s1.safetensors"), []testTensor{tensor("a", U8, 1, 1)}, nil)
		idx := writeIndex(t, dir, `{"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}`)
		_, err := OpenDir(dir)
		wantErr(t, err, idx, "s2.safetensors")
	})
	t.Run("tensor not in its shard", func(t *testing.T) {
		dir := t.TempDir()
		writeTensors(t, filepath.Join(dir, "s1.safetensors"), []testTensor{tensor("a", U8, 1, 1)}, nil)
		writeTensors(t, filepath.Join(dir, "s2.safetensors"), []testTensor{tensor("b", U8, 1, 1)}, nil)
		idx := writeIndex(t, dir, `{"weight_map": {"a": "s2.safetensors", "b": "s2.safetensors"}}`)
		_, err := OpenDir(dir)
		wantErr(t, err, idx, "tensor a", "s2.safetensors")
	})
	t.Run("corrupt shard", func(t *testing.T) {
		dir := t.TempDir()
		os.WriteFile(filepath.Join(dir, "s1.safetensors"), []byte("garbage"), 0o644)
		idx := writeIndex(t, dir, `{"weight_map": {"a": "s1.safetensors"}}`)
		_, err := OpenDir(dir)
		wantErr(t, err, idx, "s1.safetensors", "short")
	})
	t.Run("escaping path", func(t *testing.T) {
		dir := t.TempDir()
		idx := writeIndex(t, dir, `{"weight_map": {"a": "../s1.safetensors"}}`)
		_, err := OpenDir(dir)
		wantErr(t, err, idx, "../s1.safetensors")
	})
	t.Run("bad json", func(t *testing.T) {
		dir := t.TempDir()
		idx := writeIndex(t, dir, `{"weight_map": `)
		_, err := OpenDir(dir)
		wantErr(t, err, idx)
	})
	t.Run("no weight_map", func(t *testing.T) {
		dir := t.TempDir()
		idx := writeIndex(t, dir, `{"metadata": {}}`)
		_, err := OpenDir(dir)
		wantErr(t, err, idx, "weight_map")
	})
}
