package main

import (
	"bytes"
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
