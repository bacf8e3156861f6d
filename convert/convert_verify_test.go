package convert

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/mmfp4/mmfp4/format"
)

// Cancelling the context between tensors stops the conversion and removes
// the partial directory.
func TestDirContextCancelled(t *testing.T) {
	src := t.TempDir()
	fakeCheckpoint(t, src)
	parent := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	calls := 0
	var sawPartial bool
	_, err := DirContext(ctx, src, filepath.Join(parent, "out"), Options{Policy: glm, GroupSize: 32,
		Progress: func(done, total int64) {
			calls++
			if calls == 3 { // two tensors written
				dirs, _ := PartialDirs(filepath.Join(parent, "out"))
				sawPartial = len(dirs) == 1
				cancel()
			}
		}})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	if calls != 3 || !sawPartial {
		t.Errorf("%d progress calls after the cancel at the third; partial directory seen: %v", calls, sawPartial)
	}
	if ents, _ := os.ReadDir(parent); len(ents) != 0 {
		t.Errorf("a cancelled run left %v", ents)
	}
}

// Verify sees the source first, then the complete output under its
// temporary name; a rejected output is not moved into place.
func TestDirVerify(t *testing.T) {
	src := t.TempDir()
	fakeCheckpoint(t, src)
	parent := t.TempDir()
	out := filepath.Join(parent, "out")
	var seen []string
	verify := func(reject string) func(string) error {
		return func(dir string) error {
			seen = append(seen, dir)
			if dir != src && !format.IsMMFP4Dir(dir) {
				t.Errorf("output %s verified before its header was written", dir)
			}
			if strings.Contains(dir, reject) {
				return errors.New("rejected")
			}
			return nil
		}
	}
	_, err := Dir(src, out, Options{Policy: glm, Verify: verify(".partial-")})
	if err == nil || !strings.Contains(err.Error(), "does not load") {
		t.Errorf("rejected output: err = %v", err)
	}
	if len(seen) != 2 || seen[0] != src || !strings.HasPrefix(filepath.Base(seen[1]), ".out.partial-") {
		t.Errorf("Verify saw %v, want the source then the partial output", seen)
	}
	if ents, _ := os.ReadDir(parent); len(ents) != 0 {
		t.Errorf("a rejected output left %v", ents)
	}
	seen = nil
	if _, err := Dir(src, out, Options{Policy: glm, Verify: verify(src)}); err == nil || !strings.Contains(err.Error(), "source does not load") {
		t.Errorf("rejected source: err = %v", err)
	}
	if len(seen) != 1 {
		t.Errorf("Verify saw %v after rejecting the source", seen)
	}
	if _, err := Dir(src, out, Options{Policy: glm, Verify: verify("no such dir")}); err != nil {
		t.Fatal(err)
	}
	if !format.IsMMFP4Dir(out) {
		t.Error("accepted output not in place")
	}
	// The output is MMFP4 already: converting it again is refused by name.
	_, err = Dir(out, filepath.Join(parent, "again"), Options{Policy: glm})
	if err == nil || !strings.Contains(err.Error(), "MMFP4 model already") {
		t.Errorf("re-convert: err = %v", err)
	}
}

func TestPartialDirs(t *testing.T) {
	parent := t.TempDir()
	for _, d := range []string{".out.partial-1", ".out.partial-22", ".outx.partial-3", "out", ".other.partial-4"} {
		if err := os.Mkdir(filepath.Join(parent, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	writeFile(t, filepath.Join(parent, ".out.partial-file"), "not a directory")
	got, err := PartialDirs(filepath.Join(parent, "out") + "/")
	if err != nil {
		t.Fatal(err)
	}
	want := []string{filepath.Join(parent, ".out.partial-1"), filepath.Join(parent, ".out.partial-22")}
	if !slices.Equal(got, want) {
		t.Errorf("PartialDirs = %v, want %v", got, want)
	}
	if got, err := PartialDirs(filepath.Join(parent, "missing", "out")); err != nil || len(got) != 0 {
		t.Errorf("missing parent: %v, %v", got, err)
	}
}
