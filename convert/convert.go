// Package convert turns a Hugging Face checkpoint directory into an MMFP4
// model directory. The codec is package format's; what to leave out and
// what to keep in fp32 is the model architecture's Policy (for
// glm4_moe_lite, glm4moelite.ConvertPolicy).
package convert

import (
	"cmp"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/mmfp4/mmfp4/format"
	"github.com/mmfp4/mmfp4/internal/outdir"
	"github.com/mmfp4/mmfp4/safetensors"
)

// Policy is what the model architecture decides in a conversion. It is
// read from the source's config (glm4moelite.ReadConvertPolicy), so the
// converter itself knows no tensor names.
type Policy interface {
	// Skip reports whether a source tensor is left out: one the engine
	// never loads.
	Skip(name string) bool
	// KeepF32 reports whether a tensor is stored exactly, in fp32, instead
	// of being quantized or rounded to bf16.
	KeepF32(name string) bool
}

// Options controls Dir.
type Options struct {
	Policy     Policy                  // required
	GroupSize  int                     // 32, 64 or 128; 0 means 128
	Search     bool                    // per-group scale search ("mse-search") instead of plain RTN
	Progress   func(done, total int64) // bytes of source tensors processed; may be nil
	ShardBytes int64                   // target shard size; 0 means 4 GiB

	// Verify, if set, checks that a model directory loads: the source
	// before any work, and the finished output (still under its temporary
	// name) before it is moved into place. An error stops the conversion
	// and leaves no output.
	Verify func(dir string) error
}

// Report is what Dir did, for the quality table.
type Report struct {
	Rows        []ReportRow // one per written tensor, worst relative error first
	Skipped     []string    // tensors the engine does not load (the MTP head), left out
	SourceBytes int64       // bytes of the source tensors converted
	OutputBytes int64       // bytes of all files in the output directory
}

// ReportRow is one tensor of the report. RelError is the relative
// reconstruction error of the stored tensor against the source (0 for a
// tensor copied exactly).
type ReportRow struct {
	Name      string
	Shape     []int
	RelError  float64
	Quantized bool
}

// MeanRelError is the mean relative error over the quantized tensors.
func (r *Report) MeanRelError() float64 {
	var sum float64
	n := 0
	for _, row := range r.Rows {
		if row.Quantized {
			sum += row.RelError
			n++
		}
	}
	if n == 0 {
		return 0
	}
	return sum / float64(n)
}

// MaxRelError is the largest relative error over the quantized tensors.
func (r *Report) MaxRelError() float64 {
	var m float64
	for _, row := range r.Rows {
		if row.Quantized {
			m = max(m, row.RelError)
		}
	}
	return m
}

const defaultShardBytes = 4 << 30

// job is one source tensor and the tensors it becomes in the output.
type job struct {
	name     string
	src      *safetensors.Tensor // Data aliases the source memory map
	quantize bool
	outDType safetensors.DType // for a kept tensor
	outputs  []safetensors.TensorInfo
	bytes    int64 // output bytes
}

// Dir converts a Hugging Face checkpoint in directory in to an MMFP4 model
// directory out, under opt.Policy. out must not exist or be empty. The
// result is assembled in a temporary directory next to out (see
// PartialDirs) and renamed into place at the end, so a failed run leaves
// nothing behind.
func Dir(in, out string, opt Options) (*Report, error) {
	return DirContext(context.Background(), in, out, opt)
}

