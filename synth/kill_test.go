//go:build unix

package synth

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/mmfp4/mmfp4"
)

// A run killed outright (no chance to clean up) leaves no directory at the
// output path, and what it left beside it does not load as a model.
func TestKilledRunLeavesNothingLoadable(t *testing.T) {
	if dir := os.Getenv("SYNTH_KILL_CHILD_DIR"); dir != "" {
		// The child: write, and kill itself halfway through.
		opt := Options{Config: tinyConfig(t), ShardBytes: 1 << 20, Progress: func(done, total int64) {
			if done > total/2 {
				syscall.Kill(os.Getpid(), syscall.SIGKILL)
			}
		}}
		_, err := Write(context.Background(), dir, opt)
		t.Fatalf("the child was not killed: %v", err)
	}
	parent := t.TempDir()
	dir := filepath.Join(parent, "model")
	cmd := exec.Command(os.Args[0], "-test.run=^TestKilledRunLeavesNothingLoadable$")
	cmd.Env = append(os.Environ(), "SYNTH_KILL_CHILD_DIR="+dir)
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); !ok || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("child ended with %v, want killed", err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("output directory exists after a killed run (%v)", err)
	}
	ents, err := os.ReadDir(parent)
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != 1 || !strings.HasPrefix(ents[0].Name(), ".model.partial-") {
		t.Fatalf("left behind %v, want one partial directory", ents)
	}
	partial := filepath.Join(parent, ents[0].Name())
	if files, _ := os.ReadDir(partial); len(files) == 0 {
		t.Fatal("the partial directory is empty: the kill came too early to test anything")
	}
	if m, err := mmfp4.Load(partial, mmfp4.Options{}); err == nil {
		m.Close()
		t.Error("the partial directory of a killed run loads as a model")
	}
}
