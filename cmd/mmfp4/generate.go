package main

import (
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/mmfp4/mmfp4"
	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/chat"
	"github.com/mmfp4/mmfp4/engine"
	"github.com/mmfp4/mmfp4/sample"
)

// modelFlags are the load options shared by the commands that run a model.
type modelFlags struct {
	dir      string
	threads  int
	ctx      int
	floatAct bool
	debugNaN bool
	kvDType  string
	device   string
}

func (f *modelFlags) register(c *cobra.Command) {
	c.Flags().StringVarP(&f.dir, "model", "m", "", "model directory: Hugging Face checkpoint or MMFP4 (default: the built-in demo model)")
	c.Flags().IntVar(&f.threads, "threads", 0, "CPU threads (0: all cores)")
	c.Flags().IntVar(&f.ctx, "ctx", 0, "context: the most tokens of one sequence, prompt plus generated (0: the model's maximum, or what the KV cache holds)")
	c.Flags().BoolVar(&f.floatAct, "float-activations", false, "run MMFP4 products on float32 activations instead of int8")
	c.Flags().BoolVar(&f.debugNaN, "debug-nan", false, "check every tensor and name the first layer and tensor that produce NaN/Inf")
	c.Flags().StringVar(&f.kvDType, "kv-cache-dtype", "bf16", "latent cache precision: bf16, fp8, fp4 or f32")
	c.Flags().StringVar(&f.device, "device", "auto", "compute device: cuda, cpu or auto (CUDA when a supported GPU is found)")
}

func (f *modelFlags) options() (mmfp4.Options, error) {
	if f.threads < 0 {
		return mmfp4.Options{}, fmt.Errorf("--threads %d: want 0 (all cores) or a positive count", f.threads)
	}
	if f.ctx < 0 {
		return mmfp4.Options{}, fmt.Errorf("--ctx %d: want 0 (the model's maximum) or a positive count", f.ctx)
	}
	dt, err := backend.ParseCacheDType(f.kvDType)
	if err != nil {
		return mmfp4.Options{}, fmt.Errorf("--kv-cache-dtype: %w", err)
	}
	b, err := f.pickBackend()
	if err != nil {
		return mmfp4.Options{}, err
	}
	return mmfp4.Options{Backend: b, MaxContext: f.ctx, Engine: engine.Options{CacheDType: dt}, DebugNaN: f.debugNaN}, nil
}

func (f *modelFlags) load() (*mmfp4.Model, error) {
	o, err := f.options()
	if err != nil {
		return nil, err
	}
	dir, err := modelDir(f.dir)
	if err != nil {
		return nil, err
	}
	o.Engine.MaxNumSeqs, o.Engine.MaxBatchTokens = 1, engine.OneSequenceBatchTokens
	return mmfp4.Load(dir, o)
}

// parseIDs reads "1,2,3" (spaces allowed).
func parseIDs(s string) ([]int, error) {
	var ids []int
	for _, field := range strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' }) {
		id, err := strconv.Atoi(field)
		if err != nil || id < 0 {
			return nil, fmt.Errorf("--ids: %q is not a token id", field)
		}
		ids = append(ids, id)
	}
	if len(ids) == 0 {
		return nil, fmt.Errorf("--ids: no token ids given")
	}
	return ids, nil
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

