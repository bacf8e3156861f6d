package safetensors

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// mappedKB returns the resident size (Rss, kB) of this process's mappings
// of path, from /proc/self/smaps.
func mappedKB(t *testing.T, path string) int {
	t.Helper()
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		t.Skipf("no /proc/self/smaps: %v", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	in, kb, found := false, 0, false
	for sc.Scan() {
		line := sc.Text()
		if fields := strings.Fields(line); len(fields) >= 6 && strings.Contains(fields[0], "-") {
			in = fields[len(fields)-1] == path
			found = found || in
			continue
		}
		if in && strings.HasPrefix(line, "Rss:") {
			var n int
			if _, err := fmt.Sscanf(line, "Rss: %d kB", &n); err != nil {
				t.Fatal(err)
			}
			kb += n
		}
	}
	if !found {
		t.Fatalf("%s is not mapped", path)
	}
	return kb
}

// Prefault maps the whole file into the process: the mapping's resident
// size goes from the header pages read at open to the file's size.
func TestPrefaultMapsEveryPage(t *testing.T) {
	path := filepath.Join(t.TempDir(), "big.safetensors")
	const rows, cols = 4096, 1024 // 16 MiB of float32: far more than the pages
	// that opening the file maps (its header's, in folios of up to 2 MiB)
	a := tensor("a", F32, 7, rows, cols)
	w, err := Create(path, []TensorInfo{a.info}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Write("a", a.data); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	f := openT(t, path)
	size := 4 * rows * cols / 1024
	if kb := mappedKB(t, path); kb >= size/2 {
		t.Fatalf("%d kB mapped before the prefault: the test cannot tell it worked", kb)
	}
	if err := f.Prefault(); err != nil {
		t.Fatal(err)
	}
	if kb := mappedKB(t, path); kb < size {
		t.Errorf("%d kB mapped after the prefault, want the file's %d kB", kb, size)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if err := f.Prefault(); err == nil || !strings.Contains(err.Error(), path) {
		t.Errorf("prefault of a closed file: %v", err)
	}
}
