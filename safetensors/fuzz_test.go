package safetensors

import (
	"math/big"
	"slices"
	"testing"
)

func FuzzParseHeader(f *testing.F) {
	seeds := []struct {
		header  string
		dataLen int64
	}{
		{`{"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, "b": {"dtype": "BF16", "shape": [], "data_offsets": [16, 18]}}`, 18},
		{`{"a": {"dtype": "U8", "shape": [4], "data_offsets": [8, 12]}, "z": {"dtype": "I64", "shape": [0, 9], "data_offsets": [12, 12]}}  `, 64},
		{`{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}`, 16},
		{`{"w": {"dtype": "F32", "shape": [4611686018427387904, 4], "data_offsets": [0, 0]}}`, 0},
		{`{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}`, 4},
		{`{"w": {"dtype": "U8", "shape": [1], "data_offsets": [9223372036854775807, 0]}}`, 8},
		{`{"__metadata__": {"k": null}}`, 0},
		{`{"a": {"dtype": "F32"`, 0},
		{`[]`, 0},
		{``, 0},
	}
	for _, s := range seeds {
		f.Add([]byte(s.header), s.dataLen)
	}
	f.Fuzz(func(t *testing.T, header []byte, dataLen int64) {
		entries, _, err := ParseHeader(header, dataLen)
		if err != nil {
			return
		}
		// Recheck every accepted entry independently, with big integers so
		// that the check itself cannot overflow.
		for _, e := range entries {
			if e.Begin < 0 || e.Begin > e.End || e.End > dataLen {
				t.Fatalf("tensor %q: range [%d, %d] outside data of %d bytes", e.Name, e.Begin, e.End, dataLen)
			}
			size := e.DType.Size()
			if size == 0 {
				t.Fatalf("tensor %q: accepted unknown dtype %q", e.Name, e.DType)
			}
			n := big.NewInt(int64(size))
			for _, d := range e.Shape {
				if d < 0 {
					t.Fatalf("tensor %q: accepted negative dimension in %v", e.Name, e.Shape)
				}
				n.Mul(n, big.NewInt(int64(d)))
			}
			if n.Cmp(big.NewInt(e.End-e.Begin)) != 0 {
				t.Fatalf("tensor %q: shape %v of %s is %v bytes, range [%d, %d]", e.Name, e.Shape, e.DType, n, e.Begin, e.End)
			}
		}
		// Non-overlapping, checked pairwise rather than by trusting the
		// sort: empty ranges may touch but not sit strictly inside another.
		for i, a := range entries {
			for _, b := range entries[i+1:] {
				if a.Begin < b.End && b.Begin < a.End {
					t.Fatalf("tensors %q [%d, %d] and %q [%d, %d] overlap", a.Name, a.Begin, a.End, b.Name, b.Begin, b.End)
				}
				if a.Name == b.Name {
					t.Fatalf("tensor %q returned twice", a.Name)
				}
			}
		}
		if !slices.IsSortedFunc(entries, func(a, b Entry) int { return int(min(max(a.Begin-b.Begin, -1), 1)) }) {
			t.Fatalf("entries not sorted by Begin")
		}
	})
}
