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
			}
		}
	}
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
			for _, v := range []string{"gemv8", "t16", "stream", "stream_ks1"} {
				b.Run(fmt.Sprintf("%s/T%d/%s", cs.name, T, v), func(b *testing.B) {
					err := d.Do(func(c *Ctx) error {
						xb, err1 := upload(c, randVec(r, T*cs.k, 1))
						a, err2 := c.NewQActs(T, cs.k, 128)
						y, err3 := c.Alloc(4 * T * cs.n)
						p := PlanStream(cs.n, cs.k, 1, T, sms, optin)
						switch v {
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
							case "stream", "stream_ks1":
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

// Two products of the same rows in one launch (MatMulStreamPair) against
// each product's own MatMulStream launch with the same plan: the same sums
// in the same order, so the same bits; at q_a and kv_a's shapes and odd
// ones (a partial last row block in either matrix), unsplit and split K,
// the plan chosen for the pair.
func TestMatMulStreamPair(t *testing.T) {
	d := testDevice(t)
	r := testRand(t)
	type pair struct{ N1, N2, K int }
	sms, optin := d.Info().SMs, d.Info().SharedOptin
	for _, s := range []pair{{768, 576, 2048}, {1040, 48, 1024}, {16, 1040, 512}} {
		var ms [2]*format.Matrix
		for i, n := range []int{s.N1, s.N2} {
			m, err := format.Quantize(randVec(r, n*s.K, 0.02), n, s.K, format.QuantOptions{GroupSize: 128})
			if err != nil {
				t.Fatal(err)
			}
			ms[i] = m
		}
		GK := s.K / 128
		for _, T := range []int{9, 32, 64} {
			rows := 128 * ((s.N1+127)/128 + (s.N2+127)/128)
			plans := []StreamPlan{PlanStream(rows, s.K, 1, T, sms, optin), {D: 1, KS: 1}, {D: 2, KS: GK / 2}}
			x := randVec(r, T*s.K, 1)
			for _, p := range plans {
				if streamShared(streamTiles(T), s.K, p) > optin {
					continue
				}
				var singles, paired [2][]float32
				err := d.Do(func(c *Ctx) error {
					var qm [2]*QMatrix
					var ys [2]Buffer
					for i := range ms {
						q, err := c.UploadMatrix(ms[i])
						if err != nil {
							return err
						}
						defer c.FreeMatrix(q)
						qm[i] = q
						y, err := c.Alloc(4 * T * ms[i].N)
						if err != nil {
							return err
						}
						defer c.Free(y)
						ys[i] = y
					}
					xb, err1 := upload(c, x)
					a, err2 := c.NewQActs(T, s.K, 128)
					p1, err3 := c.Alloc(4 * p.KS * T * s.N1)
					p2, err4 := c.Alloc(4 * p.KS * T * s.N2)
					cnt, err5 := c.Alloc(4 * streamCounters)
					if err := errors.Join(err1, err2, err3, err4, err5); err != nil {
						return err
					}
					defer c.Free(xb)
					defer c.FreeQActs(a)
					defer c.Free(p1)
					defer c.Free(p2)
					defer c.Free(cnt)
					if err := errors.Join(c.Memset(cnt.Ptr, 0, cnt.Size), c.RMSNormQuant(xb.Ptr, s.K, 0, 0, 0, 0, T, s.K, 128, a)); err != nil {
						return err
					}
					out := func(dst *[2][]float32) error {
						for i := range ms {
							dst[i] = make([]float32, T*ms[i].N)
							if err := CopyOut(c, dst[i], ys[i].Ptr); err != nil {
								return err
							}
						}
						return nil
					}
					for i := range ms {
						if err := poison(c, ys[i].Ptr, ys[i].Size); err != nil {
							return err
						}
						part := []Buffer{p1, p2}[i]
						if err := c.MatMulStream(ys[i].Ptr, ms[i].N, qm[i], a, p, part.Ptr, cnt.Ptr); err != nil {
							return err
						}
					}
					if err := out(&singles); err != nil {
						return err
					}
					for i := range ms {
						if err := poison(c, ys[i].Ptr, ys[i].Size); err != nil {
							return err
						}
					}
					// Twice: the first launch must leave the counters zeroed.
					for i := 0; i < 2; i++ {
						if err := c.MatMulStreamPair(ys[0].Ptr, s.N1, qm[0], ys[1].Ptr, s.N2, qm[1], a, p, p1.Ptr, p2.Ptr, cnt.Ptr); err != nil {
							return err
						}
					}
					return out(&paired)
				})
				if err != nil {
					t.Fatalf("%+v T=%d plan %+v: %v", s, T, p, err)
				}
				for i := range ms {
					if n := countDiff(singles[i], paired[i]); n > 0 {
						t.Errorf("%+v T=%d plan %+v: product %d: %d of %d outputs differ from its own launch", s, T, p, i+1, n, len(paired[i]))
					}
				}
				t.Logf("%+v T=%d plan %+v: both products as their own launches", s, T, p)
			}
		}
	}
}

// countDiff is the number of positions where a and b differ bit for bit
// (NaN poison included).
func countDiff(a, b []float32) int {
	n := 0
	for i := range a {
		if math.Float32bits(a[i]) != math.Float32bits(b[i]) {
			n++
		}
	}
	return n
}

// The backend's q_a and kv_a products of one input (two MatMuls queued one
// after the other: one launch) against the CPU backend. A pair is not made
// where the second product's allocation grows the step's arena (that runs
// the queued ops), so the products are queued again until they pair, as
// they do once the arena has its size.
func TestBackendMatMulStreamPairMatchesCPU(t *testing.T) {
	r := testRand(t)
	g, c := testBackends(t, Options{})
	defer func(a, b int) { streamMinTokens, streamMaxTokens = a, b }(streamMinTokens, streamMaxTokens)
	streamMinTokens, streamMaxTokens = 2, StreamMaxTokens
	w1, w2 := quantHost(t, r, "q_a", 768, 2048, 128), quantHost(t, r, "kv_a", 576, 2048, 128)
	for _, T := range []int{9, 32, 64} {
		x := randVec(r, T*2048, 1)
		compareOp(t, g, c, fmt.Sprintf("stream matmul pair T=%d", T), 1e-5, func(b backend.Backend) []float32 {
			b.SetBatch(simpleBatch(T, 0), nil)
			xt, y1, y2 := b.NewTensor(T, 2048), b.NewTensor(T, 768), b.NewTensor(T, 576)
			b.Upload(xt, x)
			q1, q2 := mustWeight(t, b, w1), mustWeight(t, b, w2)
			gb, onDevice := b.(*Backend)
			pairs := 0
			if onDevice {
				pairs = gb.streamPairs
			}
			for round := 0; round < 6; round++ {
				b.MatMul(y1, xt, q1)
				b.MatMul(y2, xt, q2)
				if !onDevice || gb.streamPairs > pairs {
					break
				}
			}
			if onDevice && gb.streamPairs == pairs {
				t.Errorf("T=%d: the two products did not share a launch in 6 tries", T)
			}
			return append(b.Download(y1), b.Download(y2)...)
		})
	}
}

// BenchmarkMatMulStreamPair: q_a and kv_a of 8-64 rows as two launches
// (each with its own plan) against one MatMulStreamPair launch. Device
// time.
func BenchmarkMatMulStreamPair(b *testing.B) {
	d := benchDevice(b)
	r := rand.New(rand.NewPCG(13, 13))
	const N1, N2, K = 768, 576, 2048
	sms, optin := d.Info().SMs, d.Info().SharedOptin
	var q1, q2 *QMatrix
	err := d.Do(func(c *Ctx) error {
		var err1, err2 error
		q1, err1 = c.UploadMatrix(synthMatrix(r, N1, K, 128))
		q2, err2 = c.UploadMatrix(synthMatrix(r, N2, K, 128))
		return errors.Join(err1, err2)
	})
	if err != nil {
		b.Fatal(err)
	}
	for _, T := range []int{9, 32, 64} {
		for _, v := range []string{"two", "pair"} {
			b.Run(fmt.Sprintf("T%d/%s", T, v), func(b *testing.B) {
				err := d.Do(func(c *Ctx) error {
					xb, err1 := upload(c, randVec(r, T*K, 1))
					a, err2 := c.NewQActs(T, K, 128)
					y1, err3 := c.Alloc(4 * T * N1)
					y2, err4 := c.Alloc(4 * T * N2)
					part, err5 := c.Alloc(4 * 8 * T * (N1 + N2))
					cnt, err6 := c.Alloc(4 * streamCounters)
					if err := errors.Join(err1, err2, err3, err4, err5, err6); err != nil {
						return err
					}
					defer c.Free(xb)
					defer c.FreeQActs(a)
					defer c.Free(y1)
					defer c.Free(y2)
					defer c.Free(part)
					defer c.Free(cnt)
					if err := errors.Join(c.Memset(cnt.Ptr, 0, cnt.Size), c.RMSNormQuant(xb.Ptr, K, 0, 0, 0, 0, T, K, 128, a)); err != nil {
						return err
					}
					p1, p2 := PlanStream(N1, K, 1, T, sms, optin), PlanStream(N2, K, 1, T, sms, optin)
					pp := PlanStream(128*((N1+127)/128+(N2+127)/128), K, 1, T, sms, optin)
					part2 := part.Ptr + uint64(4*8*T*N1)
					run := func() error {
						if err := c.MatMulStream(y1.Ptr, N1, q1, a, p1, part.Ptr, cnt.Ptr); err != nil {
							return err
						}
						return c.MatMulStream(y2.Ptr, N2, q2, a, p2, part2, cnt.Ptr)
					}
					launches := 2
					if v == "pair" {
						launches = 1
						run = func() error {
							return c.MatMulStreamPair(y1.Ptr, N1, q1, y2.Ptr, N2, q2, a, pp, part.Ptr, part2, cnt.Ptr)
						}
					}
					return benchUsPerOp(b, c, launches, run)
				})
				if err != nil {
					b.Fatal(err)
				}
			})
		}
	}
}
