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
//	MMFP4_CUDA_FLASH_EXACT "1": prefill attention over a bf16 cache in the exact form (slower; the default f16 operands are about 4e-4 from it)
//	MMFP4_CUDA_FLASH_QUANT "0": the prefill attention does not write its output's int8 form for the value expansion (a separate quantization launch does)
//	MMFP4_CUDA_STEPTIME "1": split each step's wall time into host, launching and device time; on stderr at Close
//	MMFP4_CUDA_DECODE_MERGES "0": one-row decode layers without the merged launches (add+norm in the q_a/kv_a product, the q_a norm in q_b, 8-head attention blocks, the attention's merge in the value expansion)
//	MMFP4_CUDA_SERVE_FUSE "0": steps of several rows without the merged launches (norm pair, int8 values, MoE combine with add+norm, MoE output written not cleared, RoPEs and cache write in the absorbed query, add+norm in the router) and without the 8-head one-split decode attention and the flash kernel for mixed steps
//	MMFP4_CUDA_MOE_WIDE "0": batches of 65-640 rows take the tiled MoE, and 65-128 rows no longer the 8-pair streaming MoE (the dispatch before the wide-tile streaming pairs)
//	MMFP4_CUDA_PREFILL_FUSE "0": prefills without their merged launches and prefill kernels (int8 values, the latent norm with the q_a norm, MoE combine with add+norm across the layer end, two-tile absorbed query, one-wait RoPE rows)
package cuda
