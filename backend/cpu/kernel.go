package cpu

import (
	"fmt"
	"os"
	"slices"
	"strings"
)

// isa is a family of kernels: the pure-Go reference, or assembly for one
// x86 instruction-set level. Each backend picks one at construction, so
// tests can run the same model on every family the CPU supports.
type isa uint8

const (
	isaGo      isa = iota // portable reference
	isaAVX2               // AVX2 + FMA, vpmaddubsw for the int8 products
	isaAVXVNNI            // AVX2 + FMA, VEX-encoded vpdpbusd (AVX-VNNI)
	isaAVX512             // AVX-512 F/BW/VL + VNNI
)

var isaNames = [...]string{isaGo: "go", isaAVX2: "avx2", isaAVXVNNI: "avxvnni", isaAVX512: "avx512"}

func (i isa) String() string { return isaNames[i] }

// kernelEnv overrides the default kernel family, like Options.Kernel.
const kernelEnv = "MMFP4_CPU_KERNEL"

// Kernels lists the kernel families this CPU can run, fastest first; each
// is a valid Options.Kernel.
func Kernels() []string {
	var out []string
	for i := len(isaNames) - 1; i >= 0; i-- {
		if isaAvailable(isa(i)) {
			out = append(out, isaNames[i])
		}
	}
	return out
}

// CheckKernel reports whether name is a kernel family this CPU can run.
func CheckKernel(name string) error {
	if name == "" || slices.Contains(Kernels(), name) {
		return nil
	}
	if !slices.Contains(isaNames[:], name) {
		return fmt.Errorf("unknown CPU kernel %q: want one of %s", name, strings.Join(isaNames[:], ", "))
	}
	return fmt.Errorf("CPU kernel %q is not supported by this CPU: it supports %s", name, strings.Join(Kernels(), ", "))
}

// pickISA resolves Options.Kernel. An empty name takes the environment
// variable, then the best family available. A bad name in the environment
// is reported on stderr and ignored; a bad Options.Kernel is a programming
// error (callers validate with CheckKernel).
func pickISA(name string) isa {
	if name == "" {
		if env := os.Getenv(kernelEnv); env != "" {
			if err := CheckKernel(env); err != nil {
				fmt.Fprintf(os.Stderr, "mmfp4: %s: %v; using %s\n", kernelEnv, err, Kernels()[0])
			} else {
				name = env
			}
		}
	}
	if name == "" {
		name = Kernels()[0]
	}
	if err := CheckKernel(name); err != nil {
		panic("cpu backend: " + err.Error())
	}
	return isa(slices.Index(isaNames[:], name))
}
