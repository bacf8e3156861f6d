//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"errors"
	"fmt"
	"math"
	"os"
	"runtime"
	"sync/atomic"
	"time"
	"unsafe"
)

// Device is one GPU with its primary context, owned by a goroutine locked to
// its OS thread. All driver calls run there, inside Do.
type Device struct {
	calls  chan func()
	info   Info
	closed bool
	c      *Ctx
	// late is a panic or runtime.Goexit of a closure passed to Go, kept
	// by the device's thread for the next Do to raise.
	late any
	// waitNS sums the time callers have spent in Do (the step timer).
	waitNS atomic.Int64
}

// queuedCalls is how many closures Go may leave queued before it waits
// for the device's thread to take one.
const queuedCalls = 64

// Ctx is the device as seen from its owning thread. It is handed to the
// closures that Device.Do runs and must not be kept or used outside them.
type Ctx struct {
	dev     int32
	ctx     uintptr
	stream  uintptr // the stream work is queued on
	own     uintptr // the device's own stream
	info    *Info
	pool    *pool
	modules map[string]*module
	arch    string
	// compiles are module compiles started ahead of first use (Precompile).
	compiles map[string]*compileJob
	// ahead is what the next launch that takes it (the MoE down launch,
	// add_norm_gemv_pair) asks L2 for (l2ahead.go).
	ahead l2Ahead
	// lastKernel is the most recently launched kernel, named in errors
	// that surface later, at a synchronisation.
	lastKernel *Kernel
	// launches counts kernel launches (for profiles).
	launches int
	// rec, when set, receives launches, memsets and copies as records
	// instead of issuing them (graph.go).
	rec *recording

	// Launch arguments are marshalled into these pinned buffers: one 8-byte
	// slot per argument and the array of pointers to the slots that
	// cuLaunchKernel reads.
	argVals []uint64
	argPtrs []unsafe.Pointer
	pin     runtime.Pinner

	// pdl launches kernels with programmatic stream serialization (sm_90
	// and later; MMFP4_CUDA_PDL=0 turns it off): each may start while the
	// one before finishes, and waits for it inside (PDL_WAIT in
	// prelude.cuh). Measured on an H200 (docs/perf.md): a decode step 8-9%
	// shorter.
	pdl      bool
	pdlOK    bool // the device has programmatic dependent launch
	launchEx *launchConfig

	trace *tracer // MMFP4_CUDA_TRACE (trace.go)
}

// launchConfig is CUlaunchConfig with room for one CUlaunchAttribute.
type launchConfig struct {
	gridX, gridY, gridZ    uint32
	blockX, blockY, blockZ uint32
	shared                 uint32
	_                      uint32
	stream                 uintptr
	attrs                  *launchAttr
	nattrs                 uint32
	_                      uint32
	attr                   launchAttr
}

// launchAttr is CUlaunchAttribute: an id, padding, a 64-byte value.
type launchAttr struct {
	id  uint32
	_   uint32
	val [64]byte
}

// attrProgrammaticSerialization is
// CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION.
const attrProgrammaticSerialization = 6

type module struct {
	handle uintptr
	funcs  map[string]*Kernel
}

// Kernel is a loaded kernel function.
type Kernel struct {
	Module, Name string
	fn           uintptr
	// Regs and LocalBytes are the compiler's register count and per-thread
	// local memory (stack and spills).
	Regs, LocalBytes int
	// maxShared is the dynamic shared memory the kernel has been allowed.
	maxShared int
	// early launches the kernel with programmatic stream serialization
	// even when PDL is off (sm_90): its blocks may start once every block
	// of the kernel before has triggered (PDL_LAUNCH), and wait (PDL_WAIT)
	// for that kernel to finish before their first load.
	early bool
}

const maxKernelArgs = 32

// Open starts the owner goroutine of GPU ordinal and makes the device's
// primary context current on its thread. Where no driver or no device is
// present the error wraps ErrNoDriver or ErrNoDevice.
func Open(ordinal int) (*Device, error) {
	if err := loadDriver(); err != nil {
		return nil, err
	}
	d := &Device{calls: make(chan func(), queuedCalls)}
	started := make(chan error)
	go d.loop(ordinal, started)
	if err := <-started; err != nil {
		return nil, err
	}
	return d, nil
}

