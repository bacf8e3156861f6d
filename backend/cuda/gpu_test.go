//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"strconv"
	"testing"
	"unsafe"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/backend/cpu"
	"github.com/mmfp4/mmfp4/format"
)

// testDevice opens GPU 0 for a test, or skips where there is no GPU, driver
// or NVRTC. With MMFP4_REQUIRE_GPU=1 (set on GPU runs) it fails instead, so
// that a GPU run cannot pass by skipping.
func testDevice(t testing.TB) *Device {
	t.Helper()
	require := os.Getenv("MMFP4_REQUIRE_GPU") == "1"
	d, err := Open(0)
	if err == nil {
		if _, _, _, err = NVRTCVersion(); err != nil {
			d.Close()
		}
	}
	if err != nil {
		if !require && (errors.Is(err, ErrNoDriver) || errors.Is(err, ErrNoDevice) || errors.Is(err, ErrNoNVRTC)) {
			t.Skipf("no CUDA GPU here (%v); set MMFP4_REQUIRE_GPU=1 to fail instead", err)
		}
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := d.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return d
}

// testRand draws inputs from a fixed seed, or from MMFP4_TEST_SEED (GPU runs
// pass a fresh one each time and the log names it).
func testRand(t testing.TB) *rand.Rand {
	seed := uint64(1)
	if s := os.Getenv("MMFP4_TEST_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("MMFP4_TEST_SEED=%q: %v", s, err)
		}
		seed = v
	}
	t.Logf("seed %d", seed)
	return rand.New(rand.NewPCG(seed, 0x6d6d667034))
}

func randVec(r *rand.Rand, n int, scale float64) []float32 {
	v := make([]float32, n)
	for i := range v {
		v[i] = float32(r.NormFloat64() * scale)
	}
	return v
}

func relErr(ref, got []float32) float64 {
	var num, den float64
	for i := range ref {
		d := float64(got[i]) - float64(ref[i])
		num += d * d
		den += float64(ref[i]) * float64(ref[i])
	}
	return math.Sqrt(num / den)
}

// quantizeRef is docs/format.md section 9 written out: per group of G values,
// scale amax/127, int8 rounded half away from zero; plus each 32 values' sum.
func quantizeRef(x []float32, G int) (q []int8, scales []float32, sums []int32) {
	q = make([]int8, len(x))
	scales = make([]float32, len(x)/G)
	sums = make([]int32, len(x)/32)
	for g := range scales {
		seg := x[g*G : (g+1)*G]
		var amax float32
		for _, v := range seg {
			amax = max(amax, float32(math.Abs(float64(v))))
		}
		if amax == 0 {
			continue
		}
		s := amax / 127
		scales[g] = s
		for i, v := range seg {
			r := v / s
			if r >= 0 {
				r += 0.5
			} else {
				r -= 0.5
			}
			q[g*G+i] = int8(max(-127, min(127, int32(r))))
		}
	}
	for c := range sums {
		for _, v := range q[c*32 : (c+1)*32] {
			sums[c] += int32(v)
		}
	}
	return
}

// poolLayer reads back layer l of g's cache pool p.
func poolLayer(t testing.TB, g *Backend, p backend.CachePool, l int) []byte {
	t.Helper()
	cp := p.(*cachePool)
	rec := make([]byte, cp.layerBytes)
	g.now("read cache", func(c *Ctx) error { return CopyOut(c, rec, cp.layer(l)) })
	if err := g.Sync(); err != nil {
		t.Fatal(err)
	}
	return rec
}

// checkRecords fails t unless the cache bytes rec (slots of slotBytes,
// then padding) hold n written records: n slots with at least half their
// bytes nonzero, every other byte zero. Tests that compare caches check
// with it that what they compare was written, and only where it should be.
func checkRecords(t testing.TB, name string, rec []byte, slotBytes, n int) {
	t.Helper()
	written := 0
	for s := 0; s*slotBytes < len(rec); s++ {
		switch nz := nonzeroCount(rec[s*slotBytes : min(len(rec), (s+1)*slotBytes)]); {
		case nz == 0:
		case nz >= slotBytes/2:
			written++
		default:
			t.Errorf("%s: slot %d holds %d nonzero bytes of %d", name, s, nz, slotBytes)
		}
	}
	if written != n {
		t.Errorf("%s: %d slots hold a record, want %d", name, written, n)
	}
}

