//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"
	"math"
	"math/rand/v2"
	"reflect"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
)

// fp4Rows makes n rows of rank latent and rope k_pe values that reach the
// encoder's corners: an all-zero row, tiny and huge magnitudes, a lone
// outlier (groups whose scale underflows to zero), a zero group, values
// on the E2M1 midpoints, negative zeros; the rest normal values of
// scales from 1e-3 to 1e3.
func fp4Rows(r *rand.Rand, n, rank, rope int) (lat, kpe []float32) {
	lat, kpe = make([]float32, n*rank), make([]float32, n*rope)
	mids := []float32{0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 6}
	for t := 0; t < n; t++ {
		c, k := lat[t*rank:(t+1)*rank], kpe[t*rope:(t+1)*rope]
		scale := math.Pow(10, -3+6*r.Float64())
		for i := range c {
			c[i] = float32(r.NormFloat64() * scale)
		}
		for i := range k {
			k[i] = float32(r.NormFloat64() * scale)
		}
		switch t % 8 {
		case 0:
			clear(c)
			clear(k)
		case 1:
			for i := range c {
				c[i] *= 1e-33
			}
		case 2:
			for i := range c {
				c[i] = float32(r.NormFloat64() * 1e-3)
			}
			c[r.IntN(rank)] = 1e4
		case 3:
			clear(c[min(32, rank-rank%32):min(64, rank)])
			clear(k[:rope/2])
		case 4:
			for i := range c {
				c[i] = mids[i%len(mids)] * float32(1-2*(i/8%2)) / 8
			}
		case 5:
			for i := 0; i < rank; i += 3 {
				c[i] = float32(math.Copysign(0, -1))
			}
		case 6:
			for i := range k {
				k[i] *= 1e30
			}
		}
	}
	return lat, kpe
}

// cpuPoolBytes lays the CPU pool's codes and scales of one layer out as
// the GPU's fp4 slots (fp4SlotBytes), zero where the GPU pool has padding.
// The CPU pool keeps them in unexported fields (package cpu, cache.go:
// codes, group, scale), read here through reflection.
func cpuPoolBytes(t *testing.T, p backend.CachePool, layer, slots, rank, rope int) []byte {
	t.Helper()
	v := reflect.ValueOf(p).Elem()
	codes := v.FieldByName("codes").Index(layer).Bytes()
	group := v.FieldByName("group").Index(layer).Bytes()
	scale := v.FieldByName("scale").Index(layer)
	n, G, sb, so := rank/2+rope, (rank+backend.FP4Group-1)/backend.FP4Group, fp4SlotBytes(rank, rope), fp4ScaleOffset(rank, rope)
	if len(codes) != slots*n || len(group) != slots*G || scale.Len() != 2*slots {
		t.Fatalf("cpu pool of %d code bytes, %d group scales, %d scales for %d slots", len(codes), len(group), scale.Len(), slots)
	}
	out := make([]byte, slots*sb)
	for s := 0; s < slots; s++ {
		d := out[s*sb : (s+1)*sb]
		copy(d, codes[s*n:(s+1)*n])
		copy(d[n:], group[s*G:(s+1)*G])
		for i := 0; i < 2; i++ {
			b := math.Float32bits(float32(scale.Index(2*s + i).Float()))
			d[so+4*i], d[so+4*i+1], d[so+4*i+2], d[so+4*i+3] = byte(b), byte(b>>8), byte(b>>16), byte(b>>24)
		}
	}
	return out
}

// cacheWriteSteps are a prefill of 37 rows of one sequence whose block
// table is 12 of the pool's blocks in a random order, then two decode
// steps of one row.
func cacheWriteSteps(t *testing.T, r *rand.Rand, blocks, blockSize int) []*backend.Batch {
	t.Helper()
	var table []int32
	for _, b := range r.Perm(blocks)[:12] {
		table = append(table, int32(b))
	}
	var steps []*backend.Batch
	for _, se := range [][2]int{{0, 37}, {37, 38}, {38, 39}} {
		st := &backend.Batch{Seqs: []backend.Seq{{Start: 0, Len: se[1] - se[0], Blocks: table}}, Outputs: []int32{0}}
		for p := se[0]; p < se[1]; p++ {
			st.Positions = append(st.Positions, int32(p))
			st.Tokens = append(st.Tokens, 0)
		}
		if err := st.Validate(1, blocks, blockSize); err != nil {
			t.Fatal(err)
		}
		steps = append(steps, st)
	}
	return steps
}

