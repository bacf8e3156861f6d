// Command ncuchain reads Nsight Compute's details page for a few kernels
// and prints, for each, how long one warp's own chain of instructions
// takes: its executed instructions over the warps of its grid, times the
// cycles an issued instruction takes a warp, at the measured SM clock. A
// batch-1 decode launch is one wave whose warps each run from start to
// end, so when that chain is near the launch's duration the launch is
// bound by its warps' instruction latency, not by memory (docs/perf.md,
// 2026-12-01 (34)).
//
//	ncu --clock-control none --section SpeedOfLight --section LaunchStats \
//	    --section Occupancy --section WarpStateStats --section InstructionStats \
//	    mmfp4 bench ... > ncu.txt
//	go run ./tools/ncuchain ncu.txt
//
// With -src it reads instead the source page of a report (ncu --import R
// --page source --csv --print-source sass), one or more kernels, and
// splits each kernel's executed warp instructions and stall samples at
// its first executed ACQBULK (griddepcontrol.wait): the part after the wait is
// the chain a launch adds to the layer, the part before overlaps the
// launch before it. Rows are taken in address order, as tools/sasscost
// does. -top N also lists the N instructions after the wait with the
// most stall samples.
//
//	go run ./tools/ncuchain -src [-top 10] src.csv
package main

import (
	"bufio"
	"encoding/csv"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
)

// launch is one profiled kernel launch and the metrics ncuchain uses.
type launch struct {
	name         string
	grid, block  [3]int
	registers    float64
	warpsPerSM   float64 // achieved active warps a multiprocessor
	instructions float64 // executed, the whole grid
	cpi          float64 // warp cycles an issued instruction
	clockGHz     float64
	durationUs   float64
}

// The header line of a kernel's section of the details page:
// "  name (gx, gy, gz)x(bx, by, bz), Context 1, ...".
var header = regexp.MustCompile(`^\s{2}(\S+) \((\d+), (\d+), (\d+)\)x\((\d+), (\d+), (\d+)\)`)

// metricRow is a metric's row: name, an optional unit, and a number.
var metricRow = regexp.MustCompile(`^\s+(\S.*?)\s{2,}(?:(\S+)\s+)?([0-9][0-9,]*(?:\.[0-9]+)?)\s*$`)

