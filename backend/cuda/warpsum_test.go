//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"errors"
	"fmt"
	"math"
	"testing"
)

// TestWarpSumRowsMatchesWarpSum: warp_sum_rows gives every row warp_sum's
// bits (the products' sums in the GEMV and MoE kernels rest on it). The
// partials span many magnitudes, so that any other order of additions
// gives other bits for many rows; the test checks that it would.
func TestWarpSumRowsMatchesWarpSum(t *testing.T) {
	d := testDevice(t)
	r := testRand(t)
	const warps = 64
	err := d.Do(func(c *Ctx) error {
		for _, rows := range []int{1, 2, 4, 8, 12, 32} {
			x := make([]float32, warps*32*rows)
			for i := range x {
				x[i] = float32(r.NormFloat64() * math.Exp2(float64(r.IntN(40)-20)))
			}
			xb, err1 := upload(c, x)
			gb, err2 := c.Alloc(4 * warps * 32)
			wb, err3 := c.Alloc(4 * warps * 32)
			k, err := c.Kernel("util", fmt.Sprintf("warp_sum_rows_check_%d", rows))
			if err = errors.Join(err1, err2, err3, err); err == nil {
				err = errors.Join(c.Launch(k, D1(warps/4), D1(128), 0, xb.Ptr, gb.Ptr, wb.Ptr), c.Sync())
			}
			got, want := make([]float32, warps*32), make([]float32, warps*32)
			if err == nil {
				err = errors.Join(CopyOut(c, got, gb.Ptr), CopyOut(c, want, wb.Ptr))
			}
			if err := errors.Join(err, c.Free(xb), c.Free(gb), c.Free(wb)); err != nil {
				return err
			}
			sensitive := 0
			for w := range warps {
				for row := range rows {
					lanes := make([]float32, 32)
					var seq float32
					for l := range lanes {
						lanes[l] = x[(32*w+l)*rows+row]
						seq += lanes[l]
					}
					ref := simButterfly(lanes)
					i := 32*w + row
					if math.Float32bits(want[i]) != math.Float32bits(ref) {
						t.Fatalf("%d rows: warp %d row %d: warp_sum %g, the butterfly in Go %g", rows, w, row, want[i], ref)
					}
					if math.Float32bits(got[i]) != math.Float32bits(ref) {
						t.Errorf("%d rows: warp %d row %d: warp_sum_rows %g, warp_sum %g", rows, w, row, got[i], ref)
					}
					if math.Float32bits(seq) != math.Float32bits(ref) {
						sensitive++
					}
				}
			}
			if sensitive < warps*rows/4 {
				t.Errorf("%d rows: a lane-by-lane sum differs from the butterfly's in only %d of %d rows: the inputs would not catch another order", rows, sensitive, warps*rows)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
