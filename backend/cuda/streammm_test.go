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

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/backend/cpu"
	"github.com/mmfp4/mmfp4/format"
)

// The streaming product of few rows against the CPU backend's int8 MMFP4
// product (same int8 activations: only the float summation order differs,
// and with a split K the partial sums add in another order) and the
// float64 product of the dequantized weights, at the model's shapes and
// odd ones, odd row counts, the planned launch shape and forced ones
// (every D, K unsplit and split into single groups).
func TestMatMulStream(t *testing.T) {
	d := testDevice(t)
	r := testRand(t)
	ref := cpu.New(cpu.Options{Threads: 4})
	type shape struct {
		N, K int
		Ts   []int
	}
	shapes := []shape{
		{2048, 5120, []int{3, 33}},    // o_proj
		{768, 2048, []int{2, 17, 64}}, // q_a
		{576, 2048, []int{9, 32}},     // kv_a
		{5120, 768, []int{5, 40}},     // q_b
		{48, 512, []int{1, 8, 63}},    // small
		{1040, 1024, []int{16, 57}},   // a partial last row block
		{16, 128, []int{3}},           // one m-tile, one group
	}
	sms, optin := d.Info().SMs, d.Info().SharedOptin
	for _, s := range shapes {
		w := randVec(r, s.N*s.K, 0.02)
		m, err := format.Quantize(w, s.N, s.K, format.QuantOptions{GroupSize: 128})
		if err != nil {
			t.Fatal(err)
		}
		wd := m.Dequantize()
		rw, err := ref.NewWeight(backend.HostWeight{Name: "w", N: s.N, K: s.K, Quant: m})
		if err != nil {
			t.Fatal(err)
		}
		GK := s.K / 128
		for _, T := range s.Ts {
			plans := []StreamPlan{PlanStream(s.N, s.K, 1, T, sms, optin), {D: 1, KS: 1}, {D: 1, KS: GK}}
			if GK%2 == 0 {
				plans = append(plans, StreamPlan{D: 2, KS: GK / 2})
			}
			if GK%4 == 0 {
				plans = append(plans, StreamPlan{D: 4, KS: 1})
			}
			if T > 16 { // one and two m-tiles a warp, pipelined or not, for each plan
				for i, p := range plans {
					plans[i].MR, plans[i].Pipe = 1, false
					plans = append(plans, StreamPlan{D: p.D, KS: p.KS, MR: 2}, StreamPlan{D: p.D, KS: p.KS, MR: 2, Pipe: true})
				}
			}
			// Plans whose staged rows exceed the shared memory are refused.
			plans = slices.DeleteFunc(plans, func(p StreamPlan) bool { return streamShared(streamTiles(T), s.K, p) > optin })
			x := randVec(r, T*s.K, 1)
			for i := 0; i < 128; i++ { // a zero group
				x[i] = 0
			}
			xt, yt := ref.NewTensor(T, s.K), ref.NewTensor(T, s.N)
			ref.Upload(xt, x)
			ref.MatMul(yt, xt, rw)
			want := ref.Download(yt)
			exact := floatProduct(wd, x, T, s.N, s.K)
			byPlan := map[StreamPlan][]float32{}
			for _, p := range plans {
				ldy := s.N + 4*(T%2)
				got := productOnDevice(t, d, m, x, T, ldy, func(c *Ctx, y uint64, qm *QMatrix, a *QActs) error {
					part, err1 := c.Alloc(4 * p.KS * T * s.N)
					cnt, err2 := c.Alloc(4 * streamCounters)
					if err := errors.Join(err1, err2, c.Memset(cnt.Ptr, 0, cnt.Size)); err != nil {
						return err
					}
					defer c.Free(part)
					defer c.Free(cnt)
					// Twice: the first call must leave the counters zeroed.
					for i := 0; i < 2; i++ {
						if err := c.MatMulStream(y, ldy, qm, a, p, part.Ptr, cnt.Ptr); err != nil {
							return err
						}
					}
					return nil
				})
				e1, m1, e2 := relErr(want, got), maxRelErr(want, got), relErr(exact, got)
				// Float rounding only (the GEMM measured 0 to 1e-7).
				if !(e1 <= 2e-6) || !(m1 <= 1e-5) {
					t.Errorf("N=%d K=%d T=%d plan %+v: relative error %.3g (max %.3g) against the CPU int8 product", s.N, s.K, T, p, e1, m1)
				}
				// int8 activations: about 2^-8 relative per element.
				if !(e2 <= 1e-2) {
					t.Errorf("N=%d K=%d T=%d plan %+v: relative error %.3g against the float64 product", s.N, s.K, T, p, e2)
				}
				t.Logf("N=%d K=%d T=%d plan %+v: rel err %.2g (max %.2g) vs CPU int8, %.2g vs float64", s.N, s.K, T, p, e1, m1, e2)
				// One or two m-tiles a warp: the same terms in the same
				// order, so the same bits.
				if p.MR == 2 {
					if prev, ok := byPlan[StreamPlan{D: p.D, KS: p.KS, MR: 1}]; ok {
						if diff := countDiff(prev, got); diff > 0 {
							t.Errorf("N=%d K=%d T=%d plan %+v: %d of %d outputs differ from one m-tile a warp", s.N, s.K, T, p, diff, len(got))
						}
					} else {
						t.Errorf("N=%d K=%d T=%d plan %+v: no one-m-tile twin ran", s.N, s.K, T, p)
					}
				}
				byPlan[p] = got
			}
		}
	}
}

