//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/backend/cpu"
)

// expandedRun writes random cache rows for seqs (as flashRun does), then
// runs a step's attention with random queries and the weights uk, uv:
// in the expanded form (ExpandedAttention) or the latent one (AbsorbQuery,
// LatentAttention, ExpandValues), and returns the output.
func expandedRun(t *testing.T, b backend.Backend, seqs []flashSeq, s backend.MLAShape, dt backend.CacheDType, seed uint64,
	uk, uv backend.HostWeight, expanded bool) []float32 {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, 0x657870))
	step := flashCache(t, b, seqs, s, dt, r)
	T, H := step.Rows(), s.Heads
	q, out := b.NewTensor(T, H*(s.NopeDim+s.RopeDim)), b.NewTensor(T, H*s.VDim)
	b.Upload(q, randVec(r, T*H*(s.NopeDim+s.RopeDim), 1))
	nan := make([]float32, T*H*s.VDim)
	for i := range nan {
		nan[i] = float32(math.NaN())
	}
	b.Upload(out, nan)
	wk, wv := mustWeight(t, b, uk), mustWeight(t, b, uv)
	scale := float32(1 / math.Sqrt(float64(s.NopeDim+s.RopeDim)))
	if expanded {
		ea := b.(backend.ExpandedAttender)
		if !ea.ExpandedFits(s) {
			t.Fatalf("seqs %v: the step does not take the expanded form", seqs)
		}
		ea.ExpandedAttention(out, q, 0, wk, wv, s, scale)
	} else {
		qlat, olat := b.NewTensor(T, H*s.Rank), b.NewTensor(T, H*s.Rank)
		b.AbsorbQuery(qlat, q, wk, s)
		b.LatentAttention(olat, qlat, q, 0, s, scale)
		b.ExpandValues(out, olat, wv, s)
	}
	got := b.Download(out)
	if err := b.Sync(); err != nil {
		t.Fatal(err)
	}
	return got
}

// TestExpandedAttentionMatchesCPU checks the expanded form of a prompt
// step's attention against the CPU backend's latent form on the same
// random cache, queries and MMFP4 weights: fresh prompts and chunks after
// a prefix, two sequences in a step, splits of the keys (some of them
// empty for the first query tiles of a fresh prompt), the bf16, fp8 and
// fp4 caches, groups of 128 and 32. The GPU's latent form on the same
// inputs is logged beside it.
func TestExpandedAttentionMatchesCPU(t *testing.T) {
	g, _ := testBackends(t, Options{})
	g.expandedMin = 1
	c := cpu.New(cpu.Options{Threads: 2})
	cases := []struct {
		s    backend.MLAShape
		seqs []flashSeq
		G    int
	}{
		{backend.MLAShape{Heads: 3, NopeDim: 192, RopeDim: 64, VDim: 256, Rank: 512}, []flashSeq{{0, 300}}, 128},
		{backend.MLAShape{Heads: 3, NopeDim: 192, RopeDim: 64, VDim: 256, Rank: 512}, []flashSeq{{700, 260}}, 32},
		{backend.MLAShape{Heads: 2, NopeDim: 192, RopeDim: 64, VDim: 256, Rank: 512}, []flashSeq{{0, 1024}}, 128},
		{backend.MLAShape{Heads: 5, NopeDim: 192, RopeDim: 64, VDim: 256, Rank: 256}, []flashSeq{{100, 256}, {37, 300}}, 64},
	}
	for i, cs := range cases {
		if testing.Short() && i > 0 {
			continue // the sanitizer's run: the first case only
		}
		r := rand.New(rand.NewPCG(uint64(400+i), 1))
		uk := quantHost(t, r, "wuk", cs.s.Heads*cs.s.NopeDim, cs.s.Rank, cs.G)
		uv := quantHost(t, r, "wuv", cs.s.Heads*cs.s.VDim, cs.s.Rank, cs.G)
		for _, dt := range []backend.CacheDType{backend.CacheBF16, backend.CacheFP8, backend.CacheFP4} {
			name := fmt.Sprintf("%v cache, heads %d rank %d, groups of %d, seqs %v", dt, cs.s.Heads, cs.s.Rank, cs.G, cs.seqs)
			seed := uint64(500 + i)
			want := expandedRun(t, c, cs.seqs, cs.s, dt, seed, uk, uv, false)
			got := expandedRun(t, g, cs.seqs, cs.s, dt, seed, uk, uv, true)
			e := maxRelErr(want, got)
			if !(e <= expandedBound) {
				t.Errorf("%s: expanded form max relative error %.3e above %.0e", name, e, expandedBound)
			}
			latent := expandedRun(t, g, cs.seqs, cs.s, dt, seed, uk, uv, false)
			t.Logf("%-75s expanded %.2e, GPU latent %.2e", name, e, maxRelErr(want, latent))
		}
	}
}

// expandedBound is the expanded form's bound against the CPU's latent
// form: bf16 keys, values, queries and weights (2^-9 each) against the
// latent form's int8 queries and outputs.
const expandedBound = 2e-2
