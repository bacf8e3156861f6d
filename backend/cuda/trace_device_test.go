//go:build linux || darwin || freebsd || netbsd

package cuda

import "testing"

// The traced step is the 64th of one row, or the 16th of the rows asked
// for: the histogram is cleared at its first flush only, and written at
// the first flush of any later step, once, whatever steps of other row
// counts come between.
func TestTraceTakesOneStep(t *testing.T) {
	type flush struct{ id, rows int }
	for _, c := range []struct {
		want int // rows asked for
	}{{1}, {32}} {
		// Steps of c.want rows (ids 1000+i), each of two flushes, with a
		// step of 512 rows and one of 31 before every third.
		var flushes []flush
		traced := -1
		n := 0
		for i := range 80 {
			if i%3 == 0 {
				flushes = append(flushes, flush{2 * i, 512}, flush{2*i + 1, 31})
			}
			id := 1000 + i
			if n++; (c.want == 1 && n == traceStep) || (c.want > 1 && n == traceStepRows) {
				traced = id
			}
			flushes = append(flushes, flush{id, c.want}, flush{id, c.want})
		}
		tr := &tracer{lastID: -1}
		clears, writes, written := 0, 0, -1
		for i, f := range flushes {
			switch tr.next(f.id, f.rows, c.want) {
			case traceClear:
				clears++
				if f.id != traced || flushes[i-1].id == f.id {
					t.Errorf("want %d rows: cleared at step %d, flush %d; the traced step is %d", c.want, f.id, i, traced)
				}
			case traceWrite:
				writes++
				written = i
			}
		}
		if clears != 1 || writes != 1 {
			t.Fatalf("want %d rows: %d clears and %d writes, want 1 and 1", c.want, clears, writes)
		}
		if prev := flushes[written-1]; prev.id != traced || flushes[written].id == traced {
			t.Errorf("want %d rows: written at flush %d (step %d) after step %d; want the first flush after step %d", c.want, written, flushes[written].id, prev.id, traced)
		}
	}
}
