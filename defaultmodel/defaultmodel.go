// Package defaultmodel holds the built-in demo model: a small glm4_moe_lite
// model (10.7 M parameters) trained from scratch on State of the Union
// addresses by tools/train_default.py, quantized to MMFP4 (group 128, scale
// search) by `mmfp4 quantize`. It writes text that reads like the addresses;
// it is not an assistant.
//
// The model directory is embedded in the binary. The loader, the tokenizer
// and the format header all read a directory and memory-map the weights, so
// rather than teach each of them to read from memory, Dir writes the
// embedded files once to a cache directory named after their content and
// returns its path: one 6 MB write on first use, no change to any loader, and
// a path that any tool can open.
package defaultmodel

import (
	"bytes"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"sync"
)

//go:embed model
var files embed.FS

const root = "model"

// Files returns the names of the embedded files, sorted.
func Files() []string {
	ents, err := fs.ReadDir(files, root)
	if err != nil {
		panic(err) // the embedded directory is part of the binary
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	slices.Sort(names)
	return names
}

// ReadFile returns the content of one embedded file.
func ReadFile(name string) ([]byte, error) {
	return files.ReadFile(path.Join(root, name))
}

var digest = sync.OnceValue(func() string {
	h := sha256.New()
	for _, n := range Files() {
		b, _ := ReadFile(n)
		fmt.Fprintf(h, "%s %d\n", n, len(b))
		h.Write(b)
	}
	return hex.EncodeToString(h.Sum(nil))[:16]
})

// Export writes the embedded model into dir as a normal MMFP4 model
// directory. dir must not exist or be empty.
func Export(dir string) error {
	if ents, err := os.ReadDir(dir); err == nil && len(ents) > 0 {
		return fmt.Errorf("%s: directory is not empty", dir)
	} else if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	return writeFiles(dir)
}

func writeFiles(dir string) error {
	for _, n := range Files() {
		b, err := ReadFile(n)
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dir, n), b, 0o644); err != nil {
			return err
		}
	}
	return nil
}

// Dir returns a directory holding the embedded model, writing it on first
// use under the user's cache directory (or, where that is not writable,
// the temporary directory).
func Dir() (string, error) {
	var bases []string
	if c, err := os.UserCacheDir(); err == nil {
		bases = append(bases, filepath.Join(c, "mmfp4"))
	}
	bases = append(bases, filepath.Join(os.TempDir(), fmt.Sprintf("mmfp4-%d", os.Getuid())))
	var errs []error
	for _, b := range bases {
		d, err := DirIn(b)
		if err == nil {
			return d, nil
		}
		errs = append(errs, err)
	}
	return "", fmt.Errorf("writing the built-in model: %w", errors.Join(errs...))
}

// DirIn is Dir with the cache directory given: the model goes to
// base/default-HASH, where HASH names the embedded content. An existing
// directory is used only if it holds exactly the embedded bytes; it is
// written in a temporary directory and renamed into place, so concurrent
// first uses are safe.
func DirIn(base string) (string, error) {
	dir := filepath.Join(base, "default-"+digest())
	if same(dir) {
		return dir, nil
	}
	if err := os.MkdirAll(base, 0o700); err != nil {
		return "", err
	}
	tmp, err := os.MkdirTemp(base, ".default-partial-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp) // after a successful rename there is nothing left to remove
	if err := writeFiles(tmp); err != nil {
		return "", err
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		return "", err
	}
	if err := os.Rename(tmp, dir); err != nil {
		if same(dir) { // another process put it there first
			return dir, nil
		}
		// A stale or damaged copy: replace it.
		if err := os.RemoveAll(dir); err != nil {
			return "", err
		}
		if err := os.Rename(tmp, dir); err != nil {
			return "", err
		}
	}
	return dir, nil
}

// same reports whether dir holds exactly the embedded files.
func same(dir string) bool {
	ents, err := os.ReadDir(dir)
	if err != nil || len(ents) != len(Files()) {
		return false
	}
	for _, n := range Files() {
		want, _ := ReadFile(n)
		got, err := os.ReadFile(filepath.Join(dir, n))
		if err != nil || !bytes.Equal(got, want) {
			return false
		}
	}
	return true
}
