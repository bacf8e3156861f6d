//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
)

// pdlShape is the attention half of a decode layer at batch 1: the residual
// add and norm, q_a and kv_a, the q_a norm, q_b, the absorbed query, the
// quantization of the (stand-in) attention output, the value expansion, the
// quantization of v and o_proj, whose output the next layer's add takes.
type pdlShape struct {
	hidden, qRank, kvRows, heads, nope, rope, rank, vDim, G int
}

// glmShape is GLM-4.7-Flash's.
var glmShape = pdlShape{hidden: 2048, qRank: 768, kvRows: 576, heads: 20, nope: 192, rope: 64, rank: 512, vDim: 256, G: 128}

type pdlLayer struct {
	qa, kva, qb, uk, uv, o *QMatrix
	g1, g2                 uint64 // norm gains
}

type pdlBufs struct {
	s                           pdlShape
	d, c, h, qa, kv, q, qlat, v uint64 // float rows; d is the residual, c o_proj's output
	hq, qaq, olq, vq            *QActs
}

func newPDLBufs(c *Ctx, r *rand.Rand, s pdlShape) (*pdlBufs, error) {
	b := &pdlBufs{s: s}
	var errs []error
	alloc := func(n int) uint64 {
		buf, err := c.Alloc(4 * n)
		errs = append(errs, err)
		return buf.Ptr
	}
	acts := func(K int) *QActs {
		a, err := c.NewQActs(1, K, s.G)
		errs = append(errs, err)
		return a
	}
	b.d, b.c, b.h = alloc(s.hidden), alloc(s.hidden), alloc(s.hidden)
	b.qa, b.kv, b.q = alloc(s.qRank), alloc(s.kvRows), alloc(s.heads*(s.nope+s.rope))
	b.qlat, b.v = alloc(s.heads*s.rank), alloc(s.heads*s.vDim)
	b.hq, b.qaq, b.olq, b.vq = acts(s.hidden), acts(s.qRank), acts(s.heads*s.rank), acts(s.heads*s.vDim)
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return b, b.reset(c, r)
}

// reset gives the residual and the first layer's other input fresh values.
func (b *pdlBufs) reset(c *Ctx, r *rand.Rand) error {
	return errors.Join(CopyIn(c, b.d, randVec(r, b.s.hidden, 1)), CopyIn(c, b.c, randVec(r, b.s.hidden, 0.5)))
}

// newPDLLayers makes n layers' weights.
func newPDLLayers(c *Ctx, r *rand.Rand, sh pdlShape, n int) ([]*pdlLayer, error) {
	var ls []*pdlLayer
	for range n {
		l, err := newPDLLayer(c, r, sh)
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
	}
	return ls, nil
}

func newPDLLayer(c *Ctx, r *rand.Rand, s pdlShape) (*pdlLayer, error) {
	l := &pdlLayer{}
	var errs []error
	mat := func(n, k int) *QMatrix {
		q, err := c.UploadMatrix(synthMatrix(r, n, k, s.G))
		errs = append(errs, err)
		return q
	}
	vec := func(n int) uint64 {
		buf, err := upload(c, randVec(r, n, 1))
		errs = append(errs, err)
		return buf.Ptr
	}
	l.qa, l.kva = mat(s.qRank, s.hidden), mat(s.kvRows, s.hidden)
	l.qb = mat(s.heads*(s.nope+s.rope), s.qRank)
	l.uk, l.uv = mat(s.heads*s.nope, s.rank), mat(s.heads*s.vDim, s.rank)
	l.o = mat(s.hidden, s.heads*s.vDim)
	l.g1, l.g2 = vec(s.hidden), vec(s.qRank)
	return l, errors.Join(errs...)
}