// DirContext is Dir that stops when ctx is cancelled: it checks ctx between
// tensors, removes the partial output and returns ctx's error.
func DirContext(ctx context.Context, in, out string, opt Options) (*Report, error) {
	if opt.Policy == nil {
		return nil, errors.New("convert: no Policy given: the model package says which tensors to skip and which to keep in fp32")
	}
	if opt.GroupSize == 0 {
		opt.GroupSize = 128
	}
	if !format.ValidGroupSize(opt.GroupSize) {
		return nil, fmt.Errorf("convert: group size %d: must be 32, 64 or 128", opt.GroupSize)
	}
	if opt.ShardBytes <= 0 {
		opt.ShardBytes = defaultShardBytes
	}
	if err := outdir.Check(out); err != nil {
		return nil, err
	}
	if format.IsMMFP4Dir(in) {
		return nil, fmt.Errorf("%s holds an MMFP4 model already (it has %s): quantize reads a bf16/f16/f32 Hugging Face checkpoint", in, format.HeaderFile)
	}
	set, err := safetensors.OpenDir(in)
	if err != nil {
		return nil, err
	}
	defer set.Close()
	for _, name := range set.Names() {
		if strings.HasSuffix(name, ".qweight") {
			return nil, fmt.Errorf("%s: tensor %s is MMFP4-packed already (and %s is missing): quantize reads a bf16/f16/f32 Hugging Face checkpoint", in, name, format.HeaderFile)
		}
	}
	if opt.Verify != nil {
		if err := opt.Verify(in); err != nil {
			return nil, fmt.Errorf("the source does not load as a model, so its conversion would not either: %w", err)
		}
	}

	rep := &Report{}
	var jobs []*job
	for _, name := range set.Names() {
		if opt.Policy.Skip(name) {
			rep.Skipped = append(rep.Skipped, name)
			continue
		}
		t, err := set.Tensor(name)
		if err != nil {
			return nil, err
		}
		j, err := planTensor(t, opt.GroupSize, opt.Policy.KeepF32(t.Name))
		if err != nil {
			return nil, err
		}
		jobs = append(jobs, j)
		rep.SourceBytes += int64(len(t.Data))
	}
	if len(jobs) == 0 {
		return nil, fmt.Errorf("%s: no tensors to convert", in)
	}

	// The output appears whole or not at all (outdir.Write).
	rep.OutputBytes, err = outdir.Write(out, func(tmp string) error {
		// Shards are planned from the output sizes up front: their names carry
		// the shard count, and each file's header lists all of its tensors.
		shards := planShards(jobs, opt.ShardBytes)
		weightMap := map[string]string{}
		var totalSize, processed int64
		progress := func() {
			if opt.Progress != nil {
				opt.Progress(processed, rep.SourceBytes)
			}
		}
		progress()
		for i, shard := range shards {
			file := "model.safetensors"
			if len(shards) > 1 {
				file = fmt.Sprintf("model-%05d-of-%05d.safetensors", i+1, len(shards))
			}
			var infos []safetensors.TensorInfo
			for _, j := range shard {
				infos = append(infos, j.outputs...)
				for _, o := range j.outputs {
					weightMap[o.Name] = file
				}
				totalSize += j.bytes
			}
			w, err := safetensors.Create(filepath.Join(tmp, file), infos, map[string]string{"format": "pt"})
			if err != nil {
				return err
			}
			for _, j := range shard {
				if err := ctx.Err(); err != nil {
					w.Abort()
					return err
				}
				row, err := convertTensor(w, j, opt)
				if err != nil {
					w.Abort()
					return err
				}
				rep.Rows = append(rep.Rows, row)
				processed += int64(len(j.src.Data))
				progress()
			}
			if err := w.Close(); err != nil {
				return err
			}
		}
		if err := safetensors.WriteIndex(tmp, weightMap, totalSize, nil); err != nil {
			return err
		}
		if err := copyAuxFiles(in, tmp); err != nil {
			return err
		}
		if err := writeHeader(tmp, buildHeader(jobs, opt)); err != nil {
			return err
		}
		if opt.Verify != nil {
			if err := opt.Verify(tmp); err != nil {
				return fmt.Errorf("the converted model does not load; nothing was written to %s: %w", out, err)
			}
		}
		return ctx.Err()
	})
	if err != nil {
		return nil, err
	}

	slices.SortStableFunc(rep.Rows, func(a, b ReportRow) int {
		return cmp.Or(cmp.Compare(b.RelError, a.RelError), strings.Compare(a.Name, b.Name))
	})
	return rep, nil
}

// PartialDirs lists the temporary directories of conversions to out that
// were killed before they could clean up (a running conversion to out has one
// too). Dir never removes them itself: it cannot tell an abandoned one
// from one that another conversion is still writing.
func PartialDirs(out string) ([]string, error) { return outdir.Partials(out) }

func isFloat(d safetensors.DType) bool {
	return d == safetensors.BF16 || d == safetensors.F16 || d == safetensors.F32
}

// planTensor decides what a source tensor becomes. A keepF32 tensor is
// stored exactly, as F32 (the policy says which: for glm4_moe_lite, the
// router).
func planTensor(t *safetensors.Tensor, g int, keepF32 bool) (*job, error) {
	j := &job{name: t.Name, src: t}
	j.quantize = isFloat(t.DType) && len(t.Shape) == 2 && strings.HasSuffix(t.Name, ".weight") &&
		!keepF32 && t.Shape[0] > 0 && t.Shape[1] > 0 && t.Shape[1]%g == 0
	if j.quantize {
		n, k := t.Shape[0], t.Shape[1]
		q, s, r := format.QuantizedNames(t.Name)
		j.outputs = []safetensors.TensorInfo{
			{Name: q, DType: safetensors.U8, Shape: []int{n, k / 2}},
			{Name: s, DType: safetensors.F8E4M3, Shape: []int{n, k / g}},
			{Name: r, DType: safetensors.F32, Shape: []int{n}},
		}
		j.bytes = int64(n*k/2 + n*k/g + 4*n)
		return j, nil
	}
	switch {
	case keepF32 && isFloat(t.DType), t.DType == safetensors.F32:
		j.outDType = safetensors.F32
	case isFloat(t.DType):
		j.outDType = safetensors.BF16
	case keepF32:
		return nil, fmt.Errorf("%s: tensor %s: kept in fp32, but its dtype is %s, not a float type", t.File, t.Name, t.DType)
	default:
		j.outDType = t.DType // not a float tensor: copied unchanged
	}
	j.outputs = []safetensors.TensorInfo{{Name: t.Name, DType: j.outDType, Shape: t.Shape}}
	j.bytes = int64(t.NumElements() * j.outDType.Size())
	return j, nil
}

