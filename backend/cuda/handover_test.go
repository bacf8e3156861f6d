//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
)

// The hand-over probes (util.cu): a chain of stages in which every block
// needs the whole vector the stage before wrote, as one launch a stage
// (programmatic dependent launch), one persistent launch meeting at a count
// in memory, or one persistent launch polling tagged values.
type handoverProbe struct {
	c      *Ctx
	blocks int // one a multiprocessor, at most 256*HO_PER/16
	n      int // 16 values a block
	x, y   Buffer
	buf    Buffer // 2n floats (count) or 2n tagged words (tag)
	count  Buffer
	tag    uint32 // the next tag form's first tag
	// handover_tag_stream's background read: blocks slices of
	// handoverSlice bytes, what keeps its loads, the bytes it read.
	src, sink, bytes Buffer
}

// handoverSlice is a block's slice of handover_tag_stream's source (a power
// of two): 132 of them are about ten times an H200's L2.
const handoverSlice = 4 << 20

// handoverRing is HO_RING in util.cu: the most bulk copies in flight.
const handoverRing = 8

const handoverPer = 9 // HO_PER in util.cu

func newHandoverProbe(c *Ctx) (*handoverProbe, error) {
	blocks := min(c.info.SMs, 256*handoverPer/16)
	p := &handoverProbe{c: c, blocks: blocks, n: 16 * blocks, tag: 1}
	var errs []error
	alloc := func(n int) Buffer {
		b, err := c.Alloc(n)
		errs = append(errs, err)
		return b
	}
	p.x, p.y, p.buf, p.count = alloc(4*p.n), alloc(4*p.n), alloc(16*p.n), alloc(4)
	p.src, p.sink, p.bytes = alloc(blocks*handoverSlice), alloc(4*256*blocks), alloc(8)
	return p, errors.Join(errs...)
}

func (p *handoverProbe) free() error {
	return errors.Join(p.c.Free(p.x), p.c.Free(p.y), p.c.Free(p.buf), p.c.Free(p.count), p.c.Free(p.src), p.c.Free(p.sink), p.c.Free(p.bytes))
}

// streamed queues handover_tag_stream: tagged's stages beside a read of
// src by warps more warps in the same blocks (mode 0: u loads of 16 bytes
// a lane at once; mode 1: one thread keeping u bulk copies in flight,
// warps 1).
func (p *handoverProbe) streamed(stages, mode, warps, u int) error {
	k, err := p.c.Kernel("util", "handover_tag_stream")
	if err != nil {
		return err
	}
	if warps < 1 || warps > 8 || u < 1 || u > handoverRing || (mode == 1 && warps != 1) {
		return fmt.Errorf("handover_tag_stream: %d warps of %d in flight, mode %d", warps, u, mode)
	}
	if err := p.c.Launch(k, D1(p.blocks), D1(256+32*warps), 0, p.buf.Ptr, p.n, stages, p.tag, p.src.Ptr, uint32(handoverSlice),
		mode, u, p.sink.Ptr, p.bytes.Ptr); err != nil {
		return err
	}
	p.tag += uint32(stages)
	return nil
}

// readBytes returns the bytes handover_tag_stream has read since the last
// call, and zeroes the count.
func (p *handoverProbe) readBytes() (uint64, error) {
	var n [1]uint64
	if err := CopyOut(p.c, n[:], p.bytes.Ptr); err != nil {
		return 0, err
	}
	return n[0], p.c.Memset(p.bytes.Ptr, 0, 8)
}

// chain queues stages launches of handover_stage from x; the result is in
// x for even stages, else y.
func (p *handoverProbe) chain(stages int) error {
	return p.chainOf([]string{"handover_stage"}, p.blocks, stages)
}

// chainOf is chain with the kernels names launched in turn, over blocks
// blocks.
func (p *handoverProbe) chainOf(names []string, blocks, stages int) error {
	ks := make([]*Kernel, len(names))
	for i, name := range names {
		k, err := p.c.Kernel("util", name)
		if err != nil {
			return err
		}
		ks[i] = k
	}
	for s := 0; s < stages; s++ {
		in, out := p.x.Ptr, p.y.Ptr
		if s%2 == 1 {
			in, out = out, in
		}
		if err := p.c.Launch(ks[s%len(ks)], D1(blocks), D1(256), 0, in, out, p.n); err != nil {
			return err
		}
	}
	return nil
}

