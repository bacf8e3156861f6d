package format

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mmfp4/mmfp4/safetensors"
)

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestReadHeaderErrors(t *testing.T) {
	good := `{"format":"mmfp4","version":1,"group_size":128,"layout":"nk-rowmajor-lownibble","scale_type":"F8_E4M3","quantizer":"rtn","source_dtype":"BF16","tensors":[]}`
	cases := map[string]string{
		"":           good,
		"format":     strings.Replace(good, `"mmfp4"`, `"gguf"`, 1),
		"version":    strings.Replace(good, `"version":1`, `"version":2`, 1),
		"group_size": strings.Replace(good, `"group_size":128`, `"group_size":48`, 1),
		"layout":     strings.Replace(good, `nk-rowmajor-lownibble`, `kn`, 1),
		"scale_type": strings.Replace(good, `F8_E4M3`, `F16`, 1),
	}
	for field, content := range cases {
		dir := t.TempDir()
		writeFile(t, filepath.Join(dir, HeaderFile), content)
		if !IsMMFP4Dir(dir) {
			t.Errorf("%s: IsMMFP4Dir false", field)
		}
		_, err := ReadHeader(dir)
		switch {
		case field == "" && err != nil:
			t.Errorf("good header rejected: %v", err)
		case field != "" && (err == nil || !strings.Contains(err.Error(), HeaderFile) || !strings.Contains(err.Error(), field)):
			t.Errorf("bad %s: err = %v", field, err)
		}
	}
	if IsMMFP4Dir(t.TempDir()) {
		t.Error("IsMMFP4Dir true for an empty directory")
	}
}

func TestMatrixFromTensorsErrors(t *testing.T) {
	mk := func(name string, dtype safetensors.DType, shape ...int) *safetensors.Tensor {
		n := 1
		for _, d := range shape {
			n *= d
		}
		return &safetensors.Tensor{Name: name, DType: dtype, Shape: shape, Data: make([]byte, n*dtype.Size()), File: "shard.safetensors"}
	}
	q := mk("w.qweight", safetensors.U8, 4, 32)
	s := mk("w.scales", safetensors.F8E4M3, 4, 2)
	r := mk("w.row_scale", safetensors.F32, 4)
	m, err := MatrixFromTensors(q, s, r, 32)
	if err != nil {
		t.Fatal(err)
	}
	if m.N != 4 || m.K != 64 || &m.Codes[0] != &q.Data[0] || &m.Scales[0] != &s.Data[0] {
		t.Errorf("matrix %dx%d, or its codes/scales are copies", m.N, m.K)
	}
	bad := []struct {
		q, s, r *safetensors.Tensor
		g       int
		tensor  string
	}{
		{mk("w.qweight", safetensors.I8, 4, 32), s, r, 32, "w.qweight"},
		{mk("w.qweight", safetensors.U8, 128), s, r, 32, "w.qweight"},
		{q, mk("w.scales", safetensors.U8, 4, 2), r, 32, "w.scales"},
		{q, mk("w.scales", safetensors.F8E4M3, 4, 3), r, 32, "w.scales"},
		{q, s, mk("w.row_scale", safetensors.BF16, 4), 32, "w.row_scale"},
		{q, s, mk("w.row_scale", safetensors.F32, 5), 32, "w.row_scale"},
		{q, s, r, 128, "w.qweight"},
	}
	for i, c := range bad {
		_, err := MatrixFromTensors(c.q, c.s, c.r, c.g)
		if err == nil || !strings.Contains(err.Error(), "shard.safetensors") || !strings.Contains(err.Error(), c.tensor) {
			t.Errorf("case %d: err = %v, want one naming shard.safetensors and %s", i, err, c.tensor)
		}
	}
}
