//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/mmfp4/mmfp4/format"
	"github.com/mmfp4/mmfp4/internal/benchmode"
)

// Benchmarks time device work with events and report GB/s of weights read
// and the fraction of the device-to-device copy bandwidth measured in the
// same process (bytes read plus bytes written).

func benchDevice(b *testing.B) *Device {
	benchmode.Check(b)
	return testDevice(b)
}

var copyBandwidth float64

// measureCopy times device-to-device copies of 1 GiB, once per process.
func measureCopy(c *Ctx) (float64, error) {
	if copyBandwidth > 0 {
		return copyBandwidth, nil
	}
	const n, reps = 1 << 30, 10
	src, err := c.Alloc(n)
	if err != nil {
		return 0, err
	}
	dst, err := c.Alloc(n)
	if err != nil {
		return 0, err
	}
	defer c.Free(src)
	defer c.Free(dst)
	if err := errors.Join(c.Memset(src.Ptr, 0x5A, n), c.CopyDevice(dst.Ptr, src.Ptr, n)); err != nil { // warm-up
		return 0, err
	}
	ms, err := timeEvents(c, reps, func() error { return c.CopyDevice(dst.Ptr, src.Ptr, n) })
	if err != nil {
		return 0, err
	}
	copyBandwidth = 2 * n * reps / (float64(ms) / 1e3)
	return copyBandwidth, nil
}

// timeEvents runs fn reps times between two events and returns milliseconds.
func timeEvents(c *Ctx, reps int, fn func() error) (float32, error) {
	start, err := c.Record()
	if err != nil {
		return 0, err
	}
	defer c.DestroyEvent(start)
	for i := 0; i < reps; i++ {
		if err := fn(); err != nil {
			return 0, err
		}
	}
	end, err := c.Record()
	if err != nil {
		return 0, err
	}
	defer c.DestroyEvent(end)
	return c.Elapsed(start, end)
}

// runOps runs queued ops in order, stopping at the first error.
func runOps(c *Ctx, ops []queuedOp) error {
	for _, op := range ops {
		if err := op.fn(c); err != nil {
			return err
		}
	}
	return nil
}

// timeQueued runs the queued ops once, counting their launches, then
// times reps runs of them (timeDevice): seconds a run, and a run's launches.
func timeQueued(c *Ctx, ops []queuedOp, reps int) (sec float64, launches int, err error) {
	run := func() error { return runOps(c, ops) }
	n := c.launches
	if err := run(); err != nil {
		return 0, 0, err
	}
	launches = c.launches - n
	if err := c.Sync(); err != nil {
		return 0, 0, err
	}
	ms, err := timeDevice(c, reps, launches, run)
	if err != nil {
		return 0, 0, err
	}
	return float64(ms) / 1e3 / float64(reps), launches, nil
}

// timeDevice queues a spin kernel long enough for the host to queue reps
// calls of fn (launches calls each) behind it, then times those calls
// between events: device time without the host's launch gaps, about what a
// graph replay sees.
func timeDevice(c *Ctx, reps, launches int, fn func() error) (float32, error) {
	const hostPerLaunch = 10e-6 // seconds; purego launches take about 7
	if err := c.Spin(int64(float64(reps*launches)*hostPerLaunch*2e9) + 100000); err != nil {
		return 0, err
	}
	return timeEvents(c, reps, fn)
}

// benchUsPerOp runs run once (compiling and warming), then times 20 runs of
// launches launches each and reports the device microseconds a run.
func benchUsPerOp(b *testing.B, c *Ctx, launches int, run func() error) error {
	if err := run(); err != nil {
		return err
	}
	const reps = 20
	ms, err := timeDevice(c, reps, launches, run)
	if err != nil {
		return err
	}
	b.ReportMetric(float64(ms)*1e3/reps, "us/op")
	return nil
}

