package format

import (
	"fmt"
	"path/filepath"
	"testing"

	"github.com/mmfp4/mmfp4/safetensors"
)

// TestRTNMatchesTorchSimulation quantizes real fixture tensors with plain RTN
// and compares the reconstruction, value for value, with the PyTorch
// simulation of the spec that tools/make_fixtures.py recorded.
func TestRTNMatchesTorchSimulation(t *testing.T) {
	src, err := safetensors.OpenDir("../testdata/glm4moelite-tiny")
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	for _, g := range []int{32, 64, 128} {
		sim, err := safetensors.Open(filepath.Join("../testdata/glm4moelite-tiny-ref", fmt.Sprintf("rtn_g%d.safetensors", g)))
		if err != nil {
			t.Fatal(err)
		}
		names := sim.Names()
		if len(names) < 3 {
			t.Fatalf("rtn_g%d: only %d tensors", g, len(names))
		}
		for _, name := range names {
			want := tensorFloats(t, sim, name)
			st, err := src.Tensor(name)
			if err != nil {
				t.Fatal(err)
			}
			w, err := st.Float32()
			if err != nil {
				t.Fatal(err)
			}
			n, k := st.Shape[0], st.Shape[1]
			m, err := Quantize(w, n, k, QuantOptions{GroupSize: g})
			if err != nil {
				t.Fatal(err)
			}
			got := m.Dequantize()
			diff := 0
			for i := range want {
				if got[i] != want[i] {
					if diff < 3 {
						t.Errorf("G=%d %s[%d,%d]: ours %g, torch %g (source %g)", g, name, i/k, i%k, got[i], want[i], w[i])
					}
					diff++
				}
			}
			if diff > 0 {
				t.Errorf("G=%d %s: %d of %d values differ from the torch simulation", g, name, diff, len(want))
			}
		}
		sim.Close()
	}
}

type tensorSource interface {
	Tensor(string) (*safetensors.Tensor, error)
}

func tensorFloats(t *testing.T, f tensorSource, name string) []float32 {
	t.Helper()
	tn, err := f.Tensor(name)
	if err != nil {
		t.Fatal(err)
	}
	v, err := tn.Float32()
	if err != nil {
		t.Fatal(err)
	}
	return v
}