// loop is the owner goroutine: it locks its thread, sets up the context,
// then runs closures until Close.
func (d *Device) loop(ordinal int, started chan<- error) {
	runtime.LockOSThread()
	c, err := openCtx(ordinal)
	if err != nil {
		runtime.UnlockOSThread()
		started <- err
		return
	}
	d.c, d.info = c, *c.info
	started <- nil
	d.serve()
}

// serve runs closures on the current (locked) thread until Close. A closure
// that calls runtime.Goexit ends the goroutine and its thread; Do then
// starts a new owner with serveOnNewThread.
func (d *Device) serve() {
	for fn := range d.calls {
		fn()
	}
	runtime.UnlockOSThread()
	// The range reads d.calls once, so without this d would be dead while
	// the loop waits: a device its owner dropped without Close would then
	// be collected with the launch arguments still pinned (Ctx.pin), and
	// the runtime panics from a finalizer ("found leaking pinned pointer",
	// which `mmfp4 logits` on a GPU hit now and then; docs/perf.md,
	// 2026-12-01 (33)).
	runtime.KeepAlive(d)
}

func (d *Device) serveOnNewThread() {
	runtime.LockOSThread()
	// Should this fail, every later call reports an invalid context.
	drv.cuCtxSetCurrent(d.c.ctx)
	d.serve()
}

func openCtx(ordinal int) (*Ctx, error) {
	var n int32
	if err := check("cuDeviceGetCount", drv.cuDeviceGetCount(&n)); err != nil {
		return nil, err
	}
	if n == 0 {
		return nil, fmt.Errorf("%w (the driver reports none)", ErrNoDevice)
	}
	if ordinal < 0 || ordinal >= int(n) {
		return nil, fmt.Errorf("cuda: device %d requested, %d present", ordinal, n)
	}
	c := &Ctx{modules: map[string]*module{}}
	if err := check("cuDeviceGet", drv.cuDeviceGet(&c.dev, int32(ordinal))); err != nil {
		return nil, err
	}
	info, err := deviceInfo(c.dev, ordinal)
	if err != nil {
		return nil, err
	}
	c.info = &info
	if err := check("cuDevicePrimaryCtxRetain", drv.cuDevicePrimaryCtxRetain(&c.ctx, c.dev)); err != nil {
		return nil, err
	}
	if err := check("cuCtxSetCurrent", drv.cuCtxSetCurrent(c.ctx)); err != nil {
		drv.cuDevicePrimaryCtxRelease(c.dev)
		return nil, err
	}
	// A non-blocking stream of our own: the legacy default stream cannot be
	// captured into a graph.
	const streamNonBlocking = 1
	if err := check("cuStreamCreate", drv.cuStreamCreate(&c.own, streamNonBlocking)); err != nil {
		drv.cuDevicePrimaryCtxRelease(c.dev)
		return nil, err
	}
	c.stream = c.own
	c.pool = newPool(func(n uint64) (uint64, error) {
		var p uint64
		return p, check("cuMemAlloc", drv.cuMemAlloc(&p, n))
	}, func(p uint64) error {
		return check("cuMemFree", drv.cuMemFree(p))
	})
	c.argVals = make([]uint64, maxKernelArgs)
	c.argPtrs = make([]unsafe.Pointer, maxKernelArgs)
	c.pin.Pin(&c.argVals[0])
	c.pin.Pin(&c.argPtrs[0])
	c.launchEx = &launchConfig{}
	c.launchEx.attrs = &c.launchEx.attr
	c.launchEx.nattrs = 1
	c.launchEx.attr.id = attrProgrammaticSerialization
	c.launchEx.attr.val[0] = 1
	c.pin.Pin(c.launchEx)
	c.pdlOK = info.CC >= 90
	c.pdl = c.pdlOK && os.Getenv("MMFP4_CUDA_PDL") != "0"
	return c, nil
}

