// Package outdir writes an output directory all at once: its files go into
// a hidden sibling that is renamed into place only when complete, so an
// interrupted writer leaves nothing that loads as a finished directory.
package outdir

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// Check refuses a dir that exists and is not an empty directory.
func Check(dir string) error {
	ents, err := os.ReadDir(dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil
	case err != nil:
		return fmt.Errorf("output %s: %w", dir, err)
	case len(ents) > 0:
		return fmt.Errorf("output %s exists and is not empty; refusing to overwrite it", dir)
	}
	return nil
}

// partialPrefix is the start of the names of dir's temporary directories.
func partialPrefix(dir string) string {
	return "." + filepath.Base(filepath.Clean(dir)) + ".partial-"
}

// Write checks dir (Check), has fill write the directory's files into a
// temporary sibling, checks dir again (it may have appeared meanwhile) and
// renames the sibling to dir. On any error the sibling is removed and dir
// is untouched. It returns the size of the files written.
func Write(dir string, fill func(tmp string) error) (int64, error) {
	if err := Check(dir); err != nil {
		return 0, err
	}
	parent := filepath.Dir(filepath.Clean(dir))
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return 0, err
	}
	tmp, err := os.MkdirTemp(parent, partialPrefix(dir))
	if err != nil {
		return 0, err
	}
	done := false
	defer func() {
		if !done {
			os.RemoveAll(tmp)
		}
	}()
	if err := os.Chmod(tmp, 0o755); err != nil { // MkdirTemp makes it private
		return 0, err
	}
	if err := fill(tmp); err != nil {
		return 0, err
	}
	if err := Check(dir); err != nil {
		return 0, err
	}
	os.Remove(dir) // an existing empty directory; rename cannot replace it everywhere
	if err := os.Rename(tmp, dir); err != nil {
		return 0, err
	}
	done = true
	SyncDir(parent)
	return Size(dir)
}

// Partials lists the temporary directories of writes to dir that were
// killed before they could clean up (a running write to dir has one too).
// Write never removes them itself: it cannot tell an abandoned one from
// one that another writer is still filling.
func Partials(dir string) ([]string, error) {
	parent := filepath.Dir(filepath.Clean(dir))
	ents, err := os.ReadDir(parent)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var dirs []string
	for _, e := range ents {
		if e.IsDir() && strings.HasPrefix(e.Name(), partialPrefix(dir)) {
			dirs = append(dirs, filepath.Join(parent, e.Name()))
		}
	}
	return dirs, nil
}

// SyncDir makes a directory's entries durable, where the system allows it.
func SyncDir(dir string) {
	if f, err := os.Open(dir); err == nil {
		_ = f.Sync()
		f.Close()
	}
}

// Size sums the sizes of the regular files directly in dir.
func Size(dir string) (int64, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	var n int64
	for _, e := range ents {
		info, err := e.Info()
		if err != nil {
			return 0, err
		}
		if info.Mode().IsRegular() {
			n += info.Size()
		}
	}
	return n, nil
}