// counted queues handover_count over buf (its first n floats the input).
func (p *handoverProbe) counted(stages int, sync bool) error {
	k, err := p.c.Kernel("util", "handover_count")
	if err != nil {
		return err
	}
	s := 0
	if sync {
		s = 1
	}
	if err := p.c.Memset(p.count.Ptr, 0, 4); err != nil {
		return err
	}
	return p.c.Launch(k, D1(p.blocks), D1(256), 0, p.buf.Ptr, p.count.Ptr, p.n, stages, s)
}

// tagged queues handover_tag over buf, whose first n words carry p.tag;
// stages must be even, so that the result is there again with the next
// run's first tag.
func (p *handoverProbe) tagged(stages int) error {
	k, err := p.c.Kernel("util", "handover_tag")
	if err != nil {
		return err
	}
	if err := p.c.Launch(k, D1(p.blocks), D1(256), 0, p.buf.Ptr, p.n, stages, p.tag); err != nil {
		return err
	}
	p.tag += uint32(stages)
	return nil
}

// retag queues handover_retag: buf's first n words tagged 1, the rest 0,
// the values kept.
func (p *handoverProbe) retag() error {
	k, err := p.c.Kernel("util", "handover_retag")
	if err != nil {
		return err
	}
	return p.c.Launch(k, D1(p.blocks), D1(256), 0, p.buf.Ptr, p.n, uint32(1))
}

// chainTagged queues the retag and stages launches of handover_stage_tag
// over buf's halves in turn; stages even, the result is in the first half
// tagged stages + 1.
func (p *handoverProbe) chainTagged(stages int) error {
	k, err := p.c.Kernel("util", "handover_stage_tag")
	if err != nil {
		return err
	}
	if err := p.retag(); err != nil {
		return err
	}
	for s := 0; s < stages; s++ {
		in, out := p.buf.Ptr, p.buf.Ptr+uint64(8*p.n)
		if s%2 == 1 {
			in, out = out, in
		}
		if err := p.c.Launch(k, D1(p.blocks), D1(256), 0, in, out, p.n, uint32(1+s)); err != nil {
			return err
		}
	}
	return nil
}

// tagWords is buf's 2n words for the tagged forms: x's values tagged tag
// in the first half, zero words after.
func tagWords(x []float32, tag uint32) []uint64 {
	words := make([]uint64, 2*len(x))
	for i, v := range x {
		words[i] = uint64(tag)<<32 | uint64(math.Float32bits(v))
	}
	return words
}

// untag reads buf's first n words back as values, each of which must
// carry tag.
func (p *handoverProbe) untag(tag uint32) ([]float32, error) {
	words := make([]uint64, p.n)
	if err := CopyOut(p.c, words, p.buf.Ptr); err != nil {
		return nil, err
	}
	vals := make([]float32, p.n)
	for i, w := range words {
		if got := uint32(w >> 32); got != tag {
			return nil, fmt.Errorf("word %d: tag %d, want %d", i, got, tag)
		}
		vals[i] = math.Float32frombits(uint32(w))
	}
	return vals, nil
}

// uniformVec is n values drawn uniformly from [-1, 1).
func uniformVec(r *rand.Rand, n int) []float32 {
	v := make([]float32, n)
	for i := range v {
		v[i] = 2*r.Float32() - 1
	}
	return v
}

// handoverRef is a stage on the CPU (the block's sum in another order).
func handoverRef(x []float32) []float32 {
	var t float64
	for _, v := range x {
		t += float64(v)
	}
	y := make([]float32, len(x))
	for i, v := range x {
		y[i] = float32(0.5*float64(v) + t*0.25/float64(len(x)))
	}
	return y
}

