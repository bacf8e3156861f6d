//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"testing"
	"time"

	"github.com/mmfp4/mmfp4/backend"
)

// BenchmarkBackendOps times single-token (decode) ops of the full-size
// GLM-4.7-Flash shapes through the Backend interface, host work included:
// ns/op is the amortized time of b.N ops queued back to back (one Sync at
// the end), and synced-us the time of one op followed by Sync.
func BenchmarkBackendOps(b *testing.B) {
	d := benchDevice(b)
	g := NewOnDevice(d, Options{})
	defer g.Close()
	r := testRand(b)
	const (
		hidden, vocab, heads, qLora, rank, rope, nope, vdim = 2048, 154880, 20, 768, 512, 64, 192, 256
		experts, inter, topK                                = 64, 1536, 4
		ctx                                                 = 1024
	)
	s := backend.MLAShape{Heads: heads, NopeDim: nope, RopeDim: rope, VDim: vdim, Rank: rank}
	quant := func(n, k int) backend.Weight {
		w, err := g.NewWeight(backend.HostWeight{Name: "w", N: n, K: k, Quant: synthMatrix(r, n, k, 128)})
		if err != nil {
			b.Fatal(err)
		}
		return w
	}
	dense := func(n, k int) backend.Weight {
		w, err := g.NewWeight(backend.HostWeight{Name: "w", N: n, K: k, Dense: randVec(r, n*k, 0.1)})
		if err != nil {
			b.Fatal(err)
		}
		return w
	}
	lmHead, qB, o := quant(vocab, hidden), quant(heads*(nope+rope), qLora), quant(hidden, heads*vdim)
	wUK, wUV := quant(heads*nope, rank), quant(heads*vdim, rank)
	router, bias, gain := dense(experts, hidden), dense(1, experts), dense(1, hidden)
	var ex []backend.Expert
	for e := 0; e < experts; e++ {
		ex = append(ex, backend.Expert{Gate: quant(inter, hidden), Up: quant(inter, hidden), Down: quant(hidden, inter)})
	}
	pool, err := g.NewCachePool(1, ctx/64, 64, rank, rope, backend.CacheBF16)
	if err != nil {
		b.Fatal(err)
	}
	batch := &backend.Batch{Tokens: []int32{1}, Positions: []int32{ctx - 1}, Outputs: []int32{0}, Seqs: []backend.Seq{{Start: 0, Len: 1}}}
	for i := 0; i < ctx/64; i++ {
		batch.Seqs[0].Blocks = append(batch.Seqs[0].Blocks, int32(i))
	}
	g.SetBatch(batch, pool)
	in := func(cols int) backend.Tensor {
		t := g.NewTensor(1, cols)
		g.Upload(t, randVec(r, cols, 1))
		return t
	}
	x, xq, q, ql, ol, ov := in(hidden), in(qLora), in(heads*(nope+rope)), in(heads*rank), in(heads*rank), in(heads*vdim)
	logits := g.NewTensor(1, vocab)
	rl := g.NewTensor(1, experts)
	g.MatMul(rl, x, router)
	rt := g.Route(rl, bias, backend.RouterConfig{TopK: topK, Groups: 1, TopKGroups: 1, NormTopKProb: true, RoutedScaling: 1.8, NumExperts: experts})
	outH, outQ, outV := g.NewTensor(1, hidden), g.NewTensor(1, heads*(nope+rope)), g.NewTensor(1, heads*vdim)
	if err := g.Sync(); err != nil {
		b.Fatal(err)
	}
	for _, c := range []struct {
		name string
		op   func()
	}{
		{"lm_head", func() { g.MatMul(logits, x, lmHead) }},
		{"q_b", func() { g.MatMul(outQ, xq, qB) }},
		{"o_proj", func() { g.MatMul(outH, ov, o) }},
		{"router", func() { g.MatMul(rl, x, router) }},
		{"route", func() {
			g.Route(rl, bias, backend.RouterConfig{TopK: topK, Groups: 1, TopKGroups: 1, NormTopKProb: true, RoutedScaling: 1.8, NumExperts: experts})
		}},
		{"moe_top4_of_64", func() { g.MoE(outH, x, rt, ex) }},
		{"absorb_query", func() { g.AbsorbQuery(ql, q, wUK, s) }},
		{"attention_ctx1024", func() { g.LatentAttention(ol, ql, q, 0, s, 0.07) }},
		{"expand_values", func() { g.ExpandValues(outV, ol, wUV, s) }},
		{"rmsnorm", func() { g.RMSNorm(outH, x, gain, 1e-5) }},
		{"add", func() { g.Add(outH, x, x) }},
	} {
		b.Run(c.name, func(b *testing.B) {
			c.op()
			if err := g.Sync(); err != nil {
				b.Fatal(err)
			}
			const synced = 20
			start := time.Now()
			for i := 0; i < synced; i++ {
				c.op()
				g.Sync()
			}
			one := time.Since(start) / synced
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				c.op()
			}
			if err := g.Sync(); err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(float64(one.Microseconds()), "synced-us")
		})
	}
}
