package cuda

import (
	"errors"
	"fmt"
)

// ErrNoDriver is wrapped by the errors returned where no CUDA driver library
// can be loaded; callers fall back to the CPU.
var ErrNoDriver = errors.New("no CUDA driver found")

// ErrNoNVRTC is wrapped by the errors returned where no NVRTC library can be
// loaded, so kernels cannot be compiled.
var ErrNoNVRTC = errors.New("no NVRTC library found")

// ErrNoDevice is wrapped by Open's error where the driver loads but reports
// no GPU.
var ErrNoDevice = errors.New("no CUDA device found")

// Info describes an opened device.
type Info struct {
	Ordinal       int
	Name          string
	CC            int // compute capability, 10*major + minor
	SMs           int
	TotalMem      uint64
	L2Bytes       int
	ClockKHz      int
	MemClockKHz   int
	BusWidthBits  int
	SharedOptin   int // largest shared memory a block may opt in to, bytes
	DriverVersion int // e.g. 13000 for CUDA 13.0
	DriverPath    string
}

// PeakBandwidth is the memory bandwidth the clock and bus width imply
// (double data rate), in bytes per second. The measured copy bandwidth is
// the ceiling to compare against; this is the datasheet figure.
func (i Info) PeakBandwidth() float64 {
	return 2 * float64(i.MemClockKHz) * 1e3 * float64(i.BusWidthBits) / 8
}

// Arch is the compute capability as "sm_XY".
func (i Info) Arch() string { return fmt.Sprintf("sm_%d", i.CC) }
