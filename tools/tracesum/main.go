// Command tracesum folds a kernel trace (MMFP4_CUDA_TRACE, backend/cuda's
// trace.go) of one decode step into one layer: for every site, when the
// first, the median and the last block of each layer passed it, averaged
// over the layers, relative to an anchor site that every layer passes once
// per block at one moment (a kernel's wait, say).
//
//	MMFP4_CUDA_TRACE=/tmp/trace.txt mmfp4 bench -m DIR --device cuda --ctx 1024
//	go run ./tools/tracesum -anchor absorb.cu:647 -before 0.15 /tmp/trace.txt
//
// With -layer N it lists instead every event of layer N, each site's
// blocks by time (us from the anchor : blocks), where the averages hide
// how a launch's blocks spread.
//
// A layer's window starts -before layers' worth of time ahead of its anchor,
// so that the kernels before the anchor fall in the same layer; a site
// whose events would straddle that start gets windows of its own, moved
// into its events' widest gap (siteBefore). The first two and the last two
// layers are left out (the step's ends).
package main

import (
	"bufio"
	"cmp"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"strconv"
	"strings"
)

// buckets is the histogram's size in a trace whose header does not give
// it ("buckets N"); a bucket is 128 ns.
const buckets = 1 << 15

// site is one numbered place of the trace with its events: times in us
// from the start of the step (the histogram's wrap undone), one per block.
type site struct {
	id                  int
	place, kernel, kind string
	times               []float64
}

