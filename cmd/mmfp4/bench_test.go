package main

import (
	"strings"
	"testing"
)

// In task mode bench exits 0 at once: no model directory is even looked at.
func TestBenchSkipsInTaskMode(t *testing.T) {
	t.Setenv("ALPHAHENG_TASK_MODE", "1")
	out, _, err := run(t, "bench", "-m", "/nonexistent")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "skipped") {
		t.Errorf("output %q does not say benchmarks are skipped", out)
	}
}

func TestBenchBadFlags(t *testing.T) {
	t.Setenv("ALPHAHENG_TASK_MODE", "")
	for _, args := range [][]string{
		{"bench", "-m", fixture, "--gen", "1"},
		{"bench", "-m", fixture, "--ctx", "0"},
		{"bench", "-m", fixture, "--device", "tpu"},
	} {
		if _, _, err := run(t, args...); err == nil {
			t.Errorf("%v accepted", args)
		}
	}
}

func TestSynthBadFlags(t *testing.T) {
	for _, args := range [][]string{
		{"synth", "--preset", "nope", "-o", t.TempDir() + "/m"},
		{"synth", "-o", t.TempDir() + "/m", "--layers", "-2"},
		{"synth", "-o", t.TempDir() + "/m", "--group-size", "100"},
	} {
		if _, _, err := run(t, args...); err == nil {
			t.Errorf("%v accepted", args)
		}
	}
}
