// Command quality measures what quantization costs the built-in model: the
// rows of docs/quality.md.
//
//	python3 tools/sotu.py   # writes testdata/sotu-eval/heldout-table.txt
//	go run ./tools/quality -work /tmp/quality
//
// It writes the quantized variants of the bf16 checkpoint into -work: MMFP4
// at group sizes 32/64/128, plain RTN and scale search (with `mmfp4
// quantize`'s converter), G=128 with lm_head (and the embedding) in FP8,
// and an FP8 E4M3 per-channel simulation of the whole model (fp8BF16). It
// then scores all of them on the same sliding windows as `mmfp4 ppl`
// (package perplexity) against the bf16 model as the reference, which runs
// once per window for all rows, and prints a Markdown table and one JSON
// line per row.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/mmfp4/mmfp4"
	"github.com/mmfp4/mmfp4/backend/cpu"
	"github.com/mmfp4/mmfp4/convert"
	"github.com/mmfp4/mmfp4/format"
	"github.com/mmfp4/mmfp4/model/glm4moelite"
	"github.com/mmfp4/mmfp4/perplexity"
	"github.com/mmfp4/mmfp4/safetensors"
)

type variant struct {
	name     string
	dir      string
	floatAct bool
	size     int64 // bytes of weights
	sizeNote string
}

func main() {
	bf16 := flag.String("bf16", "testdata/sotu-bf16", "bf16 checkpoint (the reference)")
	file := flag.String("file", "testdata/sotu-eval/heldout-table.txt", "text to score")
	work := flag.String("work", "", "directory for the quantized variants (required)")
	ctx := flag.Int("ctx", 512, "window")
	stride := flag.Int("stride", 512, "stride")
	flag.Parse()
	if err := run(*bf16, *file, *work, *ctx, *stride); err != nil {
		fmt.Fprintln(os.Stderr, "quality:", err)
		os.Exit(1)
	}
}

func run(bf16, file, work string, ctx, stride int) error {
	if work == "" {
		return errors.New("-work is required")
	}
	text, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	bsize, err := weightBytes(bf16)
	if err != nil {
		return err
	}
	vs := []variant{{name: "bf16", dir: bf16, size: bsize}}
	for _, g := range []int{32, 64, 128} {
		for _, search := range []bool{false, true} {
			q := "RTN"
			if search {
				q = "scale search"
			}
			dir := filepath.Join(work, fmt.Sprintf("g%d-%s", g, map[bool]string{false: "rtn", true: "search"}[search]))
			if err := ensure(dir, func() error {
				policy, err := glm4moelite.ReadConvertPolicy(bf16)
				if err != nil {
					return err
				}
				_, err = convert.Dir(bf16, dir, convert.Options{Policy: policy, GroupSize: g, Search: search})
				return err
			}); err != nil {
				return err
			}
			vs = append(vs, variant{name: fmt.Sprintf("MMFP4 G=%d, %s", g, q), dir: dir})
		}
	}
	g128 := filepath.Join(work, "g128-search")
	vs = append(vs, variant{name: "MMFP4 G=128, scale search, float activations", dir: g128, floatAct: true})
	for _, mix := range []struct {
		name string
		fp8  []string
	}{
		{"lmhead", []string{"lm_head.weight"}},
		{"lmhead-embed", []string{"lm_head.weight", "model.embed_tokens.weight"}},
	} {
		dir := filepath.Join(work, "g128-search-fp8-"+mix.name)
		var size int64
		if err := ensure(dir, func() error {
			var err error
			size, err = writeMixed(g128, bf16, dir, mix.fp8)
			return err
		}); err != nil {
			return err
		}
		if size == 0 { // made by an earlier run: recompute
			tmp := filepath.Join(work, ".size-"+mix.name)
			if size, err = writeMixed(g128, bf16, tmp, mix.fp8); err != nil {
				return err
			}
			os.RemoveAll(tmp)
		}
		vs = append(vs, variant{name: fmt.Sprintf("MMFP4 G=128, scale search, %s in FP8", strings.Join(mix.fp8, " and ")),
			dir: dir, size: size, sizeNote: "with those as FP8"})
	}
	fp8 := filepath.Join(work, "fp8")
	var fp8Size int64
	if err := ensure(fp8, func() error { return writeFP8(bf16, fp8) }); err != nil {
		return err
	}
	if fp8Size, err = fp8Bytes(bf16); err != nil {
		return err
	}
	vs = append(vs, variant{name: "FP8 E4M3 per-channel (simulated), float activations", dir: fp8, size: fp8Size,
		sizeNote: "as FP8 + fp32 channel scales"})

	var models []*mmfp4.Model
	for i := range vs {
		v := &vs[i]
		if v.size == 0 {
			if v.size, err = weightBytes(v.dir); err != nil {
				return err
			}
		}
		m, err := mmfp4.Load(v.dir, mmfp4.Options{MaxContext: ctx, Backend: cpu.New(cpu.Options{FloatActivations: v.floatAct})})
		if err != nil {
			return err
		}
		models = append(models, m)
	}
	ids, err := models[0].EncodeText(string(text))
	if err != nil {
		return err
	}
	// The bf16 model is both a row and the reference: run it once a window.
	ref := &memo{f: models[0].Logits}
	fns := []perplexity.LogitsFunc{ref.logits}
	for _, m := range models[1:] {
		fns = append(fns, m.Logits)
	}
	start := time.Now()
	res, err := perplexity.EvaluateAll(ids, fns, perplexity.Options{
		Ctx: ctx, Stride: stride, Vocab: models[0].Config().VocabSize, Ref: ref.logits,
		Progress: func(done, total int) {
			fmt.Fprintf(os.Stderr, "\rwindow %d/%d (%s)", done, total, time.Since(start).Round(time.Second))
		},
	})
	fmt.Fprintln(os.Stderr)
	if err != nil {
		return err
	}
	fmt.Printf("%s: %d tokens, %d scored in %d windows (ctx %d, stride %d), %s\n\n",
		file, len(ids), res[0].Tokens, res[0].Windows, ctx, stride, time.Since(start).Round(time.Second))
	fmt.Println("| weights | perplexity | vs bf16 | KL vs bf16 (nats/token) | top-1 agreement | size of weights |")
	fmt.Println("| --- | ---: | ---: | ---: | ---: | ---: |")
	for i, r := range res {
		v := vs[i]
		size := fmt.Sprintf("%.2f MB", float64(v.size)/1e6)
		if v.sizeNote != "" {
			size += " (" + v.sizeNote + ")"
		}
		fmt.Printf("| %s | %.3f | %+.2f%% | %.4f | %.2f%% | %s |\n", v.name, r.PPL, 100*(r.PPL/res[0].PPL-1), r.KL, 100*r.Top1, size)
	}
	fmt.Println()
	for i, r := range res {
		b, _ := json.Marshal(map[string]any{"row": vs[i].name, "ppl": r.PPL, "mean_nll": r.MeanNLL, "kl": r.KL,
			"top1": r.Top1, "tokens": r.Tokens, "windows": r.Windows, "bytes": vs[i].size})
		fmt.Println(string(b))
	}
	return nil
}

