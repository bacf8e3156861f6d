package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"time"
	"unicode/utf8"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"

	"github.com/mmfp4/mmfp4"
	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/model/glm4moelite"
	"github.com/mmfp4/mmfp4/perplexity"
)

// pplFlags are the flags of `mmfp4 ppl`. It has its own --ctx (the window),
// so it does not use modelFlags.
type pplFlags struct {
	dir, ref, file string
	ctx, stride    int
	threads        int
	floatAct       bool
	json           bool
	kvDType        string
	device         string
}

// pplReport is what `mmfp4 ppl --json` prints, one line.
type pplReport struct {
	Model       string   `json:"model"`
	File        string   `json:"file"`
	Ctx         int      `json:"ctx"`
	Stride      int      `json:"stride"`
	Windows     int      `json:"windows"`
	Tokens      int      `json:"tokens"`
	PPL         float64  `json:"ppl"`
	MeanNLL     float64  `json:"mean_nll"`
	Seconds     float64  `json:"seconds"`
	LoadSeconds float64  `json:"load_seconds"`
	KVDType     string   `json:"kv_cache_dtype"`
	KVBytes     int      `json:"kv_bytes_per_token"` // all layers
	Ref         string   `json:"ref,omitempty"`
	KL          *float64 `json:"kl,omitempty"`
	Top1        *float64 `json:"top1,omitempty"`
}

func init() {
	var f pplFlags
	cmd := &cobra.Command{
		Use:   "ppl [-m DIR] --file TEXT [--ctx 512] [--stride N] [--ref DIR] [--kv-cache-dtype f32] [--json]",
		Short: "Perplexity of a model on a text file, with a sliding window",
		Long: "Tokenizes the file with the model's tokenizer (with its special tokens, as\n" +
			"HF's tokenizer(text) does) and scores it with windows of --ctx tokens that\n" +
			"start every --stride tokens; each window scores only the tokens no earlier\n" +
			"window scored (the Hugging Face perplexity guide's method). With --ref, the\n" +
			"reference model runs on the same windows and the mean KL(ref || model) and\n" +
			"the top-1 agreement are reported too.\n\n" +
			"--kv-cache-dtype stores the model's latent cache as serving does (the paged\n" +
			"blocks, every position attending to the rounded cache); the default f32 is\n" +
			"exact. The reference always runs with the exact cache, so --ref with the same\n" +
			"model measures what the cache precision alone costs.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			rep, err := runPPL(f, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			return printPPL(cmd.OutOrStdout(), rep, f.json)
		},
	}
	fl := cmd.Flags()
	fl.StringVarP(&f.dir, "model", "m", "", "model directory: Hugging Face checkpoint or MMFP4 (default: the built-in demo model)")
	fl.StringVar(&f.file, "file", "", "UTF-8 text file to score (required)")
	fl.IntVar(&f.ctx, "ctx", 512, "window size in tokens")
	fl.IntVar(&f.stride, "stride", 0, "tokens between window starts (0: half the window)")
	fl.StringVar(&f.ref, "ref", "", "reference model directory: also report KL divergence and top-1 agreement against it")
	fl.IntVar(&f.threads, "threads", 0, "CPU threads (0: all cores)")
	fl.BoolVar(&f.floatAct, "float-activations", false, "run MMFP4 products on float32 activations instead of int8")
	fl.BoolVar(&f.json, "json", false, "print one JSON line instead of the summary")
	fl.StringVar(&f.kvDType, "kv-cache-dtype", "f32", "latent cache precision of the model (not of --ref): f32 (exact), bf16, fp8 or fp4")
	fl.StringVar(&f.device, "device", "auto", "compute device: cuda, cpu or auto (CUDA when a supported GPU is found)")
	_ = cmd.MarkFlagRequired("file")
	rootCmd.AddCommand(cmd)
}

