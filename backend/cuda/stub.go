//go:build !(linux || darwin || freebsd || netbsd)

package cuda

import (
	"fmt"

	"github.com/mmfp4/mmfp4/backend"
)

var errUnsupported = fmt.Errorf("%w: CUDA is used on Linux only", ErrNoDriver)

// Device is a GPU; on this system there is none.
type Device struct{}

// Ctx is the device as seen from its owning thread.
type Ctx struct{}

// Open reports that there is no CUDA on this system.
func Open(ordinal int) (*Device, error) { return nil, errUnsupported }

// Info describes the device.
func (d *Device) Info() Info { return Info{} }

// Do reports that there is no device.
func (d *Device) Do(fn func(c *Ctx) error) error { return errUnsupported }

// Close does nothing.
func (d *Device) Close() error { return nil }

// NVRTCVersion reports that there is no NVRTC on this system.
func NVRTCVersion() (major, minor int, path string, err error) {
	return 0, 0, "", fmt.Errorf("%w: CUDA is used on Linux only", ErrNoNVRTC)
}

// Probe reports that there is no CUDA on this system.
func Probe(compileWithoutGPU bool) Report {
	_, _, _, err := NVRTCVersion()
	return Report{DeviceErr: errUnsupported, NVRTCErr: err}
}

// Options configure the CUDA backend.
type Options struct {
	Ordinal    int
	NoFusedMoE bool
}

// NewBackend reports that there is no CUDA on this system.
func NewBackend(o Options, minCC int) (backend.Backend, error) { return nil, errUnsupported }
