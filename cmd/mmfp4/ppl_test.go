package main

import (
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/mmfp4/mmfp4"
	"github.com/mmfp4/mmfp4/safetensors"
)

const (
	sotuBF16  = "../../testdata/sotu-bf16"
	sotuRef   = "../../testdata/sotu-ref"
	sotuSlice = sotuRef + "/heldout-slice.txt"
)

// useTempCache points the built-in model's cache at a fresh directory.
func useTempCache(t *testing.T) {
	t.Helper()
	t.Setenv("XDG_CACHE_HOME", t.TempDir())
	t.Setenv("HOME", t.TempDir())
}

// transformersPPL is the perplexity tools/train_default.py computed with HF
// transformers (float32, eager) for a file and window.
func transformersPPL(t *testing.T, key string) (ppl float64, tokens int) {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(sotuRef, "reference.json"))
	if err != nil {
		t.Fatal(err)
	}
	var ref struct {
		PPL map[string]struct {
			BF16 struct {
				PPL    float64 `json:"ppl"`
				Tokens int     `json:"tokens"`
			} `json:"bf16"`
		} `json:"ppl"`
	}
	if err := json.Unmarshal(data, &ref); err != nil {
		t.Fatal(err)
	}
	r, ok := ref.PPL[key]
	if !ok {
		t.Fatalf("reference.json has no perplexity for %s", key)
	}
	return r.BF16.PPL, r.BF16.Tokens
}

func pplJSON(t *testing.T, args ...string) pplReport {
	t.Helper()
	out, errOut, err := run(t, append([]string{"ppl", "--json"}, args...)...)
	if err != nil {
		t.Fatalf("ppl %v: %v", args, err)
	}
	var r pplReport
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("ppl --json printed %q: %v", out, err)
	}
	if r.Windows > 1 && !strings.Contains(errOut, "ppl windows") {
		t.Errorf("no progress bar on stderr: %q", errOut)
	}
	return r
}

// On the committed held-out slice, the bf16 checkpoint's perplexity is the
// one transformers computed on the same tokens and windows.
func TestPPLMatchesTransformers(t *testing.T) {
	if raceBuild {
		// 1,024 token positions through the dense float path take over a
		// minute under the race detector; TestPPLMatchesTransformerLogits
		// checks the same on 36 tokens there.
		t.Skip("skipped in race builds: too slow with the race detector")
	}
	want, tokens := transformersPPL(t, "heldout-slice.txt@256/128")
	r := pplJSON(t, "-m", sotuBF16, "--file", sotuSlice, "--ctx", "256", "--stride", "128")
	if r.Tokens != tokens || r.Windows != 4 {
		t.Errorf("%d tokens in %d windows, transformers scored %d in 4", r.Tokens, r.Windows, tokens)
	}
	// The issue asks for 0.5%; measured 2026-11-28 the two agree to 1e-7.
	if rel := math.Abs(r.PPL/want - 1); rel > 1e-4 {
		t.Errorf("perplexity %.6f, transformers %.6f (relative difference %.2g)", r.PPL, want, rel)
	}
	if math.Abs(r.MeanNLL-math.Log(r.PPL)) > 1e-9 || r.KL != nil {
		t.Errorf("inconsistent report %+v", r)
	}
}

