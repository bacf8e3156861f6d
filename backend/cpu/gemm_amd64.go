package cpu

import "github.com/mmfp4/mmfp4/format"

//go:noescape
func gemmPrep16AVX512(codes *byte, offs *int32, mask, groups int, tile *byte)

//go:noescape
func gemm16x8AVX512(tile *byte, wsc *float32, groups int, x *int8, k int, xsc *uint32, rs *float32, out *float32)

func hasGemm(i isa) bool { return i == isaAVX512 }

// gemmPrep widens rows [n0, n0+rows) of m (rows <= 16) into tile.
func gemmPrep(i isa, m *format.Matrix, n0, rows int, tile []byte) {
	groups := m.K / 128
	_ = tile[groups*2048-1]
	var offs [16]int32
	for r := 0; r < rows; r++ {
		offs[r] = int32(r * m.K / 2)
	}
	codes := m.Codes[n0*m.K/2 : (n0+rows)*m.K/2]
	gemmPrep16AVX512(&codes[0], &offs[0], 1<<rows-1, groups, &tile[0])
}

// gemmBlock runs the 16-row x 8-token kernel; x, xsc hold 8 tokens.
func gemmBlock(i isa, tile []byte, wsc []float32, groups int, x []int8, k int, xsc []uint32, rs *[16]float32, out *[128]float32) {
	_, _, _, _ = tile[groups*2048-1], wsc[groups*16-1], x[8*k-1], xsc[16*groups-1]
	gemm16x8AVX512(&tile[0], &wsc[0], groups, &x[0], k, &xsc[0], &rs[0], &out[0])
}

//go:noescape
func vnniPeakAVX512(n int)
