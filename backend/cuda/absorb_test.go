//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
)

// absorbScaleMatrix is a random MMFP4 matrix whose E4M3 group scales are
// drawn from the bytes [lo, hi] (0x01-0x07: the subnormals), row scales
// 1e-3 to 1.5e-3, uniform codes: the weight values cover the E4M3 range
// that quantized weights rarely reach.
func absorbScaleMatrix(r *rand.Rand, n, k, g int, lo, hi byte) backend.HostWeight {
	m := synthMatrix(r, n, k, g)
	for i := range m.Scales {
		m.Scales[i] = lo + byte(r.IntN(int(hi-lo)+1))
	}
	return backend.HostWeight{Name: "wuk", N: n, K: k, Quant: m}
}

// rowRelErr is the largest over rows of max |got - ref| / max |ref| within
// the row (rows of cols values), so that rows of small magnitude count as
// much as large ones.
func rowRelErr(ref, got []float32, cols int) float64 {
	worst := 0.0
	for r := 0; r+cols <= len(ref); r += cols {
		if e := maxRelErr(ref[r:r+cols], got[r:r+cols]); !(e <= worst) {
			worst = e
		}
	}
	return worst
}

// AbsorbQuery through the tensor-core kernel against the CPU backend: the
// model's shapes (20 heads, dn 192, rank 512) and a small one, groups of
// 128 and 32, quantized weights and weights whose scales span the E4M3
// range (normal and subnormal), odd token counts, and token rows scaled by
// powers of two from 2^-24 to 2^24 (the kernel rescales each row for f16).
// The error is taken per token row. The CUDA-core kernels, which remain
// for other shapes, run on the same inputs (absorb_query_many from 2 rows,
// absorb_query_q for 1). Bounds: a few times the largest errors measured
// on an H200 (tensor cores 1.8e-6, CUDA cores 6.2e-7).
func TestAbsorbTCMatchesCPU(t *testing.T) {
	r := testRand(t)
	g, c := testBackends(t, Options{})
	defer func(a, m int) { absorbTCMinTokens, absorbManyMinTokens = a, m }(absorbTCMinTokens, absorbManyMinTokens)
	type shape struct {
		s    backend.MLAShape
		G    int
		kind string
	}
	model := backend.MLAShape{Heads: 20, NopeDim: 192, RopeDim: 64, VDim: 256, Rank: 512}
	small := backend.MLAShape{Heads: 3, NopeDim: 128, RopeDim: 32, VDim: 128, Rank: 256}
	shapes := []shape{{model, 128, "quantized"}, {model, 32, "quantized"}, {model, 128, "wide scales"},
		{model, 64, "subnormal scales"}, {small, 32, "quantized"}}
	tokens := []int{1, 5, 16, 17, 63, 100, 257}
	if testing.Short() {
		tokens = []int{5, 65}
	}
	for _, sh := range shapes {
		s := sh.s
		var hw backend.HostWeight
		switch sh.kind {
		case "quantized":
			hw = quantHost(t, r, "wuk", s.Heads*s.NopeDim, s.Rank, sh.G)
		case "wide scales":
			hw = absorbScaleMatrix(r, s.Heads*s.NopeDim, s.Rank, sh.G, 0x01, 0x7E)
		default:
			hw = absorbScaleMatrix(r, s.Heads*s.NopeDim, s.Rank, sh.G, 0x01, 0x07)
		}
		qk := s.NopeDim + s.RopeDim
		for _, T := range tokens {
			q := randVec(r, T*s.Heads*qk, 1)
			for tk := 0; tk < T; tk++ {
				f := float32(math.Ldexp(1, r.IntN(49)-24))
				for i := range q[tk*s.Heads*qk : (tk+1)*s.Heads*qk] {
					q[tk*s.Heads*qk+i] *= f
				}
			}
			run := func(b backend.Backend) []float32 {
				b.SetBatch(simpleBatch(T, 0), nil)
				qt, ql := b.NewTensor(T, s.Heads*qk), b.NewTensor(T, s.Heads*s.Rank)
				b.Upload(qt, q)
				b.AbsorbQuery(ql, qt, mustWeight(t, b, hw), s)
				out := b.Download(ql)
				if err := b.Sync(); err != nil {
					t.Fatal(err)
				}
				return out
			}
			want := run(c)
			absorbTCMinTokens = 1
			got := run(g)
			absorbTCMinTokens, absorbManyMinTokens = 0, 2
			old := run(g)
			name := fmt.Sprintf("dn=%d rank=%d G=%d %s T=%d", s.NopeDim, s.Rank, sh.G, sh.kind, T)
			e, eo := rowRelErr(want, got, s.Heads*s.Rank), rowRelErr(want, old, s.Heads*s.Rank)
			t.Logf("%-48s max row rel err: tensor cores %.2e, CUDA cores %.2e", name, e, eo)
			if !(e <= 5e-6) {
				t.Errorf("%s: tensor cores: max row relative error %.3e above 5e-6", name, e)
			}
			if !(eo <= 2e-6) {
				t.Errorf("%s: CUDA cores: max row relative error %.3e above 2e-6", name, eo)
			}
		}
	}
}