func deviceInfo(dev int32, ordinal int) (Info, error) {
	info := Info{Ordinal: ordinal, DriverPath: drvPath}
	var v int32
	if err := check("cuDriverGetVersion", drv.cuDriverGetVersion(&v)); err != nil {
		return info, err
	}
	info.DriverVersion = int(v)
	name := make([]byte, 256)
	if err := check("cuDeviceGetName", drv.cuDeviceGetName(&name[0], int32(len(name)), dev)); err != nil {
		return info, err
	}
	for i, b := range name {
		if b == 0 {
			name = name[:i]
			break
		}
	}
	info.Name = string(name)
	if err := check("cuDeviceTotalMem", drv.cuDeviceTotalMem(&info.TotalMem, dev)); err != nil {
		return info, err
	}
	attrs := []struct {
		id  int32
		dst *int
	}{
		{16, &info.SMs},
		{38, &info.L2Bytes},
		{13, &info.ClockKHz},
		{36, &info.MemClockKHz},
		{37, &info.BusWidthBits},
		{97, &info.SharedOptin},
	}
	for _, a := range attrs {
		if err := check("cuDeviceGetAttribute", drv.cuDeviceGetAttribute(&v, a.id, dev)); err != nil {
			return info, err
		}
		*a.dst = int(v)
	}
	var major, minor int32
	if err := check("cuDeviceGetAttribute", drv.cuDeviceGetAttribute(&major, 75, dev)); err != nil {
		return info, err
	}
	if err := check("cuDeviceGetAttribute", drv.cuDeviceGetAttribute(&minor, 76, dev)); err != nil {
		return info, err
	}
	info.CC = int(10*major + minor)
	return info, nil
}

// Info describes the device.
func (d *Device) Info() Info { return d.info }

// errGoexit is returned by Do when the closure called runtime.Goexit (as
// t.Fatal does): call such functions outside the closure.
var errGoexit = errors.New("cuda: closure passed to Device.Do called runtime.Goexit (t.Fatal inside Do?)")

// Do runs fn on the device's thread and returns its error. A panic in fn is
// re-raised in the caller. Do must not be called from inside fn, nor
// concurrently with Close.
func (d *Device) Do(fn func(c *Ctx) error) error {
	if d.closed {
		return errors.New("cuda: device is closed")
	}
	var (
		err error
		pv  any
	)
	t0 := time.Now()
	defer func() { d.waitNS.Add(int64(time.Since(t0))) }()
	done := make(chan struct{})
	d.calls <- func() {
		returned := false
		defer func() {
			pv = recover()
			if !returned && pv == nil {
				err = errGoexit
				go d.serveOnNewThread()
			}
			if pv == nil && d.late != nil {
				pv, d.late = d.late, nil
			}
			close(done)
		}()
		err = fn(d.c)
		returned = true
	}
	<-done
	if pv != nil {
		panic(pv)
	}
	return err
}

// waited is the time callers have spent in Do.
func (d *Device) waited() time.Duration { return time.Duration(d.waitNS.Load()) }

// Go queues fn to run on the device's thread after the closures queued
// before it, and returns without waiting (unless queuedCalls are already
// waiting). A panic in fn is raised by the next Do; fn reports errors
// through state of its own, which a later Do may read. On a closed device
// fn does not run (the next Do reports the device closed).
func (d *Device) Go(fn func(c *Ctx)) {
	if d.closed {
		return
	}
	d.calls <- func() {
		returned := false
		defer func() {
			pv := recover()
			if !returned && pv == nil {
				pv = errGoexit
				go d.serveOnNewThread()
			}
			if pv != nil && d.late == nil {
				d.late = pv
			}
		}()
		fn(d.c)
		returned = true
	}
}