// cacheDTypeCode is the cache kernels' dtype code of d (kernelDType).
func cacheDTypeCode(d backend.CacheDType) int { return (&cachePool{dtype: d}).kernelDType() }

// slotBytesOf is the size of a slot of a cache of dtype d (slotBytes).
func slotBytesOf(d backend.CacheDType, rank, rope int) int {
	return (&cachePool{rank: rank, ropeDim: rope, dtype: d}).slotBytes()
}

// poison fills n bytes at p with 0xFF (a NaN in every float32), so that an
// output element the kernel fails to write shows.
func poison(c *Ctx, p uint64, n int) error { return c.Memset(p, 0xFF, n) }

// upload copies v into a new device buffer. Helpers used inside Device.Do
// return errors: t.Fatal there would end the device's goroutine.
func upload(c *Ctx, v []float32) (Buffer, error) {
	b, err := c.Alloc(4 * len(v))
	if err != nil {
		return b, err
	}
	return b, CopyIn(c, b.Ptr, v)
}

// nonzeroCount is how many of s are not zero (tests check that an output
// they compare is not all zeros).
func nonzeroCount[T comparable](s []T) int {
	var zero T
	n := 0
	for _, v := range s {
		if v != zero {
			n++
		}
	}
	return n
}

// runOutKernel launches test kernel name of module mod on grid x block
// with one argument, a device buffer the size of got, and copies that
// buffer into got.
func runOutKernel[T any](c *Ctx, mod, name string, grid, block Dim, got []T) error {
	var zero T
	out, err := c.Alloc(len(got) * int(unsafe.Sizeof(zero)))
	if err != nil {
		return err
	}
	defer c.Free(out)
	k, err := c.Kernel(mod, name)
	if err != nil {
		return err
	}
	if err := c.Launch(k, grid, block, 0, out.Ptr); err != nil {
		return err
	}
	return CopyOut(c, got, out.Ptr)
}

// testBufs uploads and allocates a test's device buffers, keeping their
// errors for one errors.Join (errs).
type testBufs struct {
	c    *Ctx
	errs []error
}

// up uploads v and returns its address.
func (b *testBufs) up(v []float32) uint64 {
	buf, err := upload(b.c, v)
	b.errs = append(b.errs, err)
	return buf.Ptr
}

// alloc allocates n bytes and returns their address.
func (b *testBufs) alloc(n int) uint64 {
	buf, err := b.c.Alloc(n)
	b.errs = append(b.errs, err)
	return buf.Ptr
}

