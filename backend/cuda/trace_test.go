package cuda

import (
	"strings"
	"testing"
)

// The trace numbers every PDL_LAUNCH, PDL_WAIT, TRACE_MARK and
// TRACE_MARK_DEP outside the
// prelude once, in order, and leaves none of them unnumbered.
func TestTraceNumbersEverySite(t *testing.T) {
	traceNumber()
	if traceErr != nil {
		t.Fatal(traceErr)
	}
	seen := 0
	for _, m := range Modules() {
		src := traceSrc[m]
		body := src[1+strings.Index(src[1:], "#line 1 \""):] // past the prelude
		for _, ev := range []string{"PDL_LAUNCH()", "PDL_WAIT()", "TRACE_MARK()", "TRACE_MARK_DEP("} {
			if strings.Contains(body, ev) {
				t.Errorf("%s: an unnumbered %s", m, ev)
			}
			seen += strings.Count(body, strings.TrimRight(ev, "()")+"_K(")
		}
	}
	if seen != len(traceSites) || seen < 100 || seen >= traceMaxSites {
		t.Errorf("%d numbered sites in the sources, %d in the table (at most %d)", seen, len(traceSites), traceMaxSites)
	}
	for _, s := range traceSites[:3] {
		if s.file == "" || s.line == 0 {
			t.Errorf("site without a place: %+v", s)
		}
	}
}