// Close waits for queued work, frees the device memory this device
// allocated through its pool, unloads the modules and releases the context.
func (d *Device) Close() error {
	if d.closed {
		return nil
	}
	err := d.Do(func(c *Ctx) error {
		errs := []error{c.Sync()}
		errs = append(errs, c.pool.trim())
		for p := range c.pool.live {
			errs = append(errs, check("cuMemFree", drv.cuMemFree(p)))
		}
		for _, m := range c.modules {
			errs = append(errs, check("cuModuleUnload", drv.cuModuleUnload(m.handle)))
		}
		errs = append(errs, check("cuStreamDestroy", drv.cuStreamDestroy(c.own)))
		errs = append(errs, check("cuDevicePrimaryCtxRelease", drv.cuDevicePrimaryCtxRelease(c.dev)))
		c.pin.Unpin()
		return errors.Join(errs...)
	})
	d.closed = true
	close(d.calls)
	return err
}

// Info describes the device.
func (c *Ctx) Info() Info { return *c.info }

// Buffer is a block of device memory.
type Buffer struct {
	Ptr  uint64
	Size int // bytes requested
}

// At is the device address off bytes into b.
func (b Buffer) At(off int) uint64 { return b.Ptr + uint64(off) }

// Alloc returns n bytes of device memory from the caching pool. The
// contents are undefined.
func (c *Ctx) Alloc(n int) (Buffer, error) {
	if n < 0 {
		return Buffer{}, fmt.Errorf("cuda: allocation of %d bytes", n)
	}
	p, err := c.pool.alloc(uint64(n))
	return Buffer{Ptr: p, Size: n}, err
}

// Free returns b to the pool for reuse by later work on the same stream.
func (c *Ctx) Free(b Buffer) error {
	if b.Ptr == 0 {
		return nil
	}
	return c.pool.release(b.Ptr)
}

// Trim gives the pool's cached blocks back to the driver.
func (c *Ctx) Trim() error { return c.pool.trim() }

// PoolStats reports the caching allocator's bytes.
func (c *Ctx) PoolStats() PoolStats { return c.pool.stats() }

// MemInfo reports the device's free and total memory.
func (c *Ctx) MemInfo() (free, total uint64, err error) {
	err = check("cuMemGetInfo", drv.cuMemGetInfo(&free, &total))
	return
}

// CopyIn copies src into device memory at dst. Host memory that is not
// pinned is staged by the driver, so src may be reused when this returns.
func CopyIn[T any](c *Ctx, dst uint64, src []T) error {
	if len(src) == 0 {
		return nil
	}
	n := uint64(len(src)) * uint64(unsafe.Sizeof(src[0]))
	if c.rec != nil {
		c.rec.upload(dst, unsafe.Pointer(&src[0]), n)
		return nil
	}
	return check("cuMemcpyHtoDAsync", drv.cuMemcpyHtoDAsync(dst, unsafe.Pointer(&src[0]), n, c.stream))
}

// CopyOut copies device memory at src into dst and waits for it.
func CopyOut[T any](c *Ctx, dst []T, src uint64) error {
	if len(dst) == 0 {
		return nil
	}
	n := uint64(len(dst)) * uint64(unsafe.Sizeof(dst[0]))
	if c.rec != nil {
		return errors.New("cuda: a read-back cannot be queued with the step's ops")
	}
	if err := check("cuMemcpyDtoHAsync", drv.cuMemcpyDtoHAsync(unsafe.Pointer(&dst[0]), src, n, c.stream)); err != nil {
		return c.annotate(err)
	}
	return c.Sync()
}

// CopyDevice copies n bytes between device addresses.
func (c *Ctx) CopyDevice(dst, src uint64, n int) error {
	if c.rec != nil {
		c.rec.recs = append(c.rec.recs, record{kind: recCopy, dst: dst, src: src, n: uint64(n)})
		return nil
	}
	return c.copyDeviceRaw(dst, src, uint64(n))
}

func (c *Ctx) copyDeviceRaw(dst, src, n uint64) error {
	return check("cuMemcpyDtoDAsync", drv.cuMemcpyDtoDAsync(dst, src, n, c.stream))
}

// Memset fills n bytes at dst with v.
func (c *Ctx) Memset(dst uint64, v byte, n int) error {
	if c.rec != nil {
		c.rec.recs = append(c.rec.recs, record{kind: recMemset, dst: dst, val: v, n: uint64(n)})
		return nil
	}
	return c.memsetRaw(dst, v, uint64(n))
}

