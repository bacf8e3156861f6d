//go:build linux || darwin || freebsd || netbsd

package cuda

import (
	"fmt"
	"math"
	"testing"

	"github.com/mmfp4/mmfp4/backend"
	"github.com/mmfp4/mmfp4/format"
)

// MEASUREMENT ONLY: the GEMM kernels against the earlier ones, bit for bit.
func sameBits(t *testing.T, name string, a, b []float32) {
	t.Helper()
	diff := 0
	for i := range a {
		if math.Float32bits(a[i]) != math.Float32bits(b[i]) {
			if diff < 3 {
				t.Errorf("%s: [%d] %g against base %g", name, i, a[i], b[i])
			}
			diff++
		}
	}
	t.Logf("%s: %d of %d differ from base", name, diff, len(a))
}

func TestZZGEMMMatchesBase(t *testing.T) {
	d := testDevice(t)
	r := testRand(t)
	defer func(m string) { gemmModule = m }(gemmModule)
	type shape struct {
		N, K, G int
		Ts      []int
	}
	for _, s := range []shape{
		{1536, 2048, 128, []int{16, 64, 100, 1024}},
		{2048, 5120, 128, []int{65, 300}},
		{100, 256, 32, []int{1, 7, 70}},
		{300, 384, 64, []int{5, 129}},
		{130, 1024, 128, []int{2, 257}},
	} {
		w := randVec(r, s.N*s.K, 0.02)
		m, err := format.Quantize(w, s.N, s.K, format.QuantOptions{GroupSize: s.G})
		if err != nil {
			t.Fatal(err)
		}
		for _, T := range s.Ts {
			x := randVec(r, T*s.K, 1)
			for _, tile := range []GEMMTile{GEMMTile16, GEMMTile64} {
				var out [2][]float32
				for v, mod := range []string{"gemm", "gemmbase"} {
					gemmModule = mod
					out[v] = productOnDevice(t, d, m, x, T, s.N, func(c *Ctx, y uint64, qm *QMatrix, a *QActs) error {
						return c.GEMM(y, s.N, qm, a, tile)
					})
				}
				sameBits(t, fmt.Sprintf("N=%d K=%d G=%d T=%d tile %d", s.N, s.K, s.G, T, tile.tokens()), out[0], out[1])
			}
		}
	}
}

func TestZZMoEMatchesBase(t *testing.T) {
	const K, I, E, topK = 2048, 512, 8, 4
	r := testRand(t)
	cfg := backend.RouterConfig{TopK: topK, Groups: 1, TopKGroups: 1, NormTopKProb: true, RoutedScaling: 1.8, NumExperts: E}
	router := denseHost(r, "router", E, K)
	bias := backend.HostWeight{Name: "bias", N: 1, K: E, Dense: randVec(r, E, 0.1)}
	g, _ := testBackends(t, Options{})
	defer func(v int, tile GEMMTile, m string) { moeBatchedMinTokens, moeTileOverride, gemmModule = v, tile, m }(moeBatchedMinTokens, moeTileOverride, gemmModule)
	moeBatchedMinTokens = 2
	hosts := expertHosts(t, r, E+1, I, K, 128)
	for _, T := range []int{20, 100, 300} {
		x := randVec(r, T*K, 1)
		for _, tile := range []GEMMTile{GEMMTile16, GEMMTile64} {
			moeTileOverride = tile
			var out [2][]float32
			for v, mod := range []string{"gemm", "gemmbase"} {
				gemmModule = mod
				out[v] = moeBlockOutput(t, g, hosts, router, bias, cfg, x, T, true)
			}
			sameBits(t, fmt.Sprintf("moe T=%d tile %d", T, tile.tokens()), out[0], out[1])
		}
	}
}