// greedyText writes the prompt and greedy continuation that transformers
// recorded as a text file; it encodes back to the same 36 ids.
func greedyText(t *testing.T) (path string, ids []int, logits []float32) {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(sotuRef, "reference.json"))
	if err != nil {
		t.Fatal(err)
	}
	var ref struct {
		Greedy struct {
			Prompt    string `json:"prompt"`
			PromptIDs []int  `json:"prompt_ids"`
			IDs       []int  `json:"ids"`
			Text      string `json:"text"`
		} `json:"greedy"`
	}
	if err := json.Unmarshal(data, &ref); err != nil {
		t.Fatal(err)
	}
	f, err := safetensors.Open(filepath.Join(sotuRef, "reference.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	lt, err := f.Tensor("logits")
	if err != nil {
		t.Fatal(err)
	}
	if logits, err = lt.Float32(); err != nil {
		t.Fatal(err)
	}
	path = filepath.Join(t.TempDir(), "greedy.txt")
	if err := os.WriteFile(path, []byte(ref.Greedy.Prompt+ref.Greedy.Text), 0o644); err != nil {
		t.Fatal(err)
	}
	return path, append(ref.Greedy.PromptIDs, ref.Greedy.IDs...), logits
}

// The same agreement on one window of 36 tokens, where the transformers
// perplexity follows from the float32 logits it recorded for the sequence.
func TestPPLMatchesTransformerLogits(t *testing.T) {
	path, ids, logits := greedyText(t)
	vocab := len(logits) / len(ids)
	var nll float64
	for i := 1; i < len(ids); i++ {
		row := logits[(i-1)*vocab : i*vocab]
		m := float64(slices.Max(row))
		var s float64
		for _, v := range row {
			s += math.Exp(float64(v) - m)
		}
		nll += m + math.Log(s) - float64(row[ids[i]])
	}
	want := math.Exp(nll / float64(len(ids)-1))
	n := strconv.Itoa(len(ids))
	r := pplJSON(t, "-m", sotuBF16, "--file", path, "--ctx", n, "--stride", n)
	if r.Tokens != len(ids)-1 || r.Windows != 1 {
		t.Fatalf("%d tokens in %d windows; want %d in 1 (does the text encode to other ids?)", r.Tokens, r.Windows, len(ids)-1)
	}
	if rel := math.Abs(r.PPL/want - 1); rel > 1e-4 {
		t.Errorf("perplexity %.6f, from transformers' logits %.6f (relative difference %.2g)", r.PPL, want, rel)
	}
}

// The built-in model against its bf16 source: KL and top-1 agreement are
// reported, near what the tests of package defaultmodel measure.
func TestPPLDefaultModelWithRef(t *testing.T) {
	useTempCache(t)
	path, ids, _ := greedyText(t)
	n := strconv.Itoa(len(ids))
	r := pplJSON(t, "--file", path, "--ctx", n, "--ref", sotuBF16)
	if r.KL == nil || r.Top1 == nil || r.Ref != sotuBF16 || !strings.Contains(r.Model, "default-") || r.Stride != len(ids)/2 {
		t.Fatalf("report %+v", r)
	}
	t.Logf("KL %.4f, top-1 %.3f, perplexity %.3f over %d tokens", *r.KL, *r.Top1, r.PPL, r.Tokens)
	// Measured 2026-11-28: KL 0.018, top-1 94%.
	if *r.KL <= 0 || *r.KL > 0.06 || *r.Top1 < 0.7 || *r.Top1 > 1 {
		t.Errorf("KL %.4f, top-1 %.3f", *r.KL, *r.Top1)
	}
}

// --kv-cache-dtype runs the model on a rounded cache, the reference on the
// exact one: against itself, the model's KL is 0 with the f32 cache and
// grows as the cache gets coarser. Bytes per token follow the layouts of
// docs/quality.md at the fixture's shapes (4 layers, rank 128, rope 16).
func TestPPLKVCacheDType(t *testing.T) {
	want := map[string]int{"f32": 4 * 144 * 4, "bf16": 2 * 144 * 4, "fp8": (144 + 8) * 4, "fp4": (64 + 16 + 4 + 8) * 4}
	kl := map[string]float64{}
	for _, d := range []string{"f32", "bf16", "fp8", "fp4"} {
		r := pplJSON(t, "-m", fixture, "--ref", fixture, "--file", sotuSlice, "--ctx", "64", "--stride", "64", "--kv-cache-dtype", d)
		if r.KVDType != d || r.KVBytes != want[d] || r.KL == nil {
			t.Fatalf("%s: report %+v, want %d bytes per token", d, r, want[d])
		}
		t.Logf("%s: perplexity %.4f, KL %.3g, top-1 %.4f", d, r.PPL, *r.KL, *r.Top1)
		kl[d] = *r.KL
	}
	if kl["f32"] != 0 || !(0 < kl["bf16"] && kl["bf16"] < kl["fp8"] && kl["fp8"] < kl["fp4"]) {
		t.Errorf("KL from the exact cache: %v, want 0 for f32 and increasing from bf16 to fp4", kl)
	}
	// Measured: 3.6e-4, 7.2e-3, 2.6e-2 (random weights: see docs/quality.md).
	for d, bound := range map[string]float64{"bf16": 1e-3, "fp8": 0.02, "fp4": 0.08} {
		if kl[d] > bound {
			t.Errorf("%s: KL %.3g from the exact cache, bound %g", d, kl[d], bound)
		}
	}
}

func TestPPLBadInput(t *testing.T) {
	useTempCache(t)
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	empty := write("empty.txt", "")
	short := write("short.txt", "Fellow citizens of the Senate and House of Representatives.")
	binary := write("binary.txt", "Fellow citizens\xff\xfe of the Senate")
	for _, c := range []struct {
		args []string
		want []string // substrings of the error
	}{
		{[]string{"--file", empty}, []string{empty, "empty"}},
		{[]string{"--file", short}, []string{short, "fewer than one window", "--ctx 512"}},
		{[]string{"--file", binary}, []string{binary, "UTF-8", "offset 15"}},
		{[]string{"--file", sotuSlice, "--ctx", "1024"}, []string{"--ctx 1024", "max_position_embeddings 512"}},
		{[]string{"--file", sotuSlice, "--ref", sotuBF16, "-m", fixture, "--ctx", "64"}, []string{"--ref", "vocabulary"}},
		{[]string{"--file", sotuSlice, "--ctx", "64", "--stride", "65"}, []string{"--stride 65"}},
		{[]string{"--file", sotuSlice, "--ctx", "1"}, []string{"--ctx 1"}},
		{[]string{"--file", sotuSlice, "--kv-cache-dtype", "fp5"}, []string{"--kv-cache-dtype", "fp5"}},
		{[]string{"--file", filepath.Join(dir, "missing.txt")}, []string{"missing.txt"}},
		{[]string{"--file", sotuSlice, "--device", "tpu"}, []string{"--device", "tpu"}},
		{[]string{}, []string{"file"}},
	} {
		out, _, err := run(t, append([]string{"ppl"}, c.args...)...)
		if err == nil {
			t.Errorf("ppl %v: no error (printed %q)", c.args, out)
			continue
		}
		for _, w := range c.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("ppl %v: error %q does not mention %q", c.args, err, w)
			}
		}
		if strings.Contains(out, "NaN") {
			t.Errorf("ppl %v printed NaN", c.args)
		}
	}
}