// RMSNorm and quantization against the CPU backend's RMSNorm and the
// format's quantization rule, on rows with a column stride.
func TestRMSNormQuant(t *testing.T) {
	d := testDevice(t)
	r := testRand(t)
	ref := cpu.New(cpu.Options{Threads: 2})
	for _, c := range []struct{ T, K, G int }{{1, 2048, 128}, {5, 2048, 64}, {3, 768, 32}, {8, 10240, 128}, {2, 512, 128}} {
		err := d.Do(func(ctx *Ctx) error {
			ld := c.K + 32
			x := randVec(r, c.T*ld, 2)
			for i := 0; i < 7; i++ { // a zero group and a zero row quantize to zeros
				copy(x[i*c.G:(i+1)*c.G], make([]float32, c.G))
			}
			gain := randVec(r, c.K, 0.5)
			eps := float32(1e-5)

			// CPU reference: RMSNorm on the unstrided rows.
			xs := make([]float32, c.T*c.K)
			for t := 0; t < c.T; t++ {
				copy(xs[t*c.K:(t+1)*c.K], x[t*ld:t*ld+c.K])
			}
			in, out := ref.NewTensor(c.T, c.K), ref.NewTensor(c.T, c.K)
			ref.Upload(in, xs)
			g, err := ref.NewWeight(backend.HostWeight{Name: "gain", N: 1, K: c.K, Dense: gain})
			if err != nil {
				return err
			}
			ref.RMSNorm(out, in, g, eps)
			want := ref.Download(out)

			xb, err1 := upload(ctx, x)
			gb, err2 := upload(ctx, gain)
			ob, err3 := ctx.Alloc(4 * c.T * ld)
			if err := errors.Join(err1, err2, err3); err != nil {
				return err
			}
			a, err := ctx.NewQActs(c.T, c.K, c.G)
			if err != nil {
				return err
			}
			if err := errors.Join(poison(ctx, ob.Ptr, ob.Size), poison(ctx, a.Q, c.T*c.K)); err != nil {
				return err
			}
			if err := ctx.RMSNormQuant(xb.Ptr, ld, gb.Ptr, eps, ob.Ptr, ld, c.T, c.K, c.G, a); err != nil {
				return err
			}
			gotStrided := make([]float32, c.T*ld)
			q := make([]int8, c.T*c.K)
			sc := make([]float32, c.T*c.K/c.G)
			sums := make([]int32, c.T*c.K/32)
			if err := errors.Join(CopyOut(ctx, gotStrided, ob.Ptr), CopyOut(ctx, q, a.Q), CopyOut(ctx, sc, a.Scales), CopyOut(ctx, sums, a.Sums)); err != nil {
				return err
			}
			got := make([]float32, c.T*c.K)
			for t := 0; t < c.T; t++ {
				copy(got[t*c.K:(t+1)*c.K], gotStrided[t*ld:t*ld+c.K])
			}
			// Same operations, but the squares summed in another order and
			// the scale a float32 rsqrt (a few ulp; 1.0e-7 measured when the
			// GPU summed in float64).
			if e := relErr(want, got); !(e <= 5e-7) {
				t.Errorf("T=%d K=%d: rmsnorm relative error %.3g", c.T, c.K, e)
			}
			// Quantization of the kernel's own float output must match the
			// rule exactly.
			for tk := 0; tk < c.T; tk++ {
				wq, ws, wsum := quantizeRef(got[tk*c.K:(tk+1)*c.K], c.G)
				for i := range wq {
					if q[tk*c.K+i] != wq[i] {
						return fmt.Errorf("T=%d K=%d G=%d: row %d q[%d] = %d, want %d", c.T, c.K, c.G, tk, i, q[tk*c.K+i], wq[i])
					}
				}
				for i := range ws {
					if sc[tk*len(ws)+i] != ws[i] {
						return fmt.Errorf("T=%d K=%d G=%d: row %d scale[%d] = %g, want %g", c.T, c.K, c.G, tk, i, sc[tk*len(ws)+i], ws[i])
					}
				}
				for i := range wsum {
					if sums[tk*len(wsum)+i] != wsum[i] {
						return fmt.Errorf("T=%d K=%d G=%d: row %d sum[%d] = %d, want %d", c.T, c.K, c.G, tk, i, sums[tk*len(wsum)+i], wsum[i])
					}
				}
			}
			return errors.Join(ctx.Free(xb), ctx.Free(gb), ctx.Free(ob), ctx.FreeQActs(a))
		})
		if err != nil {
			t.Fatal(err)
		}
	}
}

