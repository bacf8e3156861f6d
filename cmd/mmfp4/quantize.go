package main

import (
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"

	"github.com/mmfp4/mmfp4/format"
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
			"plain round-to-nearest.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if !format.ValidGroupSize(groupSize) {
				return fmt.Errorf("--group-size %d: want 32, 64 or 128", groupSize)
			}
			return runQuantize(in, out, format.ConvertOptions{GroupSize: groupSize, Search: !rtn})
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

func runQuantize(in, out string, opt format.ConvertOptions) error {
	var bar *progressbar.ProgressBar // made on the first report, when the total is known
	opt.Progress = func(done, total int64) {
		if bar == nil {
			bar = progressbar.DefaultBytes(total, "quantizing") // writes to stderr
		}
		_ = bar.Set64(done)
	}
	start := time.Now()
	rep, err := format.ConvertDir(in, out, opt)
	if err != nil {
		if bar != nil {
			_ = bar.Exit() // ends the bar's line where it stopped
		}
		return err
	}
	printQuality(rep)
	fmt.Printf("wrote %s: %s (source tensors %s) in %s\n", out, humanBytes(rep.OutputBytes),
		humanBytes(rep.SourceBytes), time.Since(start).Round(time.Second))
	return nil
}

// printQuality prints the worst tensors by relative reconstruction error,
// then the mean and max over the quantized ones.
func printQuality(rep *format.Report) {
	const worst = 20
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
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
		fmt.Printf("... %d more tensors\n", len(rep.Rows)-worst)
	}
	if len(rep.Skipped) > 0 {
		fmt.Printf("skipped %d MTP tensors\n", len(rep.Skipped))
	}
	fmt.Printf("quantized tensors: mean rel. error %.4f, max %.4f\n", rep.MeanRelError(), rep.MaxRelError())
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