// planShards groups the jobs, in order, into shards of at most about
// maxBytes; a tensor larger than that gets a shard of its own.
func planShards(jobs []*job, maxBytes int64) [][]*job {
	var shards [][]*job
	var cur []*job
	var size int64
	for _, j := range jobs {
		if len(cur) > 0 && size+j.bytes > maxBytes {
			shards = append(shards, cur)
			cur, size = nil, 0
		}
		cur = append(cur, j)
		size += j.bytes
	}
	if len(cur) > 0 {
		shards = append(shards, cur)
	}
	return shards
}

// convertTensor writes the outputs of one job and measures its error.
func convertTensor(w *safetensors.Writer, j *job, opt Options) (ReportRow, error) {
	t := j.src
	row := ReportRow{Name: t.Name, Shape: t.Shape, Quantized: j.quantize}
	if !j.quantize && j.outDType == t.DType {
		return row, w.Write(t.Name, t.Data) // an exact copy
	}
	x, err := t.Float32()
	if err != nil {
		return row, err
	}
	if !j.quantize {
		var data []byte
		var got []float32
		switch j.outDType {
		case safetensors.F32:
			data, got = float32Bytes(x), x // widening is exact
		case safetensors.BF16:
			data, got = bf16Bytes(x)
		}
		row.RelError = format.RelError(x, got)
		return row, w.Write(t.Name, data)
	}
	m, err := format.Quantize(x, t.Shape[0], t.Shape[1], format.QuantOptions{GroupSize: opt.GroupSize, Search: opt.Search})
	if err != nil {
		return row, fmt.Errorf("%s: tensor %s: %w", t.File, t.Name, err)
	}
	row.RelError = m.RelError(x)
	q, s, r := format.QuantizedNames(t.Name)
	if err := w.Write(q, m.Codes); err != nil {
		return row, err
	}
	if err := w.Write(s, m.Scales); err != nil {
		return row, err
	}
	return row, w.Write(r, float32Bytes(m.RowScale))
}

func float32Bytes(x []float32) []byte {
	b := make([]byte, 4*len(x))
	for i, v := range x {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(v))
	}
	return b
}

// bf16Bytes rounds x to bfloat16 and returns the encoded bytes and the
// rounded values.
func bf16Bytes(x []float32) ([]byte, []float32) {
	b := make([]byte, 2*len(x))
	got := make([]float32, len(x))
	for i, v := range x {
		h := safetensors.Float32ToBF16(v)
		binary.LittleEndian.PutUint16(b[2*i:], h)
		got[i] = safetensors.BF16ToFloat32(h)
	}
	return b, got
}

// buildHeader lists every converted tensor in mmfp4.json.
func buildHeader(jobs []*job, opt Options) *format.Header {
	h := &format.Header{
		Format:    format.FormatName,
		Version:   format.FormatVersion,
		GroupSize: opt.GroupSize,
		Layout:    format.LayoutNK,
		ScaleType: format.ScaleTypeE4M3,
		Quantizer: format.QuantizerRTN,
		Tensors:   []format.HeaderTensor{},
	}
	if opt.Search {
		h.Quantizer = format.QuantizerSearch
	}
	for _, j := range jobs {
		ht := format.HeaderTensor{Name: j.name, Shape: j.src.Shape, Quantized: j.quantize, DType: string(j.outDType)}
		if j.quantize {
			ht.DType = format.QuantizedDType
			// The source dtype is that of the quantized weights; "mixed" if they differ.
			switch src := string(j.src.DType); h.SourceDType {
			case "":
				h.SourceDType = src
			case src:
			default:
				h.SourceDType = "mixed"
			}
		}
		h.Tensors = append(h.Tensors, ht)
	}
	return h
}

func writeHeader(dir string, h *format.Header) error {
	b, err := json.MarshalIndent(h, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, format.HeaderFile), append(b, '\n'), 0o644)
}

// copyAuxFiles copies config.json, generation_config.json and the tokenizer
// files (every top-level *.json, *.jinja, *.txt and *.model except the
// source's own safetensors index and header).
func copyAuxFiles(in, out string) error {
	ents, err := os.ReadDir(in)
	if err != nil {
		return err
	}
	for _, e := range ents {
		name := e.Name()
		switch {
		case name == format.HeaderFile || strings.HasSuffix(name, ".index.json"):
			continue
		case !slices.Contains([]string{".json", ".jinja", ".txt", ".model"}, filepath.Ext(name)):
			continue
		}
		// Stat follows symlinks, as in a Hugging Face cache snapshot.
		if st, err := os.Stat(filepath.Join(in, name)); err != nil || !st.Mode().IsRegular() {
			continue
		}
		if err := copyFile(filepath.Join(in, name), filepath.Join(out, name)); err != nil {
			return err
		}
	}
	return nil
}

func copyFile(src, dst string) error {
	r, err := os.Open(src)
	if err != nil {
		return err
	}
	defer r.Close()
	w, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(w, r); err != nil {
		w.Close()
		return err
	}
	return w.Close()
}
