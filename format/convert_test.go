package format

import (
	"encoding/binary"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/mmfp4/mmfp4/safetensors"
)

type srcTensor struct {
	name  string
	dtype safetensors.DType
	shape []int
	vals  []float32
}

func (s srcTensor) bytes() []byte {
	var b []byte
	for _, v := range s.vals {
		switch s.dtype {
		case safetensors.BF16:
			b = binary.LittleEndian.AppendUint16(b, safetensors.Float32ToBF16(v))
		case safetensors.F16:
			b = binary.LittleEndian.AppendUint16(b, safetensors.Float32ToF16(v))
		case safetensors.F32:
			b = binary.LittleEndian.AppendUint32(b, math.Float32bits(v))
		}
	}
	return b
}

func writeSafetensors(t *testing.T, path string, ts []srcTensor) {
	t.Helper()
	var infos []safetensors.TensorInfo
	for _, s := range ts {
		infos = append(infos, safetensors.TensorInfo{Name: s.name, DType: s.dtype, Shape: s.shape})
	}
	w, err := safetensors.Create(path, infos, map[string]string{"format": "pt"})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Abort()
	for _, s := range ts {
		if err := w.Write(s.name, s.bytes()); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
}

func randTensor(r *rand.Rand, name string, dtype safetensors.DType, shape ...int) srcTensor {
	n := 1
	for _, d := range shape {
		n *= d
	}
	vals := make([]float32, n)
	k := shape[len(shape)-1]
	for i := range vals {
		// Rows of different magnitudes.
		vals[i] = float32(r.NormFloat64() * math.Pow(4, float64(i/k%5)-2))
	}
	return srcTensor{name, dtype, shape, vals}
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

const (
	qaProj    = "model.layers.0.self_attn.q_a_proj.weight"
	router    = "model.layers.0.mlp.gate.weight"
	routerB   = "model.layers.0.mlp.gate.e_score_correction_bias"
	norm      = "model.layers.0.input_layernorm.weight"
	oddK      = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
	mtpWeight = "model.layers.1.self_attn.q_a_proj.weight"
	lmHead    = "lm_head.weight"
	embed     = "model.embed_tokens.weight"
)

// fakeCheckpoint writes a tiny glm4_moe_lite checkpoint in two shards with
// an index, and returns its tensors by name.
func fakeCheckpoint(t *testing.T, dir string) map[string]srcTensor {
	r := rand.New(rand.NewPCG(21, 22))
	ts := []srcTensor{
		randTensor(r, qaProj, safetensors.BF16, 20, 256),
		randTensor(r, router, safetensors.BF16, 8, 128),
		randTensor(r, routerB, safetensors.F32, 8),
		randTensor(r, norm, safetensors.BF16, 128),
		randTensor(r, oddK, safetensors.F16, 12, 100),
		randTensor(r, mtpWeight, safetensors.BF16, 20, 256),
		randTensor(r, lmHead, safetensors.F32, 16, 128),
		randTensor(r, embed, safetensors.BF16, 24, 128),
	}
	// Source values as the file holds them (rounded to the source dtype).
	for i := range ts {
		for j, v := range ts[i].vals {
			switch ts[i].dtype {
			case safetensors.BF16:
				ts[i].vals[j] = safetensors.BF16ToFloat32(safetensors.Float32ToBF16(v))
			case safetensors.F16:
				ts[i].vals[j] = safetensors.F16ToFloat32(safetensors.Float32ToF16(v))
			}
		}
	}
	writeSafetensors(t, filepath.Join(dir, "model-00001-of-00002.safetensors"), ts[:4])
	writeSafetensors(t, filepath.Join(dir, "model-00002-of-00002.safetensors"), ts[4:])
	wm := map[string]string{}
	for i, s := range ts {
		wm[s.name] = "model-00001-of-00002.safetensors"
		if i >= 4 {
			wm[s.name] = "model-00002-of-00002.safetensors"
		}
	}
	if err := safetensors.WriteIndex(dir, wm, 0, nil); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dir, "config.json"), `{"model_type": "glm4_moe_lite", "num_hidden_layers": 1}`)
	writeFile(t, filepath.Join(dir, "tokenizer.json"), `{"model": {}}`)
	writeFile(t, filepath.Join(dir, "tokenizer_config.json"), `{}`)
	writeFile(t, filepath.Join(dir, "generation_config.json"), `{"eos_token_id": 1}`)
	writeFile(t, filepath.Join(dir, "chat_template.jinja"), `{{ messages }}`)
	writeFile(t, filepath.Join(dir, "README.md"), `not a model file`)
	m := map[string]srcTensor{}
	for _, s := range ts {
		m[s.name] = s
	}
	return m
}