// With no -m, every command runs the built-in model.
func TestDefaultModelCommands(t *testing.T) {
	useTempCache(t)
	out, errOut, err := run(t, "generate", "-p", "Fellow citizens", "-n", "8")
	if err != nil {
		t.Fatal(err)
	}
	if len(strings.TrimSpace(out)) < 8 || !strings.Contains(errOut, "generated 8 tokens") {
		t.Errorf("generate printed %q, %q", out, errOut)
	}
	out, _, err = runIn(t, "Fellow citizens", "tokenize", "--add-special")
	if err != nil {
		t.Fatal(err)
	}
	// [gMASK] <sop> "Fellow" " citizens", as HF tokenizers encodes it
	// (testdata/sotu-ref/reference.json).
	if strings.TrimSpace(out) != "[8174,8176,5828,762]" {
		t.Errorf("tokenize printed %q", out)
	}
	if _, _, err := run(t, "logits", "--ids", "8174,8176,5828"); err != nil {
		t.Error(err)
	}
}

func TestExportDefault(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "sotu")
	out, _, err := run(t, "export-default", "-o", dir)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "wrote "+dir) {
		t.Errorf("printed %q", out)
	}
	m, err := mmfp4.Load(dir, mmfp4.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Tokenizer(); m.Config().VocabSize != 8192 || err != nil {
		t.Errorf("exported model: vocab %d, tokenizer error %v", m.Config().VocabSize, err)
	}
	if _, _, err := run(t, "export-default", "-o", dir); err == nil || !strings.Contains(err.Error(), "not empty") {
		t.Errorf("export into a non-empty directory: %v", err)
	}
}