// Quantization without a norm (quant_rows, and rmsnorm_quant where a row
// is not 16-byte aligned) against the format's rule, bit for bit: rows with
// a stride, zero groups, every group size, one row to a whole prefill.
func TestQuantizeRowsMatchesRule(t *testing.T) {
	d := testDevice(t)
	r := testRand(t)
	for _, c := range []struct{ T, K, G, ld int }{
		{1, 2048, 128, 2048}, {5, 576, 64, 580}, {17, 96, 32, 100}, {37, 768, 32, 768},
		{300, 10240, 128, 10244}, {1024, 5120, 128, 5120}, {3, 512, 128, 513},
	} {
		err := d.Do(func(ctx *Ctx) error {
			x := randVec(r, c.T*c.ld, 3)
			for i := 0; i < 5 && i < c.T; i++ { // zero groups quantize to zeros
				copy(x[i*c.ld:i*c.ld+c.G], make([]float32, c.G))
			}
			last := (c.T-1)*c.ld + c.K
			copy(x[last-c.G:last], make([]float32, c.G))
			xb, err := upload(ctx, x)
			if err != nil {
				return err
			}
			a, err := ctx.NewQActs(c.T, c.K, c.G)
			if err != nil {
				return err
			}
			if err := errors.Join(poison(ctx, a.Q, c.T*c.K), poison(ctx, a.Scales, 4*c.T*c.K/c.G), poison(ctx, a.Sums, 4*c.T*c.K/32)); err != nil {
				return err
			}
			if err := ctx.RMSNormQuant(xb.Ptr, c.ld, 0, 0, 0, 0, c.T, c.K, c.G, a); err != nil {
				return err
			}
			q := make([]int8, c.T*c.K)
			sc := make([]float32, c.T*c.K/c.G)
			sums := make([]int32, c.T*c.K/32)
			if err := errors.Join(CopyOut(ctx, q, a.Q), CopyOut(ctx, sc, a.Scales), CopyOut(ctx, sums, a.Sums)); err != nil {
				return err
			}
			for tk := 0; tk < c.T; tk++ {
				wq, ws, wsum := quantizeRef(x[tk*c.ld:tk*c.ld+c.K], c.G)
				for i := range wq {
					if q[tk*c.K+i] != wq[i] {
						return fmt.Errorf("%+v: row %d q[%d] = %d, want %d", c, tk, i, q[tk*c.K+i], wq[i])
					}
				}
				for i := range ws {
					if math.Float32bits(sc[tk*len(ws)+i]) != math.Float32bits(ws[i]) {
						return fmt.Errorf("%+v: row %d scale[%d] = %g, want %g", c, tk, i, sc[tk*len(ws)+i], ws[i])
					}
				}
				for i := range wsum {
					if sums[tk*len(wsum)+i] != wsum[i] {
						return fmt.Errorf("%+v: row %d sum[%d] = %d, want %d", c, tk, i, sums[tk*len(wsum)+i], wsum[i])
					}
				}
			}
			return errors.Join(ctx.Free(xb), ctx.FreeQActs(a))
		})
		if err != nil {
			t.Fatal(err)
		}
	}
}

// The GEMV kernels against the CPU backend's int8 MMFP4 product (same int8
// activations, so only the float summation order differs) and against the
// float64 product of the dequantized weights and the float activations.
func TestGEMV(t *testing.T) {
	d := testDevice(t)
	r := testRand(t)
	ref := cpu.New(cpu.Options{Threads: 2})
	type shape struct{ N, K, G int }
	shapes := []shape{{37, 256, 32}, {1000, 2048, 128}, {576, 2048, 64}, {2048, 1536, 128}, {300, 512, 128}, {130, 768, 128}, {64, 5120, 128}, {50, 10240, 128}}
	for _, s := range shapes {
		w := randVec(r, s.N*s.K, 0.02)
		m, err := format.Quantize(w, s.N, s.K, format.QuantOptions{GroupSize: s.G})
		if err != nil {
			t.Fatal(err)
		}
		wd := m.Dequantize()
		rw, err := ref.NewWeight(backend.HostWeight{Name: "w", N: s.N, K: s.K, Quant: m})
		if err != nil {
			t.Fatal(err)
		}
		for T := 1; T <= 8; T++ {
			if s.K >= 5120 && T != 1 && T != 8 {
				continue
			}
			x := randVec(r, T*s.K, 1)
			xt, yt := ref.NewTensor(T, s.K), ref.NewTensor(T, s.N)
			ref.Upload(xt, x)
			ref.MatMul(yt, xt, rw)
			want := ref.Download(yt)
			exact := floatProduct(wd, x, T, s.N, s.K)
			variants := []GEMVVariant{GEMVOffset}
			if T == 1 {
				variants = append(variants, GEMVSplit)
			}
			if s.G == 128 {
				variants = append(variants, GEMVMMA)
			}
			for _, v := range variants {
				ldy := s.N + 3*(T%2)
				got := productOnDevice(t, d, m, x, T, ldy, func(c *Ctx, y uint64, qm *QMatrix, a *QActs) error {
					return c.GEMV(y, ldy, qm, a, v)
				})
				e1, e2 := relErr(want, got), relErr(exact, got)
				// The same integer dot products: float rounding only.
				if !(e1 <= 2e-6) {
					t.Errorf("N=%d K=%d G=%d T=%d variant %d: relative error %.3g against the CPU int8 product", s.N, s.K, s.G, T, v, e1)
				}
				// int8 activations: about 2^-8 relative per element.
				if !(e2 <= 1e-2) {
					t.Errorf("N=%d K=%d G=%d T=%d variant %d: relative error %.3g against the float64 product", s.N, s.K, s.G, T, v, e2)
				}
				if T == 1 || T == 8 {
					t.Logf("N=%d K=%d G=%d T=%d variant %d: rel err %.2g vs CPU int8, %.2g vs float64", s.N, s.K, s.G, T, v, e1, e2)
				}
			}
		}
	}
}

