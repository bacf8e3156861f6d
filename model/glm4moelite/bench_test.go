package glm4moelite

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/backend/cpu"
	"github.com/mmfp4/mmfp4/format"
	"github.com/mmfp4/mmfp4/internal/benchmode"
)

// glmFlashConfig is GLM-4.7-Flash's architecture with the given number of
// layers (the first dense, the rest MoE).
func glmFlashConfig(layers int) *Config {
	c := &Config{
		VocabSize: 154880, HiddenSize: 2048, IntermediateSize: 10240, MoEIntermediateSize: 1536,
		NumLayers: layers, NumHeads: 20, QLoraRank: 768, KVLoraRank: 512,
		QKNopeHeadDim: 192, QKRopeHeadDim: 64, VHeadDim: 256,
		NumExperts: 64, NumSharedExperts: 1, ExpertsPerToken: 4, NumGroups: 1, TopKGroups: 1,
		NormTopKProb: true, RoutedScaling: 1.8, RMSNormEps: 1e-5, RopeTheta: 1e6, RopeInterleave: true,
		MaxPositions: 202752, BOSTokenID: -1,
	}
	for i := 0; i < layers; i++ {
		c.Dense = append(c.Dense, i == 0)
	}
	return c
}

// synthModel builds a model of random MMFP4 weights (group 128) in memory:
// codes uniform, block scales 0x30-0x37, row scales that make weights of
// about 1/sqrt(K), router N(0, 0.02), norm gains 1.
func synthModel(tb testing.TB, b backend.Backend, c *Config, seed uint64) *Model {
	r := rand.New(rand.NewPCG(seed, 7))
	q := func(n, k int) backend.Weight {
		m := &format.Matrix{N: n, K: k, GroupSize: 128, Codes: offHeap(n * k / 2), Scales: offHeap(n * k / 128), RowScale: make([]float32, n)}
		for i := 0; i+8 <= len(m.Codes); i += 8 {
			v := r.Uint64()
			for j := 0; j < 8; j++ {
				m.Codes[i+j] = byte(v >> (8 * j))
			}
		}
		for i := range m.Scales {
			m.Scales[i] = byte(0x30 + r.IntN(8))
		}
		// e2m1 codes average |v| 2.2 and e4m3 0x30-0x37 about 0.0059.
		rs := float32(1 / (2.2 * 0.0059 * math.Sqrt(float64(k))))
		for i := range m.RowScale {
			m.RowScale[i] = rs
		}
		w, err := b.NewWeight(backend.HostWeight{Name: "w", N: n, K: k, Quant: m})
		if err != nil {
			tb.Fatal(err)
		}
		return w
	}
	dense := func(n, k int, scale float64) backend.Weight {
		v := make([]float32, n*k)
		for i := range v {
			v[i] = float32(r.NormFloat64() * scale)
		}
		w, err := b.NewWeight(backend.HostWeight{Name: "w", N: n, K: k, Dense: v})
		if err != nil {
			tb.Fatal(err)
		}
		return w
	}
	ones := func(n int) backend.Weight {
		v := make([]float32, n)
		for i := range v {
			v[i] = 1
		}
		w, _ := b.NewWeight(backend.HostWeight{Name: "gain", N: 1, K: n, Dense: v})
		return w
	}
	H, heads, qk := c.HiddenSize, c.NumHeads, c.QKNopeHeadDim+c.QKRopeHeadDim
	m := &Model{Config: c, b: b,
		mla: backend.MLAShape{Heads: heads, NopeDim: c.QKNopeHeadDim, RopeDim: c.QKRopeHeadDim, VDim: c.VHeadDim, Rank: c.KVLoraRank},
		route: backend.RouterConfig{TopK: c.ExpertsPerToken, Groups: c.NumGroups, TopKGroups: c.TopKGroups,
			NormTopKProb: c.NormTopKProb, RoutedScaling: c.RoutedScaling, NumExperts: c.NumExperts}}
	m.Embed = q(c.VocabSize, H)
	mlp := func(inter int) *MLP { return &MLP{Gate: q(inter, H), Up: q(inter, H), Down: q(H, inter)} }
	for i := 0; i < c.NumLayers; i++ {
		l := Layer{InputNorm: ones(H), PostAttnNorm: ones(H)}
		l.Attn = Attention{QA: q(c.QLoraRank, H), QANorm: ones(c.QLoraRank), QB: q(heads*qk, c.QLoraRank),
			KVA: q(c.KVLoraRank+c.QKRopeHeadDim, H), KVANorm: ones(c.KVLoraRank),
			UK: q(heads*c.QKNopeHeadDim, c.KVLoraRank), UV: q(heads*c.VHeadDim, c.KVLoraRank), O: q(H, heads*c.VHeadDim)}
		if c.Dense[i] {
			l.MLP = mlp(c.IntermediateSize)
		} else {
			moe := &MoE{Router: dense(c.NumExperts, H, 0.02), Bias: dense(1, c.NumExperts, 0), Shared: mlp(c.MoEIntermediateSize)}
			for e := 0; e < c.NumExperts; e++ {
				ex := mlp(c.MoEIntermediateSize)
				moe.Experts = append(moe.Experts, backend.Expert{Gate: ex.Gate, Up: ex.Up, Down: ex.Down})
			}
			l.MoE = moe
		}
		m.Layers = append(m.Layers, l)
	}
	m.Norm = ones(H)
	m.LMHead = q(c.VocabSize, H)
	return m
}

