package glm4moelite

import (
	"errors"
	"math"
	"testing"
)

// checkFinite finds the first NaN or ±Inf at every position of rows whose
// length is not a multiple of its block, and passes finite rows, extremes
// included.
func TestCheckFiniteFindsFirst(t *testing.T) {
	const n, cols = 53, 7
	row := make([]float32, n)
	for i := range row {
		row[i] = float32(i%5) - 2.5
	}
	row[3], row[10] = math.MaxFloat32, -math.MaxFloat32
	if err := checkFinite(row, cols); err != nil {
		t.Fatalf("finite row: %v", err)
	}
	for _, bad := range []float32{float32(math.NaN()), float32(math.Inf(1)), float32(math.Inf(-1))} {
		for pos := 0; pos < n; pos++ {
			v := append([]float32(nil), row...)
			v[pos] = bad
			if pos+5 < n {
				v[pos+5] = float32(math.NaN()) // a later one must not be reported
			}
			var nf nonFinite
			if err := checkFinite(v, cols); !errors.As(err, &nf) || nf.row != pos/cols || nf.col != pos%cols {
				t.Fatalf("%v at %d: got %v", bad, pos, err)
			}
		}
	}
}
