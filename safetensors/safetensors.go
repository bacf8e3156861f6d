// Package safetensors reads memory-mapped safetensors files (single or sharded) and writes them in a streaming fashion.
//
// A safetensors file is an 8-byte little-endian header length N, N bytes of
// JSON describing every tensor (dtype, shape, byte range within the data
// section) plus an optional "__metadata__" object of strings, then the data.
package safetensors

import (
	"encoding/binary"
	"fmt"
	"math"
	"slices"
)

// DType is a safetensors element type, spelled as in the file header.
type DType string

const (
	BF16   DType = "BF16"
	F16    DType = "F16"
	F32    DType = "F32"
	F64    DType = "F64"
	U8     DType = "U8"
	I8     DType = "I8"
	I16    DType = "I16"
	I32    DType = "I32"
	I64    DType = "I64"
	F8E4M3 DType = "F8_E4M3"
	BOOL   DType = "BOOL"
)

// Size returns the number of bytes per element, or 0 for an unknown dtype.
func (d DType) Size() int {
	switch d {
	case U8, I8, F8E4M3, BOOL:
		return 1
	case BF16, F16, I16:
		return 2
	case F32, I32:
		return 4
	case F64, I64:
		return 8
	}
	return 0
}

// Tensor is one tensor of a file. Data aliases the read-only memory map:
// writing to it crashes the process, and it is only valid until the File
// (or Set) it came from is closed.
type Tensor struct {
	Name  string
	DType DType
	Shape []int
	Data  []byte
	File  string // path of the file that holds it, for error messages
}

// NumElements returns the product of the dimensions (1 for a scalar).
func (t *Tensor) NumElements() int {
	n := 1
	for _, d := range t.Shape {
		n *= d
	}
	return n
}

// errorf prefixes an error with the file and tensor so that a message from
// deep inside a model loader still says where the bad data came from.
func (t *Tensor) errorf(format string, args ...any) error {
	return fmt.Errorf("%s: tensor %s: %s", t.File, t.Name, fmt.Sprintf(format, args...))
}

// Float32 decodes a BF16, F16 or F32 tensor into a new []float32.
func (t *Tensor) Float32() ([]float32, error) {
	switch t.DType {
	case BF16, F16, F32:
	default:
		return nil, t.errorf("cannot convert dtype %s to float32", t.DType)
	}
	n := t.NumElements()
	if len(t.Data) != n*t.DType.Size() {
		return nil, t.errorf("has %d data bytes, want %d for shape %v", len(t.Data), n*t.DType.Size(), t.Shape)
	}
	out := make([]float32, n)
	d := t.Data
	switch t.DType {
	case BF16:
		for i := range out {
			out[i] = BF16ToFloat32(binary.LittleEndian.Uint16(d[2*i:]))
		}
	case F16:
		for i := range out {
			out[i] = F16ToFloat32(binary.LittleEndian.Uint16(d[2*i:]))
		}
	case F32:
		for i := range out {
			out[i] = math.Float32frombits(binary.LittleEndian.Uint32(d[4*i:]))
		}
	}
	return out, nil
}

// Check returns an error unless the tensor has the given dtype and shape.
func (t *Tensor) Check(dtype DType, shape ...int) error {
	if t.DType != dtype {
		return t.errorf("dtype %s, want %s", t.DType, dtype)
	}
	if !slices.Equal(t.Shape, shape) {
		return t.errorf("shape %v, want %v", t.Shape, shape)
	}
	return nil
}
