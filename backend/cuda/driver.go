//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"
	"sync"
	"unsafe"

	"github.com/ebitengine/purego"
)

// The subset of the CUDA driver API used here, bound with purego. CUresult
// is int32, handles (context, module, function, stream, event) are uintptr,
// device pointers are uint64. Unversioned names are bound to the symbols
// that cuda.h maps them to (cuMemAlloc -> cuMemAlloc_v2, ...).
var drv driverAPI

// driverAPI holds the driver's functions, bound by loadDriver.
type driverAPI struct {
	cuInit                                      func(flags uint32) int32
	cuDriverGetVersion                          func(v *int32) int32
	cuDeviceGetCount                            func(n *int32) int32
	cuDeviceGet                                 func(dev *int32, ordinal int32) int32
	cuDeviceGetName                             func(name *byte, n int32, dev int32) int32
	cuDeviceGetAttribute                        func(v *int32, attr int32, dev int32) int32
	cuDeviceTotalMem                            func(bytes *uint64, dev int32) int32
	cuDevicePrimaryCtxRetain                    func(ctx *uintptr, dev int32) int32
	cuDevicePrimaryCtxRelease                   func(dev int32) int32
	cuCtxSetCurrent                             func(ctx uintptr) int32
	cuCtxSynchronize                            func() int32
	cuMemGetInfo                                func(free, total *uint64) int32
	cuMemAlloc                                  func(ptr *uint64, bytes uint64) int32
	cuMemFree                                   func(ptr uint64) int32
	cuMemAllocHost                              func(pp *unsafe.Pointer, bytes uint64) int32
	cuMemFreeHost                               func(p unsafe.Pointer) int32
	cuMemcpyHtoDAsync                           func(dst uint64, src unsafe.Pointer, n uint64, stream uintptr) int32
	cuMemcpyDtoHAsync                           func(dst unsafe.Pointer, src uint64, n uint64, stream uintptr) int32
	cuMemcpyDtoDAsync                           func(dst, src uint64, n uint64, stream uintptr) int32
	cuMemsetD8Async                             func(dst uint64, v uint8, n uint64, stream uintptr) int32
	cuModuleLoadData                            func(mod *uintptr, image unsafe.Pointer) int32
	cuModuleUnload                              func(mod uintptr) int32
	cuModuleGetFunction                         func(fn *uintptr, mod uintptr, name string) int32
	cuModuleGetGlobal                           func(ptr *uint64, bytes *uint64, mod uintptr, name string) int32
	cuFuncGetAttribute                          func(v *int32, attr int32, fn uintptr) int32
	cuFuncSetAttribute                          func(fn uintptr, attr int32, v int32) int32
	cuLaunchKernel                              func(fn uintptr, gx, gy, gz, bx, by, bz, smem uint32, stream uintptr, params unsafe.Pointer, extra unsafe.Pointer) int32
	cuStreamCreate                              func(s *uintptr, flags uint32) int32
	cuStreamDestroy                             func(s uintptr) int32
	cuStreamSynchronize                         func(s uintptr) int32
	cuEventCreate                               func(e *uintptr, flags uint32) int32
	cuEventRecord                               func(e, s uintptr) int32
	cuEventSynchronize                          func(e uintptr) int32
	cuEventElapsedTime                          func(ms *float32, start, end uintptr) int32
	cuEventDestroy                              func(e uintptr) int32
	cuGetErrorName                              func(r int32, s **byte) int32
	cuGetErrorString                            func(r int32, s **byte) int32
	cuOccupancyMaxActiveBlocksPerMultiprocessor func(n *int32, fn uintptr, block int32, smem uint64) int32
	cuStreamBeginCapture                        func(s uintptr, mode int32) int32
	cuStreamEndCapture                          func(s uintptr, graph *uintptr) int32
	cuGraphInstantiateWithFlags                 func(exec *uintptr, graph uintptr, flags uint64) int32
	cuGraphLaunch                               func(exec, s uintptr) int32
	cuGraphExecDestroy                          func(exec uintptr) int32
	cuGraphDestroy                              func(graph uintptr) int32
	cuLaunchKernelEx                            func(cfg unsafe.Pointer, fn uintptr, params unsafe.Pointer, extra unsafe.Pointer) int32
	// cuGraphGetEdges_v2 (CUDA 12.3 and later) is bound where present: the
	// tests read the edge types of captured graphs with it.
	cuGraphGetEdges func(graph uintptr, from, to *uintptr, data *graphEdgeData, n *uint64) int32
}

// graphEdgeData is CUgraphEdgeData.
type graphEdgeData struct {
	fromPort, toPort, typ uint8
	_                     [5]uint8
}

// edgeProgrammatic is CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC.
const edgeProgrammatic = 1

var (
	drvOnce sync.Once
	drvErr  error
	drvPath string
)

// loadDriver opens libcuda once and binds its functions.
func loadDriver() error {
	drvOnce.Do(func() {
		h, path, err := openLib("MMFP4_CUDA_LIB", []string{"libcuda.so.1", "libcuda.so"})
		if err != nil {
			drvErr = fmt.Errorf("%w: %v", ErrNoDriver, err)
			return
		}
		drvPath = path
		d := &drv
		err = bind(path, h, d.symbols())
		if err != nil {
			drvErr = fmt.Errorf("%w: %v", ErrNoDriver, err)
			return
		}
		if addr, err := purego.Dlsym(h, "cuGraphGetEdges_v2"); err == nil && addr != 0 {
			purego.RegisterFunc(&d.cuGraphGetEdges, addr)
		}
		if r := drv.cuInit(0); r != 0 {
			drvErr = fmt.Errorf("%w: %v", ErrNoDriver, newError("cuInit", "", r))
		}
	})
	return drvErr
}

