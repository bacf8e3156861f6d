package backend

// DeviceMemory is how a backend with memory of its own (a GPU) uses it.
type DeviceMemory struct {
	WeightBytes    int64 // weights uploaded
	CacheBytes     int64 // latent cache pools
	WorkspaceBytes int64 // per-step tensors and metadata
	// FreeBytes and TotalBytes are the device's, when asked.
	FreeBytes, TotalBytes int64
	// UploadSeconds is the time spent copying weights to the device.
	UploadSeconds float64
}

// MemoryReporter is a backend with device memory of its own. The CPU
// backend is not one: its weights are the memory-mapped files.
type MemoryReporter interface {
	DeviceMemory() (DeviceMemory, error)
}