// queue launches one layer as the backend's default decode path does.
func (b *pdlBufs) queue(c *Ctx, l *pdlLayer) error {
	s := b.s
	const eps = 1e-5
	absorb, err := c.Kernel("ops", "absorb_query_q")
	if err != nil {
		return err
	}
	qRows := s.heads * (s.nope + s.rope)
	return errors.Join(
		c.RMSNormQuant8(0, 0, b.d, s.hidden, b.d, s.hidden, b.c, s.hidden, l.g1, eps, b.h, s.hidden, 1, s.hidden, s.G, b.hq),
		c.GEMV(b.qa, s.qRank, l.qa, b.hq, GEMVSplit),
		c.GEMV(b.kv, s.kvRows, l.kva, b.hq, GEMVSplit),
		c.RMSNormQuant8(b.qa, s.qRank, 0, 0, 0, 0, 0, 0, l.g2, eps, b.qa, s.qRank, 1, s.qRank, s.G, b.qaq),
		c.GEMV(b.q, qRows, l.qb, b.qaq, GEMVSplit),
		c.Launch(absorb, Dim{1, uint32(s.heads), 1}, D1(32*absorbWarps), 0, b.qlat, s.heads*s.rank, b.q, qRows,
			l.uk.Codes, l.uk.Scales, l.uk.RowScale, s.G, s.rank, s.nope, s.rope),
		c.RMSNormQuant(b.qlat, s.heads*s.rank, 0, 0, 0, 0, 1, s.heads*s.rank, s.G, b.olq),
		c.GEMVHeads(b.v, l.uv, b.olq, s.heads, s.vDim),
		c.RMSNormQuant(b.v, s.heads*s.vDim, 0, 0, 0, 0, 1, s.heads*s.vDim, s.G, b.vq),
		c.GEMV(b.c, s.hidden, l.o, b.vq, GEMVSplit))
}

// pdlLaunchesPerLayer is the number of launches queue makes.
const pdlLaunchesPerLayer = 10

// outputs downloads every buffer the chain writes.
func (b *pdlBufs) outputs(c *Ctx) (map[string][]byte, error) {
	s := b.s
	out := map[string][]byte{}
	var errs []error
	get := func(name string, p uint64, n int) {
		buf := make([]byte, n)
		errs = append(errs, CopyOut(c, buf, p))
		out[name] = buf
	}
	for _, v := range []struct {
		name string
		p    uint64
		n    int
	}{{"d", b.d, s.hidden}, {"c", b.c, s.hidden}, {"h", b.h, s.hidden}, {"qa", b.qa, s.qRank}, {"kv", b.kv, s.kvRows},
		{"q", b.q, s.heads * (s.nope + s.rope)}, {"qlat", b.qlat, s.heads * s.rank}, {"v", b.v, s.heads * s.vDim}} {
		get(v.name, v.p, 4*v.n)
	}
	for name, a := range map[string]*QActs{"hq": b.hq, "qaq": b.qaq, "olq": b.olq, "vq": b.vq} {
		get(name+".q", a.Q, a.T*a.K)
		get(name+".s", a.Scales, 4*a.T*a.K/a.G)
		get(name+".sum", a.Sums, 4*a.T*a.K/32)
	}
	return out, errors.Join(errs...)
}

// capturedPDL records fn's launches into a CUDA graph through the backend's
// graph cache (played once directly, then captured and replayed once) and
// returns it with a release.
func capturedPDL(c *Ctx, fn func() error) (*graph, func(), error) {
	gc := &graphCache{}
	for i := 0; i < 2; i++ {
		gc.rec.reset()
		c.rec = &gc.rec
		err := fn()
		c.rec = nil
		if err != nil {
			return nil, nil, err
		}
		if err := gc.run(c, false, nil); err != nil {
			return nil, nil, err
		}
	}
	if len(gc.graphs) != 1 || gc.graphs[0].exec == 0 {
		return nil, nil, fmt.Errorf("no graph captured")
	}
	return gc.graphs[0], func() { gc.free(c) }, nil
}

