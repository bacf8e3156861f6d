package main

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/spf13/pflag"

	"github.com/mmfp4/mmfp4/safetensors"
)

const fixture = "../../testdata/glm4moelite-tiny"

func run(t *testing.T, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	return runIn(t, "", args...)
}

func runIn(t *testing.T, stdin string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	// Flags keep their values between Execute calls: reset them.
	reset := func(f *pflag.Flag) {
		_ = f.Value.Set(f.DefValue)
		f.Changed = false
	}
	rootCmd.PersistentFlags().VisitAll(reset)
	for _, c := range rootCmd.Commands() {
		c.Flags().VisitAll(reset)
	}
	var o, e bytes.Buffer
	rootCmd.SetOut(&o)
	rootCmd.SetErr(&e)
	rootCmd.SetIn(strings.NewReader(stdin))
	rootCmd.SetArgs(args)
	err = rootCmd.Execute()
	return o.String(), e.String(), err
}

func TestGenerateCommand(t *testing.T) {
	out, errOut, err := run(t, "generate", "-m", fixture, "--ids", "248,475,240,439,34,19,502,29,502,22,169,295", "-n", "4")
	if err != nil {
		t.Fatal(err)
	}
	// HF transformers' greedy continuation of this prompt starts 253 54 340 340.
	if strings.TrimSpace(out) != "253 54 340 340" {
		t.Errorf("streamed %q", out)
	}
	for _, want := range []string{"prompt 12 tokens", "generated 4 tokens", "prefill", "decode"} {
		if !strings.Contains(errOut, want) {
			t.Errorf("summary %q lacks %q", errOut, want)
		}
	}
}

// reference is the HF transformers record of the fixture
// (tools/make_fixtures.py): the prompt, its 16-token greedy continuation,
// and the float32 logits of every position of prompt + continuation.
type reference struct {
	prompt, greedy []int
	logits         []float32
}

func loadReference(t *testing.T) *reference {
	t.Helper()
	f, err := safetensors.Open("../../testdata/glm4moelite-tiny-ref/reference.safetensors")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tensor := func(name string) *safetensors.Tensor {
		tn, err := f.Tensor(name)
		if err != nil {
			t.Fatal(err)
		}
		return tn
	}
	ints := func(name string) []int {
		tn := tensor(name)
		out := make([]int, tn.NumElements())
		for i := range out {
			out[i] = int(int64(binary.LittleEndian.Uint64(tn.Data[8*i:])))
		}
		return out
	}
	logits, err := tensor("logits").Float32()
	if err != nil {
		t.Fatal(err)
	}
	return &reference{prompt: ints("prompt_ids"), greedy: ints("greedy_ids"), logits: logits}
}

func joinIDs(ids []int) string {
	s := make([]string, len(ids))
	for i, id := range ids {
		s[i] = strconv.Itoa(id)
	}
	return strings.Join(s, ",")
}

// readNpy parses a float32 2-D .npy file, version 1.0, as writeNpy writes it.
func readNpy(t *testing.T, path string) (v []float32, rows, cols int) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(data, []byte("\x93NUMPY\x01\x00")) {
		t.Fatalf("bad magic %q", data[:8])
	}
	hlen := int(binary.LittleEndian.Uint16(data[8:10]))
	header := string(data[10 : 10+hlen])
	if (10+hlen)%64 != 0 || !strings.HasSuffix(header, "\n") || !strings.Contains(header, "'descr': '<f4'") ||
		!strings.Contains(header, "'fortran_order': False") {
		t.Fatalf("header %q (data offset %d)", header, 10+hlen)
	}
	if _, err := fmt.Sscanf(header[strings.Index(header, "'shape': "):], "'shape': (%d, %d)", &rows, &cols); err != nil {
		t.Fatalf("header %q: %v", header, err)
	}
	body := data[10+hlen:]
	if len(body) != rows*cols*4 {
		t.Fatalf("body %d bytes, want %d x %d x 4", len(body), rows, cols)
	}
	v = make([]float32, rows*cols)
	for i := range v {
		v[i] = math.Float32frombits(binary.LittleEndian.Uint32(body[4*i:]))
	}
	return v, rows, cols
}

