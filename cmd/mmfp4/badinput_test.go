package main

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
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