// memo remembers the logits of the last window, so that the reference and
// the bf16 row share one forward pass.
type memo struct {
	f    perplexity.LogitsFunc
	key  *int
	n    int
	last []float32
}

func (c *memo) logits(ids []int) ([]float32, error) {
	if len(ids) > 0 && &ids[0] == c.key && len(ids) == c.n {
		return c.last, nil
	}
	out, err := c.f(ids)
	if err != nil {
		return nil, err
	}
	c.key, c.n, c.last = &ids[0], len(ids), out
	return out, nil
}

// ensure runs build unless dir already exists.
func ensure(dir string, build func() error) error {
	if _, err := os.Stat(dir); err == nil {
		return nil
	}
	fmt.Fprintln(os.Stderr, "writing", dir)
	return build()
}

// weightBytes is the size of the safetensors files of dir.
func weightBytes(dir string) (int64, error) {
	var n int64
	ents, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".safetensors") {
			st, err := os.Stat(filepath.Join(dir, e.Name()))
			if err != nil {
				return 0, err
			}
			n += st.Size()
		}
	}
	return n, nil
}

// fp8Quantized reports whether a tensor gets FP8 weights: the matrices that
// MMFP4 quantizes (every 2-D weight except the router).
func fp8Quantized(t *safetensors.Tensor) bool {
	return len(t.Shape) == 2 && strings.HasSuffix(t.Name, ".weight") && !strings.HasSuffix(t.Name, ".mlp.gate.weight")
}

// fp8BF16 rounds a [n, k] matrix to FP8 E4M3 with one scale per row and
// returns the result as bf16 bytes. The scale is the power of two at or
// above amax/448, so each value is an E4M3 number times a power of two and
// is stored exactly in bf16: the result loads like any bf16 tensor and
// computes with exactly the FP8 values (activations stay float).
// tools/train_default.py simulates the same rule in torch.
func fp8BF16(v []float32, n, k int) []byte {
	data := make([]byte, 2*len(v))
	for r := 0; r < n; r++ {
		row := v[r*k : (r+1)*k]
		var amax float64
		for _, x := range row {
			amax = max(amax, math.Abs(float64(x)))
		}
		scale := 1.0
		if amax > 0 {
			scale = math.Exp2(math.Ceil(math.Log2(amax / format.E4M3Max)))
		}
		for i, x := range row {
			q := format.E4M3Decode(format.E4M3Encode(float32(float64(x) / scale)))
			h := safetensors.Float32ToBF16(float32(float64(q) * scale))
			data[2*(r*k+i)] = byte(h)
			data[2*(r*k+i)+1] = byte(h >> 8)
		}
	}
	return data
}