// Error is a failed driver call. Kernel names the kernel it concerns: the
// one launched, or, for errors that surface at a synchronisation, the last
// one launched before it.
type Error struct {
	Call   string
	Kernel string
	Code   int32
}

func newError(call, kernel string, r int32) *Error {
	return &Error{Call: call, Kernel: kernel, Code: r}
}

func (e *Error) Error() string {
	name, desc := errorName(e.Code)
	s := "cuda: " + e.Call
	if e.Kernel != "" {
		s += " (kernel " + e.Kernel + ")"
	}
	return fmt.Sprintf("%s: %s (%d): %s", s, name, e.Code, desc)
}

// errorName asks the driver for the name and description of a CUresult.
func errorName(r int32) (name, desc string) {
	name, desc = "CUDA_ERROR", "unknown error"
	if drv.cuGetErrorName == nil {
		return
	}
	var p *byte
	if drv.cuGetErrorName(r, &p) == 0 && p != nil {
		name = cString(p)
	}
	p = nil
	if drv.cuGetErrorString(r, &p) == 0 && p != nil {
		desc = cString(p)
	}
	return
}

// cString copies a NUL-terminated C string.
func cString(p *byte) string {
	n := 0
	for *(*byte)(unsafe.Add(unsafe.Pointer(p), n)) != 0 {
		n++
	}
	return string(unsafe.Slice(p, n))
}

// check turns a CUresult into an error naming the call.
func check(call string, r int32) error {
	if r == 0 {
		return nil
	}
	return newError(call, "", r)
}

// symbols maps each required driver symbol to the field it binds (every
// func field but cuGraphGetEdges, which is optional).
func (d *driverAPI) symbols() map[string]any {
	return map[string]any{
		"cuInit":                                      &d.cuInit,
		"cuDriverGetVersion":                          &d.cuDriverGetVersion,
		"cuDeviceGetCount":                            &d.cuDeviceGetCount,
		"cuDeviceGet":                                 &d.cuDeviceGet,
		"cuDeviceGetName":                             &d.cuDeviceGetName,
		"cuDeviceGetAttribute":                        &d.cuDeviceGetAttribute,
		"cuDeviceTotalMem_v2":                         &d.cuDeviceTotalMem,
		"cuDevicePrimaryCtxRetain":                    &d.cuDevicePrimaryCtxRetain,
		"cuDevicePrimaryCtxRelease_v2":                &d.cuDevicePrimaryCtxRelease,
		"cuCtxSetCurrent":                             &d.cuCtxSetCurrent,
		"cuCtxSynchronize":                            &d.cuCtxSynchronize,
		"cuMemGetInfo_v2":                             &d.cuMemGetInfo,
		"cuMemAlloc_v2":                               &d.cuMemAlloc,
		"cuMemFree_v2":                                &d.cuMemFree,
		"cuMemAllocHost_v2":                           &d.cuMemAllocHost,
		"cuMemFreeHost":                               &d.cuMemFreeHost,
		"cuMemcpyHtoDAsync_v2":                        &d.cuMemcpyHtoDAsync,
		"cuMemcpyDtoHAsync_v2":                        &d.cuMemcpyDtoHAsync,
		"cuMemcpyDtoDAsync_v2":                        &d.cuMemcpyDtoDAsync,
		"cuMemsetD8Async":                             &d.cuMemsetD8Async,
		"cuModuleLoadData":                            &d.cuModuleLoadData,
		"cuModuleUnload":                              &d.cuModuleUnload,
		"cuModuleGetFunction":                         &d.cuModuleGetFunction,
		"cuModuleGetGlobal_v2":                        &d.cuModuleGetGlobal,
		"cuFuncGetAttribute":                          &d.cuFuncGetAttribute,
		"cuFuncSetAttribute":                          &d.cuFuncSetAttribute,
		"cuLaunchKernel":                              &d.cuLaunchKernel,
		"cuStreamCreate":                              &d.cuStreamCreate,
		"cuStreamDestroy_v2":                          &d.cuStreamDestroy,
		"cuStreamSynchronize":                         &d.cuStreamSynchronize,
		"cuEventCreate":                               &d.cuEventCreate,
		"cuEventRecord":                               &d.cuEventRecord,
		"cuEventSynchronize":                          &d.cuEventSynchronize,
		"cuEventElapsedTime":                          &d.cuEventElapsedTime,
		"cuEventDestroy_v2":                           &d.cuEventDestroy,
		"cuGetErrorName":                              &d.cuGetErrorName,
		"cuGetErrorString":                            &d.cuGetErrorString,
		"cuOccupancyMaxActiveBlocksPerMultiprocessor": &d.cuOccupancyMaxActiveBlocksPerMultiprocessor,
		"cuStreamBeginCapture_v2":                     &d.cuStreamBeginCapture,
		"cuStreamEndCapture":                          &d.cuStreamEndCapture,
		"cuGraphInstantiateWithFlags":                 &d.cuGraphInstantiateWithFlags,
		"cuGraphLaunch":                               &d.cuGraphLaunch,
		"cuGraphExecDestroy":                          &d.cuGraphExecDestroy,
		"cuGraphDestroy":                              &d.cuGraphDestroy,
		"cuLaunchKernelEx":                            &d.cuLaunchKernelEx,
	}
}