// fillCache writes random latents and keys at positions [0, n) of every
// layer of s's cache, as if a context of n tokens had been prefilled.
func fillCache(b backend.Backend, m *Model, s *State, n int) {
	c := m.Config
	r := rand.New(rand.NewPCG(5, 5))
	batch := &backend.Batch{Seqs: []backend.Seq{{Len: n, Blocks: s.blocks}}}
	for j := 0; j < n; j++ {
		batch.Tokens = append(batch.Tokens, 0)
		batch.Positions = append(batch.Positions, int32(j))
	}
	b.SetBatch(batch, s.pool)
	lat, kpe := b.NewTensor(n, c.KVLoraRank), b.NewTensor(n, c.QKRopeHeadDim)
	v := make([]float32, n*c.KVLoraRank)
	for l := 0; l < c.NumLayers; l++ {
		for i := range v {
			v[i] = float32(r.NormFloat64())
		}
		b.Upload(lat, v)
		b.Upload(kpe, v[:n*c.QKRopeHeadDim])
		b.CacheWrite(l, lat, kpe)
	}
	s.Pos = n
}

// decodeBytes counts the weight bytes one decode step reads: attention and
// norms of every layer, the dense MLP, the router, four routed experts and
// the shared expert of each MoE layer, and the lm_head.
func decodeBytes(c *Config) int64 {
	mm := func(n, k int) int64 { return int64(n*k/2 + n*k/128 + 4*n) }
	H, heads, qk := c.HiddenSize, c.NumHeads, c.QKNopeHeadDim+c.QKRopeHeadDim
	attn := mm(c.QLoraRank, H) + mm(heads*qk, c.QLoraRank) + mm(c.KVLoraRank+c.QKRopeHeadDim, H) +
		mm(heads*(c.QKNopeHeadDim+c.VHeadDim), c.KVLoraRank) + mm(H, heads*c.VHeadDim)
	expert := 3 * mm(c.MoEIntermediateSize, H)
	var total int64
	for i := 0; i < c.NumLayers; i++ {
		total += attn
		if c.Dense[i] {
			total += 3 * mm(c.IntermediateSize, H)
		} else {
			total += int64(4*c.NumExperts*H) + int64(c.ExpertsPerToken+c.NumSharedExperts)*expert
		}
	}
	return total + mm(c.VocabSize, H)
}

// BenchmarkDecodeStep decodes one token at GLM-4.7-Flash's shapes after a
// context of 1024 tokens (bf16 cache, the serving default), through a few
// layers (1 dense, the rest MoE) and the full lm_head. GB/s counts the
// weight bytes the step reads.
//
//	go test -run '^$' -bench DecodeStep -cpuprofile cpu.out ./model/glm4moelite/
func BenchmarkDecodeStep(b *testing.B) {
	benchmode.Check(b)
	const layers, ctx = 4, 1024
	c := glmFlashConfig(layers)
	for _, k := range cpu.Kernels() {
		b.Run(fmt.Sprintf("%s/layers=%d/ctx=%d", k, layers, ctx), func(b *testing.B) {
			be := cpu.New(cpu.Options{Kernel: k})
			m := synthModel(b, be, c, 1)
			s, err := m.NewState(ctx+1, backend.CacheBF16)
			if err != nil {
				b.Fatal(err)
			}
			fillCache(be, m, s, ctx)
			if _, err := m.ForwardSeq(s, []int{17}, false); err != nil {
				b.Fatal(err)
			}
			bytes := decodeBytes(c)
			b.SetBytes(bytes)
			faults := minorFaults()
			b.ResetTimer()
			best := time.Duration(math.MaxInt64)
			for i := 0; i < b.N; i++ {
				s.Pos = ctx
				t0 := time.Now()
				if _, err := m.ForwardSeq(s, []int{i % c.VocabSize}, false); err != nil {
					b.Fatal(err)
				}
				best = min(best, time.Since(t0))
			}
			b.ReportMetric(float64(bytes)*float64(b.N)/b.Elapsed().Seconds()/1e9, "GB/s")
			b.ReportMetric(b.Elapsed().Seconds()*1e3/float64(b.N), "ms/token")
			// The fastest step: on a shared machine the mean mixes in other
			// programs' use of the cores and the memory.
			b.ReportMetric(float64(best.Microseconds())/1e3, "best-ms/token")
			b.ReportMetric(float64(bytes)/best.Seconds()/1e9, "best-GB/s")
			// Fresh memory pages touched per step (each costs a fault).
			b.ReportMetric(float64(minorFaults()-faults)/float64(b.N), "faults/token")
		})
	}
}

// BenchmarkPrefill runs a prompt of 512 tokens through a few layers at
// GLM-4.7-Flash's shapes (1 dense, the rest MoE) and the lm_head of the
// last position; tok/s scales to the full model by the number of layers.
func BenchmarkPrefill(b *testing.B) {
	benchmode.Check(b)
	const layers, T = 4, 512
	c := glmFlashConfig(layers)
	for _, k := range cpu.Kernels()[:1] {
		b.Run(fmt.Sprintf("%s/layers=%d/T=%d", k, layers, T), func(b *testing.B) {
			be := cpu.New(cpu.Options{Kernel: k})
			m := synthModel(b, be, c, 1)
			ids := make([]int, T)
			for i := range ids {
				ids[i] = (i * 7919) % c.VocabSize
			}
			prefill := func() {
				s, err := m.NewState(T, backend.CacheBF16)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := m.ForwardSeq(s, ids, false); err != nil {
					b.Fatal(err)
				}
			}
			// A first step sizes the backend's tensor arena: its fresh pages
			// would otherwise be counted (about 0.3 MB per token and layer).
			prefill()
			faults := minorFaults()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				prefill()
			}
			b.ReportMetric(float64(T*b.N)/b.Elapsed().Seconds(), "tok/s")
			b.ReportMetric(float64(minorFaults()-faults)/float64(b.N), "faults/op")
		})
	}
}
