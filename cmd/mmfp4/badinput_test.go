package main

import (
	"os"
	"path/filepath"
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