func TestConvertDir(t *testing.T) {
	for _, shardBytes := range []int64{0, 3000} {
		src := t.TempDir()
		ts := fakeCheckpoint(t, src)
		out := filepath.Join(t.TempDir(), "out")
		var lastDone, lastTotal int64
		rep, err := ConvertDir(src, out, ConvertOptions{GroupSize: 64, Search: true, ShardBytes: shardBytes,
			Progress: func(done, total int64) { lastDone, lastTotal = done, total }})
		if err != nil {
			t.Fatal(err)
		}
		checkConverted(t, out, ts, shardBytes != 0)
		if lastDone != lastTotal || lastTotal != rep.SourceBytes || lastTotal == 0 {
			t.Errorf("progress ended at %d/%d, source bytes %d", lastDone, lastTotal, rep.SourceBytes)
		}
		if !slices.Equal(rep.Skipped, []string{mtpWeight}) {
			t.Errorf("skipped %v, want [%s]", rep.Skipped, mtpWeight)
		}
		if len(rep.Rows) != len(ts)-1 {
			t.Errorf("%d report rows, want %d", len(rep.Rows), len(ts)-1)
		}
		if !slices.IsSortedFunc(rep.Rows, func(a, b ReportRow) int { return -compareFloat(a.RelError, b.RelError) }) {
			t.Errorf("report rows not sorted worst first: %+v", rep.Rows)
		}
		for _, row := range rep.Rows {
			t.Logf("%-50s %v quantized=%v rel=%.4f", row.Name, row.Shape, row.Quantized, row.RelError)
			if row.Quantized && (row.RelError <= 0 || row.RelError > 0.2) {
				t.Errorf("%s: implausible relative error %v", row.Name, row.RelError)
			}
		}
		if rep.MaxRelError() < rep.MeanRelError() || rep.MeanRelError() <= 0 {
			t.Errorf("mean %v, max %v", rep.MeanRelError(), rep.MaxRelError())
		}
		size, _ := dirSize(out)
		if rep.OutputBytes != size {
			t.Errorf("report says %d output bytes, directory has %d", rep.OutputBytes, size)
		}
	}
}

func compareFloat(a, b float64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func checkConverted(t *testing.T, out string, ts map[string]srcTensor, sharded bool) {
	t.Helper()
	if !IsMMFP4Dir(out) {
		t.Fatal("IsMMFP4Dir false for the output")
	}
	h, err := ReadHeader(out)
	if err != nil {
		t.Fatal(err)
	}
	if h.Format != "mmfp4" || h.Version != 1 || h.GroupSize != 64 || h.Layout != "nk-rowmajor-lownibble" ||
		h.ScaleType != "F8_E4M3" || h.Quantizer != "mse-search" || h.SourceDType != "mixed" {
		t.Errorf("header %+v", *h)
	}
	wantHeader := map[string]HeaderTensor{
		qaProj:  {qaProj, []int{20, 256}, true, "MMFP4"},
		router:  {router, []int{8, 128}, false, "F32"},
		routerB: {routerB, []int{8}, false, "F32"},
		norm:    {norm, []int{128}, false, "BF16"},
		oddK:    {oddK, []int{12, 100}, false, "BF16"},
		lmHead:  {lmHead, []int{16, 128}, true, "MMFP4"},
		embed:   {embed, []int{24, 128}, true, "MMFP4"},
	}
	if len(h.Tensors) != len(wantHeader) {
		t.Errorf("header lists %d tensors, want %d", len(h.Tensors), len(wantHeader))
	}
	for _, ht := range h.Tensors {
		w := wantHeader[ht.Name]
		if ht.Name != w.Name || !slices.Equal(ht.Shape, w.Shape) || ht.Quantized != w.Quantized || ht.DType != w.DType {
			t.Errorf("header tensor %+v, want %+v", ht, w)
		}
	}

	if _, err := os.Stat(filepath.Join(out, "README.md")); err == nil {
		t.Error("README.md copied")
	}
	_, errSingle := os.Stat(filepath.Join(out, "model.safetensors"))
	shards, _ := filepath.Glob(filepath.Join(out, "model-0000?-of-0000?.safetensors"))
	if sharded != (len(shards) > 1) || sharded == (errSingle == nil) {
		t.Errorf("sharded=%v: model.safetensors: %v, shards %v", sharded, errSingle, shards)
	}
	if _, err := os.Stat(filepath.Join(out, "model.safetensors.index.json")); err != nil {
		t.Error(err)
	}

	set, err := safetensors.OpenDir(out)
	if err != nil {
		t.Fatal(err)
	}
	defer set.Close()
	var wantNames []string
	for _, name := range []string{qaProj, lmHead, embed} {
		q, s, r := QuantizedNames(name)
		wantNames = append(wantNames, q, s, r)
	}
	wantNames = append(wantNames, router, routerB, norm, oddK)
	slices.Sort(wantNames)
	if names := set.Names(); !slices.Equal(names, wantNames) {
		t.Fatalf("output tensors %v, want %v", names, wantNames)
	}

	for _, name := range []string{qaProj, lmHead, embed} {
		src := ts[name]
		qn, sn, rn := QuantizedNames(name)
		q, _ := set.Tensor(qn)
		s, _ := set.Tensor(sn)
		r, _ := set.Tensor(rn)
		m, err := MatrixFromTensors(q, s, r, h.GroupSize)
		if err != nil {
			t.Fatal(err)
		}
		want, err := Quantize(src.vals, src.shape[0], src.shape[1], QuantOptions{GroupSize: 64, Search: true})
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(m.Dequantize(), want.Dequantize()) {
			t.Errorf("%s: stored matrix differs from Quantize of the source", name)
		}
	}

	checkKept := func(name string, dtype safetensors.DType, want []float32) {
		tn, err := set.Tensor(name)
		if err != nil {
			t.Fatal(err)
		}
		if err := tn.Check(dtype, ts[name].shape...); err != nil {
			t.Error(err)
			return
		}
		got, err := tn.Float32()
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, want) {
			t.Errorf("%s: values differ from the source", name)
		}
	}
	checkKept(router, safetensors.F32, ts[router].vals)
	checkKept(routerB, safetensors.F32, ts[routerB].vals)
	checkKept(norm, safetensors.BF16, ts[norm].vals)
	var oddBF16 []float32
	for _, v := range ts[oddK].vals {
		oddBF16 = append(oddBF16, safetensors.BF16ToFloat32(safetensors.Float32ToBF16(v)))
	}
	checkKept(oddK, safetensors.BF16, oddBF16)
}