func runPPL(f pplFlags, progress io.Writer) (*pplReport, error) {
	if f.ctx < 2 {
		return nil, fmt.Errorf("--ctx %d: the window needs at least 2 tokens", f.ctx)
	}
	stride := f.stride
	if stride == 0 {
		stride = max(1, f.ctx/2)
	}
	if stride < 1 || stride > f.ctx {
		return nil, fmt.Errorf("--stride %d: want 1 to --ctx (%d)", stride, f.ctx)
	}
	dtype, err := backend.ParseCacheDType(f.kvDType)
	if err != nil {
		return nil, fmt.Errorf("--kv-cache-dtype: %w", err)
	}
	text, err := readUTF8(f.file)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	m, dir, err := loadForPPL(f.dir, "--model", f.ctx, f, dtype)
	if err != nil {
		return nil, err
	}
	defer m.Close()
	ids, err := m.EncodeText(text)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", f.file, err)
	}
	if len(ids) < f.ctx {
		return nil, fmt.Errorf("%s: %d tokens, fewer than one window of --ctx %d; give a longer file or a smaller --ctx",
			f.file, len(ids), f.ctx)
	}
	cfg := m.Config()
	vocab := cfg.VocabSize
	opt := perplexity.Options{Ctx: f.ctx, Stride: stride, Vocab: vocab}
	rep := &pplReport{Model: dir, File: f.file, Ctx: f.ctx, Stride: stride, KVDType: dtype.String(),
		KVBytes: backend.CacheBytesPerToken(cfg.KVLoraRank, cfg.QKRopeHeadDim, dtype) * cfg.NumLayers}
	if f.ref != "" {
		ref, refDir, err := loadForPPL(f.ref, "--ref", f.ctx, f, backend.CacheF32)
		if err != nil {
			return nil, err
		}
		defer ref.Close()
		if rv := ref.Config().VocabSize; rv != vocab {
			return nil, fmt.Errorf("--ref %s: vocabulary of %d tokens, but the model has %d", refDir, rv, vocab)
		}
		opt.Ref = ref.Logits
		rep.Ref = refDir
	}
	rep.LoadSeconds = time.Since(start).Seconds()

	ws, err := perplexity.Windows(len(ids), f.ctx, stride)
	if err != nil {
		return nil, err
	}
	bar := progressbar.NewOptions(len(ws), progressbar.OptionSetWriter(progress),
		progressbar.OptionSetDescription("ppl windows"), progressbar.OptionShowCount(),
		progressbar.OptionSetPredictTime(true), progressbar.OptionClearOnFinish())
	opt.Progress = func(done, _ int) { _ = bar.Set(done) }
	start = time.Now()
	logits := func(ids []int) ([]float32, error) { return m.LogitsWithCache(ids, dtype) }
	res, err := perplexity.Evaluate(ids, logits, opt)
	_ = bar.Finish()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", f.file, err)
	}
	rep.Seconds = time.Since(start).Seconds()
	rep.Windows, rep.Tokens, rep.PPL, rep.MeanNLL = res.Windows, res.Tokens, res.PPL, res.MeanNLL
	if opt.Ref != nil {
		rep.KL, rep.Top1 = &res.KL, &res.Top1
	}
	return rep, nil
}

// loadForPPL loads a model (the built-in one for an empty dir) whose
// context holds a window of ctx tokens, on the device of --device that runs
// a cache of dtype.
func loadForPPL(dir, flag string, ctx int, f pplFlags, dtype backend.CacheDType) (*mmfp4.Model, string, error) {
	dir, err := modelDir(dir)
	if err != nil {
		return nil, "", err
	}
	cfg, err := glm4moelite.LoadConfig(dir)
	if err != nil {
		return nil, "", fmt.Errorf("%s %s: %w", flag, dir, err)
	}
	if mp := cfg.MaxPositions; mp > 0 && ctx > mp {
		return nil, "", fmt.Errorf("--ctx %d is larger than %s %s allows (max_position_embeddings %d)", ctx, flag, dir, mp)
	}
	if f.threads < 0 {
		return nil, "", fmt.Errorf("--threads %d: want 0 (all cores) or a positive count", f.threads)
	}
	mf := modelFlags{threads: f.threads, floatAct: f.floatAct, device: f.device}
	b, err := mf.pickBackend()
	if err != nil {
		return nil, "", err
	}
	m, err := mmfp4.Load(dir, mmfp4.Options{Backend: b, MaxContext: ctx})
	if err != nil {
		return nil, "", fmt.Errorf("%s %s: %w", flag, dir, err)
	}
	return m, dir, nil
}

// readUTF8 reads a non-empty UTF-8 text file.
func readUTF8(path string) (string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	if len(data) == 0 {
		return "", fmt.Errorf("%s: the file is empty", path)
	}
	if !utf8.Valid(data) {
		off := 0
		for off < len(data) {
			r, n := utf8.DecodeRune(data[off:])
			if r == utf8.RuneError && n <= 1 {
				break
			}
			off += n
		}
		return "", fmt.Errorf("%s: not UTF-8 text (invalid byte 0x%02x at offset %d)", path, data[off], off)
	}
	return string(data), nil
}

func printPPL(w io.Writer, r *pplReport, asJSON bool) error {
	if asJSON {
		b, err := json.Marshal(r)
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(w, "%s\n", b)
		return err
	}
	fmt.Fprintf(w, "model %s\nfile %s: %d tokens scored in %d windows (ctx %d, stride %d)\n",
		r.Model, r.File, r.Tokens, r.Windows, r.Ctx, r.Stride)
	fmt.Fprintf(w, "KV cache %s: %d bytes per token (all layers)\n", r.KVDType, r.KVBytes)
	fmt.Fprintf(w, "perplexity %.4f, mean NLL %.5f nats/token\n", r.PPL, r.MeanNLL)
	if r.KL != nil {
		fmt.Fprintf(w, "against %s: mean KL %.5f nats/token, top-1 agreement %.2f%%\n", r.Ref, *r.KL, 100**r.Top1)
	}
	_, err := fmt.Fprintf(w, "wall time %.1fs (%.0f tokens/s), load %.1fs\n", r.Seconds, float64(r.Tokens)/r.Seconds, r.LoadSeconds)
	return err
}
