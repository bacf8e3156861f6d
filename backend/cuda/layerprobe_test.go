//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
)

// The layer probes (util.cu, layer_probe_*): a batch-1 decode layer's
// eight dependent stages with its bytes of weights, as one launch a stage
// (today's structure) or one persistent launch whose copy thread streams
// the weights ahead of the chain.

// layerProbeMB is a GLM-4.7-Flash decode layer's weights by launch
// (docs/perf.md, 2026-11-29 (17)): the add, norm and q_a/kv_a products;
// q_b and the absorbed query; the attention's cache at 1024 positions; the
// merge and W_UV; o_proj; the router; gate/up of the routed and shared
// experts; down. The last two stand for the routed experts
// (gate/up's, stage 6, asked for only once the router's output is there).
var layerProbeMB = []float64{1.40, 3.00, 1.18, 1.33, 5.32, 0.52, 15.97, 7.99}

// layerShape is a probe layer: megabytes a stage, and the stage whose
// weights wait for the router's output (len(mb): none).
type layerShape struct {
	mb     []float64
	routed int
}

var decodeLayer = layerShape{layerProbeMB, 6}

const (
	layerProbeSlot  = 16384 // LP_SLOT
	layerProbeSlots = 12    // LP_SLOTS
)

type layerProbe struct {
	*handoverProbe
	shape      layerShape
	per        []uint32 // bytes a block a stage
	perBuf     Buffer
	arena      Buffer
	layerBytes int
	layers     int
	// stamps, when stamped: each stage's inputs' arrival and outputs' end
	// a block (%globaltimer, ns).
	stamps  Buffer
	stamped bool
	l2ahead bool // the persistent form asks L2 for the next layer's first stages
}

// stampArg is the kernels' stamps argument.
func (p *layerProbe) stampArg() uint64 {
	if p.stamped {
		return p.stamps.Ptr
	}
	return 0
}

func newLayerProbe(c *Ctx, layers int) (*layerProbe, error) {
	h, err := newHandoverProbe(c)
	if err != nil {
		return nil, err
	}
	p := &layerProbe{handoverProbe: h, layers: layers}
	if err := p.setShape(decodeLayer); err != nil {
		return p, err
	}
	var err1, err2, err3 error
	p.perBuf, err1 = c.Alloc(4 * 8)
	p.arena, err2 = c.Alloc(layers * p.layerBytes)
	p.stamps, err3 = c.Alloc(2 * 8 * layers * 8 * h.blocks)
	if err := errors.Join(err1, err2, err3); err != nil {
		return p, err
	}
	return p, CopyIn(c, p.perBuf.Ptr, p.per)
}

// setShape sets the stages' bytes a block (the layer's bytes no more than
// decodeLayer's, for which the arena is sized).
func (p *layerProbe) setShape(sh layerShape) error {
	if len(sh.mb) < 1 || len(sh.mb) > 8 {
		return fmt.Errorf("layer probe: %d stages", len(sh.mb))
	}
	p.shape, p.per, p.layerBytes = sh, nil, 0
	for _, mb := range sh.mb {
		per := (int(mb*1e6)/p.blocks + 15) &^ 15
		p.per = append(p.per, uint32(per))
		p.layerBytes += per * p.blocks
	}
	if p.perBuf.Ptr != 0 {
		return CopyIn(p.c, p.perBuf.Ptr, p.per)
	}
	return nil
}

// stages is the stages a run takes: layers of len(shape.mb).
func (p *layerProbe) stages() int { return p.layers * len(p.shape.mb) }

func (p *layerProbe) free() error {
	return errors.Join(p.handoverProbe.free(), p.c.Free(p.perBuf), p.c.Free(p.arena), p.c.Free(p.stamps))
}