func TestConvertDirCopiesFiles(t *testing.T) {
	src := t.TempDir()
	fakeCheckpoint(t, src)
	out := t.TempDir() // exists and is empty: allowed
	if _, err := ConvertDir(src, out, ConvertOptions{GroupSize: 32}); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"} {
		a, err1 := os.ReadFile(filepath.Join(src, f))
		b, err2 := os.ReadFile(filepath.Join(out, f))
		if err1 != nil || err2 != nil || string(a) != string(b) {
			t.Errorf("%s: not copied unchanged (%v, %v)", f, err1, err2)
		}
	}
	h, err := ReadHeader(out)
	if err != nil {
		t.Fatal(err)
	}
	if h.Quantizer != "rtn" || h.GroupSize != 32 {
		t.Errorf("quantizer %q, group size %d", h.Quantizer, h.GroupSize)
	}
	// The index is ours, not the source's copied over.
	set, err := safetensors.OpenDir(out)
	if err != nil {
		t.Fatal(err)
	}
	defer set.Close()
	if set.Has(mtpWeight) || set.Has(qaProj) {
		t.Error("output holds the MTP weight or the unquantized q_a_proj")
	}
}

func TestConvertDirErrors(t *testing.T) {
	src := t.TempDir()
	fakeCheckpoint(t, src)

	// An existing non-empty output is refused and left alone.
	out := t.TempDir()
	writeFile(t, filepath.Join(out, "keep.txt"), "mine")
	if _, err := ConvertDir(src, out, ConvertOptions{}); err == nil || !strings.Contains(err.Error(), "not empty") {
		t.Errorf("non-empty out: err = %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(out, "keep.txt")); string(b) != "mine" {
		t.Error("non-empty out was modified")
	}

	// A wrong model_type names the file and the field.
	writeFile(t, filepath.Join(src, "config.json"), `{"model_type": "llama", "num_hidden_layers": 1}`)
	parent := t.TempDir()
	_, err := ConvertDir(src, filepath.Join(parent, "out"), ConvertOptions{})
	if err == nil || !strings.Contains(err.Error(), "config.json") || !strings.Contains(err.Error(), "model_type") {
		t.Errorf("wrong model_type: err = %v", err)
	}
	os.Remove(filepath.Join(src, "config.json"))
	if _, err := ConvertDir(src, filepath.Join(parent, "out"), ConvertOptions{}); err == nil {
		t.Error("missing config.json accepted")
	}

	// A failure halfway (a NaN weight) leaves nothing in the parent.
	writeFile(t, filepath.Join(src, "config.json"), `{"model_type": "glm4_moe_lite", "num_hidden_layers": 1}`)
	bad := randTensor(rand.New(rand.NewPCG(1, 1)), "model.layers.0.mlp.down_proj.weight", safetensors.F32, 4, 128)
	bad.vals[5] = float32(math.NaN())
	writeSafetensors(t, filepath.Join(src, "model-00002-of-00002.safetensors"), []srcTensor{bad})
	os.Remove(filepath.Join(src, "model.safetensors.index.json"))
	_, err = ConvertDir(src, filepath.Join(parent, "out"), ConvertOptions{})
	if err == nil || !strings.Contains(err.Error(), bad.name) {
		t.Errorf("NaN weight: err = %v", err)
	}
	if ents, _ := os.ReadDir(parent); len(ents) != 0 {
		t.Errorf("failed run left %v behind", ents)
	}
	if _, err := ConvertDir(src, filepath.Join(parent, "out"), ConvertOptions{GroupSize: 100}); err == nil {
		t.Error("group size 100 accepted")
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