func main() {
	anchor := flag.String("anchor", "", "the anchor site: its number or file:line (default: the first site with one event a layer)")
	before := flag.Float64("before", 0.15, "where a layer's window starts, in layers ahead of its anchor")
	layer := flag.Int("layer", -1, "list the events of this layer (0 the first) instead of the averages")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: tracesum [-anchor SITE] [-before F] [-layer N] TRACE")
		os.Exit(2)
	}
	f, err := os.Open(flag.Arg(0))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer f.Close()
	sites, err := read(f)
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", flag.Arg(0), err)
		os.Exit(1)
	}
	if *layer >= 0 {
		err = listLayer(os.Stdout, sites, *anchor, *before, *layer)
	} else {
		err = summarize(os.Stdout, sites, *anchor, *before)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

// read parses the trace's lines (site file:line [kernel] event bucket
// count) and undoes the buckets' wrap: the step starts after the longest
// run of empty buckets.
func read(r io.Reader) ([]*site, error) {
	byID := map[int]*site{}
	type hit struct{ id, bucket, n int }
	var hits []hit
	nb := buckets
	sc := bufio.NewScanner(r)
	for line := 1; sc.Scan(); line++ {
		text := strings.TrimSpace(sc.Text())
		if text == "" || text[0] == '#' {
			if f := strings.Fields(text); len(f) >= 2 && f[len(f)-2] == "buckets" && len(hits) == 0 {
				v, err := strconv.Atoi(f[len(f)-1])
				if err != nil || v < 1 || v > 1<<24 {
					return nil, fmt.Errorf("line %d: bad bucket count %q", line, f[len(f)-1])
				}
				nb = v
			}
			continue
		}
		f := strings.Fields(text)
		if len(f) != 5 && len(f) != 6 {
			return nil, fmt.Errorf("line %d: %d fields, want 5 or 6", line, len(f))
		}
		nums := make([]int, 3)
		for i, s := range []string{f[0], f[len(f)-2], f[len(f)-1]} {
			v, err := strconv.Atoi(s)
			if err != nil || v < 0 || (i == 1 && v >= nb) {
				return nil, fmt.Errorf("line %d: bad number %q", line, s)
			}
			nums[i] = v
		}
		s := byID[nums[0]]
		if s == nil {
			s = &site{id: nums[0], place: f[1], kind: f[len(f)-3]}
			if len(f) == 6 {
				s.kernel = f[2]
			}
			byID[nums[0]] = s
		}
		hits = append(hits, hit{nums[0], nums[1], nums[2]})
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(hits) == 0 {
		return nil, fmt.Errorf("no events")
	}
	used := make([]bool, nb)
	for _, h := range hits {
		used[h.bucket] = true
	}
	var occupied []int
	for b, u := range used {
		if u {
			occupied = append(occupied, b)
		}
	}
	start, gap := 0, -1
	for i, b := range occupied {
		next := occupied[(i+1)%len(occupied)]
		if n := (next - b + nb) % nb; n > gap || (len(occupied) == 1 && gap < 0) {
			gap, start = n, next
		}
	}
	for _, h := range hits {
		t := float64((h.bucket-start+nb)%nb) * 0.128
		for range h.n {
			byID[h.id].times = append(byID[h.id].times, t)
		}
	}
	var sites []*site
	for _, s := range byID {
		slices.Sort(s.times)
		sites = append(sites, s)
	}
	slices.SortFunc(sites, func(a, b *site) int { return a.id - b.id })
	return sites, nil
}

// moments finds the anchor site and the moments it is passed, one a layer.
func moments(sites []*site, anchor string) (*site, []float64, error) {
	var an *site
	for _, s := range sites {
		if anchor == strconv.Itoa(s.id) || anchor == s.place {
			an = s
		}
	}
	if an == nil && anchor != "" {
		return nil, nil, fmt.Errorf("no site %q in the trace", anchor)
	}
	if an == nil {
		return nil, nil, fmt.Errorf("name an anchor site (-anchor)")
	}
	// The anchor's moments: its events grouped where they lie within a
	// quarter of the largest gap between two of them (at least 1 us), so
	// that blocks whose wait returns a microsecond or two after the
	// others' stay in their layer.
	split := 1.0
	for i := 1; i < len(an.times); i++ {
		split = max(split, (an.times[i]-an.times[i-1])/4)
	}
	var at []float64
	for i, t := range an.times {
		if i == 0 || t-an.times[i-1] > split {
			at = append(at, t)
		}
	}
	if len(at) < 6 {
		return nil, nil, fmt.Errorf("the anchor %s is passed at %d moments; too few layers", an.place, len(at))
	}
	return an, at, nil
}

// window is layer l's span of the step: from before layers' worth of time
// ahead of its anchor's moment to as far ahead of the next one's.
func window(at []float64, l int, before float64) (lo, hi float64) {
	gapBefore, gapAfter := 0.0, 0.0
	if l > 0 {
		gapBefore = at[l] - at[l-1]
	}
	if l+1 < len(at) {
		gapAfter = at[l+1] - at[l]
	}
	if l == 0 {
		gapBefore = gapAfter
	}
	if l+1 == len(at) {
		gapAfter = gapBefore
	}
	return at[l] - before*gapBefore, at[l] + (1-before)*gapAfter
}

// in is the site's events in [lo, hi).
func (s *site) in(lo, hi float64) []float64 {
	i, _ := slices.BinarySearch(s.times, lo)
	j, _ := slices.BinarySearch(s.times, hi)
	return s.times[i:j]
}

// siteBefore is before for site s: where the site's events, as phases of
// the layer windows' spans, leave their widest gap inside the span rather
// than across its ends, the site's windows start in the middle of that gap
// instead, in the layer that keeps its events nearest the anchor. So a
// launch whose blocks pass the site on both sides of a window's start is
// not split between two layers (its first, median and last would mix
// them). A site whose events leave no gap of a twentieth of a layer keeps
// before.
func siteBefore(s *site, at []float64, before float64) float64 {
	var g []float64
	for l := 2; l < len(at)-2; l++ {
		lo, hi := window(at, l, before)
		for _, t := range s.in(lo, hi) {
			g = append(g, (t-lo)/(hi-lo))
		}
	}
	if len(g) < 2 {
		return before
	}
	slices.Sort(g)
	// after is the first event past the widest gap (0: the gap across the
	// span's ends).
	gap, after := g[0]+1-g[len(g)-1], 0
	for i := 1; i < len(g); i++ {
		if d := g[i] - g[i-1]; d > gap {
			gap, after = d, i
		}
	}
	if after == 0 || gap < 0.05 {
		return before
	}
	// The events lie from g[after] round to g[after-1]+1; the windows start
	// at the gap's middle, or a layer before it, whichever puts the events'
	// centre nearer the anchor (phase before).
	mid, centre := (g[after]+g[after-1])/2, (g[after]+g[after-1]+1)/2
	if math.Abs(centre-1-before) < math.Abs(centre-before) {
		mid--
	}
	return before - mid
}

// listLayer writes every site's events in layer l's window, as times from
// the anchor's moment (0.1 us apart at the finest) and the blocks at each.
func listLayer(w io.Writer, sites []*site, anchor string, before float64, l int) error {
	an, at, err := moments(sites, anchor)
	if err != nil {
		return err
	}
	if l >= len(at) {
		return fmt.Errorf("layer %d: the anchor %s is passed at %d moments", l, an.place, len(at))
	}
	fmt.Fprintf(w, "layer %d of %d; times in us from %s (%s) : blocks\n", l, len(at), an.place, an.kernel)
	type row struct {
		s     *site
		first float64
		text  string
	}
	var rows []row
	for _, s := range sites {
		ts := s.in(window(at, l, siteBefore(s, at, before)))
		if len(ts) == 0 {
			continue
		}
		var b strings.Builder
		for k := 0; k < len(ts); {
			t := math.Round((ts[k]-at[l])*10) / 10
			n := 0
			for ; k < len(ts) && math.Round((ts[k]-at[l])*10)/10 == t; k++ {
				n++
			}
			fmt.Fprintf(&b, " %.1f:%d", t, n)
		}
		rows = append(rows, row{s, ts[0] - at[l], b.String()})
	}
	slices.SortStableFunc(rows, func(a, b row) int { return cmp.Compare(a.first, b.first) })
	for _, r := range rows {
		fmt.Fprintf(w, "%5d %-22s %-30s %-15s%s\n", r.s.id, r.s.place, r.s.kernel, r.s.kind, r.text)
	}
	return nil
}

// summarize writes each site's first, median and last time a layer,
// averaged over the layers, from the anchor's moment in that layer.
func summarize(w io.Writer, sites []*site, anchor string, before float64) error {
	an, at, err := moments(sites, anchor)
	if err != nil {
		return err
	}
	// The layers averaged (2 to len-3, counting from 0) and their mean
	// length, which the wait costs below wrap by: the layers left out at
	// the step's ends may differ (a decode step's first, dense layer is
	// longer).
	layer := (at[len(at)-2] - at[2]) / float64(len(at)-4)
	fmt.Fprintf(w, "%d layers (%.2f us a layer over the step); times in us from %s (%s), averaged over layers 3-%d, %.2f us a layer\n",
		len(at), (at[len(at)-1]-at[0])/float64(len(at)-1), an.place, an.kernel, len(at)-2, layer)
	fmt.Fprintf(w, "%5s %-22s %-30s %-15s %8s %8s %8s %8s\n", "site", "place", "kernel", "event", "first", "median", "last", "blocks")
	type row struct {
		s                          *site
		first, median, last, count float64
	}
	var rows []row
	for _, s := range sites {
		var r row
		n, sb := 0, siteBefore(s, at, before)
		for l := 2; l < len(at)-2; l++ {
			ts := s.in(window(at, l, sb))
			if len(ts) == 0 {
				continue
			}
			r.first += ts[0] - at[l]
			r.median += ts[len(ts)/2] - at[l]
			r.last += ts[len(ts)-1] - at[l]
			r.count += float64(len(ts))
			n++
		}
		if n < (len(at)-4)/2 { // not a site of every layer
			continue
		}
		k := float64(n)
		rows = append(rows, row{s, r.first / k, r.median / k, r.last / k, r.count / k})
	}
	slices.SortStableFunc(rows, func(a, b row) int {
		switch {
		case a.first < b.first:
			return -1
		case a.first > b.first:
			return 1
		}
		return 0
	})
	for _, r := range rows {
		fmt.Fprintf(w, "%5d %-22s %-30s %-15s %8.2f %8.2f %8.2f %8.1f\n", r.s.id, r.s.place, r.s.kernel, r.s.kind, r.first, r.median, r.last, r.count)
	}
	// What the layer pays for each launch: from its wait's median return
	// to the next wait's, the last wrapping to the first of the next layer.
	// A wait within 0.2 us of the one before is taken for the same launch's
	// and left out; a launch with a later second wait (a block that waits
	// again on its way) shows as two rows, to be added.
	var waits []row
	for _, r := range rows {
		if r.s.kind == "PDL_WAIT" && (len(waits) == 0 || r.median-waits[len(waits)-1].median > 0.2) {
			waits = append(waits, r)
		}
	}
	if len(waits) > 0 {
		fmt.Fprintf(w, "\nwhat each wait costs the layer (us, from its median return to the next wait's; add a launch's rows):\n")
		for i, r := range waits {
			next := layer + waits[0].median
			if i+1 < len(waits) {
				next = waits[i+1].median
			}
			fmt.Fprintf(w, "%-22s %-30s %8.2f\n", r.s.place, r.s.kernel, next-r.median)
		}
	}
	return nil
}
