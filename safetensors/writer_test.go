package safetensors

import (
	"bytes"
	"math"
	"os"
	"path/filepath"
	"testing"
)

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

func TestWriterRejectsBadWrites(t *testing.T) {
	path := filepath.Join(t.TempDir(), "w.safetensors")
	a, b := tensor("a", F32, 1, 2), tensor("b", BF16, 2, 3)
	w, err := Create(path, []TensorInfo{a.info, b.info}, map[string]string{"k": "v"})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Abort()
	if !exists(path + ".tmp") {
		t.Error("no temporary file while writing")
	}
	wantErr(t, w.Write("b", b.data), path, "b")       // out of order
	wantErr(t, w.Write("c", b.data), path, "c")       // undeclared
	wantErr(t, w.Write("a", a.data[:7]), path, "a")   // short
	wantErr(t, w.Write("a", append(a.data, 0)), path) // long
	// Rejected writes do not advance the writer.
	if err := w.Write("a", a.data); err != nil {
		t.Fatal(err)
	}
	wantErr(t, w.Write("a", a.data), path) // a again
	if err := w.Write("b", b.data); err != nil {
		t.Fatal(err)
	}
	wantErr(t, w.Write("b", b.data), path) // past the end
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if exists(path + ".tmp") {
		t.Error("temporary file left after Close")
	}
	f := openT(t, path)
	for _, tt := range []testTensor{a, b} {
		x, err := f.Tensor(tt.info.Name)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(x.Data, tt.data) {
			t.Errorf("tensor %s differs", tt.info.Name)
		}
	}
	if f.Metadata()["k"] != "v" {
		t.Errorf("Metadata() = %v", f.Metadata())
	}
	w.Abort() // after Close: must not remove the finished file
	if !exists(path) {
		t.Error("Abort after Close removed the file")
	}
	wantErr(t, w.Write("a", a.data), path)
	wantErr(t, w.Close(), path)
}

func TestWriterUnfinishedClose(t *testing.T) {
	path := filepath.Join(t.TempDir(), "w.safetensors")
	a, b := tensor("a", U8, 1, 2), tensor("b", U8, 2, 3)
	w, err := Create(path, []TensorInfo{a.info, b.info}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Write("a", a.data); err != nil {
		t.Fatal(err)
	}
	wantErr(t, w.Close(), path, "b")
	if exists(path) || exists(path+".tmp") {
		t.Error("unfinished Close left a file behind")
	}
}

func TestWriterAbort(t *testing.T) {
	path := filepath.Join(t.TempDir(), "w.safetensors")
	a := tensor("a", U8, 1, 2)
	w, err := Create(path, []TensorInfo{a.info}, nil)
	if err != nil {
		t.Fatal(err)
	}
	w.Abort()
	w.Abort()
	if exists(path) || exists(path+".tmp") {
		t.Error("Abort left a file behind")
	}
	wantErr(t, w.Write("a", a.data), path)
}

func TestWriterReplacesExisting(t *testing.T) {
	path := filepath.Join(t.TempDir(), "w.safetensors")
	writeTensors(t, path, []testTensor{tensor("old", U8, 1, 2)}, nil)
	writeTensors(t, path, []testTensor{tensor("new", U8, 1, 2)}, nil)
	f := openT(t, path)
	if names := f.Names(); len(names) != 1 || names[0] != "new" {
		t.Errorf("Names() = %v, want [new]", names)
	}
}

func TestCreateRejectsBadDeclarations(t *testing.T) {
	dir := t.TempDir()
	cases := map[string][]TensorInfo{
		"duplicate": {{"w", U8, []int{1}}, {"w", U8, []int{2}}},
		"reserved":  {{"__metadata__", U8, []int{1}}},
		"dtype":     {{"w", "Q4", []int{1}}},
		"negative":  {{"w", U8, []int{2, -1}}},
		"overflow":  {{"w", F32, []int{math.MaxInt, math.MaxInt, math.MaxInt}}},
		"badutf8":   {{"w\xff", U8, []int{1}}},
	}
	for name, infos := range cases {
		path := filepath.Join(dir, name+".safetensors")
		w, err := Create(path, infos, nil)
		if err == nil {
			w.Abort()
			t.Errorf("%s: Create accepted %v", name, infos)
			continue
		}
		wantErr(t, err, path)
		if exists(path + ".tmp") {
			t.Errorf("%s: temporary file left behind", name)
		}
	}
}

func TestWriterNoTensors(t *testing.T) {
	path := filepath.Join(t.TempDir(), "empty.safetensors")
	writeTensors(t, path, nil, map[string]string{"only": "metadata"})
	f := openT(t, path)
	if len(f.Names()) != 0 || f.Metadata()["only"] != "metadata" {
		t.Errorf("Names() = %v, Metadata() = %v", f.Names(), f.Metadata())
	}
}
