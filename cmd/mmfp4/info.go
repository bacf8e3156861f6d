package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"

	"github.com/spf13/cobra"
	xcpu "golang.org/x/sys/cpu"

	"github.com/mmfp4/mmfp4/backend/cpu"
	"github.com/mmfp4/mmfp4/backend/cuda"
)

func init() {
	var compile bool
	info := &cobra.Command{
		Use:   "info [--compile]",
		Short: "Describe the CPU and GPU and the kernels chosen for them",
		Long: "Prints the CPU's model and vector features and the MMFP4 kernel the CPU backend\n" +
			"uses; then the GPU (name, compute capability, memory, driver) and whether the\n" +
			"CUDA kernels compile and load on it. Without a GPU it says so. With --compile\n" +
			"and no GPU, the kernels are still compiled (for sm_90) as a check of NVRTC.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			w := cmd.OutOrStdout()
			printCPUInfo(w)
			printGPUInfo(w, cuda.Probe(compile))
			return nil
		},
	}
	info.Flags().BoolVar(&compile, "compile", false, "without a GPU, still compile the CUDA kernels with NVRTC")
	rootCmd.AddCommand(info)
}

func printCPUInfo(w io.Writer) {
	fmt.Fprintf(w, "CPU:     %s, %d logical CPUs (GOMAXPROCS %d), %s/%s\n", cpuModel(), runtime.NumCPU(), runtime.GOMAXPROCS(0), runtime.GOOS, runtime.GOARCH)
	fmt.Fprintf(w, "         features: %s\n", strings.Join(cpuFeatures(), " "))
	fmt.Fprintf(w, "         MMFP4 int8 kernel: %s\n", cpu.KernelName())
}

// cpuModel is the model name from /proc/cpuinfo where there is one.
func cpuModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return "unknown model"
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		k, v, ok := strings.Cut(s.Text(), ":")
		if ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown model"
}

func cpuFeatures() []string {
	var fs []string
	add := func(ok bool, name string) {
		if ok {
			fs = append(fs, name)
		}
	}
	switch runtime.GOARCH {
	case "amd64":
		x := xcpu.X86
		add(x.HasAVX2, "avx2")
		add(x.HasFMA, "fma")
		add(x.HasAVXVNNI, "avx-vnni")
		add(x.HasAVX512F, "avx512f")
		add(x.HasAVX512BW, "avx512bw")
		add(x.HasAVX512VNNI, "avx512vnni")
		add(x.HasAVX512BF16, "avx512bf16")
		// AMX is listed as the CPU reports it; using it also needs the
		// kernel's permission (arch_prctl), which nothing here asks for.
		add(x.HasAMXInt8, "amx-int8(reported)")
	case "arm64":
		a := xcpu.ARM64
		add(a.HasASIMD, "asimd")
		add(a.HasASIMDDP, "dotprod")
		add(a.HasI8MM, "i8mm")
		add(a.HasSVE, "sve")
		add(a.HasSVE2, "sve2")
	}
	if len(fs) == 0 {
		fs = append(fs, "(none detected)")
	}
	return fs
}

func printGPUInfo(w io.Writer, r cuda.Report) {
	if r.Device == nil {
		fmt.Fprintf(w, "GPU:     none: %v\n", r.DeviceErr)
	} else {
		d := r.Device
		fmt.Fprintf(w, "GPU %d:   %s, compute capability %d.%d, %d SMs, %.1f GiB (%.1f GiB free), L2 %d MiB\n",
			d.Ordinal, d.Name, d.CC/10, d.CC%10, d.SMs, gib(d.TotalMem), gib(r.FreeMem), d.L2Bytes>>20)
		fmt.Fprintf(w, "         driver CUDA %d.%d (%s); memory %.0f GB/s peak from clock and bus width\n",
			d.DriverVersion/1000, d.DriverVersion%1000/10, d.DriverPath, d.PeakBandwidth()/1e9)
	}
	if r.NVRTCErr != nil {
		fmt.Fprintf(w, "NVRTC:   none: %v\n", r.NVRTCErr)
	} else {
		fmt.Fprintf(w, "NVRTC:   %s\n", r.NVRTC)
	}
	switch {
	case len(r.Modules) > 0:
		what := "compiled and loaded for " + r.Arch
		if r.Device == nil {
			what = "compiled for " + r.Arch + " (no GPU to load them)"
		}
		fmt.Fprintf(w, "Kernels: %s:\n", what)
		for _, m := range r.Modules {
			status := "ok"
			if m.Err != nil {
				status = "FAILED: " + m.Err.Error()
			}
			fmt.Fprintf(w, "         %-8s %s (%.2f s)\n", m.Name, status, m.Seconds)
		}
	case r.Device == nil && r.NVRTCErr == nil:
		fmt.Fprintln(w, "Kernels: not compiled without a GPU (--compile checks them with NVRTC)")
	case r.Device != nil:
		fmt.Fprintln(w, "Kernels: cannot be compiled without NVRTC")
	}
	backend := "cpu (no usable GPU)"
	if r.Device != nil && r.NVRTCErr == nil {
		backend = "cuda"
		for _, m := range r.Modules {
			if m.Err != nil {
				backend = "cpu (the CUDA kernels failed to compile)"
			}
		}
	}
	fmt.Fprintf(w, "Backend: %s\n", backend)
}

func gib(b uint64) float64 { return float64(b) / (1 << 30) }
