//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"errors"
	"fmt"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
)

// norm_qb_absorb_192 writes what its separate launches write, bit for bit:
// NormGEMV (the q_a norm with q_b's product, the latent's norm in its
// extra block or none), rope2_cache_write (both RoPEs, the cache write of
// the latent and the key; over fp8 and fp4 caches rope_rows twice and
// cache_write_fp8 or cache_write_fp4, as the backend launched them before
// its fused writes took those caches) and absorb_query_tc_192: q_b's
// output with its rope columns rotated, the q_a norm's output and int8
// form, the latent's norm and int8 form, the rotated key, the absorbed
// query and the cache's bytes (bf16, f32, fp8 and fp4; the record written
// at its slot only), at GLM-4.7-Flash's shapes (20 heads, q_lora 768)
// and at other head counts, q_lora widths, groups and RoPE layouts, on
// random weights and rows, with programmatic dependent launch where the
// device has it.
func TestNormQAbsorbMatchesSeparate(t *testing.T) {
	d := testDevice(t)
	defer d.Close()
	if d.Info().CC < 90 {
		t.Skipf("clusters need compute capability 9.0, the device has %d", d.Info().CC)
	}
	r := testRand(t)
	const nope, rope, rank, slot = 192, 64, 512, 5
	for _, v := range []struct {
		heads, K, G, ukG, il int
		dt                   backend.CacheDType
		latNorm              bool
	}{
		{20, 768, 128, 128, 1, backend.CacheBF16, true},
		{20, 768, 128, 128, 0, backend.CacheF32, true},
		{20, 768, 64, 32, 1, backend.CacheBF16, false},
		{3, 256, 32, 64, 0, backend.CacheF32, true},
		{7, 1024, 128, 128, 1, backend.CacheBF16, true},
		{1, 512, 64, 128, 0, backend.CacheBF16, false},
		{20, 768, 128, 128, 1, backend.CacheFP8, true},
		{20, 768, 128, 128, 0, backend.CacheFP4, true},
		{20, 768, 64, 32, 1, backend.CacheFP4, false},
		{3, 256, 32, 64, 0, backend.CacheFP8, false},
		{7, 1024, 128, 128, 1, backend.CacheFP4, true},
	} {
		dtype := cacheDTypeCode(v.dt)
		t.Run(fmt.Sprintf("heads%d_K%d_G%d_uk%d_il%d_%v_lat%v", v.heads, v.K, v.G, v.ukG, v.il, v.dt, v.latNorm), func(t *testing.T) {
			err := d.Do(func(c *Ctx) error {
				qRows := v.heads * (nope + rope)
				wqb, e1 := c.UploadMatrix(synthMatrix(r, qRows, v.K, v.G))
				uk, e2 := c.UploadMatrix(synthMatrix(r, v.heads*nope, rank, v.ukG))
				xv, gv, kvv := randVec(r, v.K, 1), randVec(r, v.K, 1), randVec(r, rank+rope, 2)
				latv, lgv, tab := randVec(r, rank, 1), randVec(r, rank, 1), randVec(r, rope, 1)
				tb := &testBufs{c: c}
				up, alloc := tb.up, tb.alloc
				x, gain, kv, latGain, table := up(xv), up(gv), up(kvv), up(lgv), up(tab)
				qan, q, qlat, lat := alloc(4*v.K), alloc(4*qRows), alloc(4*v.heads*rank), alloc(4*rank)
				cacheBytes := 4 * (rank + rope) * 8
				cache, slots := alloc(cacheBytes), alloc(4)
				tb.errs = append(tb.errs, CopyIn(c, slots, []int32{slot}))
				qaq, e3 := c.NewQActs(1, v.K, v.G)
				latq, e4 := c.NewQActs(1, rank, v.G)
				if err := errors.Join(append(tb.errs, e1, e2, e3, e4)...); err != nil {
					return err
				}
				kpe := kv + 4*rank
				n := norm8{x: x, out: qan, gain: gain, eps: 1e-6, q: qaq}
				n2 := norm8{}
				if v.latNorm {
					n2 = norm8{x: kv, out: lat, gain: latGain, eps: 1e-5, q: latq}
				}
				s := backend.MLAShape{Heads: v.heads, NopeDim: nope, RopeDim: rope, Rank: rank, VDim: 256}
				run := func(fused bool) (map[string][]byte, error) {
					// Fresh inputs (the RoPEs rotate in place) and poisoned outputs.
					errs := []error{CopyIn(c, kv, kvv), c.Memset(cache, 0, cacheBytes), poison(c, q, 4*qRows), poison(c, qlat, 4*v.heads*rank),
						poison(c, qan, 4*v.K), poison(c, qaq.Q, v.K), poison(c, latq.Q, rank)}
					if v.latNorm {
						errs = append(errs, poison(c, lat, 4*rank))
					} else {
						errs = append(errs, CopyIn(c, lat, latv))
					}
					if err := errors.Join(errs...); err != nil {
						return nil, err
					}
					err := withPDL(c, true, func() error {
						if fused {
							return c.NormQAbsorb(q, wqb, n, n2, qlat, uk, s, qAbsorbRope{table: table, il: v.il, kpe: kpe, layer: cache, dtype: dtype, slots: slots, lat: lat})
						}
						shared := absorbTCShared(nope)
						absorb, err := c.kernelShared("absorb", "absorb_query_tc_192", shared)
						if err != nil {
							return err
						}
						errs := []error{c.NormGEMV(q, wqb, n, n2), launchRopesCache(c, dtype, q, qRows, v.heads, nope+rope, nope, kpe, rank+rope, rope, v.il, table,
							cache, slots, lat, rank, rank)}
						return errors.Join(append(errs, c.Launch(absorb, Dim{rank / absorbTCN, 1, uint32(v.heads)}, D1(256), shared, qlat, v.heads*rank, q, qRows,
							uk.Codes, uk.Scales, uk.RowScale, uk.G, rank, rope, 1))...)
					})
					if err == nil {
						err = c.Sync()
					}
					if err != nil {
						return nil, err
					}
					out := map[string][]byte{}
					for name, b := range map[string]struct {
						p uint64
						n int
					}{"q": {q, 4 * qRows}, "qlat": {qlat, 4 * v.heads * rank}, "qa norm": {qan, 4 * v.K}, "qa norm q": {qaq.Q, v.K},
						"qa norm scales": {qaq.Scales, 4 * v.K / v.G}, "qa norm sums": {qaq.Sums, 4 * v.K / 32}, "kv": {kv, 4 * (rank + rope)},
						"latent": {lat, 4 * rank}, "latent q": {latq.Q, rank}, "latent scales": {latq.Scales, 4 * rank / v.G},
						"latent sums": {latq.Sums, 4 * rank / 32}, "cache": {cache, cacheBytes}} {
						out[name] = readBytes(t, c, b.p, b.n)
					}
					return out, nil
				}
				want, err := againstSeparate(t, "", run)
				if err != nil {
					return err
				}
				checkRecords(t, "cache", want["cache"], slotBytesOf(v.dt, rank, rope), 1)
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
		})
	}
}

// launchRopesCache launches the RoPEs and cache write of one row apart
// from other work, as the backend launched them before its fused writes
// took the fp8 and fp4 caches: over a bf16 or f32 cache (dtype 0 or 1)
// rope2_cache_write; over an fp8 (2) or fp4 (3) cache rope_rows on the
// queries' heads of q (qheads heads of qstride columns, rope columns from
// qoffset) and on the key kpe (one head of rope columns), then
// cache_write_fp8 or cache_write_fp4 of lat and kpe at slots[0].
func launchRopesCache(c *Ctx, dtype int, q uint64, ldq, qheads, qstride, qoffset int, kpe uint64, ldk, rope, il int, table,
	cache, slots, lat uint64, ldl, rank int) error {
	if dtype < 2 {
		ropeCache, err := c.Kernel("ops", "rope2_cache_write")
		if err != nil {
			return err
		}
		return c.Launch(ropeCache, D1(1), D1(256), 0, q, ldq, qheads, qstride, qoffset, kpe, ldk, 1, rope, 0, rope, il, table, 1,
			cache, dtype, slots, lat, ldl, rank, rope)
	}
	ropeRows, err := c.Kernel("ops", "rope_rows")
	if err != nil {
		return err
	}
	name := "cache_write_fp8"
	if dtype == 3 {
		name = "cache_write_fp4"
	}
	write, err := c.Kernel("ops", name)
	if err != nil {
		return err
	}
	return errors.Join(c.Launch(ropeRows, D1(1), D1(256), 0, q, ldq, qheads, qstride, qoffset, rope, il, table, 1),
		c.Launch(ropeRows, D1(1), D1(256), 0, kpe, ldk, 1, rope, 0, rope, il, table, 1),
		c.Launch(write, D1(1), D1(256), 0, cache, slots, lat, ldl, kpe, ldk, rank, rope))
}
