//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/model/glm4moelite"
)

// Decoding three sequences with each step queued before the ids of the one
// before have come back (LaunchOutputs, Batch.Prev) chooses the tokens
// that the same steps run one at a time (ForwardOutputs) choose: greedy,
// temperature and top-k rows with the same random numbers, on the bf16
// fixture (embedding on the host: the ids are waited for there) and the
// MMFP4 one (embedding on the device, reading the ids where the sampler
// left them).
func TestLaunchAheadMatchesSync(t *testing.T) {
	g, _ := testBackends(t, Options{})
	prompts := [][]int{{248, 475, 240, 439, 34, 19, 502}, {5, 6, 7}, {300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310, 311}}
	params := []backend.SampleParams{{}, {Temperature: 0.8}, {Temperature: 1.2, TopK: 12}}
	const steps, blockSize = 24, 16
	r := rand.New(rand.NewPCG(7, 8))
	us := make([][]float64, steps+1)
	for i := range us {
		for range prompts {
			us[i] = append(us[i], r.Float64())
		}
	}
	for _, dir := range []string{fixtureDir, quantizedFixture(t)} {
		m := loadOn(t, dir, g)
		if !m.Async() {
			t.Fatal("the CUDA backend does not queue steps ahead")
		}
		run := func(ahead bool) [][]int32 {
			pool, err := m.NewCachePool(len(prompts)*3, blockSize, backend.CacheBF16)
			if err != nil {
				t.Fatal(err)
			}
			sampleAt := func(step int) []*backend.SampleParams {
				var ps []*backend.SampleParams
				for i := range prompts {
					p := params[i]
					p.U = us[step][i]
					ps = append(ps, &p)
				}
				return ps
			}
			// The prompts in one step, then one token a sequence a step.
			b := &backend.Batch{Sample: sampleAt(0)}
			for i, p := range prompts {
				b.Seqs = append(b.Seqs, backend.Seq{Start: len(b.Tokens), Len: len(p), Blocks: []int32{int32(3 * i), int32(3*i + 1), int32(3*i + 2)}})
				for j, id := range p {
					b.Tokens, b.Positions = append(b.Tokens, int32(id)), append(b.Positions, int32(j))
				}
				b.Outputs = append(b.Outputs, int32(len(b.Tokens)-1))
			}
			outs, err := m.ForwardOutputs(b, pool)
			if err != nil {
				t.Fatal(err)
			}
			ids := make([][]int32, len(prompts))
			for i, o := range outs {
				ids[i] = append(ids[i], int32(o.ID))
			}
			decode := func(step int, prev bool) *backend.Batch {
				d := &backend.Batch{Sample: sampleAt(step)}
				for i, p := range prompts {
					d.Seqs = append(d.Seqs, backend.Seq{Start: i, Len: 1, Blocks: b.Seqs[i].Blocks})
					d.Positions = append(d.Positions, int32(len(p)+step-1))
					d.Outputs = append(d.Outputs, int32(i))
					if prev {
						d.Tokens, d.Prev = append(d.Tokens, 0), append(d.Prev, int32(i))
					} else {
						d.Tokens = append(d.Tokens, ids[i][len(ids[i])-1])
					}
				}
				return d
			}
			hand := func(outs []glm4moelite.Output) {
				for i, o := range outs {
					ids[i] = append(ids[i], int32(o.ID))
				}
			}
			if !ahead {
				for step := 1; step <= steps; step++ {
					outs, err := m.ForwardOutputs(decode(step, false), pool)
					if err != nil {
						t.Fatal(err)
					}
					hand(outs)
				}
				return ids
			}
			wait, err := m.LaunchOutputs(decode(1, false), pool)
			if err != nil {
				t.Fatal(err)
			}
			for step := 2; step <= steps+1; step++ {
				var next func() ([]glm4moelite.Output, error)
				if step <= steps {
					if next, err = m.LaunchOutputs(decode(step, true), pool); err != nil {
						t.Fatal(err)
					}
				}
				outs, err := wait()
				if err != nil {
					t.Fatal(err)
				}
				hand(outs)
				wait = next
			}
			return ids
		}
		want, got := run(false), run(true)
		for i := range want {
			if !slices.Equal(got[i], want[i]) {
				t.Errorf("%s, sequence %d: ahead %v\n sync %v", dir, i, got[i], want[i])
			}
		}
		t.Logf("%s: %d tokens of %d sequences identical", dir, len(want[0]), len(want))
	}
}