// withPDL runs fn with programmatic dependent launch on or off.
func withPDL(c *Ctx, on bool, fn func() error) error {
	old := c.pdl
	c.pdl = on
	defer func() { c.pdl = old }()
	return fn()
}

// A chain of decode-layer kernels launched with programmatic dependent
// launch, each starting before the one before has finished, computes what
// the same launches compute one after another, bit for bit, launched
// directly and replayed from a graph; the captured graph keeps one
// programmatic edge between each two kernels, and a memset between two
// kernels cuts the chain there.
func TestPDLChainMatchesSerial(t *testing.T) {
	d := testDevicePDL(t)
	r := testRand(t)
	const layers = 3
	err := d.Do(func(c *Ctx) error {
		b, err := newPDLBufs(c, r, glmShape)
		if err != nil {
			return err
		}
		ls, err := newPDLLayers(c, r, glmShape, layers)
		if err != nil {
			return err
		}
		seed := r.Uint64()
		run := func(fn func() error) (map[string][]byte, error) {
			// The same inputs each time; every output poisoned first.
			if err := b.reset(c, rand.New(rand.NewPCG(seed, 2))); err != nil {
				return nil, err
			}
			for _, p := range []struct {
				p uint64
				n int
			}{{b.h, 4 * b.s.hidden}, {b.qa, 4 * b.s.qRank}, {b.kv, 4 * b.s.kvRows}, {b.q, 4 * b.s.heads * (b.s.nope + b.s.rope)},
				{b.qlat, 4 * b.s.heads * b.s.rank}, {b.v, 4 * b.s.heads * b.s.vDim}} {
				if err := poison(c, p.p, p.n); err != nil {
					return nil, err
				}
			}
			for _, a := range []*QActs{b.hq, b.qaq, b.olq, b.vq} {
				if err := errors.Join(poison(c, a.Q, a.T*a.K), poison(c, a.Scales, 4*a.T*a.K/a.G), poison(c, a.Sums, 4*a.T*a.K/32)); err != nil {
					return nil, err
				}
			}
			if err := fn(); err != nil {
				return nil, err
			}
			return b.outputs(c)
		}
		chain := func() error {
			for _, l := range ls {
				if err := b.queue(c, l); err != nil {
					return err
				}
			}
			return nil
		}
		serial, err := run(func() error { return withPDL(c, false, chain) })
		if err != nil {
			return err
		}
		direct, err := run(func() error { return withPDL(c, true, chain) })
		if err != nil {
			return err
		}
		// The graph is captured first (capturedPDL runs the chain twice),
		// then replayed once on the same inputs.
		var g *graph
		var release func()
		if err := withPDL(c, true, func() error {
			var err error
			g, release, err = capturedPDL(c, chain)
			return err
		}); err != nil {
			return err
		}
		defer release()
		graphed, err := run(func() error {
			return check("cuGraphLaunch", drv.cuGraphLaunch(g.exec, c.stream))
		})
		if err != nil {
			return err
		}
		for name, want := range serial {
			for what, got := range map[string][]byte{"direct": direct[name], "graph": graphed[name]} {
				if i := firstDiff(want, got); i >= 0 {
					t.Errorf("%s with programmatic launch (%s): byte %d of %d differs from the serial launches", name, what, i, len(want))
				}
			}
		}
		launches := layers * pdlLaunchesPerLayer
		t.Logf("graph of %d launches: %d edges, %d programmatic", launches, g.edges, g.programmatic)
		if g.edges >= 0 && (g.edges != launches-1 || g.programmatic != launches-1) {
			t.Errorf("graph of %d chained launches: %d edges, %d programmatic; want %d of each", launches, g.edges, g.programmatic, launches-1)
		}
		// A memset between two kernels: its edges are full dependencies.
		var cut *graph
		if err := withPDL(c, true, func() error {
			var release func()
			var err error
			cut, release, err = capturedPDL(c, func() error {
				return errors.Join(b.queue(c, ls[0]), c.Memset(b.h, 0, 4), b.queue(c, ls[1]))
			})
			if err == nil {
				release()
			}
			return err
		}); err != nil {
			return err
		}
		want := 2*pdlLaunchesPerLayer - 2
		t.Logf("with a memset between two layers: %d edges, %d programmatic", cut.edges, cut.programmatic)
		if cut.edges >= 0 && (cut.edges != want+2 || cut.programmatic != want) {
			t.Errorf("with a memset between two layers: %d edges, %d programmatic; want %d and %d", cut.edges, cut.programmatic, want+2, want)
		}
		return c.Sync()
	})
	if err != nil {
		t.Fatal(err)
	}
}

