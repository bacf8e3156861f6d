package cuda

// Report is what Probe found: the device (or why there is none), NVRTC, and
// whether each kernel module compiles.
type Report struct {
	Device    *Info // nil without a usable GPU
	DeviceErr error // why Device is nil
	FreeMem   uint64
	NVRTC     string // version and library path
	NVRTCErr  error  // why NVRTC could not be loaded
	Arch      string // the target the modules were compiled for
	Modules   []ModuleStatus
}

// ModuleStatus is the outcome of compiling (and, on a GPU, loading) one
// kernel module; Seconds includes a disk-cache hit.
type ModuleStatus struct {
	Name    string
	Err     error
	Seconds float64
}