func (c *Ctx) memsetRaw(dst uint64, v byte, n uint64) error {
	return check("cuMemsetD8Async", drv.cuMemsetD8Async(dst, v, n, c.stream))
}

// Sync waits for the queued work. An error that a kernel caused surfaces
// here; it names the last kernel launched.
func (c *Ctx) Sync() error {
	return c.annotate(check("cuStreamSynchronize", drv.cuStreamSynchronize(c.stream)))
}

func (c *Ctx) annotate(err error) error {
	var e *Error
	if errors.As(err, &e) && e.Kernel == "" && c.lastKernel != nil {
		e.Kernel = "last launched: " + c.lastKernel.Module + "." + c.lastKernel.Name
	}
	return err
}

// Stream is a queue of device work.
type Stream struct{ h uintptr }

// NewStream creates a non-blocking stream.
func (c *Ctx) NewStream() (*Stream, error) {
	s := &Stream{}
	return s, check("cuStreamCreate", drv.cuStreamCreate(&s.h, 1))
}

// DestroyStream destroys s after its work completes.
func (c *Ctx) DestroyStream(s *Stream) error {
	if c.stream == s.h {
		c.stream = c.own
	}
	return check("cuStreamDestroy", drv.cuStreamDestroy(s.h))
}

// SetStream makes later work queue on s (nil: the device's own stream).
func (c *Ctx) SetStream(s *Stream) {
	if s == nil {
		c.stream = c.own
		return
	}
	c.stream = s.h
}

// Event marks a point in a stream.
type Event struct{ h uintptr }

// Record places a new event on the current stream.
func (c *Ctx) Record() (*Event, error) {
	e := &Event{}
	if err := check("cuEventCreate", drv.cuEventCreate(&e.h, 0)); err != nil {
		return nil, err
	}
	if err := check("cuEventRecord", drv.cuEventRecord(e.h, c.stream)); err != nil {
		drv.cuEventDestroy(e.h)
		return nil, err
	}
	return e, nil
}

// NewEvent creates an event for RecordAt.
func (c *Ctx) NewEvent() (*Event, error) {
	e := &Event{}
	return e, check("cuEventCreate", drv.cuEventCreate(&e.h, 0))
}

// RecordAt records e on the current stream.
func (c *Ctx) RecordAt(e *Event) error {
	return check("cuEventRecord", drv.cuEventRecord(e.h, c.stream))
}

// ElapsedDone returns the milliseconds between two completed events.
func (c *Ctx) ElapsedDone(start, end *Event) (float32, error) {
	var ms float32
	return ms, check("cuEventElapsedTime", drv.cuEventElapsedTime(&ms, start.h, end.h))
}

// Elapsed waits for end and returns the milliseconds between two events.
func (c *Ctx) Elapsed(start, end *Event) (float32, error) {
	if err := check("cuEventSynchronize", drv.cuEventSynchronize(end.h)); err != nil {
		return 0, c.annotate(err)
	}
	var ms float32
	return ms, check("cuEventElapsedTime", drv.cuEventElapsedTime(&ms, start.h, end.h))
}

// DestroyEvent releases an event.
func (c *Ctx) DestroyEvent(e *Event) error {
	return check("cuEventDestroy", drv.cuEventDestroy(e.h))
}

// Arch is the NVRTC target the kernels are compiled for on this device.
func (c *Ctx) Arch() (string, error) {
	if c.arch == "" {
		if err := loadNVRTC(); err != nil {
			return "", err
		}
		c.arch = targetArch(c.info.CC, rtcVersion[0], rtcArchs)
	}
	return c.arch, nil
}

// Kernel returns a kernel of an embedded module, compiling the module on
// first use (or loading it from the disk cache).
func (c *Ctx) Kernel(mod, name string) (*Kernel, error) {
	m, err := c.module(mod)
	if err != nil {
		return nil, err
	}
	if k := m.funcs[name]; k != nil {
		return k, nil
	}
	k := &Kernel{Module: mod, Name: name}
	if r := drv.cuModuleGetFunction(&k.fn, m.handle, name); r != 0 {
		return nil, newError("cuModuleGetFunction", mod+"."+name, r)
	}
	var v int32
	if drv.cuFuncGetAttribute(&v, 4, k.fn) == 0 {
		k.Regs = int(v)
	}
	if drv.cuFuncGetAttribute(&v, 3, k.fn) == 0 {
		k.LocalBytes = int(v)
	}
	m.funcs[name] = k
	return k, nil
}