// TestLogitsCommandWritesNpy: the .npy body holds, row by row, the logits
// that transformers computed for the same ids, to the bound the model tests
// use (max|ours - ref| / max|ref| <= 2e-6, measured 9.8e-7).
func TestLogitsCommandWritesNpy(t *testing.T) {
	ref := loadReference(t)
	seq := append(append([]int{}, ref.prompt...), ref.greedy...)
	path := filepath.Join(t.TempDir(), "l.npy")
	if _, _, err := run(t, "logits", "-m", fixture, "--ids", joinIDs(seq), "--out", path); err != nil {
		t.Fatal(err)
	}
	got, rows, cols := readNpy(t, path)
	if rows != len(seq) || cols != 512 {
		t.Fatalf("shape (%d, %d), want (%d, 512)", rows, cols, len(seq))
	}
	var refMax float64
	for _, v := range ref.logits {
		refMax = math.Max(refMax, math.Abs(float64(v)))
	}
	var largest float64
	for r := 0; r < rows; r++ {
		var worst float64
		for c := 0; c < cols; c++ {
			worst = math.Max(worst, math.Abs(float64(got[r*cols+c]-ref.logits[r*cols+c])))
		}
		e := worst / refMax
		if e > 2e-6 {
			t.Errorf("row %d (id %d): relative error %.2e from the reference logits > 2e-6", r, seq[r], e)
		}
		largest = math.Max(largest, e)
	}
	t.Logf("%d rows: largest relative error %.2e", rows, largest)
}

// generateIDs runs generate on the reference prompt and returns the ids it
// streamed.
func generateIDs(t *testing.T, n int, flags ...string) string {
	t.Helper()
	ref := loadReference(t)
	args := append([]string{"generate", "-m", fixture, "--ids", joinIDs(ref.prompt), "-n", strconv.Itoa(n)}, flags...)
	out, _, err := run(t, args...)
	if err != nil {
		t.Fatalf("%v: %v", args, err)
	}
	return strings.TrimSpace(out)
}

// TestGenerateSamplingFlags: --temperature, --seed and --top-p reach the
// sampler. A seed reproduces its sample and another seed changes it, which a
// dropped --temperature (greedy) or --seed would not; a top-p so small that
// only the most likely token is kept gives transformers' greedy continuation
// at any temperature, which a dropped --top-p would not.
func TestGenerateSamplingFlags(t *testing.T) {
	ref := loadReference(t)
	greedy := strings.Trim(fmt.Sprint(ref.greedy), "[]")
	if got := generateIDs(t, 16); got != greedy {
		t.Fatalf("greedy: %q, reference %q", got, greedy)
	}
	a := generateIDs(t, 16, "--temperature", "1.5", "--seed", "7")
	if b := generateIDs(t, 16, "--temperature", "1.5", "--seed", "7"); a != b {
		t.Errorf("seed 7 gave %q, then %q", a, b)
	}
	b := generateIDs(t, 16, "--temperature", "1.5", "--seed", "8")
	t.Logf("temperature 1.5, seed 7: %s; seed 8: %s", a, b)
	if a == b {
		t.Errorf("seeds 7 and 8 both gave %q", a)
	}
	if a == greedy {
		t.Errorf("temperature 1.5 gave the greedy continuation %q", a)
	}
	if got := generateIDs(t, 16, "--temperature", "1.5", "--seed", "7", "--top-p", "1e-6"); got != greedy {
		t.Errorf("--top-p 1e-6 gave %q, want the greedy %q", got, greedy)
	}
}

func TestCommandErrors(t *testing.T) {
	for _, args := range [][]string{
		{"generate", "-m", fixture, "--ids", "1,x"},
		{"generate", "-m", fixture, "--ids", "1,100000"},
		{"generate", "-m", fixture, "--ids", "1", "--temperature", "-1"},
		{"logits", "-m", "/does/not/exist", "--ids", "1"},
	} {
		if _, _, err := run(t, args...); err == nil {
			t.Errorf("%v: no error", args)
		}
	}
}

