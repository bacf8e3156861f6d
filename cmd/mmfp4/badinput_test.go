package main

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

// Values that cannot work are refused before any work, naming the flag.
func TestRejectUnworkableFlags(t *testing.T) {
	out := filepath.Join(t.TempDir(), "q")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"generate", "-m", fixture, "--ids", "1,2", "-n", "-1"}, "-n/--max-tokens -1"},
		{[]string{"generate", "-m", fixture, "--ids", "1,2", "--threads", "-3"}, "--threads -3"},
		{[]string{"logits", "-m", fixture, "--ids", "1,2", "--threads", "-3"}, "--threads -3"},
		{[]string{"generate", "-m", fixture, "--ids", "1,2", "--ctx", "-5"}, "--ctx -5"},
		{[]string{"quantize", "-i", fixture, "-o", out, "--group-size", "0"}, "--group-size 0"},
		{[]string{"quantize", "-i", fixture, "-o", out, "--group-size", "100"}, "--group-size 100"},
		{[]string{"generate", "-m", fixture, "-p", ""}, "the prompt is empty"},
		{[]string{"generate", "-m", fixture, "--ids", ""}, "--ids: no token ids"},
		{[]string{"generate", "-m", fixture, "--chat", ""}, "--chat: no file"},
	} {
		_, _, err := run(t, tc.args...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: err = %v, want one containing %q", tc.args, err, tc.want)
		}
	}
	if _, err := os.Stat(out); err == nil {
		t.Errorf("a refused quantize wrote %s", out)
	}
}

// generate --chat reads the files chat-template reads, and renders them the
// same way: its output equals that of generate --ids on the ids of
// chat-template's prompt.
func TestGenerateChatTakesChatTemplateFiles(t *testing.T) {
	dir := t.TempDir()
	for i, content := range []string{
		`[{"role":"user","content":"Hi"}]`,
		`{"messages": [{"role":"user","content":"Hi"}]}`,
		`{"messages": [{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"}], "enable_thinking": false}`,
	} {
		file := filepath.Join(dir, "m.json")
		if err := os.WriteFile(file, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		prompt, _, err := run(t, "chat-template", "-m", fixture, "--messages", file, "--add-generation-prompt")
		if err != nil {
			t.Fatalf("%d: chat-template: %v", i, err)
		}
		ids, _, err := runIn(t, prompt, "tokenize", "-m", fixture)
		if err != nil {
			t.Fatal(err)
		}
		ids = strings.Trim(strings.TrimSpace(ids), "[]")
		want, wantSummary, err := run(t, "generate", "-m", fixture, "--ids", ids, "-n", "4")
		if err != nil {
			t.Fatal(err)
		}
		got, summary, err := run(t, "generate", "-m", fixture, "--chat", file, "-n", "4")
		if err != nil {
			t.Fatalf("%d: generate --chat: %v", i, err)
		}
		// --chat streams text, --ids streams ids: compare the prompt sizes
		// and detokenize the ids.
		// Ids past the tokenizer's 484 entries are padding rows with no text.
		var textIDs []string
		for _, id := range strings.Fields(want) {
			if n, err := strconv.Atoi(id); err == nil && n < 484 {
				textIDs = append(textIDs, id)
			}
		}
		text, _, err := runIn(t, "["+strings.Join(textIDs, ",")+"]", "detokenize", "-m", fixture)
		if err != nil {
			t.Fatal(err)
		}
		if got != text+"\n" || promptTokens(summary) != promptTokens(wantSummary) {
			t.Errorf("%d: --chat gave %q (%s), --ids of the chat-template prompt gave %q (%s)", i, got, summary, text, wantSummary)
		}
	}
}

// promptTokens is the "prompt N tokens" part of generate's summary.
func promptTokens(summary string) string {
	s, _, _ := strings.Cut(summary, ",")
	return s
}

// failWriter fails every write, as stdout on a full device does.
type failWriter struct{}

func (failWriter) Write([]byte) (int, error) { return 0, errors.New("no space left on device") }

// Write errors on stdout or on the output file end the command with an
// error; --out - writes the .npy to stdout.
func TestWriteErrorsAreReported(t *testing.T) {
	for _, args := range [][]string{
		{"logits", "-m", fixture, "--ids", "1,2"},
		{"logits", "-m", fixture, "--ids", "1,2", "--out", "-"},
		{"generate", "-m", fixture, "--ids", "1,2", "-n", "2"},
	} {
		if _, err := runWithOut(t, failWriter{}, args...); err == nil || !strings.Contains(err.Error(), "no space left") {
			t.Errorf("%v to a full stdout: err = %v", args, err)
		}
	}
	dir := t.TempDir()
	out := filepath.Join(dir, "q")
	_, err := runWithOut(t, failWriter{}, "quantize", "-i", fixture, "-o", out)
	if err == nil || !strings.Contains(err.Error(), "no space left") || !strings.Contains(err.Error(), "written to "+out) {
		t.Errorf("quantize to a full stdout: err = %v", err)
	}
	// The model itself was complete before the report failed: it loads.
	if _, _, err := run(t, "generate", "-m", out, "--ids", "1,2", "-n", "1"); err != nil {
		t.Errorf("the model written before the report failed does not load: %v", err)
	}
	if _, err := os.Stat("/dev/full"); err == nil {
		if _, _, err := run(t, "logits", "-m", fixture, "--ids", "1,2", "--out", "/dev/full"); err == nil {
			t.Error("logits --out /dev/full: no error")
		}
	}

	npy := filepath.Join(dir, "l.npy")
	if _, _, err := run(t, "logits", "-m", fixture, "--ids", "3,4,5", "--out", npy); err != nil {
		t.Fatal(err)
	}
	want, err := os.ReadFile(npy)
	if err != nil {
		t.Fatal(err)
	}
	wd, _ := os.Getwd()
	t.Chdir(dir)
	got, _, err := run(t, "logits", "-m", filepath.Join(wd, fixture), "--ids", "3,4,5", "--out", "-")
	if err != nil {
		t.Fatal(err)
	}
	if got != string(want) {
		t.Errorf("--out - wrote %d bytes to stdout, --out FILE %d; they differ", len(got), len(want))
	}
	if _, err := os.Stat(filepath.Join(dir, "-")); err == nil {
		t.Error("--out - created a file named -")
	}
}

// runWithOut is run with stdout going to w.
func runWithOut(t *testing.T, w io.Writer, args ...string) (string, error) {
	t.Helper()
	for _, c := range rootCmd.Commands() {
		c.Flags().VisitAll(func(f *pflag.Flag) {
			_ = f.Value.Set(f.DefValue)
			f.Changed = false
		})
	}
	var e bytes.Buffer
	rootCmd.SetOut(w)
	rootCmd.SetErr(&e)
	rootCmd.SetIn(strings.NewReader(""))
	rootCmd.SetArgs(args)
	err := rootCmd.Execute()
	return e.String(), err
}