// skipWithoutBulk skips a probe that needs bulk copies where the kernels
// are compiled without them (PROBE_BULK in util.cu: NVRTC 12 or later).
func skipWithoutBulk(t testing.TB, d *Device) {
	t.Helper()
	if err := d.Do(func(c *Ctx) error {
		_, err := c.Arch() // loads NVRTC, which sets rtcVersion
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if rtcVersion[0] < 12 {
		t.Skipf("the probe needs bulk copies: NVRTC 12 or later, this is %d.%d", rtcVersion[0], rtcVersion[1])
	}
}

func chunksOf(bytes uint32) int { return int((bytes + layerProbeSlot - 1) / layerProbeSlot) }

// chained queues the retag and one launch a stage of every layer; the
// result is in buf's first half (stages() even), tagged 1 + stages().
func (p *layerProbe) chained() error {
	if err := p.retag(); err != nil {
		return err
	}
	for l := 0; l < p.layers; l++ {
		for s := range p.per {
			shared := chunksOf(p.per[s]) * layerProbeSlot
			k, err := p.c.kernelShared("util", "layer_probe_stage", shared)
			if err != nil {
				return err
			}
			if err := p.c.Launch(k, D1(p.blocks), D1(256), shared, p.buf.Ptr, p.n, p.arena.Ptr, p.perBuf.Ptr, len(p.per), p.shape.routed, l, s, uint32(1), p.stampArg()); err != nil {
				return err
			}
		}
	}
	return nil
}

// persistent queues the retag and layer_probe_persistent; the result as
// chained's.
func (p *layerProbe) persistent() error {
	if err := p.retag(); err != nil {
		return err
	}
	shared := layerProbeSlots * layerProbeSlot
	k, err := p.c.kernelShared("util", "layer_probe_persistent", shared)
	if err != nil {
		return err
	}
	l2ahead := 0
	if p.l2ahead {
		l2ahead = 1
	}
	return p.c.Launch(k, D1(p.blocks), D1(288), shared, p.buf.Ptr, p.n, p.arena.Ptr, p.perBuf.Ptr, len(p.per), p.shape.routed, p.layers, uint32(1), p.stampArg(), l2ahead)
}

// stageTimes runs form once with stamps and returns, for each stage of a
// layer, the mean over the middle layers of the median over blocks of the
// wait for its inputs (from the block's end of the stage before) and of
// its work after them (us).
func (p *layerProbe) stageTimes(form func() error) (wait, work []float64, err error) {
	p.stamped = true
	defer func() { p.stamped = false }()
	if err := errors.Join(withPDL(p.c, true, form), p.c.Sync()); err != nil {
		return nil, nil, err
	}
	G, ns := p.blocks, len(p.per)
	st := make([]uint64, 2*p.stages()*G)
	if err := CopyOut(p.c, st, p.stamps.Ptr); err != nil {
		return nil, nil, err
	}
	in := func(idx, b int) float64 { return float64(st[2*idx*G+b]) }
	out := func(idx, b int) float64 { return float64(st[(2*idx+1)*G+b]) }
	wait, work = make([]float64, ns), make([]float64, ns)
	first, last := 3, p.layers-3
	for l := first; l < last; l++ {
		for s := range ns {
			idx := l*ns + s
			w, k := make([]float64, G), make([]float64, G)
			for b := range G {
				w[b], k[b] = (in(idx, b)-out(idx-1, b))/1e3, (out(idx, b)-in(idx, b))/1e3
			}
			slices.Sort(w)
			slices.Sort(k)
			wait[s] += w[G/2] / float64(last-first)
			work[s] += k[G/2] / float64(last-first)
		}
	}
	return wait, work, nil
}

// Both forms give the same bits over three layers of random weights, and
// the weights' dots change the values (against zero weights).
func TestLayerProbeFormsAgree(t *testing.T) {
	d := testDevicePDL(t)
	skipWithoutBulk(t, d)
	r := rand.New(rand.NewPCG(25, 1))
	const layers = 3
	err := d.Do(func(c *Ctx) error {
		p, err := newLayerProbe(c, layers)
		if err != nil {
			return err
		}
		defer p.free()
		x := uniformVec(r, p.n)
		run := func(name string, weights []byte, form func() error) ([]float32, error) {
			if err := errors.Join(CopyIn(c, p.arena.Ptr, weights), CopyIn(c, p.buf.Ptr, tagWords(x, 1))); err != nil {
				return nil, err
			}
			if err := withPDL(c, true, form); err != nil {
				return nil, fmt.Errorf("%s: %w", name, err)
			}
			got, err := p.untag(1 + uint32(p.stages()))
			if err != nil {
				return nil, fmt.Errorf("%s: %w", name, err)
			}
			return got, nil
		}
		weights := make([]byte, layers*p.layerBytes)
		for i := range weights {
			weights[i] = byte(r.Uint32())
		}
		chain, err := run("chained", weights, p.chained)
		if err != nil {
			return err
		}
		pers, err := run("persistent", weights, p.persistent)
		if err != nil {
			return err
		}
		bare, err := run("zero weights", make([]byte, len(weights)), p.persistent)
		if err != nil {
			return err
		}
		if i := sameBits(chain, pers); i >= 0 {
			t.Errorf("value %d: persistent %v, chained %v", i, pers[i], chain[i])
		}
		if sameBits(chain, bare) < 0 {
			t.Error("the weights' dots did not change the values")
		}
		t.Logf("%d blocks, bytes a block a stage %v, %d layers of %.2f MB: the forms agree", p.blocks, p.per, layers, float64(p.layerBytes)/1e6)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// BenchmarkLayerProbe: device time a layer of each form over 47 layers
// (the persistent form also with the next layer's first stages asked of L2
// during the routed ones), for
// the decode layer's eight stages (gate/up's weights asked for only once
// the router's output is there, or before it), and for its bytes in six
// and four stages (the attention's launches merged in pairs, then o_proj
// with the router and the first four with each other).
func BenchmarkLayerProbe(b *testing.B) {
	d := testDevicePDL(b)
	skipWithoutBulk(b, d)
	const layers = 47
	var p *layerProbe
	err := d.Do(func(c *Ctx) error {
		var err error
		if p, err = newLayerProbe(c, layers); err != nil {
			return err
		}
		return c.Memset(p.arena.Ptr, 0x11, layers*p.layerBytes)
	})
	b.Cleanup(func() {
		d.Do(func(c *Ctx) error {
			if p != nil {
				return p.free()
			}
			return nil
		})
	})
	if err != nil {
		b.Fatal(err)
	}
	m := layerProbeMB
	shapes := []struct {
		name  string
		shape layerShape
	}{
		{"8stages", decodeLayer},
		{"8stages_routed_known", layerShape{m, len(m)}},
		{"6stages", layerShape{[]float64{m[0] + m[1], m[2] + m[3], m[4], m[5], m[6], m[7]}, 4}},
		{"4stages", layerShape{[]float64{m[0] + m[1] + m[2] + m[3], m[4] + m[5], m[6], m[7]}, 2}},
	}
	for _, sh := range shapes {
		for _, form := range []string{"chained_pdl_graph", "persistent", "persistent_l2ahead"} {
			if form == "persistent_l2ahead" && sh.shape.routed == len(sh.shape.mb) {
				continue
			}
			b.Run(sh.name+"/"+form, func(b *testing.B) {
				var runs []float64
				p.l2ahead = form == "persistent_l2ahead"
				err := d.Do(func(c *Ctx) error {
					if err := p.setShape(sh.shape); err != nil {
						return err
					}
					run := func() error { return withPDL(c, true, p.persistent) }
					if form == "chained_pdl_graph" {
						// Once outside the capture: it loads the module and sizes
						// the kernels' shared memory.
						if err := errors.Join(withPDL(c, true, p.chained), c.Sync()); err != nil {
							return err
						}
						var g *graph
						var release func()
						if err := withPDL(c, true, func() error {
							var err error
							g, release, err = capturedPDL(c, p.chained)
							return err
						}); err != nil {
							return err
						}
						defer release()
						run = func() error { return check("cuGraphLaunch", drv.cuGraphLaunch(g.exec, c.stream)) }
					}
					for range 5 {
						if err := c.Spin(2_000_000); err != nil {
							return err
						}
						ms, err := timeEvents(c, 3, run)
						if err != nil {
							return err
						}
						runs = append(runs, float64(ms)*1e3/float64(3*layers))
					}
					_, err := p.untag(1 + uint32(p.stages()))
					return errors.Join(err, c.Sync())
				})
				if err != nil {
					b.Fatal(err)
				}
				b.ReportMetric(slices.Min(runs), "us/layer")
				b.ReportMetric(float64(p.layerBytes)/slices.Min(runs)/1e3, "GB/s")
				b.Logf("%s %s: %d layers of %.2f MB in %d stages, us a layer over 5 runs: %.2f", sh.name, form, layers, float64(p.layerBytes)/1e6, len(p.per), runs)
				var wait, work []float64
				if err := d.Do(func(c *Ctx) error {
					once := p.persistent
					if form == "chained_pdl_graph" {
						once = p.chained
					}
					var err error
					wait, work, err = p.stageTimes(once)
					return err
				}); err != nil {
					b.Fatal(err)
				}
				b.Logf("%s %s, us a stage (median block, layers 3-%d): waiting for its inputs %.2f; its work after them %.2f", sh.name, form, layers-4, wait, work)
			})
		}
	}
}
