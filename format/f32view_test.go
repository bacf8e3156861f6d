package format

import (
	"encoding/binary"
	"math"
	"slices"
	"testing"
	"unsafe"

	"github.com/mmfp4/mmfp4/safetensors"
)

// Row scales are used in place where aligned, and copied (with the same
// values) where not.
func TestF32ViewAliasesAlignedData(t *testing.T) {
	vals := []float32{1.5, -2, 3.25e-3, float32(math.Inf(1)), 0}
	buf := make([]byte, 4*len(vals)+1)
	for _, off := range []int{0, 1} {
		data := buf[off : off+4*len(vals)]
		for i, v := range vals {
			binary.LittleEndian.PutUint32(data[4*i:], math.Float32bits(v))
		}
		tn := &safetensors.Tensor{Name: "r", DType: safetensors.F32, Shape: []int{len(vals)}, Data: data}
		got, err := f32View(tn)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, vals) {
			t.Errorf("offset %d: got %v, want %v", off, got, vals)
		}
		aliased := unsafe.Pointer(&got[0]) == unsafe.Pointer(&data[0])
		aligned := uintptr(unsafe.Pointer(&data[0]))%4 == 0
		if aliased != (aligned && hostLittleEndian) {
			t.Errorf("offset %d: aliased %v, aligned %v", off, aliased, aligned)
		}
	}
	if _, err := f32View(&safetensors.Tensor{Name: "r", DType: safetensors.U8, Shape: []int{4}, Data: make([]byte, 4)}); err == nil {
		t.Error("U8 data accepted as F32")
	}
}
