//go:build amd64 && linux

package cpu

import (
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/internal/benchmode"
)

// BenchmarkExpertReadAnon asks whether routed-expert weights read faster
// from anonymous memory in 2 MB pages than from the model's file mapping
// (page-cache folios, mapped 2 MB at a time where the kernel can). The
// experts' codes of MMFP4_BENCH_ANON_LAYERS MoE layers (default 12, from
// layer MMFP4_BENCH_ANON_FIRST of the MoE layers, default 0) of the model
// in MMFP4_BENCH_MODEL are copied into one anonymous MADV_HUGEPAGE mapping; each pass then reads
// 4 random experts' gate, up and down codes of a random one of those layers
// (as a decode step does) with AVX-512 loads in 384 KB items on the pool,
// once from the file mapping and once from the copy, alternating so that
// both see the same moments of a shared machine. A third reader takes the
// same pick from the file mapping over all MoE layers (the full model's TLB
// reach), for comparison with the subset.
func BenchmarkExpertReadAnon(b *testing.B) {
	benchmode.Check(b)
	nl := 12
	if s := os.Getenv("MMFP4_BENCH_ANON_LAYERS"); s != "" {
		v, err := strconv.Atoi(s)
		if err != nil || v < 1 {
			b.Fatalf("MMFP4_BENCH_ANON_LAYERS=%q: want a positive integer", s)
		}
		nl = v
	}
	be, _, layers := benchModelMoE(b)
	nl = min(nl, len(layers))
	// MMFP4_BENCH_ANON_FIRST picks the first layer of the copied run.
	first := 0
	if s := os.Getenv("MMFP4_BENCH_ANON_FIRST"); s != "" {
		v, err := strconv.Atoi(s)
		if err != nil || v < 0 {
			b.Fatalf("MMFP4_BENCH_ANON_FIRST=%q: want a layer number", s)
		}
		first = min(v, len(layers)-nl)
	}
	layers = append(layers[first:len(layers):len(layers)], layers[:first]...) // copied run first
	codes := func(layer, e int) [][]byte {
		ex := layers[layer][e]
		var cs [][]byte
		for _, w := range []backend.Weight{ex.Gate, ex.Up, ex.Down} {
			cs = append(cs, w.(*quant).m.Codes)
		}
		return cs
	}
	// The copy: every expert matrix of the first nl layers, each at a 4 KB
	// aligned offset, in layer and expert order.
	var total int
	for l := 0; l < nl; l++ {
		for e := range layers[l] {
			for _, c := range codes(l, e) {
				total += (len(c) + 4095) &^ 4095
			}
		}
	}
	anon, err := unix.Mmap(-1, 0, total, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANON)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Munmap(anon)
	if err := unix.Madvise(anon, unix.MADV_HUGEPAGE); err != nil {
		b.Fatal(err)
	}
	t0 := time.Now()
	copied := map[*byte][]byte{}
	off := 0
	for l := 0; l < nl; l++ {
		for e := range layers[l] {
			for _, c := range codes(l, e) {
				copy(anon[off:], c)
				copied[&c[0]] = anon[off : off+len(c)]
				off += (len(c) + 4095) &^ 4095
			}
		}
	}
	b.Logf("copied %d MB of expert codes into anonymous memory in %.2f s (%s; %s)", total>>20, time.Since(t0).Seconds(), smapsLine("AnonHugePages:"), smapsLine("FilePmdMapped:"))

	const topK = 4
	E := len(layers[0])
	r := rand.New(rand.NewPCG(7, 8))
	type pick struct{ sub, all [][]byte }
	picks := make([]pick, 256)
	var step int64
	for i := range picks {
		ls, la := r.IntN(nl), r.IntN(len(layers))
		perm := r.Perm(E)
		for _, e := range perm[:topK] {
			picks[i].sub = append(picks[i].sub, codes(ls, e)...)
			picks[i].all = append(picks[i].all, codes(la, e)...)
		}
	}
	for _, c := range picks[0].sub {
		step += int64(len(c) &^ 255)
	}
	var sink [64]uint64
	read := func(mats [][]byte, mapped bool) {
		const item = 384 << 10
		var spans [][]byte
		for _, c := range mats {
			if mapped {
				c = copied[&c[0]]
			}
			for o := 0; o < len(c); o += item {
				spans = append(spans, c[o:min(o+item, len(c))])
			}
		}
		be.workers.run(len(spans), 1, func(lo, hi int) {
			for _, s := range spans[lo:hi] {
				sink[lo%64] += readAVX512(&s[0], len(s)&^255)
			}
		})
	}
	for _, p := range picks { // first touches out of the timing
		read(p.sub, false)
		read(p.sub, true)
		read(p.all, false)
	}
	var dt [3]time.Duration
	var best [3]passTimer
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		p := picks[i%len(picks)]
		order := []int{0, 1, 2}
		if i%2 == 1 { // neither reader always follows the other
			order = []int{1, 0, 2}
		}
		for _, k := range order {
			f := []func(){
				func() { read(p.sub, false) },
				func() { read(p.sub, true) },
				func() { read(p.all, false) },
			}[k]
			t := time.Now()
			best[k].start()
			f()
			best[k].stop(step)
			dt[k] += time.Since(t)
		}
	}
	for k, name := range []string{"file-GB/s", "anon-GB/s", "file-all-GB/s"} {
		b.ReportMetric(float64(step)*float64(b.N)/dt[k].Seconds()/1e9, name)
		b.ReportMetric(best[k].best/1e9, "best-"+name)
	}
}

// smapsLine is the line of /proc/self/smaps_rollup that starts with key.
func smapsLine(key string) string {
	b, err := os.ReadFile("/proc/self/smaps_rollup")
	if err != nil {
		return "smaps_rollup unreadable"
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, key) {
			return line
		}
	}
	return "no " + key + " line"
}
