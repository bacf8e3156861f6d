//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"
	"slices"
	"time"
	"unsafe"
)

// Whole-step CUDA graphs. The backend queues a step's ops as closures
// (Backend.do); at a flush they run in recording mode, where each launch,
// memset and copy becomes a record instead of a driver call. A list of
// records that was seen before is captured into a graph once and replayed
// from then on: one cuGraphLaunch instead of one purego launch per kernel.
// Host data a step uploads (batch metadata, embeddings, RoPE tables) is
// kept out of the graph's identity: the graph copies it from a staging
// buffer of its own, which is refilled by one host-to-device copy before
// each replay. A list seen only once runs as plain launches, so one-off
// flushes (a long prefill) pay no capture.

type recKind uint8

const (
	recLaunch recKind = iota
	recMemset
	recCopy   // device to device
	recUpload // host to device: the payload is not part of the identity
)

// record is one stream operation. Records compare with ==, which is what
// makes two flushes the same graph.
type record struct {
	kind   recKind
	val    byte
	nargs  uint8
	shared uint32
	grid   Dim
	block  Dim
	dst    uint64
	src    uint64 // copy: source; upload: offset in the payload
	n      uint64
	args   [maxKernelArgs]uint64
	kernel *Kernel
}

// recording collects a flush's records and its uploads' payload.
type recording struct {
	recs    []record
	payload []byte
}

func (r *recording) reset() {
	r.recs = r.recs[:0]
	r.payload = r.payload[:0]
}

// upload records a host-to-device copy of n bytes at src.
func (r *recording) upload(dst uint64, src unsafe.Pointer, n uint64) {
	off := len(r.payload)
	r.payload = append(r.payload, unsafe.Slice((*byte)(src), n)...)
	r.recs = append(r.recs, record{kind: recUpload, dst: dst, src: uint64(off), n: n})
}

// play issues rec on the current stream; uploads read from payload (host),
// or, when staging is not 0, from staging+offset on the device.
func (c *Ctx) play(rec *record, payload []byte, staging uint64) error {
	switch rec.kind {
	case recLaunch:
		return c.launchRaw(rec.kernel, rec.grid, rec.block, rec.shared, rec.args[:rec.nargs])
	case recMemset:
		return c.memsetRaw(rec.dst, rec.val, rec.n)
	case recCopy:
		return c.copyDeviceRaw(rec.dst, rec.src, rec.n)
	case recUpload:
		if staging != 0 {
			return c.copyDeviceRaw(rec.dst, staging+rec.src, rec.n)
		}
		return check("cuMemcpyHtoDAsync", drv.cuMemcpyHtoDAsync(rec.dst, unsafe.Pointer(&payload[rec.src]), rec.n, c.stream))
	}
	return fmt.Errorf("cuda: record of kind %d", rec.kind)
}

// graph is a captured list of records.
type graph struct {
	recs    []record
	exec    uintptr // 0 until captured (the list has been seen once)
	staging Buffer  // the uploads' payload on the device
	used    int     // last flush that ran it, for eviction
	// edges and programmatic count the captured graph's dependencies and
	// those of them that let a kernel start before the one before it ends
	// (programmatic dependent launch); -1 where the driver cannot say.
	edges, programmatic int
}

// graphCache holds the graphs of recent distinct flushes.
type graphCache struct {
	graphs  []*graph
	flushes int
	rec     recording
	// Replays and Captures count what happened, for tests and notes.
	Replays, Captures, Direct int
}

// maxGraphs bounds the cached graphs: a decode step's pieces (about 13 at
// GLM-4.7-Flash's shapes) for each batch size and attention-length bucket
// that recurs.
const maxGraphs = 256

// maxGraphRecords bounds the operations of a flush worth remembering (a
// decode step of a 47-layer model has about 1,200; a long prefill many
// more, and it does not repeat).
const maxGraphRecords = 16384