func (c *Ctx) module(name string) (*module, error) {
	if m := c.modules[name]; m != nil {
		return m, nil
	}
	src, err := moduleSource(name)
	if err != nil {
		return nil, err
	}
	arch, err := c.Arch()
	if err != nil {
		return nil, err
	}
	dir := cacheDir()
	key := cacheKey(name, src, arch, compileOptions, rtcVersion, c.info.DriverVersion)
	m := &module{funcs: map[string]*Kernel{}}
	if img := readCache(dir, key); img != nil {
		if drv.cuModuleLoadData(&m.handle, unsafe.Pointer(&img[0])) == 0 {
			c.modules[name] = m
			return m, errors.Join(c.traceModule(m), c.delayModule(m))
		}
		// A stale or damaged file: compile afresh and overwrite it.
	}
	var img []byte
	if j := c.compiles[name]; j != nil {
		<-j.done
		img, err = j.img, j.err
	} else {
		img, _, err = nvrtcCompile(name, src, arch, compileOptions)
	}
	if err != nil {
		return nil, err
	}
	if r := drv.cuModuleLoadData(&m.handle, unsafe.Pointer(&img[0])); r != 0 {
		return nil, newError("cuModuleLoadData", name+" ("+arch+")", r)
	}
	writeCache(dir, key, img)
	c.modules[name] = m
	return m, errors.Join(c.traceModule(m), c.delayModule(m))
}

// compileJob is one module's compile on another thread.
type compileJob struct {
	done chan struct{}
	img  []byte
	err  error
}

// Precompile starts compiling every embedded module that is not in the disk
// cache, on up to one thread a CPU, and returns; a module's first use waits
// for its compile. On a fresh machine the kernels are then compiled side by
// side while the weights upload (each module's first launch compiled it
// alone: about 20 s in all on an H200's host), not one by one inside the
// first requests. The modules in the cache are loaded here: loaded at
// first use, they held up the first prefill (about 50 ms of the device
// thread's time on an H200's host, while the device waited for part of it).
func (c *Ctx) Precompile() error {
	arch, err := c.Arch()
	if err != nil {
		return err
	}
	dir := cacheDir()
	if c.compiles == nil {
		c.compiles = map[string]*compileJob{}
	}
	slots := make(chan struct{}, runtime.NumCPU())
	for _, name := range Modules() {
		src, err := moduleSource(name)
		if err != nil {
			return err
		}
		key := cacheKey(name, src, arch, compileOptions, rtcVersion, c.info.DriverVersion)
		if c.modules[name] != nil || c.compiles[name] != nil {
			continue
		}
		if inCache(dir, key) {
			if _, err := c.module(name); err != nil {
				return err
			}
			continue
		}
		j := &compileJob{done: make(chan struct{})}
		c.compiles[name] = j
		go func() {
			defer close(j.done)
			slots <- struct{}{}
			defer func() { <-slots }()
			j.img, _, j.err = nvrtcCompile(name, src, arch, compileOptions)
			if j.err == nil {
				writeCache(dir, key, j.img)
			}
		}()
	}
	return nil
}

// Dim is a launch grid or block shape.
type Dim struct{ X, Y, Z uint32 }

// D1 is a one-dimensional Dim.
func D1(x int) Dim { return Dim{uint32(x), 1, 1} }