func init() {
	var (
		mf        modelFlags
		ids       string
		text      string
		chatFile  string
		think     bool
		maxTokens int
		so        sample.Options
	)
	cmd := &cobra.Command{
		Use:   "generate [-m DIR] (-p TEXT | --chat MESSAGES.json | --ids 1,2,3)",
		Short: "Generate tokens from a prompt, streaming them to the terminal",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			f := cmd.Flags()
			if n := btoi(f.Changed("ids")) + btoi(f.Changed("prompt")) + btoi(f.Changed("chat")); n != 1 {
				return fmt.Errorf("give exactly one prompt: -p TEXT, --chat FILE or --ids 1,2,3")
			}
			switch {
			case f.Changed("prompt") && text == "":
				return fmt.Errorf("-p/--prompt: the prompt is empty")
			case f.Changed("chat") && chatFile == "":
				return fmt.Errorf("--chat: no file given")
			case maxTokens < 0:
				return fmt.Errorf("-n/--max-tokens %d: want 0 (until EOS or the context is full) or a positive count", maxTokens)
			}
			if err := so.Validate(); err != nil {
				return err
			}
			m, err := mf.load()
			if err != nil {
				return err
			}
			defer m.Close()
			var prompt []int
			switch {
			case f.Changed("ids"):
				prompt, err = parseIDs(ids)
			case f.Changed("prompt"):
				prompt, err = m.EncodeText(text)
			default:
				prompt, err = encodeChatFile(m, chatFile, f.Changed("think"), think)
			}
			if err != nil {
				return err
			}
			ctx, stop := interruptContext(cmd.Context())
			defer stop()
			out := cmd.OutOrStdout()
			// Text prompts stream text; id prompts stream ids.
			opts := mmfp4.GenerateOptions{MaxTokens: maxTokens, Sampling: so}
			if !f.Changed("ids") {
				opts.OnText = func(text string) error {
					_, err := io.WriteString(out, text)
					return err
				}
			} else {
				opts.OnToken = func(id int) error {
					_, err := fmt.Fprintf(out, "%d ", id)
					return err
				}
			}
			res, err := m.Generate(ctx, prompt, opts)
			if _, werr := io.WriteString(out, "\n"); err == nil {
				err = werr
			}
			switch {
			case res != nil && res.StopReason == "canceled" && len(res.Tokens) == 0:
				fmt.Fprintf(cmd.ErrOrStderr(), "prompt %d tokens: canceled during prefill after %.1fs\n", res.PromptTokens, res.PrefillTime.Seconds())
			case res != nil:
				fmt.Fprintf(cmd.ErrOrStderr(), "prompt %d tokens, generated %d tokens (%s); load %.2fs, prefill %.1f tok/s, decode %.1f tok/s\n",
					res.PromptTokens, len(res.Tokens), res.StopReason, m.LoadTime.Seconds(),
					res.PrefillTokensPerSecond(), res.DecodeTokensPerSecond())
			}
			return err
		},
	}
	mf.register(cmd)
	f := cmd.Flags()
	f.StringVarP(&text, "prompt", "p", "", "prompt text (encoded with the model's tokenizer)")
	f.StringVar(&chatFile, "chat", "", "JSON file of chat messages, as chat-template reads it: [{\"role\":..., \"content\":...}] or {\"messages\": [...], \"tools\": [...], ...}; rendered with the model's chat template")
	f.BoolVar(&think, "think", true, "with --chat: let the template enable thinking (enable_thinking; overrides the file's)")
	f.StringVar(&ids, "ids", "", "prompt as comma-separated token ids (needs no tokenizer)")
	f.IntVarP(&maxTokens, "max-tokens", "n", 128, "most tokens to generate (0: until EOS or the context is full; prompt + generated <= --ctx)")
	f.Float32Var(&so.Temperature, "temperature", 0, "sampling temperature (0: greedy)")
	f.IntVar(&so.TopK, "top-k", 0, "keep the k most likely tokens (0: off)")
	f.Float32Var(&so.TopP, "top-p", 0, "nucleus sampling threshold (0 or 1: off)")
	f.Float32Var(&so.MinP, "min-p", 0, "drop tokens below min-p times the top probability (0: off)")
	f.Uint64Var(&so.Seed, "seed", 0, "random seed for sampling")
	rootCmd.AddCommand(cmd)
}

// encodeChatFile reads a chat file with the parser of chat-template and
// encodes it with the generation prompt. An explicit --think overrides the
// file's enable_thinking; with neither, thinking is on.
func encodeChatFile(m *mmfp4.Model, path string, thinkSet, think bool) ([]int, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--chat: %w", err)
	}
	p, err := chat.ParseFile(data)
	if err != nil {
		return nil, fmt.Errorf("--chat: %s: %w", path, err)
	}
	if thinkSet || p.Options.EnableThinking == nil {
		p.Options.EnableThinking = &think
	}
	return m.EncodeChat(p.Messages, p.Options)
}
