package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/backend/cpu"
	"github.com/mmfp4/mmfp4/backend/cuda"
)

// minCUDACC is the oldest compute capability the CUDA kernels are built
// for (int8 mma.sync and dp4a as the GEMV kernels use them).
const minCUDACC = 80

// pickBackend resolves --device: "cpu", "cuda", or "auto" (CUDA when a
// driver, NVRTC and a supported GPU are found and the options suit it, else
// the CPU).
func (f *modelFlags) pickBackend() (backend.Backend, error) {
	newCPU := func() backend.Backend {
		return cpu.New(cpu.Options{Threads: f.threads, FloatActivations: f.floatAct})
	}
	switch f.device {
	case "cpu":
		return newCPU(), nil
	case "cuda", "auto":
	default:
		return nil, fmt.Errorf("--device %q: want cuda, cpu or auto", f.device)
	}
	explicit := f.device == "cuda"
	if f.floatAct {
		// Every cache dtype runs on both backends; float activations only
		// on the CPU.
		if explicit {
			return nil, fmt.Errorf("--device cuda: --float-activations is a CPU backend option")
		}
		return newCPU(), nil
	}
	b, err := cuda.NewBackend(cuda.Options{}, minCUDACC)
	if err != nil {
		if explicit {
			return nil, fmt.Errorf("--device cuda: %w", err)
		}
		if !errors.Is(err, cuda.ErrNoDriver) && !errors.Is(err, cuda.ErrNoDevice) {
			fmt.Fprintf(os.Stderr, "mmfp4: CUDA not used (%v); running on the CPU\n", err)
		}
		return newCPU(), nil
	}
	return b, nil
}