// parse reads the details page and returns its launches in order.
func parse(r io.Reader) ([]launch, error) {
	var out []launch
	seen := map[string]bool{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	finish := func() error {
		if len(out) == 0 {
			return nil
		}
		l := out[len(out)-1]
		for _, m := range []string{"Duration", "SM Frequency", "Registers Per Thread", "Achieved Active Warps Per SM",
			"Warp Cycles Per Issued Instruction", "Executed Instructions"} {
			if !seen[m] {
				return fmt.Errorf("kernel %s: no %q row (profile with the sections the usage names)", l.name, m)
			}
		}
		return nil
	}
	for line := 1; sc.Scan(); line++ {
		text := sc.Text()
		if m := header.FindStringSubmatch(text); m != nil {
			if err := finish(); err != nil {
				return nil, err
			}
			l := launch{name: m[1]}
			for i := range 3 {
				l.grid[i], _ = strconv.Atoi(m[2+i])
				l.block[i], _ = strconv.Atoi(m[5+i])
			}
			out = append(out, l)
			seen = map[string]bool{}
			continue
		}
		m := metricRow.FindStringSubmatch(text)
		if m == nil || len(out) == 0 {
			continue
		}
		name, unit := m[1], m[2]
		v, err := strconv.ParseFloat(strings.ReplaceAll(m[3], ",", ""), 64)
		if err != nil {
			return nil, fmt.Errorf("line %d: %q: %v", line, text, err)
		}
		l := &out[len(out)-1]
		switch name {
		case "Duration":
			scale, ok := map[string]float64{"ns": 1e-3, "us": 1, "usecond": 1, "ms": 1e3, "msecond": 1e3}[unit]
			if !ok {
				return nil, fmt.Errorf("line %d: kernel %s: duration in unknown unit %q", line, l.name, unit)
			}
			l.durationUs = v * scale
		case "SM Frequency":
			scale, ok := map[string]float64{"Ghz": 1, "GHz": 1, "Mhz": 1e-3, "MHz": 1e-3}[unit]
			if !ok {
				return nil, fmt.Errorf("line %d: kernel %s: SM clock in unknown unit %q", line, l.name, unit)
			}
			l.clockGHz = v * scale
		case "Registers Per Thread":
			l.registers = v
		case "Achieved Active Warps Per SM":
			l.warpsPerSM = v
		case "Warp Cycles Per Issued Instruction":
			l.cpi = v
		case "Executed Instructions":
			l.instructions = v
		default:
			continue
		}
		seen[name] = true
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if err := finish(); err != nil {
		return nil, err
	}
	return out, nil
}

// warps is the number of warps in the launch's grid.
func (l launch) warps() int {
	threads := l.block[0] * l.block[1] * l.block[2]
	return l.grid[0] * l.grid[1] * l.grid[2] * ((threads + 31) / 32)
}

// perWarp is the executed instructions a warp.
func (l launch) perWarp() float64 { return l.instructions / float64(l.warps()) }

// chainUs is one warp's instructions at the measured cycles each.
func (l launch) chainUs() float64 { return l.perWarp() * l.cpi / (l.clockGHz * 1e3) }

func table(w io.Writer, ls []launch) {
	fmt.Fprintln(w, "| launch | grid x threads | registers | warps a multiprocessor | instructions a warp | cycles an instruction | chain, us | duration, us |")
	fmt.Fprintln(w, "| --- | --- | --- | --- | --- | --- | --- | --- |")
	for _, l := range ls {
		fmt.Fprintf(w, "| %s | %d x %d | %.0f | %.1f | %.0f | %.2f | %.1f | %.2f |\n", l.name,
			l.grid[0]*l.grid[1]*l.grid[2], l.block[0]*l.block[1]*l.block[2], l.registers, l.warpsPerSM,
			l.perWarp(), l.cpi, l.chainUs(), l.durationUs)
	}
}

// split is one kernel's source page summed on either side of its wait.
type split struct {
	name                        string
	waits                       float64 // executions of the ACQBULK: a warp each
	before, after               float64 // executed warp instructions
	samplesBefore, samplesAfter float64
	hot                         []srcLine // the lines after the wait
}

type srcLine struct {
	addr, source string
	samples      float64
}

// parseSource reads a source page in CSV: for each kernel a row
// "Kernel Name",name, a header row, then a row an instruction.
func parseSource(r io.Reader) ([]split, error) {
	cr := csv.NewReader(r)
	cr.FieldsPerRecord = -1
	var out []split
	col := map[string]int{}
	seenWait := false
	for row := 1; ; row++ {
		rec, err := cr.Read()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err
		}
		switch {
		case len(rec) >= 2 && rec[0] == "Kernel Name":
			out = append(out, split{name: rec[1]})
			col, seenWait = map[string]int{}, false
			continue
		case len(out) == 0:
			return nil, fmt.Errorf("row %d: no \"Kernel Name\" row before it", row)
		case len(col) == 0:
			for i, h := range rec {
				col[h] = i
			}
			for _, h := range []string{"Address", "Source", "Instructions Executed", "Warp Stall Sampling (All Samples)"} {
				if _, ok := col[h]; !ok {
					return nil, fmt.Errorf("row %d: kernel %s: no %q column", row, out[len(out)-1].name, h)
				}
			}
			continue
		}
		num := func(h string) (float64, error) {
			i := col[h]
			if i >= len(rec) {
				return 0, fmt.Errorf("row %d: %d fields, no %q", row, len(rec), h)
			}
			v, err := strconv.ParseFloat(strings.ReplaceAll(rec[i], ",", ""), 64)
			if err != nil {
				return 0, fmt.Errorf("row %d: %q: %v", row, h, err)
			}
			return v, nil
		}
		ex, err := num("Instructions Executed")
		if err != nil {
			return nil, err
		}
		smp, err := num("Warp Stall Sampling (All Samples)")
		if err != nil {
			return nil, err
		}
		k := &out[len(out)-1]
		src := strings.TrimSpace(rec[col["Source"]])
		// The first wait that warps execute: a kernel may hold others on
		// branches no warp takes.
		if !seenWait && strings.HasPrefix(src, "ACQBULK") && ex > 0 {
			seenWait = true
			k.waits = ex
		}
		if seenWait {
			k.after += ex
			k.samplesAfter += smp
			k.hot = append(k.hot, srcLine{rec[col["Address"]], src, smp})
		} else {
			k.before += ex
			k.samplesBefore += smp
		}
	}
	// ncu repeats some kernels' sections word for word: keep one.
	kept := out[:0]
	for _, k := range out {
		if n := len(kept); n > 0 && sameSplit(kept[n-1], k) {
			continue
		}
		kept = append(kept, k)
	}
	return kept, nil
}

// sameSplit reports whether a and b are one section printed twice.
func sameSplit(a, b split) bool {
	return a.name == b.name && a.waits == b.waits && a.before == b.before && a.after == b.after &&
		a.samplesBefore == b.samplesBefore && a.samplesAfter == b.samplesAfter && slices.Equal(a.hot, b.hot)
}

func sourceTable(w io.Writer, ks []split, top int) {
	fmt.Fprintln(w, "| kernel | warps at the wait | instructions a warp before / after it | stall samples before / after |")
	fmt.Fprintln(w, "| --- | --- | --- | --- |")
	for _, k := range ks {
		if k.waits == 0 {
			fmt.Fprintf(w, "| %s | no wait | %.0f in all | %.0f in all |\n", k.name, k.before, k.samplesBefore)
			continue
		}
		fmt.Fprintf(w, "| %s | %.0f | %.0f / %.0f | %.0f / %.0f |\n", k.name, k.waits, k.before/k.waits,
			k.after/k.waits, k.samplesBefore, k.samplesAfter)
	}
	for _, k := range ks {
		if top <= 0 || len(k.hot) == 0 {
			continue
		}
		hot := append([]srcLine(nil), k.hot...)
		sort.SliceStable(hot, func(i, j int) bool { return hot[i].samples > hot[j].samples })
		fmt.Fprintf(w, "\n%s, after the wait:\n", k.name)
		for _, l := range hot[:min(top, len(hot))] {
			fmt.Fprintf(w, "  %s %6.0f  %s\n", l.addr, l.samples, l.source)
		}
	}
}

func main() {
	src := flag.Bool("src", false, "read a source page (CSV) and split it at the wait")
	top := flag.Int("top", 0, "with -src, list this many lines after the wait by stall samples")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: ncuchain NCU_DETAILS.txt | ncuchain -src [-top N] SOURCE.csv")
	}
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	path := flag.Arg(0)
	f, err := os.Open(path)
	if err != nil {
		fmt.Fprintln(os.Stderr, "ncuchain:", err)
		os.Exit(1)
	}
	defer f.Close()
	if *src {
		ks, err := parseSource(f)
		if err == nil && len(ks) == 0 {
			err = fmt.Errorf("no \"Kernel Name\" row")
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "ncuchain: %s: %v\n", path, err)
			os.Exit(1)
		}
		sourceTable(os.Stdout, ks, *top)
		return
	}
	ls, err := parse(f)
	if err != nil {
		fmt.Fprintf(os.Stderr, "ncuchain: %s: %v\n", path, err)
		os.Exit(1)
	}
	if len(ls) == 0 {
		fmt.Fprintf(os.Stderr, "ncuchain: %s: no kernel sections\n", path)
		os.Exit(1)
	}
	table(os.Stdout, ls)
}