// The RoPEs and cache write in one launch (rope2_cache_write: a prefill's
// rows, then single decode rows, two layers) store over fp8 and fp4 caches
// the bytes of the separate launches (rope_rows twice, then
// cache_write_fp8 or cache_write_fp4), on fp4Rows' corner rows at several
// shapes; every slot holds a record but those of fp4Rows' all-zero rows,
// and every other byte of the pool is zero.
func TestCacheWriteQuantFusedMatchesSeparate(t *testing.T) {
	r := testRand(t)
	const blockSize, blocks, layers, rows = 4, 16, 2, 39
	for _, dt := range []backend.CacheDType{backend.CacheFP8, backend.CacheFP4} {
		for _, sh := range [][2]int{{512, 64}, {128, 64}, {256, 32}, {80, 16}} {
			rank, rope := sh[0], sh[1]
			steps := cacheWriteSteps(t, r, blocks, blockSize)
			var lats, kpes, qs [layers][]float32
			for l := range layers {
				lats[l], kpes[l] = fp4Rows(r, rows, rank, rope)
				qs[l] = randVec(r, rows*2*rope, 1)
			}
			run := func(separate bool) ([]byte, *Backend) {
				defer func(v bool) { ropeCacheOff = v }(ropeCacheOff)
				ropeCacheOff = separate
				g, _ := testBackends(t, Options{})
				pool, err := g.NewCachePool(layers, blocks, blockSize, rank, rope, dt)
				if err != nil {
					t.Fatal(err)
				}
				t0 := 0
				for _, st := range steps {
					g.SetBatch(st, pool)
					T := st.Rows()
					for l := range layers {
						q, lt, kt := g.NewTensor(T, 2*rope), g.NewTensor(T, rank), g.NewTensor(T, rope)
						g.Upload(q, qs[l][t0*2*rope:(t0+T)*2*rope])
						g.Upload(lt, lats[l][t0*rank:(t0+T)*rank])
						g.Upload(kt, kpes[l][t0*rope:(t0+T)*rope])
						g.RoPE(q, 2, rope, 0, rope, 10000, true)
						g.RoPE(kt, 1, rope, 0, rope, 10000, true)
						g.CacheWrite(l, lt, kt)
					}
					t0 += T
				}
				cp := pool.(*cachePool)
				buf := make([]byte, cp.buf.Size)
				g.now("read cache", func(c *Ctx) error { return CopyOut(c, buf, cp.buf.Ptr) })
				if err := g.Sync(); err != nil {
					t.Fatal(err)
				}
				return buf, g
			}
			name := fmt.Sprintf("%v cache, rank %d rope %d", dt, rank, rope)
			want, gs := run(true)
			got, g := run(false)
			if n := len(steps) * layers; g.ropeCaches != n || gs.ropeCaches != 0 {
				t.Errorf("%s: RoPEs in the cache write: %d fused, %d separate; want %d, 0", name, g.ropeCaches, gs.ropeCaches, n)
			}
			if j := firstDiff(want, got); j >= 0 {
				t.Errorf("%s: pool byte %d of %d = %#02x fused, %#02x separate", name, j, len(want), got[j], want[j])
			}
			sb, lb := slotBytesOf(dt, rank, rope), g.pool.layerBytes
			for l := range layers {
				written := 0
				for s := 0; s < blocks*blockSize; s++ {
					if nonzeroCount(want[l*lb+s*sb:l*lb+(s+1)*sb]) > 0 {
						written++
					}
				}
				if n := rows - (rows+7)/8; written != n || nonzeroCount(want[l*lb+blocks*blockSize*sb:(l+1)*lb]) != 0 {
					t.Errorf("%s, layer %d: %d slots hold a record, want %d, and no byte past them", name, l, written, n)
				}
			}
		}
	}
}

