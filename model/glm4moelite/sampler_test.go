package glm4moelite

import (
	"slices"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/backend/cpu"
)

// argmaxSampler is the CPU backend with a backend.Sampler that picks each
// row's argmax (-1 for a row that is not finite) and counts its calls.
type argmaxSampler struct {
	*cpu.Backend
	calls int
}

func (a *argmaxSampler) SampleRows(logits backend.Tensor, params []backend.SampleParams) []int32 {
	a.calls++
	V, all := logits.Cols(), a.Download(logits)
	ids := make([]int32, len(params))
	for i := range ids {
		row := all[i*V : (i+1)*V]
		if CheckLogits(row) != nil {
			ids[i] = -1
			continue
		}
		best := 0
		for j, v := range row {
			if v > row[best] {
				best = j
			}
		}
		ids[i] = int32(best)
	}
	return ids
}

// ForwardOutputs returns the backend's ids for the outputs with sampling
// settings and the logits of the others, which are Forward's; with
// DebugNaN, or without settings, logits for all.
func TestForwardOutputs(t *testing.T) {
	f := &argmaxSampler{Backend: cpu.New(cpu.Options{Threads: 1})}
	m, err := Load(fixtureDir, f, LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	V := m.Config.VocabSize
	pool, err := m.NewCachePool(1, 16, backend.CacheF32)
	if err != nil {
		t.Fatal(err)
	}
	tokens := []int32{248, 475, 240, 439, 34, 19}
	batch := &backend.Batch{Tokens: tokens, Positions: []int32{0, 1, 2, 3, 4, 5},
		Seqs: []backend.Seq{{Start: 0, Len: 6, Blocks: []int32{0}}}, Outputs: []int32{5, 0, 3}}
	want, err := m.Forward(batch, pool)
	if err != nil {
		t.Fatal(err)
	}
	argmax := func(row []float32) int {
		best := 0
		for j, v := range row {
			if v > row[best] {
				best = j
			}
		}
		return best
	}
	p := &backend.SampleParams{Temperature: 0.7, U: 0.5}
	batch.Sample = []*backend.SampleParams{p, nil, p}
	outs, err := m.ForwardOutputs(batch, pool)
	if err != nil {
		t.Fatal(err)
	}
	if f.calls != 1 || len(outs) != 3 {
		t.Fatalf("%d sampler calls, %d outputs", f.calls, len(outs))
	}
	for i, o := range outs {
		row := want[i*V : (i+1)*V]
		if batch.Sample[i] != nil {
			if o.Logits != nil || o.ID != argmax(row) {
				t.Errorf("output %d: id %d (logits %v), want id %d", i, o.ID, o.Logits != nil, argmax(row))
			}
		} else if !slices.Equal(o.Logits, row) {
			t.Errorf("output %d: logits differ from Forward's", i)
		}
	}
	for _, c := range []struct {
		name   string
		sample []*backend.SampleParams
		debug  bool
	}{{"no settings", nil, false}, {"DebugNaN", []*backend.SampleParams{p, p, p}, true}} {
		batch.Sample, m.DebugNaN = c.sample, c.debug
		outs, err := m.ForwardOutputs(batch, pool)
		if err != nil {
			t.Fatal(err)
		}
		for i, o := range outs {
			if !slices.Equal(o.Logits, want[i*V:(i+1)*V]) {
				t.Errorf("%s: output %d: logits differ from Forward's", c.name, i)
			}
		}
		if f.calls != 1 {
			t.Errorf("%s: the sampler was called", c.name)
		}
	}
	m.DebugNaN = false
	batch.Sample = []*backend.SampleParams{p}
	if _, err := m.ForwardOutputs(batch, pool); err == nil {
		t.Error("1 sampling entry for 3 outputs: no error")
	}
}