// BenchmarkAbsorbQuery times one layer's absorbed query at GLM-4.7-Flash's
// shapes (20 heads, dn 192, rank 512, groups of 128) for T tokens: the
// tensor-core kernel, absorb_query_many and absorb_query_q, device time of
// the queued launch (events), TFLOP/s of 2*T*heads*dn*rank.
func BenchmarkAbsorbQuery(b *testing.B) {
	d := benchDevice(b)
	s := backend.MLAShape{Heads: 20, NopeDim: 192, RopeDim: 64, VDim: 256, Rank: 512}
	for _, T := range []int{1, 4, 8, 16, 32, 64, 256, 1024} {
		for _, kern := range []string{"tc", "many", "q"} {
			b.Run(fmt.Sprintf("T%d/%s", T, kern), func(b *testing.B) {
				absorbBench(b, d, s, T, kern)
			})
		}
	}
}

func absorbBench(b *testing.B, d *Device, s backend.MLAShape, T int, kern string) {
	defer func(a, m int) { absorbTCMinTokens, absorbManyMinTokens = a, m }(absorbTCMinTokens, absorbManyMinTokens)
	absorbTCMinTokens, absorbManyMinTokens = 0, 1<<30
	switch kern {
	case "tc":
		absorbTCMinTokens = 1
	case "many":
		absorbManyMinTokens = 1
	}
	g := NewOnDevice(d, Options{NoGraphs: true})
	defer g.Close()
	r := rand.New(rand.NewPCG(12, 12))
	qk := s.NopeDim + s.RopeDim
	w, err := g.NewWeight(backend.HostWeight{Name: "wuk", N: s.Heads * s.NopeDim, K: s.Rank, Quant: synthMatrix(r, s.Heads*s.NopeDim, s.Rank, 128)})
	if err != nil {
		b.Fatal(err)
	}
	g.SetBatch(simpleBatch(T, 0), nil)
	q, ql := g.NewTensor(T, s.Heads*qk), g.NewTensor(T, s.Heads*s.Rank)
	g.Upload(q, randVec(r, T*s.Heads*qk, 1))
	g.AbsorbQuery(ql, q, w, s) // warm-up (compiles)
	if err := g.Sync(); err != nil {
		b.Fatal(err)
	}
	g.AbsorbQuery(ql, q, w, s)
	ops := g.pending
	g.pending = nil
	err = d.Do(func(c *Ctx) error {
		sec, _, err := timeQueued(c, ops, 20)
		if err != nil {
			return err
		}
		if kern == "tc" {
			k, err := c.Kernel("absorb", fmt.Sprintf("absorb_query_tc_%d", s.NopeDim))
			if err != nil {
				return err
			}
			b.ReportMetric(float64(k.Regs), "regs")
			b.ReportMetric(float64(k.LocalBytes), "local-bytes")
		}
		b.ReportMetric(sec*1e6, "us/op")
		b.ReportMetric(2*float64(T*s.Heads*s.NopeDim*s.Rank)/sec/1e12, "TFLOP/s")
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
}