// Launch queues k on the current stream. Arguments are Buffer (its
// address), uint64 (an address), int and int32 (passed as 32-bit int),
// uint32 and float32, in the kernel's parameter order.
func (c *Ctx) Launch(k *Kernel, grid, block Dim, shared int, args ...any) error {
	if len(args) > maxKernelArgs {
		return fmt.Errorf("cuda: kernel %s: %d arguments, at most %d", k.Name, len(args), maxKernelArgs)
	}
	var vals []uint64
	if c.rec != nil {
		c.rec.recs = append(c.rec.recs, record{kind: recLaunch, kernel: k, grid: grid, block: block, shared: uint32(shared), nargs: uint8(len(args))})
		vals = c.rec.recs[len(c.rec.recs)-1].args[:len(args)]
	} else {
		vals = c.argVals[:len(args)]
	}
	for i, a := range args {
		slot := &vals[i]
		switch v := a.(type) {
		case Buffer:
			*slot = v.Ptr
		case uint64:
			*slot = v
		case int:
			if v < math.MinInt32 || v > math.MaxInt32 {
				return fmt.Errorf("cuda: kernel %s: argument %d = %d overflows int32", k.Name, i, v)
			}
			*slot = uint64(uint32(int32(v)))
		case int32:
			*slot = uint64(uint32(v))
		case uint32:
			*slot = uint64(v)
		case float32:
			*slot = uint64(math.Float32bits(v))
		default:
			if c.rec != nil {
				c.rec.recs = c.rec.recs[:len(c.rec.recs)-1]
			}
			return fmt.Errorf("cuda: kernel %s: argument %d has unsupported type %T", k.Name, i, a)
		}
	}
	c.launches++
	if c.rec != nil {
		return nil
	}
	return c.launchRaw(k, grid, block, uint32(shared), vals)
}

// launchRaw launches k with its arguments marshalled as 8-byte slots.
func (c *Ctx) launchRaw(k *Kernel, grid, block Dim, shared uint32, vals []uint64) error {
	copy(c.argVals, vals)
	for i := range vals {
		c.argPtrs[i] = unsafe.Pointer(&c.argVals[i])
	}
	var params unsafe.Pointer
	if len(vals) > 0 {
		params = unsafe.Pointer(&c.argPtrs[0])
	}
	c.lastKernel = k
	var r int32
	if c.pdl || (k.early && c.pdlOK) {
		cfg := c.launchEx
		cfg.gridX, cfg.gridY, cfg.gridZ = grid.X, max(grid.Y, 1), max(grid.Z, 1)
		cfg.blockX, cfg.blockY, cfg.blockZ = block.X, max(block.Y, 1), max(block.Z, 1)
		cfg.shared, cfg.stream = shared, c.stream
		r = drv.cuLaunchKernelEx(unsafe.Pointer(cfg), k.fn, params, nil)
	} else {
		r = drv.cuLaunchKernel(k.fn, grid.X, max(grid.Y, 1), max(grid.Z, 1), block.X, max(block.Y, 1), max(block.Z, 1),
			shared, c.stream, params, nil)
	}
	if r != 0 {
		return newError("cuLaunchKernel", k.Module+"."+k.Name, r)
	}
	return nil
}

// kernelShared returns kernel mod.name allowed n bytes of dynamic shared
// memory, raising its limit the first time it needs more.
func (c *Ctx) kernelShared(mod, name string, n int) (*Kernel, error) {
	k, err := c.Kernel(mod, name)
	if err != nil {
		return nil, err
	}
	if k.maxShared < n {
		if err := c.SetMaxShared(k, n); err != nil {
			return nil, err
		}
		k.maxShared = n
	}
	return k, nil
}

// SetMaxShared lets k use up to n bytes of dynamic shared memory.
func (c *Ctx) SetMaxShared(k *Kernel, n int) error {
	if r := drv.cuFuncSetAttribute(k.fn, 8, int32(n)); r != 0 {
		return newError("cuFuncSetAttribute", k.Module+"."+k.Name, r)
	}
	return nil
}

// Occupancy is how many blocks of the given size fit on one multiprocessor.
func (c *Ctx) Occupancy(k *Kernel, block, shared int) (int, error) {
	var n int32
	if r := drv.cuOccupancyMaxActiveBlocksPerMultiprocessor(&n, k.fn, int32(block), uint64(shared)); r != 0 {
		return 0, newError("cuOccupancyMaxActiveBlocksPerMultiprocessor", k.Module+"."+k.Name, r)
	}
	return int(n), nil
}
