package cuda

import (
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
)

// Kernel tracing (MMFP4_CUDA_TRACE=FILE): where a decode step's time goes
// between kernels that overlap under programmatic dependent launch, which
// neither events nor a serialising profiler can show. Every module is
// compiled with MM_TRACE and each PDL_LAUNCH, PDL_WAIT and TRACE_MARK site numbered
// (prelude.cuh), so that thread 0 of every block counts, by %globaltimer,
// when it started and when its wait returned. One step of
// MMFP4_CUDA_TRACE_ROWS rows (1 by default: the traceStep-th one-row step;
// of more rows, the traceStepRows-th) is recorded into a device histogram
// and written to FILE as lines of site, file:line, kernel, event, 128 ns
// bucket and count; the bucket numbers wrap every 16.8 ms. tools/tracesum
// folds the step's layers into one.
var traceFile = os.Getenv("MMFP4_CUDA_TRACE")

// traceRows is the row count of the traced step.
var traceRows = func() int {
	n, err := strconv.Atoi(os.Getenv("MMFP4_CUDA_TRACE_ROWS"))
	if err != nil || n < 1 {
		return 1
	}
	return n
}()

const (
	traceStep        = 64
	traceStepRows    = 16
	traceBits        = 17 // the histogram's 2^traceBits buckets (MM_TRACE_BITS in prelude.cuh)
	traceBuckets     = 1 << traceBits
	traceMaxSites    = 512
	traceBucketNanos = 128
)

func init() {
	if traceFile != "" {
		compileOptions = append(compileOptions, "-DMM_TRACE", fmt.Sprintf("-DMM_TRACE_BITS=%d", traceBits))
	}
}

// traceSite is one numbered PDL_LAUNCH, PDL_WAIT, TRACE_MARK or
// TRACE_MARK_DEP in a module's source; kernel is the nearest kernel or
// device function above it.
type traceSite struct {
	file, kernel, event string
	line                int
}

var (
	traceOnce  sync.Once
	traceSites []traceSite
	traceSrc   map[string]string // module -> rewritten translation unit
	traceErr   error
)

var traceKernelName = regexp.MustCompile(`([A-Za-z_][A-Za-z0-9_]*)\s*\(`)

// traceNumber numbers the sites of every module (in Modules' order, so
// that the numbers are the same in every process) and keeps the
// rewritten sources. The prelude, which defines the macros, is left as
// it is.
func traceNumber() {
	traceSrc, traceSites = map[string]string{}, nil
	for _, name := range Modules() {
		src, err := moduleSourcePlain(name)
		if err != nil {
			traceErr = err
			return
		}
		var out strings.Builder
		file, line, kernel, want := "", 0, "", 0
		for _, text := range strings.SplitAfter(src, "\n") {
			line++
			if f, ok := strings.CutPrefix(text, "#line 1 \""); ok {
				file, line = strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(f), "\"")), 0
				out.WriteString(text)
				continue
			}
			if strings.Contains(text, "__global__") || strings.HasPrefix(text, "DEVICE ") {
				want = 3 // the name is on this line or one of the next two
			}
			if want > 0 {
				for _, m := range traceKernelName.FindAllStringSubmatch(text, -1) {
					if n := m[1]; !strings.HasPrefix(n, "__") && n != "void" {
						kernel, want = n, 0
						break
					}
				}
				if want > 0 {
					want--
				}
			}
			if file != preludeFile[len("kernels/"):] {
				for _, ev := range []string{"PDL_LAUNCH", "PDL_WAIT", "TRACE_MARK"} {
					for strings.Contains(text, ev+"()") && len(traceSites) < traceMaxSites {
						text = strings.Replace(text, ev+"()", fmt.Sprintf("%s_K(%d)", ev, len(traceSites)), 1)
						traceSites = append(traceSites, traceSite{file: file, line: line, kernel: kernel, event: ev})
					}
				}
				// TRACE_MARK_DEP(v): the mark once v has arrived.
				for strings.Contains(text, "TRACE_MARK_DEP(") && len(traceSites) < traceMaxSites {
					text = strings.Replace(text, "TRACE_MARK_DEP(", fmt.Sprintf("TRACE_MARK_DEP_K(%d, ", len(traceSites)), 1)
					traceSites = append(traceSites, traceSite{file: file, line: line, kernel: kernel, event: "TRACE_MARK_DEP"})
				}
			}
			out.WriteString(text)
		}
		traceSrc[name] = out.String()
	}
}
