package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/backend/cpu"
	"github.com/mmfp4/mmfp4/bench"
	"github.com/mmfp4/mmfp4/internal/benchmode"
)

func init() {
	var (
		o       bench.Options
		asJSON  bool
		bwBytes int64
		dev     string
		kvDType string
	)
	cmd := &cobra.Command{
		Use:   "bench -m DIR [--ctx 1024] [--gen 128] [--json]",
		Short: "Measure load time, prefill and decode speed, memory, and decode's fraction of the memory roofline",
		Long: "Measure a model: load time (warm, and cold where the page cache can be dropped),\n" +
			"prefill tok/s at --ctx random tokens, decode tok/s over --gen tokens after them,\n" +
			"peak RSS, the bytes of weights and cache one decoded token reads, this machine's\n" +
			"read bandwidth (vector loads on every thread, measured in the same run), and\n" +
			"decode's fraction of that roofline. Prints a table, or one JSON line with --json.\n" +
			"Progress goes to stderr. With ALPHAHENG_TASK_MODE=1 it does nothing.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if benchmode.Off() {
				fmt.Fprintln(cmd.OutOrStdout(), "mmfp4 bench:", bench.ErrSkipped)
				return nil
			}
			if o.Dir == "" && !cmd.Flags().Changed("ctx") {
				o.Ctx = 256 // the built-in model holds 512 positions
			}
			dir, err := modelDir(o.Dir)
			if err != nil {
				return err
			}
			o.Dir = dir
			if o.Ctx < 1 {
				return fmt.Errorf("--ctx %d: want at least 1", o.Ctx)
			}
			if o.Gen < 2 {
				return fmt.Errorf("--gen %d: want at least 2 (decode speed needs a step after the first token)", o.Gen)
			}
			o.BandwidthBytes = bwBytes << 20
			dt, err := backend.ParseCacheDType(kvDType)
			if err != nil {
				return fmt.Errorf("--kv-cache-dtype: %w", err)
			}
			o.CacheDType = dt
			// The CPU run always uses its float32 cache; the GPU's is chosen.
			switch dev {
			case "cpu":
			case "cuda":
				mf := modelFlags{device: dev}
				o.NewBackend = func() (backend.Backend, error) { return mf.pickBackend() }
			case "auto":
				// Resolved here, so that a machine without a GPU runs the
				// CPU bench (its bandwidth test, cold load and histogram).
				mf := modelFlags{device: dev}
				b, err := mf.pickBackend()
				if err != nil {
					return err
				}
				if _, onCPU := b.(*cpu.Backend); !onCPU {
					o.NewBackend = func() (backend.Backend, error) { return b, nil }
				}
			default:
				return fmt.Errorf("--device %q: want cuda, cpu or auto", dev)
			}
			o.Log = cmd.ErrOrStderr()
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			r, err := bench.Run(ctx, o)
			if err != nil {
				return err
			}
			if asJSON {
				b, err := json.Marshal(r)
				if err != nil {
					return err
				}
				fmt.Fprintln(cmd.OutOrStdout(), string(b))
				return nil
			}
			printBench(cmd.OutOrStdout(), r)
			return nil
		},
	}
	f := cmd.Flags()
	// -m is checked in RunE, so task mode can skip without it.
	f.StringVarP(&o.Dir, "model", "m", "", "MMFP4 (or Hugging Face) model directory (default: the built-in demo model, with --ctx 256)")
	f.IntVar(&o.Ctx, "ctx", 1024, "prompt tokens (random ids) prefilled before decoding")
	f.IntVar(&o.Gen, "gen", 128, "tokens decoded after the prompt")
	f.IntVar(&o.Threads, "threads", 0, "CPU threads (0: all cores)")
	f.BoolVar(&asJSON, "json", false, "print one JSON line instead of the table")
	f.BoolVar(&o.Cold, "cold", true, "also time a load with the weight files dropped from the page cache (they are read back from disk after)")
	f.BoolVar(&o.Histogram, "histogram", false, "count, per MoE layer, how often each expert is chosen")
	f.Int64Var(&bwBytes, "bandwidth-mib", 1024, "buffer of the read-bandwidth test, MiB")
	f.Uint64Var(&o.Seed, "seed", 1, "seed of the random prompt")
	f.StringVar(&dev, "device", "auto", "compute device: cuda, cpu or auto (CUDA when a supported GPU is found)")
	f.StringVar(&kvDType, "kv-cache-dtype", "bf16", "latent cache precision on the GPU: bf16, fp8, fp4 or f32")
	rootCmd.AddCommand(cmd)
}