// testDevicePDL is testDevice for tests of programmatic dependent launch,
// skipped below compute capability 9.0.
func testDevicePDL(t testing.TB) *Device {
	t.Helper()
	d := testDevice(t)
	if d.Info().CC < 90 {
		t.Skipf("programmatic dependent launch needs compute capability 9.0, the device has %d", d.Info().CC)
	}
	return d
}

// firstDiff is the index of the first byte where a and b differ (a length
// difference counts), or -1.
func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	return -1
}

// timeReplay is the median device time in microseconds of one replay of
// exec, over 9 trials of reps replays queued behind a spin (so that the
// host's launch gaps stay out).
func timeReplay(c *Ctx, exec uintptr, reps int) (float64, error) {
	var runs []float64
	for trial := 0; trial < 9; trial++ {
		if err := c.Spin(2_000_000); err != nil {
			return 0, err
		}
		ms, err := timeEvents(c, reps, func() error {
			if r := drv.cuGraphLaunch(exec, c.stream); r != 0 {
				return newError("cuGraphLaunch", "", r)
			}
			return nil
		})
		if err != nil {
			return 0, err
		}
		runs = append(runs, float64(ms)*1e3/float64(reps))
	}
	slices.Sort(runs)
	return runs[len(runs)/2], nil
}

// BenchmarkPDLLayer: the attention half of a decode layer at
// GLM-4.7-Flash's shapes (10 launches, about 11 MB of weights) over 24
// layers' weights in turn (more than L2), in a graph and launched directly,
// with programmatic dependent launch off and on: device time per layer.
func BenchmarkPDLLayer(b *testing.B) {
	d := benchDevice(b)
	r := rand.New(rand.NewPCG(9, 9))
	const layers = 24
	err := d.Do(func(c *Ctx) error {
		bufs, err := newPDLBufs(c, r, glmShape)
		if err != nil {
			return err
		}
		ls, err := newPDLLayers(c, r, glmShape, layers)
		if err != nil {
			return err
		}
		chain := func() error {
			for _, l := range ls {
				if err := bufs.queue(c, l); err != nil {
					return err
				}
			}
			return nil
		}
		name := c.Info().Name
		for round := 0; round < 2; round++ {
			for _, on := range []bool{false, true} {
				if on && c.info.CC < 90 {
					continue
				}
				err := withPDL(c, on, func() error {
					g, release, err := capturedPDL(c, chain)
					if err != nil {
						return err
					}
					us, err := timeReplay(c, g.exec, 5)
					release()
					if err != nil {
						return err
					}
					b.Logf("%s: round %d: graph, PDL %-5v %6.2f us a layer (%d edges, %d programmatic)", name, round, on, us/layers, g.edges, g.programmatic)
					var runs []float64
					for trial := 0; trial < 5; trial++ {
						ms, err := timeDevice(c, 1, layers*pdlLaunchesPerLayer, chain)
						if err != nil {
							return err
						}
						runs = append(runs, float64(ms)*1e3/layers)
					}
					slices.Sort(runs)
					b.Logf("%s: round %d: direct, PDL %-5v %6.2f us a layer", name, round, on, runs[len(runs)/2])
					return nil
				})
				if err != nil {
					return err
				}
			}
		}
		return c.Sync()
	})
	if err != nil {
		b.Fatal(err)
	}
}
