package convert

import (
	"encoding/binary"
	"maps"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/mmfp4/mmfp4/format"
	"github.com/mmfp4/mmfp4/model/glm4moelite"
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

// glm is the policy of the fake checkpoint (num_hidden_layers 1), as
// glm4moelite.ReadConvertPolicy reads it from its config.json.
var glm = &glm4moelite.ConvertPolicy{NumLayers: 1}

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

func TestDir(t *testing.T) {
	for _, shardBytes := range []int64{0, 3000} {
		src := t.TempDir()
		ts := fakeCheckpoint(t, src)
		out := filepath.Join(t.TempDir(), "out")
		var lastDone, lastTotal int64
		rep, err := Dir(src, out, Options{Policy: glm, GroupSize: 64, Search: true, ShardBytes: shardBytes,
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
		var size int64
		ents, err := os.ReadDir(out)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range ents {
			if info, err := e.Info(); err == nil && info.Mode().IsRegular() {
				size += info.Size()
			}
		}
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
	if !format.IsMMFP4Dir(out) {
		t.Fatal("IsMMFP4Dir false for the output")
	}
	h, err := format.ReadHeader(out)
	if err != nil {
		t.Fatal(err)
	}
	if h.Format != "mmfp4" || h.Version != 1 || h.GroupSize != 64 || h.Layout != "nk-rowmajor-lownibble" ||
		h.ScaleType != "F8_E4M3" || h.Quantizer != "mse-search" || h.SourceDType != "mixed" {
		t.Errorf("header %+v", *h)
	}
	wantHeader := map[string]format.HeaderTensor{
		qaProj:  {Name: qaProj, Shape: []int{20, 256}, Quantized: true, DType: "MMFP4"},
		router:  {Name: router, Shape: []int{8, 128}, Quantized: false, DType: "F32"},
		routerB: {Name: routerB, Shape: []int{8}, Quantized: false, DType: "F32"},
		norm:    {Name: norm, Shape: []int{128}, Quantized: false, DType: "BF16"},
		oddK:    {Name: oddK, Shape: []int{12, 100}, Quantized: false, DType: "BF16"},
		lmHead:  {Name: lmHead, Shape: []int{16, 128}, Quantized: true, DType: "MMFP4"},
		embed:   {Name: embed, Shape: []int{24, 128}, Quantized: true, DType: "MMFP4"},
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
		q, s, r := format.QuantizedNames(name)
		wantNames = append(wantNames, q, s, r)
	}
	wantNames = append(wantNames, router, routerB, norm, oddK)
	slices.Sort(wantNames)
	if names := set.Names(); !slices.Equal(names, wantNames) {
		t.Fatalf("output tensors %v, want %v", names, wantNames)
	}

	for _, name := range []string{qaProj, lmHead, embed} {
		src := ts[name]
		qn, sn, rn := format.QuantizedNames(name)
		q, _ := set.Tensor(qn)
		s, _ := set.Tensor(sn)
		r, _ := set.Tensor(rn)
		m, err := format.MatrixFromTensors(q, s, r, h.GroupSize)
		if err != nil {
			t.Fatal(err)
		}
		want, err := format.Quantize(src.vals, src.shape[0], src.shape[1], format.QuantOptions{GroupSize: 64, Search: true})
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

func TestDirCopiesFiles(t *testing.T) {
	src := t.TempDir()
	fakeCheckpoint(t, src)
	out := t.TempDir() // exists and is empty: allowed
	if _, err := Dir(src, out, Options{Policy: glm, GroupSize: 32}); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"} {
		a, err1 := os.ReadFile(filepath.Join(src, f))
		b, err2 := os.ReadFile(filepath.Join(out, f))
		if err1 != nil || err2 != nil || string(a) != string(b) {
			t.Errorf("%s: not copied unchanged (%v, %v)", f, err1, err2)
		}
	}
	h, err := format.ReadHeader(out)
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

func TestDirErrors(t *testing.T) {
	src := t.TempDir()
	fakeCheckpoint(t, src)

	// An existing non-empty output is refused and left alone.
	out := t.TempDir()
	writeFile(t, filepath.Join(out, "keep.txt"), "mine")
	if _, err := Dir(src, out, Options{Policy: glm}); err == nil || !strings.Contains(err.Error(), "not empty") {
		t.Errorf("non-empty out: err = %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(out, "keep.txt")); string(b) != "mine" {
		t.Error("non-empty out was modified")
	}

	// No policy is an error, not a guess.
	parent := t.TempDir()
	if _, err := Dir(src, filepath.Join(parent, "out"), Options{}); err == nil || !strings.Contains(err.Error(), "Policy") {
		t.Errorf("no policy: err = %v", err)
	}

	// A failure halfway (a NaN weight) leaves nothing in the parent.
	bad := randTensor(rand.New(rand.NewPCG(1, 1)), "model.layers.0.mlp.down_proj.weight", safetensors.F32, 4, 128)
	bad.vals[5] = float32(math.NaN())
	writeSafetensors(t, filepath.Join(src, "model-00002-of-00002.safetensors"), []srcTensor{bad})
	os.Remove(filepath.Join(src, "model.safetensors.index.json"))
	_, err := Dir(src, filepath.Join(parent, "out"), Options{Policy: glm})
	if err == nil || !strings.Contains(err.Error(), bad.name) {
		t.Errorf("NaN weight: err = %v", err)
	}
	if ents, _ := os.ReadDir(parent); len(ents) != 0 {
		t.Errorf("failed run left %v behind", ents)
	}
	if _, err := Dir(src, filepath.Join(parent, "out"), Options{Policy: glm, GroupSize: 100}); err == nil {
		t.Error("group size 100 accepted")
	}
}

// The converter follows its policy, not tensor names of its own: a policy
// that skips the norm and keeps q_a_proj in fp32 gets exactly that.
type testPolicy struct{ skip, keep string }

func (p testPolicy) Skip(name string) bool    { return name == p.skip }
func (p testPolicy) KeepF32(name string) bool { return name == p.keep }

func TestDirFollowsPolicy(t *testing.T) {
	src := t.TempDir()
	ts := fakeCheckpoint(t, src)
	out := filepath.Join(t.TempDir(), "out")
	rep, err := Dir(src, out, Options{Policy: testPolicy{skip: norm, keep: qaProj}, GroupSize: 32})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(rep.Skipped, []string{norm}) {
		t.Errorf("skipped %v, want [%s]", rep.Skipped, norm)
	}
	h, err := format.ReadHeader(out)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, ht := range h.Tensors {
		got[ht.Name] = ht.DType
	}
	// The router is quantized and the MTP layer kept: this policy does not
	// protect them.
	want := map[string]string{qaProj: "F32", router: "MMFP4", routerB: "F32", oddK: "BF16",
		mtpWeight: "MMFP4", lmHead: "MMFP4", embed: "MMFP4"}
	if !maps.Equal(got, want) {
		t.Errorf("stored dtypes %v, want %v", got, want)
	}
	set, err := safetensors.OpenDir(out)
	if err != nil {
		t.Fatal(err)
	}
	defer set.Close()
	q, err := set.Tensor(qaProj)
	if err != nil {
		t.Fatal(err)
	}
	if v, err := q.Float32(); err != nil || !slices.Equal(v, ts[qaProj].vals) {
		t.Errorf("%s not kept exactly (%v)", qaProj, err)
	}
}