// The four dependent forms compute the same stages bit for bit (each stage's sum
// in the same order), and match the stages on the CPU.
func TestHandoverFormsAgree(t *testing.T) {
	d := testDevicePDL(t)
	r := testRand(t)
	const stages = 24
	err := d.Do(func(c *Ctx) error {
		p, err := newHandoverProbe(c)
		if err != nil {
			return err
		}
		defer p.free()
		x := uniformVec(r, p.n)
		want := x
		for range stages {
			want = handoverRef(want)
		}
		// One launch a stage, chained.
		if err := CopyIn(c, p.x.Ptr, x); err != nil {
			return err
		}
		if err := withPDL(c, true, func() error { return p.chain(stages) }); err != nil {
			return err
		}
		chain := make([]float32, p.n)
		if err := CopyOut(c, chain, p.x.Ptr); err != nil {
			return err
		}
		// The count.
		if err := errors.Join(poison(c, p.buf.Ptr, 8*p.n), CopyIn(c, p.buf.Ptr, x)); err != nil {
			return err
		}
		if err := p.counted(stages, true); err != nil {
			return err
		}
		counted := make([]float32, p.n)
		var count [1]uint32
		if err := errors.Join(CopyOut(c, counted, p.buf.Ptr), CopyOut(c, count[:], p.count.Ptr)); err != nil {
			return err
		}
		if int(count[0]) != stages*p.blocks {
			t.Errorf("count %d after %d stages of %d blocks", count[0], stages, p.blocks)
		}
		// The tags.
		if err := CopyIn(c, p.buf.Ptr, tagWords(x, p.tag)); err != nil {
			return err
		}
		first := p.tag
		if err := p.tagged(stages); err != nil {
			return err
		}
		tagged, err := p.untag(first + stages)
		if err != nil {
			return fmt.Errorf("tag form: %w", err)
		}
		// The tags beside a background read, by loads and by bulk copies.
		streamed := map[string][]float32{}
		if _, err := p.readBytes(); err != nil {
			return err
		}
		forms := []struct {
			name           string
			mode, warps, u int
		}{{"tag beside loads", 0, 2, 8}, {"tag beside bulk copies", 1, 1, 4}}
		if rtcVersion[0] < 12 {
			t.Logf("no bulk copies under NVRTC %d.%d: the background read by loads alone", rtcVersion[0], rtcVersion[1])
			forms = forms[:1]
		}
		for _, f := range forms {
			if err := CopyIn(c, p.buf.Ptr, tagWords(x, p.tag)); err != nil {
				return err
			}
			first := p.tag
			if err := p.streamed(stages, f.mode, f.warps, f.u); err != nil {
				return err
			}
			if streamed[f.name], err = p.untag(first + stages); err != nil {
				return fmt.Errorf("%s: %w", f.name, err)
			}
			n, err := p.readBytes()
			if err != nil {
				return err
			}
			t.Logf("%s: %d bytes read beside %d stages", f.name, n, stages)
			if n == 0 {
				t.Errorf("%s: the background read read nothing", f.name)
			}
		}
		// Tagged words, one launch a stage (the chain's first launch tags
		// them).
		if err := CopyIn(c, p.buf.Ptr, tagWords(x, 0)); err != nil {
			return err
		}
		if err := withPDL(c, true, func() error { return p.chainTagged(stages) }); err != nil {
			return err
		}
		chainTagged, err := p.untag(stages + 1)
		if err != nil {
			return fmt.Errorf("chained tags: %w", err)
		}
		streamed["count"], streamed["tag"], streamed["chained tags"] = counted, tagged, chainTagged
		for name, got := range streamed {
			if i := sameBits(chain, got); i >= 0 {
				t.Errorf("%s form: value %d %v, the chained launches' %v", name, i, got[i], chain[i])
			}
		}
		var worst float64
		for i := range want {
			worst = max(worst, math.Abs(float64(chain[i]-want[i]))/math.Abs(float64(want[i])))
		}
		t.Logf("%d blocks, %d values, %d stages: largest relative difference from the CPU %.2g", p.blocks, p.n, stages, worst)
		if worst > 1e-5 {
			t.Errorf("largest relative difference from the CPU %.2g, want <= 1e-5", worst)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// BenchmarkHandover: device time a stage of each form (one block a
// multiprocessor, 16 values a block). "local" is the count form without
// the count: a block's own work a stage, with no hand-over.
func BenchmarkHandover(b *testing.B) {
	d := benchDevice(b)
	const launches, stages = 200, 2000
	var p *handoverProbe
	graphs := map[bool]*graph{}
	var tagGraph *graph
	var releases []func()
	err := d.Do(func(c *Ctx) error {
		var err error
		if p, err = newHandoverProbe(c); err != nil {
			return err
		}
		if err := c.Memset(p.x.Ptr, 0, 4*p.n); err != nil {
			return err
		}
		for _, pdl := range []bool{true, false} {
			var release func()
			if err := withPDL(c, pdl, func() error {
				var err error
				graphs[pdl], release, err = capturedPDL(c, func() error { return p.chain(launches) })
				return err
			}); err != nil {
				return err
			}
			releases = append(releases, release)
		}
		var release func()
		err = withPDL(c, true, func() error {
			var err error
			tagGraph, release, err = capturedPDL(c, func() error { return p.chainTagged(launches) })
			return err
		})
		if err == nil {
			releases = append(releases, release)
		}
		return err
	})
	releaseProbe(b, d, &p, &releases)
	if err != nil {
		b.Fatal(err)
	}
	replay := func(g *graph) func() error {
		return func() error { return check("cuGraphLaunch", drv.cuGraphLaunch(g.exec, p.c.stream)) }
	}
	type form struct {
		name string
		per  int
		run  func() error
	}
	forms := []form{
		{"chain_pdl_graph", launches, replay(graphs[true])},
		{"chain_graph", launches, replay(graphs[false])},
		{"chain_tag_pdl_graph", launches, replay(tagGraph)},
		{"persistent_count", stages, func() error { return p.counted(stages, true) }},
		{"persistent_tag", stages, func() error { return p.tagged(stages) }},
		{"persistent_local", stages, func() error { return p.counted(stages, false) }},
	}
	// The tags beside a background read: loads from 1-8 warps (4-32 KB a
	// multiprocessor in flight), bulk copies (4-32 KB).
	type bg struct{ mode, warps, u int }
	var bgs []bg
	for _, w := range []int{1, 2, 4, 8} {
		bgs = append(bgs, bg{0, w, 8})
	}
	for _, u := range []int{1, 2, 4, 8} {
		if rtcVersion[0] >= 12 { // bulk copies (PROBE_BULK)
			bgs = append(bgs, bg{1, 1, u})
		}
	}
	for _, g := range bgs {
		name := fmt.Sprintf("persistent_tag_beside_loads_%dKB", g.warps*g.u/2)
		if g.mode == 1 {
			name = fmt.Sprintf("persistent_tag_beside_bulk_%dKB", g.u*4)
		}
		forms = append(forms, form{name, stages, func() error { return p.streamed(stages, g.mode, g.warps, g.u) }})
	}
	for _, f := range forms {
		b.Run(f.name, func(b *testing.B) {
			var runs, rates []float64
			err := d.Do(func(c *Ctx) error {
				if strings.HasPrefix(f.name, "persistent_tag") {
					// Words tagged 1 with zero values, the other half tagged 0.
					p.tag = 1
					if err := CopyIn(c, p.buf.Ptr, tagWords(make([]float32, p.n), 1)); err != nil {
						return err
					}
				} else if err := c.Memset(p.buf.Ptr, 0, 16*p.n); err != nil {
					return err
				}
				for range 5 {
					if err := c.Spin(2_000_000); err != nil {
						return err
					}
					if _, err := p.readBytes(); err != nil {
						return err
					}
					ms, err := timeEvents(c, 3, f.run)
					if err != nil {
						return err
					}
					runs = append(runs, float64(ms)*1e3/float64(3*f.per))
					n, err := p.readBytes()
					if err != nil {
						return err
					}
					rates = append(rates, float64(n)/(float64(ms)*1e6))
				}
				return c.Sync()
			})
			if err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(slices.Min(runs), "us/stage")
			b.ReportMetric(slices.Max(rates), "bgGB/s")
			b.Logf("%s: %d blocks, us a stage over 5 runs: %.3f; background GB/s: %.0f", f.name, p.blocks, runs, rates)
		})
	}
}

// clusterChains are BenchmarkHandoverCluster's forms: the same stage as a
// plain launch, as clusters of 2 or 8 blocks, and plain and clusters of 8
// in turn (a decode layer's mix).
var clusterChains = []struct {
	name    string
	kernels []string
}{
	{"plain", []string{"handover_stage"}},
	{"cluster2", []string{"handover_stage_c2"}},
	{"cluster8", []string{"handover_stage_c8"}},
	{"plain_cluster8", []string{"handover_stage", "handover_stage_c8"}},
}

// The cluster forms of the hand-over stage write what the plain one
// writes, bit for bit, after four stages.
func TestHandoverClusterStagesAgree(t *testing.T) {
	d := testDevice(t)
	defer d.Close()
	if d.Info().CC < 90 {
		t.Skipf("clusters need compute capability 9.0, the device has %d", d.Info().CC)
	}
	r := testRand(t)
	err := d.Do(func(c *Ctx) error {
		p, err := newHandoverProbe(c)
		if err != nil {
			return err
		}
		defer p.free()
		blocks := p.blocks / 8 * 8
		x := randVec(r, p.n, 1)
		var want []byte
		for _, f := range clusterChains {
			if err := errors.Join(CopyIn(c, p.x.Ptr, x), c.Memset(p.y.Ptr, 0, 4*p.n), p.chainOf(f.kernels, blocks, 4), c.Sync()); err != nil {
				return err
			}
			got := readBytes(t, c, p.x.Ptr, 4*p.n)
			if want == nil {
				want = got
			} else if j := firstDiff(want, got); j >= 0 {
				t.Errorf("%s: byte %d differs from the plain launches'", f.name, j)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// BenchmarkHandoverCluster: us a stage of 200 chained hand-over stages in
// a graph with programmatic dependent launch, 128 blocks, as plain
// launches, cluster launches, or both in turn.
func BenchmarkHandoverCluster(b *testing.B) {
	d := benchDevice(b)
	const launches = 200
	var p *handoverProbe
	graphs := map[string]*graph{}
	var releases []func()
	err := d.Do(func(c *Ctx) error {
		var err error
		if p, err = newHandoverProbe(c); err != nil {
			return err
		}
		if err := errors.Join(c.Memset(p.x.Ptr, 0, 4*p.n), c.Memset(p.y.Ptr, 0, 4*p.n)); err != nil {
			return err
		}
		blocks := p.blocks / 8 * 8
		return withPDL(c, true, func() error {
			for _, f := range clusterChains {
				g, release, err := capturedPDL(c, func() error { return p.chainOf(f.kernels, blocks, launches) })
				if err != nil {
					return err
				}
				graphs[f.name] = g
				releases = append(releases, release)
			}
			return nil
		})
	})
	releaseProbe(b, d, &p, &releases)
	if err != nil {
		b.Fatal(err)
	}
	for _, f := range clusterChains {
		name, g := f.name, graphs[f.name]
		b.Run(name, func(b *testing.B) {
			var runs []float64
			err := d.Do(func(c *Ctx) error {
				for range 5 {
					ms, err := timeEvents(c, 3, func() error { return check("cuGraphLaunch", drv.cuGraphLaunch(g.exec, c.stream)) })
					if err != nil {
						return err
					}
					runs = append(runs, float64(ms)*1e3/float64(3*launches))
				}
				return c.Sync()
			})
			if err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(slices.Min(runs), "us/stage")
			b.Logf("%s: us a stage over 5 runs: %.3f", name, runs)
		})
	}
}

// releaseProbe releases a benchmark's graphs and frees its probe (if
// made) when the benchmark ends.
func releaseProbe(b *testing.B, d *Device, p **handoverProbe, releases *[]func()) {
	b.Cleanup(func() {
		d.Do(func(c *Ctx) error {
			for _, r := range *releases {
				r()
			}
			if *p != nil {
				return (*p).free()
			}
			return nil
		})
	})
}
