package format

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"unsafe"

	"github.com/mmfp4/mmfp4/safetensors"
)

// HeaderFile is the name of the format header in an MMFP4 model directory.
const HeaderFile = "mmfp4.json"

// Values of the header fields written by this version.
const (
	FormatName      = "mmfp4"
	FormatVersion   = 1
	LayoutNK        = "nk-rowmajor-lownibble"
	ScaleTypeE4M3   = "F8_E4M3"
	QuantizerRTN    = "rtn"
	QuantizerSearch = "mse-search"

	// QuantizedDType is the HeaderTensor.DType of a quantized weight.
	QuantizedDType = "MMFP4"
)

// Header is the content of mmfp4.json.
type Header struct {
	Format      string         `json:"format"`  // "mmfp4"
	Version     int            `json:"version"` // 1
	GroupSize   int            `json:"group_size"`
	Layout      string         `json:"layout"`     // "nk-rowmajor-lownibble"
	ScaleType   string         `json:"scale_type"` // "F8_E4M3"
	Quantizer   string         `json:"quantizer"`  // "rtn" or "mse-search"
	SourceDType string         `json:"source_dtype"`
	Tensors     []HeaderTensor `json:"tensors"`
}

// HeaderTensor describes one logical tensor of the model. A quantized weight
// X.weight [N,K] is stored as the three tensors named by QuantizedNames.
type HeaderTensor struct {
	Name      string `json:"name"`
	Shape     []int  `json:"shape"` // logical shape, [N,K] for a quantized weight
	Quantized bool   `json:"quantized"`
	DType     string `json:"dtype"` // "MMFP4" when quantized, else the stored dtype
}

// ReadHeader reads and checks dir/mmfp4.json. Unknown fields are ignored;
// anything that changes how weights decode must match this version.
func ReadHeader(dir string) (*Header, error) {
	path := filepath.Join(dir, HeaderFile)
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var h Header
	if err := json.Unmarshal(raw, &h); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	switch {
	case h.Format != FormatName:
		return nil, fmt.Errorf("%s: field format: unknown format %q, want %q", path, h.Format, FormatName)
	case h.Version != FormatVersion:
		return nil, fmt.Errorf("%s: field version: unsupported version %d, want %d", path, h.Version, FormatVersion)
	case !ValidGroupSize(h.GroupSize):
		return nil, fmt.Errorf("%s: field group_size: bad group size %d, want 32, 64 or 128", path, h.GroupSize)
	case h.Layout != LayoutNK:
		return nil, fmt.Errorf("%s: field layout: unsupported layout %q, want %q", path, h.Layout, LayoutNK)
	case h.ScaleType != ScaleTypeE4M3:
		return nil, fmt.Errorf("%s: field scale_type: unsupported scale type %q, want %q", path, h.ScaleType, ScaleTypeE4M3)
	}
	return &h, nil
}

// IsMMFP4Dir reports whether dir holds an MMFP4 header. It does not check
// the header; ReadHeader does, with a precise error.
func IsMMFP4Dir(dir string) bool {
	st, err := os.Stat(filepath.Join(dir, HeaderFile))
	return err == nil && st.Mode().IsRegular()
}

// QuantizedNames returns the names of the three stored tensors of a
// quantized weight.
func QuantizedNames(weight string) (qweight, scales, rowScale string) {
	return weight + ".qweight", weight + ".scales", weight + ".row_scale"
}

// MatrixFromTensors assembles a Matrix from its stored tensors. Codes and
// Scales alias the tensors' data (the memory map), and so does RowScale
// where it can (see f32View): the Matrix is read-only.
func MatrixFromTensors(qweight, scales, rowScale *safetensors.Tensor, groupSize int) (*Matrix, error) {
	if !ValidGroupSize(groupSize) {
		return nil, fmt.Errorf("%s: tensor %s: group size %d, want 32, 64 or 128", qweight.File, qweight.Name, groupSize)
	}
	if qweight.DType != safetensors.U8 || len(qweight.Shape) != 2 {
		return nil, fmt.Errorf("%s: tensor %s: %s %v, want U8 [N, K/2]", qweight.File, qweight.Name, qweight.DType, qweight.Shape)
	}
	n, k := qweight.Shape[0], 2*qweight.Shape[1]
	if k%groupSize != 0 {
		return nil, fmt.Errorf("%s: tensor %s: K=%d is not a multiple of the group size %d", qweight.File, qweight.Name, k, groupSize)
	}
	if err := qweight.Check(safetensors.U8, n, k/2); err != nil {
		return nil, err
	}
	if err := scales.Check(safetensors.F8E4M3, n, k/groupSize); err != nil {
		return nil, err
	}
	if err := rowScale.Check(safetensors.F32, n); err != nil {
		return nil, err
	}
	rs, err := f32View(rowScale)
	if err != nil {
		return nil, err
	}
	m := &Matrix{N: n, K: k, GroupSize: groupSize, Codes: qweight.Data, Scales: scales.Data, RowScale: rs}
	if err := m.Validate(); err != nil {
		return nil, fmt.Errorf("%s: tensor %s: %w", qweight.File, qweight.Name, err)
	}
	return m, nil
}

// f32View returns the values of an F32 tensor without copying them when the
// host is little-endian and the data is 4-byte aligned (as safetensors
// files lay them out), else a converted copy. Converting every row scale
// was most of a full-size model's load time (about 60 MB, 1 s of CPU).
func f32View(t *safetensors.Tensor) ([]float32, error) {
	n := t.NumElements()
	if t.DType == safetensors.F32 && n > 0 && len(t.Data) == 4*n && hostLittleEndian &&
		uintptr(unsafe.Pointer(&t.Data[0]))%4 == 0 {
		return unsafe.Slice((*float32)(unsafe.Pointer(&t.Data[0])), n), nil
	}
	return t.Float32()
}

var hostLittleEndian = binary.NativeEndian.Uint16([]byte{1, 0}) == 1