// countDiff is the number of positions where a and b differ bit for bit.
func countDiff(a, b []float32) int {
	n := 0
	for i := range a {
		if math.Float32bits(a[i]) != math.Float32bits(b[i]) {
			n++
		}
	}
	return n
}

// The backend's MatMul of 2-64 rows through the streaming product against
// the CPU backend (the planned shape, the backend's counters and arena).
func TestBackendMatMulStreamMatchesCPU(t *testing.T) {
	r := testRand(t)
	g, c := testBackends(t, Options{})
	defer func(a, b int) { streamMinTokens, streamMaxTokens = a, b }(streamMinTokens, streamMaxTokens)
	streamMinTokens, streamMaxTokens = 2, StreamMaxTokens
	for _, s := range [][2]int{{2048, 5120}, {576, 2048}, {5120, 768}} {
		hw := quantHost(t, r, "w", s[0], s[1], 128)
		for _, T := range []int{2, 7, 33, 64} {
			x := randVec(r, T*s[1], 1)
			compareOp(t, g, c, fmt.Sprintf("stream matmul %dx%d T=%d", s[0], s[1], T), 1e-5, func(b backend.Backend) []float32 {
				b.SetBatch(simpleBatch(T, 0), nil)
				xt, yt := b.NewTensor(T, s[1]), b.NewTensor(T, s[0])
				b.Upload(xt, x)
				b.MatMul(yt, xt, mustWeight(t, b, hw))
				return b.Download(yt)
			})
		}
	}
}