// run executes the recorded flush: by replaying its graph, capturing it
// the second time it is seen, or issuing it directly. A flush that will not
// repeat (once) is issued directly and not remembered. ft, when not nil,
// receives the time spent finding the graph and launching.
func (gc *graphCache) run(c *Ctx, once bool, ft *flushTimes) error {
	var t0 time.Time
	if ft != nil {
		t0 = time.Now()
		defer func() {
			t1 := time.Now()
			ft.launch += t1.Sub(t0) - ft.lookup
		}()
	}
	gc.flushes++
	r := &gc.rec
	var g *graph
	if !once {
		for _, h := range gc.graphs {
			if len(h.recs) == len(r.recs) && slices.Equal(h.recs, r.recs) {
				g = h
				break
			}
		}
	}
	if ft != nil {
		ft.lookup = time.Since(t0)
	}
	if g == nil {
		gc.Direct++
		if ft != nil {
			ft.direct = true
		}
		if !once && len(r.recs) <= maxGraphRecords {
			gc.add(c, &graph{recs: slices.Clone(r.recs)})
		}
		for i := range r.recs {
			if err := c.play(&r.recs[i], r.payload, 0); err != nil {
				return err
			}
		}
		return nil
	}
	g.used = gc.flushes
	if g.exec == 0 {
		if err := gc.capture(c, g, len(r.payload)); err != nil {
			return err
		}
		gc.Captures++
		if ft != nil {
			ft.captured = true
		}
	}
	gc.Replays++
	if len(r.payload) > 0 {
		if err := check("cuMemcpyHtoDAsync", drv.cuMemcpyHtoDAsync(g.staging.Ptr, unsafe.Pointer(&r.payload[0]), uint64(len(r.payload)), c.stream)); err != nil {
			return err
		}
	}
	if r := drv.cuGraphLaunch(g.exec, c.stream); r != 0 {
		return newError("cuGraphLaunch", "", r)
	}
	return nil
}

// add caches g, evicting the least recently used graph when full.
func (gc *graphCache) add(c *Ctx, g *graph) {
	g.used = gc.flushes
	if len(gc.graphs) >= maxGraphs {
		old := 0
		for i, h := range gc.graphs {
			if h.used < gc.graphs[old].used {
				old = i
			}
		}
		gc.drop(c, gc.graphs[old])
		gc.graphs = slices.Delete(gc.graphs, old, old+1)
	}
	gc.graphs = append(gc.graphs, g)
}

// capture records g's operations into a graph on the current stream.
func (gc *graphCache) capture(c *Ctx, g *graph, payload int) error {
	if payload > 0 {
		buf, err := c.Alloc(payload)
		if err != nil {
			return err
		}
		g.staging = buf
	}
	const captureRelaxed = 2 // other threads' driver calls stay legal
	if r := drv.cuStreamBeginCapture(c.stream, captureRelaxed); r != 0 {
		return newError("cuStreamBeginCapture", "", r)
	}
	var err error
	for i := range g.recs {
		if err = c.play(&g.recs[i], nil, g.staging.Ptr); err != nil {
			break
		}
	}
	var h uintptr
	if r := drv.cuStreamEndCapture(c.stream, &h); r != 0 && err == nil {
		err = newError("cuStreamEndCapture", "", r)
	}
	if err != nil {
		if h != 0 {
			drv.cuGraphDestroy(h)
		}
		return err
	}
	defer drv.cuGraphDestroy(h)
	g.edges, g.programmatic = graphEdges(h)
	if r := drv.cuGraphInstantiateWithFlags(&g.exec, h, 0); r != 0 {
		g.exec = 0
		return newError("cuGraphInstantiateWithFlags", "", r)
	}
	return nil
}

// graphEdges counts a graph's edges and its programmatic ones (-1, -1
// where the driver has no cuGraphGetEdges_v2).
func graphEdges(h uintptr) (edges, programmatic int) {
	if drv.cuGraphGetEdges == nil {
		return -1, -1
	}
	var n uint64
	if drv.cuGraphGetEdges(h, nil, nil, nil, &n) != 0 {
		return -1, -1
	}
	if n == 0 {
		return 0, 0
	}
	from, to := make([]uintptr, n), make([]uintptr, n)
	data := make([]graphEdgeData, n)
	if drv.cuGraphGetEdges(h, &from[0], &to[0], &data[0], &n) != 0 {
		return -1, -1
	}
	for _, d := range data[:n] {
		if d.typ == edgeProgrammatic {
			programmatic++
		}
	}
	return int(n), programmatic
}

func (gc *graphCache) drop(c *Ctx, g *graph) error {
	var err error
	if g.exec != 0 {
		err = check("cuGraphExecDestroy", drv.cuGraphExecDestroy(g.exec))
		g.exec = 0
	}
	if g.staging.Ptr != 0 {
		c.Free(g.staging)
		g.staging = Buffer{}
	}
	return err
}

func (gc *graphCache) free(c *Ctx) error {
	var err error
	for _, g := range gc.graphs {
		if e := gc.drop(c, g); e != nil && err == nil {
			err = e
		}
	}
	gc.graphs = nil
	return err
}
