package main

import (
	"bytes"
	"encoding/binary"
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