// BenchmarkMatMulStream: the streaming product against the GEMV kernels
// run eight rows a launch and the 16-token GEMM, at the decode step's
// shapes, 8 to 64 rows. Device time and the weights' GB/s.
func BenchmarkMatMulStream(b *testing.B) {
	d := benchDevice(b)
	r := rand.New(rand.NewPCG(9, 9))
	cases := []struct {
		name string
		n, k int
	}{
		{"o_proj_2048x5120", 2048, 5120},
		{"q_a_768x2048", 768, 2048},
		{"kv_a_576x2048", 576, 2048},
		{"q_b_5120x768", 5120, 768},
		{"lm_head_154880x2048", 154880, 2048},
	}
	sms, optin := d.Info().SMs, d.Info().SharedOptin
	for _, cs := range cases {
		var q *QMatrix
		err := d.Do(func(c *Ctx) error {
			var err error
			q, err = c.UploadMatrix(synthMatrix(r, cs.n, cs.k, 128))
			return err
		})
		if err != nil {
			b.Fatal(err)
		}
		for _, T := range []int{8, 32, 64} {
			for _, v := range []string{"gemv8", "t16", "stream", "stream_mr1", "stream_pipe", "stream_ks1"} {
				b.Run(fmt.Sprintf("%s/T%d/%s", cs.name, T, v), func(b *testing.B) {
					err := d.Do(func(c *Ctx) error {
						xb, err1 := upload(c, randVec(r, T*cs.k, 1))
						a, err2 := c.NewQActs(T, cs.k, 128)
						y, err3 := c.Alloc(4 * T * cs.n)
						p := PlanStream(cs.n, cs.k, 1, T, sms, optin)
						switch v {
						case "stream_mr1":
							p.MR, p.Pipe = 1, false
						case "stream_pipe":
							p.Pipe = p.MR == 2
						case "stream_ks1":
							p.KS = 1
							for p.KS < cs.k/128/p.D && streamShared(streamTiles(T), cs.k, p) > optin {
								p.KS++
							}
						}
						part, err4 := c.Alloc(4 * p.KS * T * cs.n)
						cnt, err5 := c.Alloc(4 * streamCounters)
						if err := errors.Join(err1, err2, err3, err4, err5); err != nil {
							return err
						}
						defer c.Free(xb)
						defer c.FreeQActs(a)
						defer c.Free(y)
						defer c.Free(part)
						defer c.Free(cnt)
						if err := errors.Join(c.Memset(cnt.Ptr, 0, cnt.Size), c.RMSNormQuant(xb.Ptr, cs.k, 0, 0, 0, 0, T, cs.k, 128, a)); err != nil {
							return err
						}
						launches := 1
						run := func() error {
							switch v {
							case "t16":
								return c.GEMM(y.Ptr, cs.n, q, a, GEMMTile16)
							case "stream", "stream_mr1", "stream_pipe", "stream_ks1":
								return c.MatMulStream(y.Ptr, cs.n, q, a, p, part.Ptr, cnt.Ptr)
							}
							return c.GEMVRows(y.Ptr, cs.n, q, a)
						}
						if v == "gemv8" {
							launches = (T + 7) / 8
						}
						if err := run(); err != nil { // warm-up
							return err
						}
						const reps = 20
						ms, err := timeDevice(c, reps, launches, run)
						if err != nil {
							return err
						}
						sec := float64(ms) / 1e3 / reps
						b.ReportMetric(sec*1e6, "us/op")
						b.ReportMetric(float64(q.Bytes())/sec/1e9, "GB/s")
						if strings.HasPrefix(v, "stream") {
							b.ReportMetric(float64(p.D), "D")
							b.ReportMetric(float64(p.KS), "KS")
							b.ReportMetric(float64(max(p.MR, 1)), "MR")
						}
						return nil
					})
					if err != nil {
						b.Fatal(err)
					}
				})
			}
		}
	}
}

// AbsorbQuery of decode-sized batches through absorb_query_many (its
// threshold lowered to 2 rows) against the CPU backend, at the model's
// head shapes, groups of 128 and 32.
func TestBackendAbsorbManyMatchesCPU(t *testing.T) {
	r := testRand(t)
	g, c := testBackends(t, Options{})
	defer func(v, tc int) { absorbManyMinTokens, absorbTCMinTokens = v, tc }(absorbManyMinTokens, absorbTCMinTokens)
	absorbManyMinTokens, absorbTCMinTokens = 2, 0
	s := backend.MLAShape{Heads: 20, NopeDim: 128, RopeDim: 64, VDim: 128, Rank: 512}
	qk := s.NopeDim + s.RopeDim
	for _, G := range []int{128, 32} {
		hw := quantHost(t, r, "wuk", s.Heads*s.NopeDim, s.Rank, G)
		for _, T := range []int{2, 9, 33} {
			q := randVec(r, T*s.Heads*qk, 1)
			// Same float terms as the CPU, summed in another order.
			compareOp(t, g, c, fmt.Sprintf("absorb many G=%d T=%d", G, T), 1e-5, func(b backend.Backend) []float32 {
				b.SetBatch(simpleBatch(T, 0), nil)
				qt, ql := b.NewTensor(T, s.Heads*qk), b.NewTensor(T, s.Heads*s.Rank)
				b.Upload(qt, q)
				b.AbsorbQuery(ql, qt, mustWeight(t, b, hw), s)
				return b.Download(ql)
			})
		}
	}
}

