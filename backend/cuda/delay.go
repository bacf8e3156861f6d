//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"unsafe"
)

// Stage delays (MMFP4_CUDA_DELAY="i=ns,..."), a measurement: every module
// is compiled with MM_DELAY, and STAGE_DELAY(i) (prelude.cuh) spins ns
// nanoseconds after the wait of a decode layer's stage i: 0 the add and
// norm with q_a and kv_a, 1 q_b with the absorbed query, 2 the attention,
// 3 the merge with W_UV, 4 o_proj, 5 the router, 6 gate/up's routed
// blocks (before their weights are requested), 7 down. How a step's time
// grows with a stage's delay says how much of that stage's own time lies
// on the step's path: all of it where the step grows by the delay times
// the layers.
var stageDelays, stageDelaysErr = parseStageDelays(os.Getenv("MMFP4_CUDA_DELAY"))

// parseStageDelays reads "i=ns,..." (stage i in 0-7, ns nanoseconds).
func parseStageDelays(v string) (d [8]uint32, err error) {
	if v == "" {
		return d, nil
	}
	for _, f := range strings.Split(v, ",") {
		i, ns, ok := strings.Cut(f, "=")
		a, e1 := strconv.Atoi(i)
		b, e2 := strconv.ParseUint(ns, 10, 32)
		if !ok || e1 != nil || e2 != nil || a < 0 || a >= len(d) {
			return d, fmt.Errorf("cuda: MMFP4_CUDA_DELAY: %q is not stage=ns with a stage from 0 to %d", f, len(d)-1)
		}
		d[a] = uint32(b)
	}
	return d, nil
}

// delayModule sets a freshly loaded module's mm_delay to stageDelays.
func (c *Ctx) delayModule(m *module) error {
	if !delaying {
		return nil
	}
	if stageDelaysErr != nil {
		return stageDelaysErr
	}
	var ptr, size uint64
	if drv.cuModuleGetGlobal(&ptr, &size, m.handle, "mm_delay") != 0 {
		return nil // a module without a delayed stage, whose mm_delay the compiler dropped
	}
	if size != uint64(4*len(stageDelays)) {
		return fmt.Errorf("cuda: mm_delay is %d bytes, want %d", size, 4*len(stageDelays))
	}
	d := stageDelays
	if err := check("cuMemcpyHtoDAsync", drv.cuMemcpyHtoDAsync(ptr, unsafe.Pointer(&d[0]), size, c.stream)); err != nil {
		return err
	}
	return c.Sync()
}
