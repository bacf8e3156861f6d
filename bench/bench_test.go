package bench

import (
	"context"
	"encoding/json"
	"errors"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/backend/cpu"
)

const fixture = "../testdata/glm4moelite-tiny"

func TestRunSkipsInTaskMode(t *testing.T) {
	t.Setenv("ALPHAHENG_TASK_MODE", "1")
	_, err := Run(context.Background(), Options{Dir: "/nonexistent", Ctx: 8, Gen: 4})
	if !errors.Is(err, ErrSkipped) {
		t.Errorf("got %v, want ErrSkipped", err)
	}
}

// A whole run on the tiny fixture: the accounting, not the speed, is
// checked (no timing thresholds in tests).
func TestRunTinyModel(t *testing.T) {
	t.Setenv("ALPHAHENG_TASK_MODE", "")
	const ctx, gen = 12, 4
	r, err := Run(context.Background(), Options{Dir: fixture, Ctx: ctx, Gen: gen, BandwidthBytes: 1 << 20, Histogram: true})
	if err != nil {
		t.Fatal(err)
	}
	if r.DecodeSteps != gen-1 || r.Ctx != ctx || r.Gen != gen {
		t.Errorf("ran %d decode steps for ctx %d, gen %d", r.DecodeSteps, r.Ctx, r.Gen)
	}
	// Three MoE layers of the fixture (8 experts, top-3) each see the ctx
	// prompt tokens and gen-1 decoded ones.
	if len(r.ExpertCounts) != 3 {
		t.Fatalf("%d histogram rows, want 3 MoE layers", len(r.ExpertCounts))
	}
	for l, row := range r.ExpertCounts {
		total := 0
		for _, c := range row {
			total += c
		}
		if len(row) != 8 || total != 3*(ctx+gen-1) {
			t.Errorf("layer %d: %d experts, %d picks; want 8 and %d", l, len(row), total, 3*(ctx+gen-1))
		}
	}
	if !(r.BandwidthGBs > 0) || r.BytesPerTok <= 0 || r.PeakRSS <= 0 || r.ModelBytes <= 0 {
		t.Errorf("missing measurements: %+v", r)
	}
	want := r.DecodeTokS * float64(r.BytesPerTok) / (r.BandwidthGBs * 1e9)
	if r.RooflineFraction != want {
		t.Errorf("roofline fraction %v, want %v", r.RooflineFraction, want)
	}
	// The JSON line carries the keys DESIGN.md section 7 names.
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"device", "threads", "load_s", "prefill_tok_s", "decode_tok_s", "peak_rss_bytes",
		"bytes_per_token", "bandwidth_gb_s", "roofline_fraction", "ctx", "gen", "weights_resident"} {
		if _, ok := m[k]; !ok {
			t.Errorf("JSON lacks %q", k)
		}
	}
}

// A backend of its own (a GPU's, here the CPU's standing in for it) gets a
// warm-up generation before the timed one, whose sequence must leave the
// one-sequence cache pool free for the timed run.
func TestRunWarmsUpADeviceBackend(t *testing.T) {
	t.Setenv("ALPHAHENG_TASK_MODE", "")
	const ctx, gen = 40, 6
	r, err := Run(context.Background(), Options{Dir: fixture, Ctx: ctx, Gen: gen,
		NewBackend: func() (backend.Backend, error) { return cpu.New(cpu.Options{Threads: 1}), nil }})
	if err != nil {
		t.Fatal(err)
	}
	if r.FirstPrefillTokS == nil || !(*r.FirstPrefillTokS > 0) {
		t.Errorf("no first-prefill figure from the warm-up: %v", r.FirstPrefillTokS)
	}
	if r.DecodeSteps != gen-1 || !(r.PrefillTokS > 0) || !(r.DecodeTokS > 0) {
		t.Errorf("timed run: %d decode steps (want %d), prefill %.1f, decode %.1f tok/s", r.DecodeSteps, gen-1, r.PrefillTokS, r.DecodeTokS)
	}
}

func TestRunRejectsBadInput(t *testing.T) {
	t.Setenv("ALPHAHENG_TASK_MODE", "")
	for _, o := range []Options{
		{Dir: fixture, Ctx: 0, Gen: 4},
		{Dir: fixture, Ctx: 4, Gen: 1},
		{Dir: t.TempDir(), Ctx: 4, Gen: 4}, // no weight files
	} {
		if _, err := Run(context.Background(), o); err == nil {
			t.Errorf("%+v accepted", o)
		}
	}
}