// ExpandValues of 2-64 rows through the per-head streaming product against
// the CPU backend (the model's value shapes: 20 heads of 256 rows over a
// latent of 512), and MatMulStreamHeads against GEMMHeads with forced plans.
func TestMatMulStreamHeads(t *testing.T) {
	r := testRand(t)
	g, c := testBackends(t, Options{})
	defer func(a, b int, on bool) { streamMinTokens, streamMaxTokens, streamHeadsOn = a, b, on }(streamMinTokens, streamMaxTokens, streamHeadsOn)
	streamMinTokens, streamMaxTokens, streamHeadsOn = 2, StreamMaxTokens, true
	s := backend.MLAShape{Heads: 20, NopeDim: 128, RopeDim: 64, VDim: 256, Rank: 512}
	hw := quantHost(t, r, "wuv", s.Heads*s.VDim, s.Rank, 128)
	for _, T := range []int{2, 9, 33, 64} {
		x := randVec(r, T*s.Heads*s.Rank, 1)
		compareOp(t, g, c, fmt.Sprintf("expand values T=%d", T), 1e-5, func(b backend.Backend) []float32 {
			b.SetBatch(simpleBatch(T, 0), nil)
			ol, om := b.NewTensor(T, s.Heads*s.Rank), b.NewTensor(T, s.Heads*s.VDim)
			b.Upload(ol, x)
			b.ExpandValues(om, ol, mustWeight(t, b, hw), s)
			return b.Download(om)
		})
	}
	d := g.Device()
	for _, T := range []int{3, 17} {
		x := randVec(r, T*s.Heads*s.Rank, 1)
		N, K := s.Heads*s.VDim, s.Rank
		run := func(p StreamPlan) []float32 {
			return productOnDevice(t, d, hw.Quant, x, T, N, func(c *Ctx, y uint64, qm *QMatrix, a *QActs) error {
				// productOnDevice quantizes rows of qm.K: requantize the
				// whole row of heads*K instead.
				xb, err := upload(c, x)
				if err != nil {
					return err
				}
				defer c.Free(xb)
				ah, err := c.NewQActs(T, s.Heads*K, 128)
				if err != nil {
					return err
				}
				defer c.FreeQActs(ah)
				if err := c.RMSNormQuant(xb.Ptr, s.Heads*K, 0, 0, 0, 0, T, s.Heads*K, 128, ah); err != nil {
					return err
				}
				if p.D == 0 {
					return c.GEMMHeads(y, N, qm, ah, s.Heads, s.VDim, GEMMTile16)
				}
				part, err1 := c.Alloc(4 * p.KS * T * N)
				cnt, err2 := c.Alloc(4 * streamCounters)
				if err := errors.Join(err1, err2, c.Memset(cnt.Ptr, 0, cnt.Size)); err != nil {
					return err
				}
				defer c.Free(part)
				defer c.Free(cnt)
				return c.MatMulStreamHeads(y, N, qm, ah, s.Heads, p, part.Ptr, cnt.Ptr)
			})
		}
		want := run(StreamPlan{})
		for _, p := range []StreamPlan{PlanStream(s.VDim, K, s.Heads, T, d.Info().SMs, d.Info().SharedOptin), {D: 4, KS: 1}, {D: 1, KS: 4}} {
			got := run(p)
			e, m := relErr(want, got), maxRelErr(want, got)
			t.Logf("T=%d plan %+v: rel err %.2g (max %.2g) against GEMMHeads", T, p, e, m)
			if !(e <= 2e-6) || !(m <= 1e-5) {
				t.Errorf("T=%d plan %+v: relative error %.3g (max %.3g) against GEMMHeads", T, p, e, m)
			}
		}
	}
}
