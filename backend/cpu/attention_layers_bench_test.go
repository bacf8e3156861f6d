package cpu

import (
	"math/rand/v2"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/internal/benchmode"
)

// BenchmarkLatentAttentionLayers is BenchmarkLatentAttentionDecode with a
// cache of 47 layers (GLM-4.7-Flash's count, 55 MB at bf16), each call on
// the next layer, so the cached rows come from memory as in a decode step
// rather than from the caches.
func BenchmarkLatentAttentionLayers(b *testing.B) {
	benchmode.Check(b)
	s := backend.MLAShape{Heads: 20, NopeDim: 192, RopeDim: 64, VDim: 256, Rank: 512}
	const ctx, bs, layers = 1024, 64, 47
	for _, dt := range []backend.CacheDType{backend.CacheF32, backend.CacheBF16} {
		b.Run(dt.String(), func(b *testing.B) {
			be := New(Options{})
			p, err := be.NewCachePool(layers, ctx/bs+1, bs, s.Rank, s.RopeDim, dt)
			if err != nil {
				b.Fatal(err)
			}
			blocks := make([]int32, ctx/bs+1)
			for i := range blocks {
				blocks[i] = int32(i)
			}
			r := rand.New(rand.NewPCG(1, 2))
			fill := &backend.Batch{Seqs: []backend.Seq{{Len: ctx, Blocks: blocks}}}
			for j := 0; j < ctx; j++ {
				fill.Tokens = append(fill.Tokens, 0)
				fill.Positions = append(fill.Positions, int32(j))
			}
			be.SetBatch(fill, p)
			lat, kpe := be.NewTensor(ctx, s.Rank), be.NewTensor(ctx, s.RopeDim)
			for l := 0; l < layers; l++ {
				be.Upload(lat, randMat(r, ctx*s.Rank, 1))
				be.Upload(kpe, randMat(r, ctx*s.RopeDim, 1))
				be.CacheWrite(l, lat, kpe)
			}
			step := &backend.Batch{Tokens: []int32{0}, Positions: []int32{ctx}, Seqs: []backend.Seq{{Len: 1, Blocks: blocks}}}
			be.SetBatch(step, p)
			ql, q := be.NewTensor(1, s.Heads*s.Rank), be.NewTensor(1, s.Heads*(s.NopeDim+s.RopeDim))
			be.Upload(ql, randMat(r, s.Heads*s.Rank, 0.05))
			be.Upload(q, randMat(r, s.Heads*(s.NopeDim+s.RopeDim), 0.05))
			out := be.NewTensor(1, s.Heads*s.Rank)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				be.LatentAttention(out, ql, q, i%layers, s, 0.07)
			}
			b.ReportMetric(b.Elapsed().Seconds()*1e6/float64(b.N), "us/op")
		})
	}
}