func TestGenerateFromTextAndChat(t *testing.T) {
	if _, errOut, err := run(t, "generate", "-m", fixture, "-p", "Hello, world", "-n", "3"); err != nil {
		t.Fatal(err)
	} else if !strings.Contains(errOut, "generated 3 tokens") {
		t.Errorf("summary %q", errOut)
	}
	msgs := filepath.Join(t.TempDir(), "m.json")
	if err := os.WriteFile(msgs, []byte(`[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"}]`), 0o644); err != nil {
		t.Fatal(err)
	}
	// [gMASK]<sop><|system|>Be brief.<|user|>Hi<|assistant|><think>: 6 special
	// tokens plus the text pieces.
	_, errOut, err := run(t, "generate", "-m", fixture, "--chat", msgs, "-n", "2")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(errOut, "generated 2 tokens") {
		t.Errorf("summary %q", errOut)
	}
	if _, _, err := run(t, "generate", "-m", fixture, "-p", "x", "--ids", "1,2"); err == nil {
		t.Error("two prompts at once were accepted")
	}
}

// The tokenizer commands on the fixture's GLM-style tokenizer: special tokens
// written in the text are single ids, and ids round-trip to the text.
func TestTokenizerCommands(t *testing.T) {
	text := "[gMASK]<sop><|user|>Hello, world<|assistant|>"
	out, _, err := runIn(t, text, "tokenize", "-m", fixture)
	if err != nil {
		t.Fatal(err)
	}
	var ids []int
	if err := json.Unmarshal([]byte(out), &ids); err != nil {
		t.Fatalf("tokenize printed %q: %v", out, err)
	}
	// [gMASK]=466, <sop>=468, <|user|>=471, <|assistant|>=472 in tokenizer.json.
	if len(ids) < 5 || ids[0] != 466 || ids[1] != 468 || ids[2] != 471 || ids[len(ids)-1] != 472 {
		t.Errorf("ids %v do not start with the special tokens [466 468 471] and end with 472", ids)
	}
	back, _, err := runIn(t, out, "detokenize", "-m", fixture)
	if err != nil {
		t.Fatal(err)
	}
	if strings.TrimSuffix(back, "\n") != text {
		t.Errorf("detokenize gave %q, want %q", back, text)
	}
	msgs := filepath.Join(t.TempDir(), "m.json")
	if err := os.WriteFile(msgs, []byte(`[{"role":"user","content":"Hi"}]`), 0o644); err != nil {
		t.Fatal(err)
	}
	prompt, _, err := run(t, "chat-template", "-m", fixture, "--messages", msgs, "--add-generation-prompt")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(prompt, "[gMASK]<sop><|user|>") || !strings.Contains(prompt, "Hi<|assistant|>") {
		t.Errorf("chat-template printed %q", prompt)
	}
	for _, bad := range []struct{ stdin, cmd string }{{"\xff\xfe", "tokenize"}, {"[1, 99999]", "detokenize"}, {"not json", "detokenize"}} {
		if _, _, err := runIn(t, bad.stdin, bad.cmd, "-m", fixture); err == nil {
			t.Errorf("%s accepted %q", bad.cmd, bad.stdin)
		}
	}
}

// info always succeeds; on a machine without a GPU it says so.
func TestInfoCommand(t *testing.T) {
	out, _, err := run(t, "info")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"CPU:", "features:", "MMFP4 int8 kernel:", "NVRTC:"} {
		if !strings.Contains(out, want) {
			t.Errorf("info output lacks %q:\n%s", want, out)
		}
	}
	if !strings.Contains(out, "GPU:     none:") && !strings.Contains(out, "compute capability") {
		t.Errorf("info output names neither a GPU nor its absence:\n%s", out)
	}
}

// --cpuprofile leaves a pprof profile (gzip-compressed protobuf) behind, and
// a command run after it without the flag writes none.
func TestCPUProfileFlag(t *testing.T) {
	path := filepath.Join(t.TempDir(), "cpu.prof")
	if _, _, err := run(t, "generate", "-m", fixture, "--ids", "1,2,3", "-n", "2", "--cpuprofile", path); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) < 2 || b[0] != 0x1f || b[1] != 0x8b {
		t.Fatalf("profile of %d bytes does not start with the gzip magic", len(b))
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if _, _, err := run(t, "generate", "-m", fixture, "--ids", "1,2,3", "-n", "2"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Errorf("a run without --cpuprofile wrote %s (%v)", path, err)
	}
	if _, _, err := run(t, "generate", "-m", fixture, "--ids", "1", "--cpuprofile", filepath.Join(path, "no", "such")); err == nil || !strings.Contains(err.Error(), "--cpuprofile") {
		t.Errorf("unwritable profile path: %v", err)
	}
}
