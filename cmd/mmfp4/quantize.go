package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"

	"github.com/mmfp4/mmfp4/convert"
	"github.com/mmfp4/mmfp4/format"
	"github.com/mmfp4/mmfp4/model/glm4moelite"
)

func init() {
	var (
		in, out   string
		groupSize int
		rtn       bool
	)
	cmd := &cobra.Command{
		Use:   "quantize -i HF_DIR -o OUT_DIR",
		Short: "Convert a Hugging Face glm4_moe_lite checkpoint to MMFP4",
		Long: "Quantize every linear weight of a bf16/f16/f32 checkpoint to MMFP4 (FP4 E2M1 elements,\n" +
			"FP8 E4M3 group scales, an FP32 row scale) and write a new model directory.\n" +
			"By default each group's scale is searched for least squared error; --rtn uses\n" +
			"plain round-to-nearest.\n\n" +
			"The source is checked against its config.json before any work, and the result\n" +
			"is loaded before it is moved into place. The output is assembled in a hidden\n" +
			"directory .OUT_DIR.partial-* beside OUT_DIR; an interrupt (Ctrl-C, SIGTERM)\n" +
			"removes it. One left by a killed run is named at the next start, not removed.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if !format.ValidGroupSize(groupSize) {
				return fmt.Errorf("--group-size %d: want 32, 64 or 128", groupSize)
			}
			ctx, stop := interruptContext(cmd.Context())
			defer stop()
			return runQuantize(ctx, cmd.OutOrStdout(), cmd.ErrOrStderr(), in, out,
				convert.Options{GroupSize: groupSize, Search: !rtn, Verify: glm4moelite.Check})
		},
	}
	f := cmd.Flags()
	f.StringVarP(&in, "input", "i", "", "Hugging Face checkpoint directory (required)")
	f.StringVarP(&out, "output", "o", "", "output directory; must not exist or be empty (required)")
	f.IntVar(&groupSize, "group-size", 128, "elements per E4M3 scale: 32, 64 or 128")
	f.BoolVar(&rtn, "rtn", false, "plain round-to-nearest scales instead of the per-group search")
	_ = cmd.MarkFlagRequired("input")
	_ = cmd.MarkFlagRequired("output")
	rootCmd.AddCommand(cmd)
}

// interruptContext is cancelled by SIGINT or SIGTERM, so that work can stop
// cleanly; after the first signal the default action returns, and a second
// one ends the process at once.
func interruptContext(parent context.Context) (context.Context, context.CancelFunc) {
	if parent == nil {
		parent = context.Background()
	}
	ctx, stop := signal.NotifyContext(parent, os.Interrupt, syscall.SIGTERM)
	context.AfterFunc(ctx, stop)
	return ctx, stop
}

// runQuantize converts in to out under glm4moelite's policy.
func runQuantize(ctx context.Context, stdout, stderr io.Writer, in, out string, opt convert.Options) error {
	partials, err := convert.PartialDirs(out)
	if err != nil {
		return err
	}
	for _, p := range partials {
		fmt.Fprintf(stderr, "note: %s is left from an earlier run that was killed (or another quantize to the same output is running); remove it when it is not in use\n", p)
	}
	if verify := opt.Verify; verify != nil {
		opt.Verify = func(dir string) error {
			if dir == in { // reads the whole checkpoint once: say why we wait
				fmt.Fprintf(stderr, "checking that %s loads as a model\n", in)
			}
			return verify(dir)
		}
	}
	policy, err := glm4moelite.ReadConvertPolicy(in)
	if err != nil {
		return err
	}
	opt.Policy = policy
	var bar *progressbar.ProgressBar // made on the first report, when the total is known
	opt.Progress = func(done, total int64) {
		if bar == nil {
			bar = progressbar.NewOptions64(total, progressbar.OptionSetDescription("quantizing"),
				progressbar.OptionSetWriter(stderr), progressbar.OptionShowBytes(true),
				progressbar.OptionShowTotalBytes(true), progressbar.OptionSetWidth(10),
				progressbar.OptionThrottle(65*time.Millisecond), progressbar.OptionShowCount(),
				progressbar.OptionOnCompletion(func() { fmt.Fprintln(stderr) }),
				progressbar.OptionFullWidth(), progressbar.OptionSetRenderBlankState(true))
		}
		_ = bar.Set64(done)
	}
	start := time.Now()
	rep, err := convert.DirContext(ctx, in, out, opt)
	if err != nil {
		if bar != nil {
			_ = bar.Exit() // ends the bar's line where it stopped
		}
		if ctx.Err() != nil {
			return fmt.Errorf("quantize interrupted; the partial output was removed: %w", err)
		}
		return err
	}
	w := bufio.NewWriter(stdout)
	printQuality(w, rep)
	fmt.Fprintf(w, "wrote %s: %s (source tensors %s) in %s\n", out, humanBytes(rep.OutputBytes),
		humanBytes(rep.SourceBytes), time.Since(start).Round(time.Second))
	if err := w.Flush(); err != nil {
		return fmt.Errorf("the model was written to %s, but its report could not be: %w", out, err)
	}
	return nil
}

// printQuality prints the worst tensors by relative reconstruction error,
// then the mean and max over the quantized ones.
func printQuality(w io.Writer, rep *convert.Report) {
	const worst = 20
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "tensor\tshape\trel. error\t")
	for _, r := range rep.Rows[:min(worst, len(rep.Rows))] {
		kind := ""
		if !r.Quantized {
			kind = "(kept)"
		}
		fmt.Fprintf(tw, "%s\t%v\t%.4f\t%s\n", r.Name, r.Shape, r.RelError, kind)
	}
	tw.Flush()
	if len(rep.Rows) > worst {
		fmt.Fprintf(w, "... %d more tensors\n", len(rep.Rows)-worst)
	}
	if len(rep.Skipped) > 0 {
		fmt.Fprintf(w, "skipped %d MTP tensors\n", len(rep.Skipped))
	}
	fmt.Fprintf(w, "quantized tensors: mean rel. error %.4f, max %.4f\n", rep.MeanRelError(), rep.MaxRelError())
}

func humanBytes(n int64) string {
	const unit = 1 << 10
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	v, i := float64(n), -1
	for v >= unit && i < 4 {
		v /= unit
		i++
	}
	return fmt.Sprintf("%.2f %ciB", v, "KMGTP"[i])
}
