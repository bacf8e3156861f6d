package main

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

const fixture = "../../testdata/glm4moelite-tiny"

func run(t *testing.T, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	return runIn(t, "", args...)
}

func runIn(t *testing.T, stdin string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	// Flags keep their values between Execute calls: reset them.
	for _, c := range rootCmd.Commands() {
		c.Flags().VisitAll(func(f *pflag.Flag) {
			_ = f.Value.Set(f.DefValue)
			f.Changed = false
		})
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

func TestLogitsCommandWritesNpy(t *testing.T) {
	path := filepath.Join(t.TempDir(), "l.npy")
	if _, _, err := run(t, "logits", "-m", fixture, "--ids", "3,4,5", "--out", path); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(data, []byte("\x93NUMPY\x01\x00")) {
		t.Fatalf("bad magic %q", data[:8])
	}
	hlen := int(binary.LittleEndian.Uint16(data[8:10]))
	header := string(data[10 : 10+hlen])
	if (10+hlen)%64 != 0 || !strings.Contains(header, "'shape': (3, 512)") || !strings.HasSuffix(header, "\n") {
		t.Errorf("header %q (data offset %d)", header, 10+hlen)
	}
	body := data[10+hlen:]
	if len(body) != 3*512*4 {
		t.Fatalf("body %d bytes, want %d", len(body), 3*512*4)
	}
	nonzero := 0
	for i := 0; i < len(body); i += 4 {
		v := math.Float32frombits(binary.LittleEndian.Uint32(body[i:]))
		if math.IsNaN(float64(v)) {
			t.Fatal("NaN in logits")
		}
		if v != 0 {
			nonzero++
		}
	}
	if nonzero < 1500 {
		t.Errorf("only %d nonzero logits", nonzero)
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