// writeFP8 writes a copy of the bf16 checkpoint src whose matrices are
// rounded to FP8 E4M3 per channel (fp8BF16).
func writeFP8(src, dst string) error {
	set, err := safetensors.OpenDir(src)
	if err != nil {
		return err
	}
	defer set.Close()
	var ts []*safetensors.Tensor
	for _, name := range set.Names() {
		t, err := set.Tensor(name)
		if err != nil {
			return err
		}
		ts = append(ts, t)
	}
	return writeDir(src, dst, ts, fp8Quantized)
}

// writeMixed copies the MMFP4 directory src to dst, except that the weights
// named in fp8 are taken from the bf16 checkpoint bf16Dir and rounded to FP8
// per channel instead (the cheapest fix the issue names: a few tensors at
// 8 bits). It returns the weight bytes such a checkpoint would have with
// those tensors stored as FP8 with fp32 row scales.
func writeMixed(src, bf16Dir, dst string, fp8 []string) (int64, error) {
	q, err := safetensors.OpenDir(src)
	if err != nil {
		return 0, err
	}
	defer q.Close()
	b, err := safetensors.OpenDir(bf16Dir)
	if err != nil {
		return 0, err
	}
	defer b.Close()
	size, err := weightBytes(src)
	if err != nil {
		return 0, err
	}
	drop := map[string]bool{}
	var ts []*safetensors.Tensor
	for _, name := range fp8 {
		qn, sn, rn := format.QuantizedNames(name)
		for _, n := range []string{qn, sn, rn} {
			t, err := q.Tensor(n)
			if err != nil {
				return 0, err
			}
			drop[n] = true
			size -= int64(len(t.Data))
		}
		t, err := b.Tensor(name)
		if err != nil {
			return 0, err
		}
		ts = append(ts, t)
		size += int64(t.Shape[0]*t.Shape[1] + 4*t.Shape[0])
	}
	for _, name := range q.Names() {
		if !drop[name] {
			t, err := q.Tensor(name)
			if err != nil {
				return 0, err
			}
			ts = append(ts, t)
		}
	}
	if err := writeDir(src, dst, ts, func(t *safetensors.Tensor) bool { return slices.Contains(fp8, t.Name) }); err != nil {
		return 0, err
	}
	// The header describes the stored tensors: these are no longer MMFP4.
	h, err := format.ReadHeader(src)
	if err != nil {
		return 0, err
	}
	for i := range h.Tensors {
		if slices.Contains(fp8, h.Tensors[i].Name) {
			h.Tensors[i].Quantized, h.Tensors[i].DType = false, string(safetensors.BF16)
		}
	}
	hb, err := json.MarshalIndent(h, "", "  ")
	if err != nil {
		return 0, err
	}
	return size, os.WriteFile(filepath.Join(dst, format.HeaderFile), hb, 0o644)
}

// writeDir writes dst/model.safetensors with the tensors ts, those for
// which fp8 is true rounded to FP8 per channel (stored as bf16) and the
// others copied, and copies the other files of src except its safetensors
// index.
func writeDir(src, dst string, ts []*safetensors.Tensor, fp8 func(*safetensors.Tensor) bool) error {
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return err
	}
	var infos []safetensors.TensorInfo
	for _, t := range ts {
		dt := t.DType
		if fp8(t) {
			dt = safetensors.BF16
		}
		infos = append(infos, safetensors.TensorInfo{Name: t.Name, DType: dt, Shape: t.Shape})
	}
	w, err := safetensors.Create(filepath.Join(dst, "model.safetensors"), infos, nil)
	if err != nil {
		return err
	}
	defer w.Abort()
	for _, t := range ts {
		data := t.Data
		if fp8(t) {
			v, err := t.Float32()
			if err != nil {
				return err
			}
			data = fp8BF16(v, t.Shape[0], t.Shape[1])
		}
		if err := w.Write(t.Name, data); err != nil {
			return err
		}
	}
	if err := w.Close(); err != nil {
		return err
	}
	ents, err := os.ReadDir(src)
	if err != nil {
		return err
	}
	for _, e := range ents {
		n := e.Name()
		if strings.HasSuffix(n, ".safetensors") || strings.HasSuffix(n, ".index.json") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(src, n))
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dst, n), b, 0o644); err != nil {
			return err
		}
	}
	return nil
}

// fp8Bytes is the size an FP8 per-channel checkpoint of src would have:
// one byte per quantized weight plus an fp32 scale per row; other tensors
// as stored.
func fp8Bytes(src string) (int64, error) {
	set, err := safetensors.OpenDir(src)
	if err != nil {
		return 0, err
	}
	defer set.Close()
	var n int64
	for _, name := range set.Names() {
		t, err := set.Tensor(name)
		if err != nil {
			return 0, err
		}
		if fp8Quantized(t) {
			n += int64(t.Shape[0]*t.Shape[1] + 4*t.Shape[0])
		} else {
			n += int64(len(t.Data))
		}
	}
	return n, nil
}