func BenchmarkCopy(b *testing.B) {
	d := benchDevice(b)
	err := d.Do(func(c *Ctx) error {
		bw, err := measureCopy(c)
		b.ReportMetric(bw/1e9, "GB/s")
		b.Logf("%s: device-to-device copy %.0f GB/s (clock-derived peak %.0f GB/s)", c.Info().Name, bw/1e9, c.Info().PeakBandwidth()/1e9)
		return err
	})
	if err != nil {
		b.Fatal(err)
	}
}

// synthMatrix is a random MMFP4 matrix: uniform codes, scales around 1/64,
// row scales near 1e-3. Generating it directly is much faster than
// quantizing the lm_head's 317 M weights.
func synthMatrix(r *rand.Rand, n, k, g int) *format.Matrix {
	m := &format.Matrix{N: n, K: k, GroupSize: g, Codes: make([]byte, n*k/2), Scales: make([]byte, n*k/g), RowScale: make([]float32, n)}
	for i := 0; i+8 <= len(m.Codes); i += 8 {
		v := r.Uint64()
		for j := 0; j < 8; j++ {
			m.Codes[i+j] = byte(v >> (8 * j))
		}
	}
	for i := range m.Scales {
		m.Scales[i] = byte(0x20 + r.IntN(0x20))
	}
	for i := range m.RowScale {
		m.RowScale[i] = float32(1e-3 * (0.5 + r.Float64()))
	}
	return m
}

type gemvCase struct {
	name   string
	n, k   int
	copies int // distinct matrices launched in turn, to stay out of L2
}

