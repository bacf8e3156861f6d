package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"

	"github.com/mmfp4/mmfp4/synth"
)

func init() {
	var (
		preset, out string
		opt         synth.Options
	)
	cmd := &cobra.Command{
		Use:   "synth --preset glm-4.7-flash -o DIR",
		Short: "Write an MMFP4 model with random weights at a published model's exact shapes",
		Long: "Write a model directory with random MMFP4 weights at the shapes of a preset\n" +
			"configuration, drawn directly as codes and scales (no bf16 pass), plus a small\n" +
			"GLM-style tokenizer so text prompts work. For speed and memory measurements at\n" +
			"full size. Presets: " + strings.Join(synth.Presets(), ", ") + ".",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := synth.PresetConfig(preset)
			if err != nil {
				return fmt.Errorf("--preset: %w", err)
			}
			if opt.Layers < 0 {
				return fmt.Errorf("--layers %d: must be positive (0: the preset's)", opt.Layers)
			}
			opt.Config = cfg
			return runSynth(out, opt)
		},
	}
	f := cmd.Flags()
	f.StringVar(&preset, "preset", "glm-4.7-flash", "model shapes: "+strings.Join(synth.Presets(), ", "))
	f.StringVarP(&out, "output", "o", "", "output directory; must not exist or be empty (required)")
	f.IntVar(&opt.Layers, "layers", 0, "number of layers (0: the preset's)")
	f.IntVar(&opt.GroupSize, "group-size", 128, "elements per E4M3 scale: 32, 64 or 128")
	f.Uint64Var(&opt.Seed, "seed", 1, "random seed; the same seed writes the same model")
	f.IntVar(&opt.Threads, "threads", 0, "threads drawing values (0: all cores)")
	_ = cmd.MarkFlagRequired("output")
	rootCmd.AddCommand(cmd)
}

func runSynth(out string, opt synth.Options) error {
	// Interrupted by a signal, Write removes its partial directory.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var bar *progressbar.ProgressBar
	opt.Progress = func(done, total int64) {
		if bar == nil {
			bar = progressbar.DefaultBytes(total, "writing") // to stderr
		}
		_ = bar.Set64(done)
	}
	sum, err := synth.Write(ctx, out, opt)
	if bar != nil {
		_ = bar.Exit()
	}
	if err != nil {
		return err
	}
	fmt.Printf("wrote %s: %d layers, %d tensors in %d files, %s in %s\n", sum.Dir, sum.Layers, sum.Tensors,
		sum.Shards, humanBytes(sum.Bytes), sum.Elapsed.Round(100_000_000))
	return nil
}