func printBench(w io.Writer, r *bench.Result) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	row := func(k, format string, args ...any) { fmt.Fprintf(tw, "%s\t"+format+"\n", append([]any{k}, args...)...) }
	row("device", "%s", r.Device)
	row("threads", "%d", r.Threads)
	row("model", "%s of weight files", humanBytes(r.ModelBytes))
	resident := "no"
	if r.WeightsResident {
		resident = "yes"
	}
	if r.ResidentFraction != nil {
		resident += fmt.Sprintf(" (%.1f%% of pages in the page cache before the run)", 100**r.ResidentFraction)
	}
	row("weights resident", "%s", resident)
	pre := fmt.Sprintf("%.2f s (%.2f GB/s)", r.PreReadS, r.PreReadGBPerSec)
	if r.ResidentAfterPreRead != nil {
		pre += fmt.Sprintf(", then %.1f%% of pages cached", 100**r.ResidentAfterPreRead)
	}
	row("pre-read", "%s", pre)
	if r.ColdLoadS != nil {
		row("load, cold", "%.2f s", *r.ColdLoadS)
	} else {
		row("load, cold", "%s", r.ColdNote)
	}
	row("load, warm", "%.2f s", r.LoadS)
	if r.UploadS != nil {
		row("upload to the device", "%.2f s (part of the load)", *r.UploadS)
		row("device memory", "weights %s, KV cache %s, step workspace %s; %s in use on the device", humanBytes(r.GPUWeightBytes), humanBytes(r.GPUCacheBytes), humanBytes(r.GPUWorkspaceBytes), humanBytes(r.GPUUsedBytes))
	}
	row("map weight pages", "%.2f s (after the load, before the prefill)", r.PrefaultS)
	if r.HugePageFraction != nil {
		row("weights in 2 MB pages", "%.1f%%", 100**r.HugePageFraction)
	}
	if r.FirstPrefillTokS != nil {
		row("first prefill", "%.2f tok/s (the warm-up run's, right after the load)", *r.FirstPrefillTokS)
	}
	row("prefill", "%.2f tok/s (%d tokens in %.1f s)", r.PrefillTokS, r.Ctx, r.PrefillS)
	row("decode", "%.2f tok/s (%d steps in %.1f s, after %d tokens)", r.DecodeTokS, r.DecodeSteps, r.DecodeS, r.Ctx)
	row("read per decoded token", "%s (weights and KV cache)", humanBytes(r.BytesPerTok))
	row("read bandwidth", "%.2f GB/s (%s, %d threads)", r.BandwidthGBs, r.BandwidthKernel, r.Threads)
	row("roofline fraction", "%.3f (decode tok/s x bytes per token / bandwidth)", r.RooflineFraction)
	row("peak RSS", "%s (limit 1.1 x model + KV cache %s = %s)", humanBytes(r.PeakRSS), humanBytes(r.KVCacheBytes), humanBytes(r.RSSLimit))
	tw.Flush()
	if r.ExpertCounts != nil {
		printHistogram(w, r.ExpertCounts)
	}
}

// printHistogram prints, per MoE layer, how evenly the experts were used,
// then the counts themselves.
func printHistogram(w io.Writer, counts [][]int) {
	fmt.Fprintln(w, "\nexpert usage per MoE layer (picks over prefill and decode)")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "layer\tused\tmin\tmean\tmax\t")
	for l, c := range counts {
		used, lo, hi, total := 0, c[0], 0, 0
		for _, v := range c {
			if v > 0 {
				used++
			}
			lo, hi, total = min(lo, v), max(hi, v), total+v
		}
		fmt.Fprintf(tw, "%d\t%d/%d\t%d\t%.1f\t%d\t\n", l, used, len(c), lo, float64(total)/float64(len(c)), hi)
	}
	tw.Flush()
	fmt.Fprintln(w, "\ncounts (one line per MoE layer, experts 0..N-1)")
	for l, c := range counts {
		s := make([]string, len(c))
		for i, v := range c {
			s[i] = fmt.Sprint(v)
		}
		fmt.Fprintf(w, "%d: %s\n", l, strings.Join(s, " "))
	}
}
