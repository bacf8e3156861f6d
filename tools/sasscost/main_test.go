package main

import (
	"bytes"
	"fmt"
	"strings"
	"testing"
)

// Four instructions as cuobjdump prints them (sm_90): a shuffle that sets
// scoreboard 1 and stalls 2 cycles, an IMAD waiting on scoreboard 0 (1
// cycle), an FMNMX waiting on scoreboard 1 (4), an ISETP (13).
const sample = `
        /*17f0*/                   SHFL.BFLY PT, R40, R2, R38, 0x1f ;                                 /* 0x0c001f2602287589 */
                                                                                                      /* 0x00006400000e0000 */
        /*1800*/                   IMAD.SHL.U32 R38, R38, 0x2, RZ ;                                   /* 0x0000000226267824 */
                                                                                                      /* 0x001fe200078e00ff */
        /*1810*/                   FMNMX R2, R40, R2, !PT ;                                           /* 0x0000000228027209 */
                                                                                                      /* 0x002fc80007800000 */
        /*1820*/                   ISETP.GE.AND P0, PT, R38, R0, PT ;                                 /* 0x000000002600720c */
                                                                                                      /* 0x000fda0003f06270 */
`

func TestControlCodes(t *testing.T) {
	insts, err := parse(strings.NewReader(sample))
	if err != nil {
		t.Fatal(err)
	}
	want := []inst{{0x17f0, "SHFL.BFLY PT, R40, R2, R38, 0x1f", 2, 1, 0}, {0x1800, "IMAD.SHL.U32 R38, R38, 0x2, RZ", 1, 7, 1},
		{0x1810, "FMNMX R2, R40, R2, !PT", 4, 7, 2}, {0x1820, "ISETP.GE.AND P0, PT, R38, R0, PT", 13, 7, 0}}
	if len(insts) != len(want) {
		t.Fatalf("%d instructions, want %d", len(insts), len(want))
	}
	for i, w := range want {
		if insts[i] != w {
			t.Errorf("instruction %d: %+v, want %+v", i, insts[i], w)
		}
	}
	var out bytes.Buffer
	n, stalls, waiting := summarize(&out, insts, 0x1800, 0x1820, true)
	if n != 2 || stalls != 5 || waiting != 2 || !strings.Contains(out.String(), "1810  4 sets - waits 000010  FMNMX") {
		t.Errorf("[1800, 1820): %d instructions, %d stalls, %d waiting; listing:\n%s", n, stalls, waiting, out.String())
	}
	if _, err := parse(strings.NewReader("no code here\n")); err == nil {
		t.Error("a file without instructions parsed")
	}
}

// Two functions of a listing: one with a predicated load and a copy before
// its wait and a load after it, one without a wait; LDGDEPBAR is no load.
const listing = `
	code for sm_90a
		Function : k_one
	.headerflags	@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                                             /* 0x00000a00ff017b82 */
                                                                                                      /* 0x000fe40000000800 */
        /*0010*/              @!P0 LDG.E.NA.128.CONSTANT R4, desc[UR4][R2.64] ;                       /* 0x0000000402048981 */
                                                                                                      /* 0x000ea8000c1e9d00 */
        /*0020*/                   LDGSTS.E.BYPASS.128 [R7], desc[UR4][R8.64] ;                       /* 0x0000000008077fae */
                                                                                                      /* 0x000fe8000b981a04 */
        /*0030*/                   LDGDEPBAR ;                                                        /* 0x00000000000079af */
                                                                                                      /* 0x000fe20000000000 */
        /*0040*/                   ACQBULK ;                                                          /* 0x000000000000782e */
                                                                                                      /* 0x000fe20000000000 */
        /*0050*/                   LDG.E.128 R12, desc[UR4][R10.64] ;                                 /* 0x000000040a0c7981 */
                                                                                                      /* 0x000ea2000c1e1d00 */
		Function : k_two
        /*0000*/                   LDG.E R2, desc[UR4][R2.64] ;                                       /* 0x0000000402027981 */
                                                                                                      /* 0x000ea2000c1e1900 */
`

func TestLoadsAroundWait(t *testing.T) {
	fs, err := loadsAroundWait(strings.NewReader(listing))
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"k_one: before the wait 1 loads, 1 copies; after wait 1, 1 loads, 0 copies",
		"k_two: no wait; 1 loads, 0 copies",
	}
	if len(fs) != len(want) {
		t.Fatalf("%d functions, want %d", len(fs), len(want))
	}
	for i, w := range want {
		if got := fs[i].String(); got != w {
			t.Errorf("function %d: %q, want %q", i, got, w)
		}
	}
	if _, err := loadsAroundWait(strings.NewReader(sample)); err == nil {
		t.Error("a listing without functions gave no error")
	}
}

// line is one instruction as cuobjdump prints it, with a control code of
// write scoreboard wr (7: none) and wait mask waits.
func line(addr int, text string, wr, waits uint64) string {
	c := uint64(1) | wr<<5 | 7<<8 | waits<<11
	return fmt.Sprintf("        /*%04x*/                   %s ;   /* 0x0000000000000000 */\n"+
		"                                                                                                      /* 0x%016x */\n", addr, text, c<<41)
}

func TestHeldLoads(t *testing.T) {
	// k_held: two loads on scoreboard 5, an address that waits on it, a
	// third load (reported); then a use of the third that waits, and no
	// load after it (not reported). k_free: the loads' waits come after
	// the last load.
	text := "\t\tFunction : k_held\n" +
		line(0x00, "LDG.E.128.CONSTANT R4, desc[UR4][R2.64]", 5, 0) +
		line(0x10, "@!P0 LDG.E.U8.CONSTANT R8, desc[UR4][R6.64]", 5, 0) +
		line(0x20, "IADD3 R10, P0, R4, R12, RZ", 7, 1<<5) +
		line(0x30, "LDG.E.128.CONSTANT R12, desc[UR4][R10.64]", 5, 0) +
		line(0x40, "FADD R14, R12, R13", 7, 1<<5) +
		"\t\tFunction : k_free\n" +
		line(0x00, "LDG.E.128.CONSTANT R4, desc[UR4][R2.64]", 5, 0) +
		line(0x10, "LDGSTS.E.BYPASS.128 [R7], desc[UR4][R8.64]", 7, 0) +
		line(0x20, "FADD R14, R4, R5", 7, 1<<5)
	hs, err := heldLoads([]byte(text))
	if err != nil {
		t.Fatal(err)
	}
	want := "k_held: 0020 waits on scoreboard 5 for 2 loads (0000 to 0010) before the load at 0030"
	if len(hs) != 1 || hs[0].String() != want {
		t.Errorf("got %v, want [%s]", hs, want)
	}
	if _, err := heldLoads([]byte("no functions\n")); err == nil {
		t.Error("a listing without functions read")
	}
}
