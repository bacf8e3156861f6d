//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"testing"

	"github.com/mmfp4/mmfp4/backend"
)

// Decode steps replayed as CUDA graphs give the logits that the same steps
// give launched op by op, bit for bit (every kernel is deterministic), over
// enough steps that the attention crosses a split bucket (the graph is
// captured again there).
func TestGraphReplayMatchesDirect(t *testing.T) {
	dir := quantizedFixture(t)
	ref := loadGolden(t)
	const steps = 80 // the prompt plus 80 passes 64 positions
	decode := func(o Options) ([]float32, *Backend) {
		g, _ := testBackends(t, o)
		return greedyLogits(t, loadOn(t, dir, g), ref.prompt, steps, backend.CacheBF16), g
	}
	direct, _ := decode(Options{NoGraphs: true})
	graphed, g := decode(Options{})
	gc := g.graphs
	t.Logf("graphs: %d replays, %d captures, %d flushes run directly", gc.Replays, gc.Captures, gc.Direct)
	var pdl bool
	g.dev.Do(func(c *Ctx) error { pdl = c.pdl; return nil })
	for _, h := range gc.graphs {
		if h.exec != 0 {
			launches := 0
			for _, r := range h.recs {
				if r.kind == recLaunch {
					launches++
				}
			}
			t.Logf("graph of %d launches and %d memsets and copies: %d edges, %d programmatic (programmatic launch %v)",
				launches, len(h.recs)-launches, h.edges, h.programmatic, pdl)
		}
	}
	if gc.Replays < steps/2 || gc.Captures < 2 {
		t.Errorf("%d of %d steps replayed, %d captures: want most steps replayed and a capture per split bucket", gc.Replays, steps, gc.Captures)
	}
	if len(graphed) != len(direct) {
		t.Fatalf("%d logits with graphs, %d without", len(graphed), len(direct))
	}
	for i := range direct {
		if graphed[i] != direct[i] {
			t.Fatalf("logit %d (step %d): %v with graphs, %v without", i, i/(len(direct)/(steps+1)), graphed[i], direct[i])
		}
	}
}
