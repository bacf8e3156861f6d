package main

import (
	"bytes"
	"math"
	"strings"
	"testing"
)

// Two kernels in the details page's layout (made-up numbers), with rows
// the parser must pass over: a section title, separators, an advice
// paragraph and metrics of similar names.
const page = `[123] mmfp4
  k_one (4, 1, 2)x(96, 1, 1), Context 1, Stream 13, Device 0, CC 9.0
    Section: GPU Speed Of Light Throughput
    ----------------------- ----------- ------------
    Metric Name             Metric Unit Metric Value
    ----------------------- ----------- ------------
    SM Frequency                    Ghz         1.60
    Duration                    usecond         5.00
    ----------------------- ----------- ------------

    OPT   This kernel grid is too small to fill the available resources on this device, resulting in only 0.1
          waves across all SMs.
    Warp Cycles Per Issued Instruction             cycle         8.00
    Avg. Executed Instructions Per Scheduler        inst    11,098.22
    Executed Instructions                           inst       24,000
    Executed Ipc Active   inst/cycle         1.05
    Registers Per Thread             register/thread             96
    Achieved Active Warps Per SM           warp         6.50
  k_two (10, 1, 1)x(33, 1, 1), Context 1, Stream 13, Device 0, CC 9.0
    SM Frequency                    Mhz       2,000.00
    Duration                         ms         0.01
    Warp Cycles Per Issued Instruction             cycle        10.00
    Executed Instructions                           inst        4,000
    Registers Per Thread             register/thread             40
    Achieved Active Warps Per SM           warp        15.25
`

func TestParseAndChain(t *testing.T) {
	ls, err := parse(strings.NewReader(page))
	if err != nil {
		t.Fatal(err)
	}
	if len(ls) != 2 {
		t.Fatalf("%d launches, want 2", len(ls))
	}
	near := func(what string, got, want float64) {
		t.Helper()
		if math.Abs(got-want) > 1e-9*math.Max(1, math.Abs(want)) {
			t.Errorf("%s = %v, want %v", what, got, want)
		}
	}
	a, b := ls[0], ls[1]
	if a.name != "k_one" || b.name != "k_two" {
		t.Errorf("names %q %q", a.name, b.name)
	}
	// k_one: 8 blocks of 3 warps; 24,000 / 24 = 1,000 instructions a warp,
	// at 8 cycles and 1.6 GHz: 5 us.
	if a.warps() != 24 {
		t.Errorf("k_one: %d warps, want 24", a.warps())
	}
	near("k_one instructions a warp", a.perWarp(), 1000)
	near("k_one chain", a.chainUs(), 5)
	near("k_one duration", a.durationUs, 5)
	near("k_one registers", a.registers, 96)
	near("k_one warps a multiprocessor", a.warpsPerSM, 6.5)
	// k_two: 33 threads are 2 warps a block; 4,000 / 20 = 200 a warp, at 10
	// cycles and 2 GHz: 1 us; 0.01 ms is 10 us.
	if b.warps() != 20 {
		t.Errorf("k_two: %d warps, want 20", b.warps())
	}
	near("k_two clock", b.clockGHz, 2)
	near("k_two chain", b.chainUs(), 1)
	near("k_two duration", b.durationUs, 10)

	var out bytes.Buffer
	table(&out, ls)
	for _, want := range []string{"| k_one | 8 x 96 | 96 | 6.5 | 1000 | 8.00 | 5.0 | 5.00 |", "| k_two | 10 x 33 | 40 | 15.2 | 200 | 10.00 | 1.0 | 10.00 |"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, out.String())
		}
	}
}

func TestMissingMetricNamesKernel(t *testing.T) {
	cut := strings.Replace(page, "    Executed Instructions                           inst        4,000\n", "", 1)
	_, err := parse(strings.NewReader(cut))
	if err == nil || !strings.Contains(err.Error(), "k_two") || !strings.Contains(err.Error(), "Executed Instructions") {
		t.Fatalf("err = %v, want one naming k_two and Executed Instructions", err)
	}
}

func TestUnknownUnit(t *testing.T) {
	bad := strings.Replace(page, "Duration                         ms", "Duration                         ks", 1)
	if _, err := parse(strings.NewReader(bad)); err == nil || !strings.Contains(err.Error(), "ks") {
		t.Fatalf("err = %v, want the unknown unit named", err)
	}
}

// A source page of two kernels (made-up counts): k_a waits once a warp
// (4 warps), k_b has no wait.
const source = `"Kernel Name","k_a",
"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed","Other"
"0x08","      ACQBULK","0","0","x"
"0x10","      LDG.E R2, desc[UR4][R4.64]","3","4","x"
"0x20","      LDG.E R3, desc[UR4][R6.64]","1","4","x"
"0x30","      ACQBULK","2","4","x"
"0x40","      LDS R5, [R7]","20","8","x"
"0x50","      IDP.4A.S8.S8 R9, R9, R5, R9","7","1,200","x"
"0x60","      EXIT","0","4","x"
"Kernel Name","k_b",
"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed"
"0x10","      MOV R1, R2","5","64"
"Kernel Name","k_b",
"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed"
"0x10","      MOV R1, R2","5","64"
`

func TestSourceSplitsAtTheWait(t *testing.T) {
	ks, err := parseSource(strings.NewReader(source))
	if err != nil {
		t.Fatal(err)
	}
	if len(ks) != 2 || ks[0].name != "k_a" || ks[1].name != "k_b" {
		t.Fatalf("kernels %+v", ks)
	}
	a := ks[0]
	// Before: the two loads (8; the wait no warp executes does not split);
	// after: the wait and the rest (4 + 8 + 1,200 + 4 = 1,216), 4 warps.
	// k_b's section printed twice counts once.
	if a.waits != 4 || a.before != 8 || a.after != 1216 || a.samplesBefore != 4 || a.samplesAfter != 29 {
		t.Errorf("k_a: waits %v before %v after %v samples %v / %v", a.waits, a.before, a.after, a.samplesBefore, a.samplesAfter)
	}
	var out bytes.Buffer
	sourceTable(&out, ks, 2)
	for _, want := range []string{"| k_a | 4 | 2 / 304 | 4 / 29 |", "| k_b | no wait | 64 in all | 5 in all |",
		"0x40     20  LDS R5, [R7]", "0x50      7  IDP.4A.S8.S8"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
	if strings.Contains(out.String(), "0x30      2") {
		t.Errorf("-top 2 listed a third line:\n%s", out.String())
	}
}

func TestSourceWithoutHeaderColumn(t *testing.T) {
	bad := strings.Replace(source, `"Instructions Executed","Other"`, `"Executed","Other"`, 1)
	if _, err := parseSource(strings.NewReader(bad)); err == nil || !strings.Contains(err.Error(), "k_a") {
		t.Fatalf("err = %v, want one naming k_a's missing column", err)
	}
}
