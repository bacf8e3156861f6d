// Package cuda runs the MMFP4 kernels on NVIDIA GPUs without cgo.
//
// The CUDA driver API (libcuda.so.1) and NVRTC (libnvrtc.so*) are opened at
// run time with purego, so a CGO_ENABLED=0 binary built anywhere uses a GPU
// where one is present and reports ErrNoDriver elsewhere. Kernels are CUDA C
// sources embedded in the binary (kernels/*.cu), compiled by NVRTC for the
// device's architecture on first use and cached on disk under
// os.UserCacheDir()/mmfp4/kernels, keyed by source hash, architecture and
// driver version.
//
// A CUDA context is current per OS thread, so one goroutine locked to its
// thread owns it: Device.Do runs closures there, and every driver call is
// made from inside such a closure through the *Ctx it is given.
//
// Environment:
//
//	MMFP4_CUDA_LIB    path of libcuda.so.1 (default: the loader's search, then the usual places)
//	MMFP4_NVRTC_LIB   path of libnvrtc.so (default: the loader's search, then /usr/local/cuda/lib64 and others)
//	MMFP4_KERNEL_CACHE directory of the compiled-kernel cache ("off" disables it)
//	MMFP4_CUDA_GRAPHS  "0": launch every op on its own instead of replaying repeated steps as CUDA graphs
//	MMFP4_CUDA_PDL     "0": no programmatic dependent launch (on by default on sm_90: each kernel starts while the one before drains)
//	MMFP4_CUDA_PROFILE "1": time every op of decode steps on the device; totals on stderr at Close
//	MMFP4_CUDA_FLASH_EXACT "1": attention on the tensor cores in the exact form (slower): the prefill's over the bf16 and fp8 caches and the decode's over the bf16 cache, whose default f16 operands are about 5e-4 from it (the fp4 cache always takes the exact form)
//	MMFP4_CUDA_STEPTIME "1": split each step's wall time into host, launching and device time; on stderr at Close
//	MMFP4_CUDA_TRACE   a file name: when each block of each kernel of one decode step starts, passes its wait and its marks (trace.go)
//	MMFP4_CUDA_DELAY   "i=ns,...": spin ns nanoseconds after the wait of a decode layer's stage i (0-7, delay.go), to see how much of a stage lies on a step's path
package cuda
