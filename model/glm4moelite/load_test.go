package glm4moelite

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mmfp4/mmfp4/backend/cpu"
	"github.com/mmfp4/mmfp4/safetensors"
)

// rewriteFixture copies the fixture into a temp dir, letting edit change,
// drop (return nil info) or add tensors.
func rewriteFixture(t *testing.T, edit func(info safetensors.TensorInfo, data []byte) (*safetensors.TensorInfo, []byte), extra map[string][]float32) string {
	t.Helper()
	dir := t.TempDir()
	copyFile(t, filepath.Join(fixtureDir, "config.json"), filepath.Join(dir, "config.json"))
	src, err := safetensors.Open(filepath.Join(fixtureDir, "model.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	var infos []safetensors.TensorInfo
	var datas [][]byte
	for _, n := range src.Names() {
		tn, _ := src.Tensor(n)
		info, data := edit(safetensors.TensorInfo{Name: n, DType: tn.DType, Shape: tn.Shape}, tn.Data)
		if info != nil {
			infos = append(infos, *info)
			datas = append(datas, data)
		}
	}
	for name, v := range extra {
		b := make([]byte, 4*len(v))
		infos = append(infos, safetensors.TensorInfo{Name: name, DType: safetensors.F32, Shape: []int{len(v)}})
		datas = append(datas, b)
	}
	w, err := safetensors.Create(filepath.Join(dir, "model.safetensors"), infos, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i, info := range infos {
		if err := w.Write(info.Name, datas[i]); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return dir
}

func keep(info safetensors.TensorInfo, data []byte) (*safetensors.TensorInfo, []byte) {
	return &info, data
}

func TestLoadSkipsMTPLayers(t *testing.T) {
	dir := rewriteFixture(t, keep, map[string][]float32{
		"model.layers.4.eh_proj.weight":         make([]float32, 8),
		"model.layers.4.input_layernorm.weight": make([]float32, 3), // wrong size: would fail if read
	})
	if _, err := Load(dir, cpu.New(cpu.Options{}), LoadOptions{}); err != nil {
		t.Fatalf("MTP tensors broke the load: %v", err)
	}
}

func TestLoadErrorsNameFileAndTensor(t *testing.T) {
	const victim = "model.layers.1.self_attn.kv_b_proj.weight"
	cases := []struct {
		name string
		edit func(info safetensors.TensorInfo, data []byte) (*safetensors.TensorInfo, []byte)
		want []string
	}{
		{"missing", func(info safetensors.TensorInfo, data []byte) (*safetensors.TensorInfo, []byte) {
			if info.Name == victim {
				return nil, nil
			}
			return &info, data
		}, []string{victim, "not found"}},
		{"shape", func(info safetensors.TensorInfo, data []byte) (*safetensors.TensorInfo, []byte) {
			if info.Name == victim {
				info.Shape = []int{info.Shape[1], info.Shape[0]}
			}
			return &info, data
		}, []string{victim, "model.safetensors", "shape [128 256], want [256 128]"}},
		{"dtype", func(info safetensors.TensorInfo, data []byte) (*safetensors.TensorInfo, []byte) {
			if info.Name == victim {
				info.DType = safetensors.I16
			}
			return &info, data
		}, []string{victim, "model.safetensors", "I16"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := rewriteFixture(t, tc.edit, nil)
			_, err := Load(dir, cpu.New(cpu.Options{}), LoadOptions{})
			if err == nil {
				t.Fatal("loaded")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
}

func TestLoadTruncatedFile(t *testing.T) {
	dir := t.TempDir()
	copyFile(t, filepath.Join(fixtureDir, "config.json"), filepath.Join(dir, "config.json"))
	data, err := os.ReadFile(filepath.Join(fixtureDir, "model.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	for _, cut := range []int{4, 100, len(data) / 2, len(data) - 1} {
		if err := os.WriteFile(filepath.Join(dir, "model.safetensors"), data[:cut], 0o644); err != nil {
			t.Fatal(err)
		}
		_, err := Load(dir, cpu.New(cpu.Options{}), LoadOptions{})
		if err == nil || !strings.Contains(err.Error(), "model.safetensors") {
			t.Errorf("cut at %d: error %v does not name the file", cut, err)
		}
	}
}
