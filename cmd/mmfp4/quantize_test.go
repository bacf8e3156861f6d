package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/mmfp4/mmfp4/safetensors"
)

// editedFixture copies the fixture's config.json (changed by editConfig) and
// model.safetensors (each tensor passed through editTensor, which may return
// nil to drop it) into a new directory.
func editedFixture(t *testing.T, editConfig func(map[string]any), editTensor func(*safetensors.TensorInfo, []byte) []byte) string {
	t.Helper()
	dir := t.TempDir()
	raw, err := os.ReadFile(filepath.Join(fixture, "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	var cfg map[string]any
	if err := json.Unmarshal(raw, &cfg); err != nil {
		t.Fatal(err)
	}
	if editConfig != nil {
		editConfig(cfg)
	}
	if raw, err = json.Marshal(cfg); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), raw, 0o644); err != nil {
		t.Fatal(err)
	}
	src, err := safetensors.Open(filepath.Join(fixture, "model.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	var infos []safetensors.TensorInfo
	var datas [][]byte
	for _, name := range src.Names() {
		tn, _ := src.Tensor(name)
		info := safetensors.TensorInfo{Name: name, DType: tn.DType, Shape: tn.Shape}
		data := tn.Data
		if editTensor != nil {
			data = editTensor(&info, data)
		}
		if data != nil {
			infos = append(infos, info)
			datas = append(datas, data)
		}
	}
	w, err := safetensors.Create(filepath.Join(dir, "model.safetensors"), infos, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i, info := range infos {
		if err := w.Write(info.Name, datas[i]); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return dir
}

// leftovers lists what a run left in dir (hidden entries included).
func leftovers(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// A source that cannot load is refused before any work, and nothing is
// written; before, each of these converted and reported success.
func TestQuantizeRefusesSourcesThatCannotLoad(t *testing.T) {
	const lmHead = "lm_head.weight"
	for _, tc := range []struct {
		name       string
		editConfig func(map[string]any)
		editTensor func(*safetensors.TensorInfo, []byte) []byte
		want       []string
	}{
		{"hidden_size 0", func(c map[string]any) { c["hidden_size"] = 0 }, nil, []string{"config.json", `"hidden_size" is 0`}},
		{"vocab_size", func(c map[string]any) { c["vocab_size"] = 600 }, nil, []string{"shape [512 128], want [600 128]"}},
		{"lm_head rows", nil, func(info *safetensors.TensorInfo, data []byte) []byte {
			if info.Name == lmHead {
				info.Shape = []int{500, info.Shape[1]}
				return data[:500*info.Shape[1]*info.DType.Size()]
			}
			return data
		}, []string{lmHead, "shape [500 128], want [512 128]"}},
		{"no lm_head", nil, func(info *safetensors.TensorInfo, data []byte) []byte {
			if info.Name == lmHead {
				return nil
			}
			return data
		}, []string{lmHead, "not found"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := editedFixture(t, tc.editConfig, tc.editTensor)
			parent := t.TempDir()
			stdout, _, err := run(t, "quantize", "-i", src, "-o", filepath.Join(parent, "out"))
			if err == nil {
				t.Fatalf("quantize succeeded:\n%s", stdout)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
			if left := leftovers(t, parent); len(left) != 0 {
				t.Errorf("a refused run left %v", left)
			}
		})
	}
}

// Re-quantizing an MMFP4 directory says so (it used to print a table of
// zeros); so does a packed directory that lost its header, and loading such
// a directory names the missing header.
func TestQuantizeRefusesMMFP4Input(t *testing.T) {
	dir := t.TempDir()
	q := filepath.Join(dir, "q")
	if _, _, err := run(t, "quantize", "-i", fixture, "-o", q); err != nil {
		t.Fatal(err)
	}
	stdout, _, err := run(t, "quantize", "-i", q, "-o", filepath.Join(dir, "qq"))
	if err == nil || !strings.Contains(err.Error(), "MMFP4 model already") || stdout != "" {
		t.Errorf("re-quantize: err = %v, stdout %q", err, stdout)
	}
	if err := os.Remove(filepath.Join(q, "mmfp4.json")); err != nil {
		t.Fatal(err)
	}
	_, _, err = run(t, "quantize", "-i", q, "-o", filepath.Join(dir, "qq"))
	if err == nil || !strings.Contains(err.Error(), "MMFP4-packed already") || !strings.Contains(err.Error(), "mmfp4.json") {
		t.Errorf("re-quantize without header: err = %v", err)
	}
	_, _, err = run(t, "generate", "-m", q, "--ids", "1,2", "-n", "1")
	if err == nil || !strings.Contains(err.Error(), "mmfp4.json") || !strings.Contains(err.Error(), "missing") {
		t.Errorf("generate without header: err = %v, want one naming the missing mmfp4.json", err)
	}
	if left := leftovers(t, dir); len(left) != 1 {
		t.Errorf("left %v, want only q", left)
	}
}

// cancelOnWrite cancels a context when the progress bar first draws, which
// quantize does once its partial directory exists, before the first tensor.
type cancelOnWrite struct {
	cancel context.CancelFunc
	buf    bytes.Buffer
}

func (w *cancelOnWrite) Write(p []byte) (int, error) {
	if bytes.Contains(p, []byte("quantizing")) {
		w.cancel()
	}
	return w.buf.Write(p)
}

// An interrupted quantize removes its partial directory; one left by a
// killed run is named at the next start (and not removed: it may belong to
// a run still in progress).
func TestQuantizeInterruptedLeavesNothing(t *testing.T) {
	parent := t.TempDir()
	old := filepath.Join(parent, ".out.partial-12345")
	if err := os.Mkdir(old, 0o755); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	q := subcommand(t, "quantize")
	q.SetContext(ctx)
	t.Cleanup(func() { q.SetContext(context.Background()) })
	stderr := &cancelOnWrite{cancel: cancel}
	_, err := runWithErr(t, stderr, "quantize", "-i", fixture, "-o", filepath.Join(parent, "out"))
	if !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "interrupted") {
		t.Errorf("err = %v, want an interruption", err)
	}
	if left := leftovers(t, parent); len(left) != 1 || left[0] != filepath.Base(old) {
		t.Errorf("left %v, want only the earlier %s", left, filepath.Base(old))
	}
	if !strings.Contains(stderr.buf.String(), old) {
		t.Errorf("stderr does not name %s:\n%s", old, stderr.buf.String())
	}
}

// The commands' context ends on SIGINT and on SIGTERM.
func TestInterruptContextOnSignals(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM} {
		ctx, stop := interruptContext(context.Background())
		if err := syscall.Kill(os.Getpid(), sig); err != nil {
			t.Fatal(err)
		}
		select {
		case <-ctx.Done():
		case <-time.After(30 * time.Second): // a liveness guard, not a timing bound
			t.Errorf("%v did not cancel the context", sig)
		}
		stop()
	}
}

func subcommand(t *testing.T, name string) *cobra.Command {
	t.Helper()
	c, _, err := rootCmd.Find([]string{name})
	if err != nil || c.Name() != name {
		t.Fatalf("no %s command: %v", name, err)
	}
	return c
}

// runWithErr is run with stderr going to w.
func runWithErr(t *testing.T, w io.Writer, args ...string) (string, error) {
	t.Helper()
	for _, c := range rootCmd.Commands() {
		c.Flags().VisitAll(func(f *pflag.Flag) {
			_ = f.Value.Set(f.DefValue)
			f.Changed = false
		})
	}
	var o bytes.Buffer
	rootCmd.SetOut(&o)
	rootCmd.SetErr(w)
	rootCmd.SetIn(strings.NewReader(""))
	rootCmd.SetArgs(args)
	err := rootCmd.Execute()
	return o.String(), err
}