// The fp4 cache write (cache_write_fp4: a prefill's many rows, then single
// decode rows) stores exactly the CPU pool's codes, group scales and
// scales, byte for byte, at the slots of scattered block tables; every
// other byte of the pool stays zero.
func TestCacheWriteFP4MatchesCPU(t *testing.T) {
	g, c := testBackends(t, Options{})
	r := testRand(t)
	const blockSize, blocks, layers = 4, 16, 2
	for _, sh := range [][2]int{{512, 64}, {128, 64}, {256, 32}, {80, 16}} {
		rank, rope := sh[0], sh[1]
		steps := cacheWriteSteps(t, r, blocks, blockSize)
		var lats, kpes [layers][][]float32
		for l := 0; l < layers; l++ {
			for _, st := range steps {
				lat, kpe := fp4Rows(r, st.Rows(), rank, rope)
				lats[l], kpes[l] = append(lats[l], lat), append(kpes[l], kpe)
			}
		}
		pools := map[string]backend.CachePool{}
		for name, b := range map[string]backend.Backend{"gpu": g, "cpu": c} {
			pool, err := b.NewCachePool(layers, blocks, blockSize, rank, rope, backend.CacheFP4)
			if err != nil {
				t.Fatal(err)
			}
			for i, st := range steps {
				b.SetBatch(st, pool)
				T := st.Rows()
				for l := 0; l < layers; l++ {
					lt, kt := b.NewTensor(T, rank), b.NewTensor(T, rope)
					b.Upload(lt, lats[l][i])
					b.Upload(kt, kpes[l][i])
					b.CacheWrite(l, lt, kt)
				}
			}
			if err := b.Sync(); err != nil {
				t.Fatal(err)
			}
			pools[name] = pool
		}
		gp := pools["gpu"].(*cachePool)
		got := make([]byte, gp.buf.Size)
		if err := g.dev.Do(func(cx *Ctx) error { return CopyOut(cx, got, gp.buf.Ptr) }); err != nil {
			t.Fatal(err)
		}
		slots := blocks * blockSize
		diffs := 0
		for l := 0; l < layers; l++ {
			want := cpuPoolBytes(t, pools["cpu"], l, slots, rank, rope)
			have := got[l*gp.layerBytes : (l+1)*gp.layerBytes]
			for i, w := range want {
				if have[i] != w {
					if diffs++; diffs <= 8 {
						sb := fp4SlotBytes(rank, rope)
						t.Errorf("rank %d rope %d layer %d slot %d byte %d: gpu %#02x, cpu %#02x", rank, rope, l, i/sb, i%sb, have[i], w)
					}
				}
			}
			for i := len(want); i < len(have); i++ {
				if have[i] != 0 {
					t.Fatalf("rank %d rope %d layer %d: byte %d past the slots is %#02x", rank, rope, l, i, have[i])
				}
			}
		}
		t.Logf("%s: %d of %d pool bytes differ", fmt.Sprintf("rank %d rope %d", rank, rope), diffs, layers*slots*fp4SlotBytes(rank, rope))
	}
}

// BenchmarkAttentionDTypes times decode latent attention at GLM-4.7-Flash's
// shapes over bf16, fp8 and fp4 caches as a decode step takes it by
// default (the tensor-core kernel, the fp8 and fp4 caches through its
// raw-record instances): 1 and 8 rows at ctx 1024 and 8192,
// device time per call over enough layers (over 100 MB) that the cache
// is read from memory. GB/s counts the cache bytes read (the slots'
// sizes). Run with -test.benchtime=1x.
func BenchmarkAttentionDTypes(b *testing.B) {
	d := benchDevice(b)
	g := NewOnDevice(d, Options{NoGraphs: true})
	defer g.Close()
	r := testRand(b)
	s := backend.MLAShape{Heads: 20, NopeDim: 192, RopeDim: 64, VDim: 256, Rank: 512}
	for _, cs := range []struct{ rows, ctx int }{{1, 1024}, {1, 8192}, {8, 1024}, {8, 8192}} {
		for _, dt := range []backend.CacheDType{backend.CacheBF16, backend.CacheFP8, backend.CacheFP4} {
			const blockSize = 64
			per := cs.ctx / blockSize
			nb := cs.rows * per
			slot := (&cachePool{rank: s.Rank, ropeDim: s.RopeDim, dtype: dt}).slotBytes()
			layers := max(2, (128<<20)/(cs.rows*cs.ctx*slot))
			pool, err := g.NewCachePool(layers, nb, blockSize, s.Rank, s.RopeDim, dt)
			if err != nil {
				b.Fatal(err)
			}
			// Fill every slot: one prefill of all blocks as one sequence.
			fill := &backend.Batch{Seqs: []backend.Seq{{Start: 0, Len: nb * blockSize}}, Outputs: []int32{0}}
			for i := 0; i < nb; i++ {
				fill.Seqs[0].Blocks = append(fill.Seqs[0].Blocks, int32(i))
			}
			for p := 0; p < nb*blockSize; p++ {
				fill.Positions = append(fill.Positions, int32(p))
				fill.Tokens = append(fill.Tokens, 0)
			}
			g.SetBatch(fill, pool)
			lt, kt := g.NewTensor(nb*blockSize, s.Rank), g.NewTensor(nb*blockSize, s.RopeDim)
			g.Upload(lt, randVec(r, nb*blockSize*s.Rank, 1))
			g.Upload(kt, randVec(r, nb*blockSize*s.RopeDim, 1))
			for l := 0; l < layers; l++ {
				g.CacheWrite(l, lt, kt)
			}
			T := cs.rows
			ql, q, ol := decodeBenchStep(b, g, r, s, pool, T, per, cs.ctx)
			bytes := float64(T * cs.ctx * slot)
			name := fmt.Sprintf("rows%d_ctx%d_%v", T, cs.ctx, dt)
			b.Run(name, func(b *testing.B) {
				g.decodeAttnConfig()
				fns := attentionLaunches(g, ol, ql, q, layers, s)
				us, err := timeRotated(d, fns, 200)
				if err != nil {
					b.Fatal(err)
				}
				b.ReportMetric(us, "us/call")
				b.Logf("%s: %.2f us/call, %.0f GB/s of cache (%d layers rotated)", name, us, bytes/(us*1e-6)/1e9, layers)
			})
			g.pending = g.pending[:0]
		}
	}
}