// BenchmarkGEMV: the lm_head; all 64 experts of a layer stacked into one
// tall matrix (what a kernel streaming every selected expert reaches at that
// K); and single matrices of the attention and expert shapes, launched one
// after another over distinct copies (device time per launch, which for
// these small matrices is mostly the launch's ramp and drain).
func BenchmarkGEMV(b *testing.B) {
	d := benchDevice(b)
	r := rand.New(rand.NewPCG(7, 7))
	cases := []gemvCase{
		{"lm_head_154880x2048", 154880, 2048, 1},
		{"experts_gate_64x1536x2048", 64 * 1536, 2048, 1},
		{"experts_down_64x2048x1536", 64 * 2048, 1536, 1},
		{"o_proj_2048x5120", 2048, 5120, 16},
		{"q_b_5120x768", 5120, 768, 32},
		{"kv_b_8960x512", 8960, 512, 32},
		{"expert_gate_1536x2048", 1536, 2048, 96},
		{"expert_down_2048x1536", 2048, 1536, 96},
	}
	type variant struct {
		name string
		T    int
		v    GEMVVariant
	}
	variants := []variant{
		{"T1_split", 1, GEMVSplit}, {"T1_mma", 1, GEMVMMA}, {"T2_mma", 2, GEMVMMA},
		{"T4_mma", 4, GEMVMMA}, {"T8_offset", 8, GEMVOffset}, {"T8_mma", 8, GEMVMMA},
	}
	for _, cs := range cases {
		var mats []*QMatrix
		err := d.Do(func(c *Ctx) error {
			if _, err := measureCopy(c); err != nil {
				return err
			}
			m := synthMatrix(r, cs.n, cs.k, 128)
			for i := 0; i < cs.copies; i++ {
				q, err := c.UploadMatrix(m)
				if err != nil {
					return err
				}
				mats = append(mats, q)
			}
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
		for _, v := range variants {
			if cs.copies > 1 && (v.T == 2 || v.T == 4 || v.v == GEMVOffset) {
				continue
			}
			b.Run(fmt.Sprintf("%s/%s", cs.name, v.name), func(b *testing.B) {
				err := d.Do(func(c *Ctx) error {
					x := randVec(r, v.T*cs.k, 1)
					xb, err := upload(c, x)
					if err != nil {
						return err
					}
					a, err := c.NewQActs(v.T, cs.k, 128)
					if err != nil {
						return err
					}
					y, err := c.Alloc(4 * v.T * cs.n)
					if err != nil {
						return err
					}
					if err := c.RMSNormQuant(xb.Ptr, cs.k, 0, 0, 0, 0, v.T, cs.k, 128, a); err != nil {
						return err
					}
					for _, q := range mats { // warm-up: compile, load, first touch
						if err := c.GEMV(y.Ptr, cs.n, q, a, v.v); err != nil {
							return err
						}
					}
					if err := c.Sync(); err != nil {
						return err
					}
					b.ResetTimer()
					i := 0
					ms, err := timeDevice(c, b.N, 1, func() error {
						i++
						return c.GEMV(y.Ptr, cs.n, mats[i%len(mats)], a, v.v)
					})
					if err != nil {
						return err
					}
					b.StopTimer()
					sec := float64(ms) / 1e3 / float64(b.N)
					bytes := float64(mats[0].Bytes())
					b.ReportMetric(sec*1e6, "us/launch")
					b.ReportMetric(bytes/sec/1e9, "GB/s")
					b.ReportMetric(bytes/sec/copyBandwidth, "copy-frac")
					return errors.Join(c.Free(xb), c.FreeQActs(a), c.Free(y))
				})
				if err != nil {
					b.Fatal(err)
				}
			})
		}
		d.Do(func(c *Ctx) error {
			for _, q := range mats {
				c.FreeMatrix(q)
			}
			return c.Trim()
		})
	}
}

// BenchmarkRMSNormQuant: one decode token's hidden state (K=2048) and a
// batch of 8.
func BenchmarkRMSNormQuant(b *testing.B) {
	d := benchDevice(b)
	r := rand.New(rand.NewPCG(8, 8))
	for _, T := range []int{1, 8} {
		b.Run(fmt.Sprintf("T%d_K2048", T), func(b *testing.B) {
			err := d.Do(func(c *Ctx) error {
				const K = 2048
				xb, err1 := upload(c, randVec(r, T*K, 1))
				gb, err2 := upload(c, randVec(r, K, 1))
				out, err3 := c.Alloc(4 * T * K)
				a, err4 := c.NewQActs(T, K, 128)
				if err := errors.Join(err1, err2, err3, err4); err != nil {
					return err
				}
				run := func() error { return c.RMSNormQuant(xb.Ptr, K, gb.Ptr, 1e-5, out.Ptr, K, T, K, 128, a) }
				if err := run(); err != nil {
					return err
				}
				b.ResetTimer()
				ms, err := timeDevice(c, b.N, 1, run)
				if err != nil {
					return err
				}
				b.ReportMetric(float64(ms)*1e3/float64(b.N), "us/launch")
				return errors.Join(c.Free(xb), c.Free(gb), c.Free(out), c.FreeQActs(a))
			})
			if err != nil {
				b.Fatal(err)
			}
		})
	}
}

// BenchmarkQuantizeRows: the activations of a prefill's value expansion
// (1024 x 20 heads x 512) and o_proj (1024 x 5120), and of a 32-row serving
// step, quantized without a norm: quant_rows against rmsnorm_quant's
// one-group-a-warp form, by turns.
func BenchmarkQuantizeRows(b *testing.B) {
	d := benchDevice(b)
	r := rand.New(rand.NewPCG(9, 9))
	for _, s := range []struct{ T, K int }{{1024, 10240}, {1024, 5120}, {32, 10240}, {32, 5120}} {
		b.Run(fmt.Sprintf("T%d_K%d", s.T, s.K), func(b *testing.B) {
			err := d.Do(func(c *Ctx) error {
				const G = 128
				xb, err1 := upload(c, randVec(r, s.T*s.K, 1))
				a, err2 := c.NewQActs(s.T, s.K, G)
				k, err3 := c.Kernel("quant", "rmsnorm_quant")
				if err := errors.Join(err1, err2, err3); err != nil {
					return err
				}
				old := func() error {
					return c.Launch(k, Dim{uint32(s.T), uint32((s.K/G + 7) / 8), 1}, D1(256), 0, xb.Ptr, s.K, uint64(0), float32(0), uint64(0), 0, a.Q, a.Scales, a.Sums, s.K, G)
				}
				rows := func() error { return c.RMSNormQuant(xb.Ptr, s.K, 0, 0, 0, 0, s.T, s.K, G, a) }
				for round := 0; round < 2; round++ {
					for _, v := range []struct {
						name string
						run  func() error
					}{{"rmsnorm_quant", old}, {"quant_rows", rows}} {
						if err := v.run(); err != nil {
							return err
						}
						ms, err := timeDevice(c, 50, 1, v.run)
						if err != nil {
							return err
						}
						us := float64(ms) * 1e3 / 50
						b.Logf("%s: %dx%d %s %.2f us (%.0f GB/s)", c.Info().Name, s.T, s.K, v.name, us, float64(s.T*s.K*5)/us/1e3)
					}
				}
				return errors.Join(c.Free(xb), c.FreeQActs(a))
			})
			if err != nil {
				b.Fatal(err)
			}
		})
	}
}

// BenchmarkMoE: one token through a GLM-4.7-Flash MoE layer (64 experts of
// 1536 x 2048, top 4, one shared expert): gate+up+SiLU, quantization and
// weighted down, three launches. The routed experts change every call (16
// random sets) so that they come from memory, not L2.
func BenchmarkMoE(b *testing.B) {
	d := benchDevice(b)
	r := rand.New(rand.NewPCG(9, 9))
	const K, I, E, topK, sets = 2048, 1536, 64, 4, 16
	var (
		call  func() error
		bytes float64
	)
	err := d.Do(func(c *Ctx) error {
		if _, err := measureCopy(c); err != nil {
			return err
		}
		var dev []ExpertMats
		for e := 0; e <= E; e++ {
			var q [3]*QMatrix
			for i, m := range []*format.Matrix{synthMatrix(r, I, K, 128), synthMatrix(r, I, K, 128), synthMatrix(r, K, I, 128)} {
				var err error
				if q[i], err = c.UploadMatrix(m); err != nil {
					return err
				}
			}
			dev = append(dev, ExpertMats{q[0], q[1], q[2]})
		}
		tab, err := c.NewExpertTable(dev[:E], dev[E:])
		if err != nil {
			return err
		}
		scr, err := c.NewMoEScratch(tab, topK)
		if err != nil {
			return err
		}
		xa, err := c.NewQActs(1, K, 128)
		if err != nil {
			return err
		}
		xb, err := upload(c, randVec(r, K, 1))
		if err != nil {
			return err
		}
		ids := make([]int32, sets*topK)
		for s := 0; s < sets; s++ {
			for k, e := range r.Perm(E)[:topK] {
				ids[s*topK+k] = int32(e)
			}
		}
		ib, err := c.Alloc(4 * len(ids))
		if err != nil {
			return err
		}
		wb, err := upload(c, randVec(r, sets*topK, 0.5))
		if err != nil {
			return err
		}
		y, err := c.Alloc(4 * K)
		if err != nil {
			return err
		}
		if err := errors.Join(CopyIn(c, ib.Ptr, ids), c.RMSNormQuant(xb.Ptr, K, 0, 0, 0, 0, 1, K, 128, xa)); err != nil {
			return err
		}
		i := 0
		call = func() error {
			i++
			s := i % sets
			return c.MoE(y.Ptr, false, tab, ib.At(4*topK*s), wb.At(4*topK*s), topK, xa, scr)
		}
		if err := call(); err != nil {
			return err
		}
		bytes = float64(topK+1) * float64(dev[0].Gate.Bytes()+dev[0].Up.Bytes()+dev[0].Down.Bytes())
		return c.Sync()
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Run("token", func(b *testing.B) {
		var ms float32
		err := d.Do(func(c *Ctx) error {
			var err error
			ms, err = timeDevice(c, b.N, 3, call)
			return err
		})
		if err != nil {
			b.Fatal(err)
		}
		sec := float64(ms) / 1e3 / float64(b.N)
		b.ReportMetric(sec*1e6, "us/call")
		b.ReportMetric(bytes/sec/1e9, "GB/s")
		b.ReportMetric(bytes/sec/copyBandwidth, "copy-frac")
	})
}