// TestSanitizerCanary writes far past the end of an output buffer. It runs
// only with MMFP4_SANITIZER_CANARY=1, under compute-sanitizer, to show that
// the sanitizer sees this binary's kernels: it must report errors there.
func TestSanitizerCanary(t *testing.T) {
	if os.Getenv("MMFP4_SANITIZER_CANARY") != "1" {
		t.Skip("run under compute-sanitizer with MMFP4_SANITIZER_CANARY=1")
	}
	d := testDevice(t)
	r := testRand(t)
	m := synthMatrix(r, 1<<16, 256, 128)
	err := d.Do(func(c *Ctx) error {
		q, err := c.UploadMatrix(m)
		if err != nil {
			return err
		}
		a, err := c.NewQActs(1, 256, 128)
		if err != nil {
			return err
		}
		var small uint64
		if err := check("cuMemAlloc", drv.cuMemAlloc(&small, 256)); err != nil {
			return err
		}
		if err := c.GEMV(small, 1<<16, q, a, GEMVSplit); err != nil {
			return err
		}
		c.Sync() // the sanitizer reports; the result does not matter
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// floatProduct is y = x W^T in float64, rounded once: the reference that
// int8 activations approach (w [N][K] dequantized, x [T][K]).
func floatProduct(w, x []float32, T, N, K int) []float32 {
	y := make([]float32, T*N)
	for tk := 0; tk < T; tk++ {
		for n := 0; n < N; n++ {
			var acc float64
			for k := 0; k < K; k++ {
				acc += float64(w[n*K+k]) * float64(x[tk*K+k])
			}
			y[tk*N+n] = float32(acc)
		}
	}
	return y
}

// productOnDevice uploads m and x (T rows of m.K), quantizes x in m's
// groups, runs product into a poisoned output of row stride ldy >= m.N and
// returns its T x m.N values.
func productOnDevice(t *testing.T, d *Device, m *format.Matrix, x []float32, T, ldy int, product func(c *Ctx, y uint64, qm *QMatrix, a *QActs) error) []float32 {
	t.Helper()
	N, K := m.N, m.K
	var got []float32
	err := d.Do(func(c *Ctx) error {
		qm, err := c.UploadMatrix(m)
		if err != nil {
			return err
		}
		xb, err := upload(c, x)
		if err != nil {
			return err
		}
		a, err := c.NewQActs(T, K, m.GroupSize)
		if err != nil {
			return err
		}
		yb, err := c.Alloc(4 * T * ldy)
		if err != nil {
			return err
		}
		if err := poison(c, yb.Ptr, yb.Size); err != nil {
			return err
		}
		if err := c.RMSNormQuant(xb.Ptr, K, 0, 0, 0, 0, T, K, m.GroupSize, a); err != nil {
			return err
		}
		if err := product(c, yb.Ptr, qm, a); err != nil {
			return err
		}
		all := make([]float32, T*ldy)
		if err := CopyOut(c, all, yb.Ptr); err != nil {
			return err
		}
		got = make([]float32, T*N)
		for tk := 0; tk < T; tk++ {
			copy(got[tk*N:(tk+1)*N], all[tk*ldy:tk*ldy+N])
		}
		return errors.Join(c.FreeMatrix(qm), c.Free(xb), c.FreeQActs(a), c.Free(yb))
	})
	if err != nil {
		t.Fatal(err)
	}
	return got
}
