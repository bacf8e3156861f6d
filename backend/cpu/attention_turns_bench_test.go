package cpu

import (
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/internal/benchmode"
	"golang.org/x/sys/unix"
)

// measurement only: variants by turns in one process.
func BenchmarkAttentionTurns(b *testing.B) {
	benchmode.Check(b)
	s := backend.MLAShape{Heads: 20, NopeDim: 192, RopeDim: 64, VDim: 256, Rank: 512}
	const ctx, bs, layers = 1024, 64, 47
	otherMB, _ := strconv.Atoi(os.Getenv("ATT_OTHER_MB"))
	rounds, _ := strconv.Atoi(os.Getenv("ATT_ROUNDS"))
	if rounds == 0 {
		rounds = 5
	}
	type variant struct {
		name   string
		huge   bool
		fused  int
		chunks int
	}
	var vs []variant
	for _, f := range []string{"old4k", "old2m", "new4k", "new2m"} {
		_ = f
	}
	spec := os.Getenv("ATT_VARIANTS")
	if spec == "" {
		spec = "old4k,old2m"
	}
	for _, n := range splitComma(spec) {
		v := variant{name: n, huge: n[len(n)-2:] == "2m"}
		if i := strings.Index(n, "c"); i > 0 {
			v.chunks, _ = strconv.Atoi(n[i+1 : i+2])
			n = n[:i] + n[i+2:]
		}
		if len(n) > 3 && n[:3] == "new" {
			v.fused, _ = strconv.Atoi(strings.TrimRight(n[3:len(n)-2], "-"))
			if v.fused == 0 {
				v.fused = 1
			}
		}
		vs = append(vs, v)
	}
	be := New(Options{})
	blocks := make([]int32, ctx/bs+1)
	for i := range blocks {
		blocks[i] = int32(i)
	}
	pools := map[bool]backend.CachePool{}
	for _, huge := range []bool{false, true} {
		cacheHuge = huge
		p, err := be.NewCachePool(layers, ctx/bs+1, bs, s.Rank, s.RopeDim, backend.CacheBF16)
		if err != nil {
			b.Fatal(err)
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
		pools[huge] = p
	}
	cacheHuge = true
	r := rand.New(rand.NewPCG(3, 4))
	step := &backend.Batch{Tokens: []int32{0}, Positions: []int32{ctx}, Seqs: []backend.Seq{{Len: 1, Blocks: blocks}}}
	ql, q := be.NewTensor(1, s.Heads*s.Rank), be.NewTensor(1, s.Heads*(s.NopeDim+s.RopeDim))
	be.Upload(ql, randMat(r, s.Heads*s.Rank, 0.05))
	be.Upload(q, randMat(r, s.Heads*(s.NopeDim+s.RopeDim), 0.05))
	out := be.NewTensor(1, s.Heads*s.Rank)
	var other []byte
	if otherMB > 0 {
		other = make([]byte, 512<<20)
		for i := 0; i < len(other); i += 4096 {
			other[i] = byte(i)
		}
	}
	var sink uint64
	off := 0
	times := make([][]float64, len(vs))
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	b.ResetTimer()
	for it := 0; it < b.N; it++ {
		for round := 0; round < rounds; round++ {
			for vi, v := range vs {
				attendFused = v.fused
				attChunks = v.chunks
				be.SetBatch(step, pools[v.huge])
				for l := 0; l < layers; l++ {
					if otherMB > 0 {
						n := otherMB << 20
						if off+n > len(other) {
							off = 0
						}
						be.workers.run(n>>20, 1, func(lo, hi int) {
							for c := lo; c < hi; c++ {
								sink += readAVX512(&other[off+c<<20], 1<<20)
							}
						})
						off += n
					}
					c0 := threadCPU()
					t0 := time.Now()
					be.LatentAttention(out, ql, q, l, s, 0.07)
					if be.threads == 1 {
						times[vi] = append(times[vi], float64(threadCPU()-c0)/1e3)
					} else {
						times[vi] = append(times[vi], float64(time.Since(t0).Nanoseconds())/1e3)
					}
				}
			}
		}
	}
	runtime.KeepAlive(sink)
	fmt.Fprintf(os.Stderr, "phases per call: scores %.1f  softmax %.1f  values %.1f us\n", float64(phaseNs[0])/1e3/float64(len(times[0])*len(vs)), float64(phaseNs[1])/1e3/float64(len(times[0])*len(vs)), float64(phaseNs[2])/1e3/float64(len(times[0])*len(vs)))
	for vi, v := range vs {
		t := times[vi]
		sort.Float64s(t)
		fmt.Fprintf(os.Stderr, "%-8s calls %6d  min %6.1f  p25 %6.1f  median %6.1f  mean %6.1f us\n", v.name, len(t), t[0], t[len(t)/4], t[len(t)/2], mean(t))
	}
}

func threadCPU() int64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_THREAD_CPUTIME_ID, &ts)
	return ts.Nano()
}

func splitComma(s string) []string {
	var out []string
	start := 0
	for i := 0; i <= len(s); i++ {
		if i == len(s) || s[i] == ',' {
			if i > start {
				out = append(out, s[start:i])
			}
			start = i + 1
		}
	}
	return out
}

func mean(t []float64) float64 {
	var s float64
	for _, v := range t {
		s += v
	}
	return s / float64(len(t))
}

// measurement only: the scores kernels on one tile of 64 rows (in L2).
func BenchmarkScoresTileTurns(b *testing.B) {
	benchmode.Check(b)
	const H, w, n = 20, 576, 64
	r := rand.New(rand.NewPCG(1, 2))
	hw, _ := bf16Rows(r, n*8, w)
	q := randMat(r, H*w, 1)
	sc := make([]float32, H*n)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	names := []string{"old-heads-inner", "rows-S64", "rows-S16", "rows-S8", "values-panels", "fma-peak"}
	best := make([]float64, len(names))
	for i := range best {
		best[i] = 1e18
	}
	p := randMat(r, H*n, 1)
	out := make([]float32, H*512)
	for it := 0; it < b.N*200; it++ {
		for v := range names {
			rows := hw[(it%8)*n*w:][:n*w]
			c0 := threadCPU()
			switch v {
			case 0:
				for i := 0; i < n; i += 4 {
					scoresBF16x4(q, w, H, rows[i*w:], w, w, sc[i:], n, 0.1)
				}
			case 1, 2, 3:
				S := []int{0, 64, 16, 8}[v]
				for st := 0; st < n; st += S {
					for h := 0; h < H; h += 4 {
						scoresBF16Rows(q[h*w:], w, rows[st*w:], w, S, w, sc[h*n+st:], n, 0.1, nil)
					}
				}
			case 5:
				fmaPeakAVX512(1 << 10)

			case 4:
				for h := 0; h < H; h += 4 {
					axpyBF16Panels(p[h*n:], n, rows, w, n, 8, out[h*512:], 512, ones4[:])
				}
			}
			if d := float64(threadCPU() - c0); d < best[v] {
				best[v] = d
			}
		}
	}
	for v, name := range names {
		flops := 2.0 * H * n * w
		if v == 4 || v == 6 {
			flops = 2.0 * H * n * 512
		}
		if v == 5 {
			flops = 1 << 10 * 16 * 16 * 2
		}
		fmt.Fprintf(os.Stderr, "%-16s best %7.2f us  %6.1f GFLOP/s\n", name, best[v]/1e3, flops/best[v])
	}
}
