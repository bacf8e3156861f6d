package main

import (
	"bytes"
	"fmt"
	"strings"
	"testing"
)

// tenLayers is a trace of ten layers of 40 us (312.5 buckets, rounded
// down) starting near the histogram's end, so that the step wraps: an
// anchor at each layer's start (one block, and one whose wait returns 12
// buckets, 1.5 us, later) and a mark 23 buckets (2.944 us) after it in
// four blocks, two at 23 and two at 25.
func tenLayers(t *testing.T) []*site { return tenLayersIn(t, buckets) }

// tenLayersIn is tenLayers in a histogram of nb buckets, named in the
// header where it is not the default.
func tenLayersIn(t *testing.T, nb int) []*site {
	t.Helper()
	var in strings.Builder
	in.WriteString("# site file:line kernel event bucket(128 ns) count\n")
	if nb != buckets {
		fmt.Fprintf(&in, "# buckets %d\n", nb)
	}
	for l := range 10 {
		b := (nb - 168 + l*3125/10) % nb
		fmt.Fprintf(&in, "1 a.cu:10 k PDL_WAIT %d 1\n", b)
		fmt.Fprintf(&in, "1 a.cu:10 k PDL_WAIT %d 1\n", (b+12)%nb)
		fmt.Fprintf(&in, "2 a.cu:20 k TRACE_MARK %d 2\n", (b+23)%nb)
		fmt.Fprintf(&in, "2 a.cu:20 k TRACE_MARK %d 2\n", (b+25)%nb)
	}
	sites, err := read(strings.NewReader(in.String()))
	if err != nil {
		t.Fatal(err)
	}
	return sites
}

func TestSummarizeFoldsLayersAcrossTheWrap(t *testing.T) {
	for _, nb := range []int{buckets, 1 << 17} {
		summarizeTenLayers(t, tenLayersIn(t, nb))
	}
}

func summarizeTenLayers(t *testing.T, sites []*site) {
	t.Helper()
	var out bytes.Buffer
	if err := summarize(&out, sites, "a.cu:10", 0.15); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 7 || !strings.HasPrefix(lines[0], "10 layers (") || !strings.HasSuffix(lines[0], "averaged over layers 3-8, 40.00 us a layer") {
		t.Fatalf("summary:\n%s", out.String())
	}
	if f := strings.Fields(lines[6]); f[0] != "a.cu:10" || f[2] != "40.00" {
		t.Errorf("the anchor's launch costs %q, want a.cu:10 at 40.00 us (the whole layer, averaged over layers 3-8)", lines[6])
	}
	f := strings.Fields(lines[3])
	if got := strings.Join(f[:1], " ") + " " + strings.Join(f[4:], " "); got != "2 2.94 3.20 3.20 4.0" {
		t.Errorf("the mark's row %q, want site 2 at 2.94 (first), 3.20 (median, last) in 4 blocks", lines[3])
	}
	out.Reset()
	if err := summarize(&out, sites, "a.cu:99", 0.15); err == nil {
		t.Error("an anchor that is not in the trace was taken")
	}
}

// One layer's events as listed (tenLayers): the anchor's two blocks at 0
// and 1.5 us, the mark's four at 2.9 and 3.2 (23 and 25 buckets).
func TestListLayerGivesOneLayersBlocks(t *testing.T) {
	sites := tenLayers(t)
	var out bytes.Buffer
	if err := listLayer(&out, sites, "a.cu:10", 0.15, 3); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 3 || !strings.HasPrefix(lines[0], "layer 3 of 10;") {
		t.Fatalf("listing:\n%s", out.String())
	}
	for i, want := range []string{"0.0:1 1.5:1", "2.9:2 3.2:2"} {
		if f := strings.Fields(lines[i+1]); strings.Join(f[len(f)-2:], " ") != want {
			t.Errorf("line %q, want its events %q", lines[i+1], want)
		}
	}
	if err := listLayer(&out, sites, "a.cu:10", 0.15, 10); err == nil {
		t.Error("a layer past the last was listed")
	}
}

func TestReadRejectsBadLines(t *testing.T) {
	for _, in := range []string{"1 a.cu:1 k PDL_WAIT 40000 1\n", "# buckets 0\n1 a.cu:1 k PDL_WAIT 1 1\n", "# buckets 65536\n1 a.cu:1 k PDL_WAIT 70000 1\n", "x a.cu:1 k PDL_WAIT 1 1\n", "1 a.cu:1\n", ""} {
		if _, err := read(strings.NewReader(in)); err == nil {
			t.Errorf("%q: no error", in)
		}
	}
}

// A site whose blocks pass it on both sides of the default window's start
// (two at 50 buckets, 6.4 us, ahead of the anchor and two at 44, 5.632 us:
// the window starts 0.15 of 40 us ahead) stays in one layer.
func TestSummarizeKeepsAStraddlingSiteInOneLayer(t *testing.T) {
	var in strings.Builder
	in.WriteString("# site file:line kernel event bucket(128 ns) count\n")
	for l := range 10 {
		b := 1000 + l*3125/10
		fmt.Fprintf(&in, "1 a.cu:10 k PDL_WAIT %d 1\n", b)
		fmt.Fprintf(&in, "3 a.cu:30 j TRACE_MARK %d 2\n", b-50)
		fmt.Fprintf(&in, "3 a.cu:30 j TRACE_MARK %d 2\n", b-44)
	}
	sites, err := read(strings.NewReader(in.String()))
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := summarize(&out, sites, "a.cu:10", 0.15); err != nil {
		t.Fatal(err)
	}
	var row []string
	for _, line := range strings.Split(out.String(), "\n") {
		if f := strings.Fields(line); len(f) == 8 && f[0] == "3" {
			row = f
		}
	}
	if row == nil {
		t.Fatalf("no row for site 3:\n%s", out.String())
	}
	if got := strings.Join(row[4:], " "); got != "-6.40 -5.63 -5.63 4.0" {
		t.Errorf("the straddling site's first, median, last and blocks %q, want -6.40 -5.63 -5.63 4.0:\n%s", got, out.String())
	}
	out.Reset()
	if err := listLayer(&out, sites, "a.cu:10", 0.15, 3); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), " -6.4:2 -5.6:2\n") {
		t.Errorf("layer 3's listing does not hold the site's four blocks:\n%s", out.String())
	}
}
