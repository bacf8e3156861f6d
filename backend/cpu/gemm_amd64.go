package cpu

import "github.com/mmfp4/mmfp4/format"

//go:noescape
func gemmPrep16AVX512(codes *byte, offs *int32, groups int, tile *byte)

//go:noescape
func gemm16x8AVX512(tile *byte, wsc *float32, groups int, x *int8, k int, xsc *uint32, rs *float32, out *float32, outStride, tokens, rowMask int)

//go:noescape
func gemmPrep8AVX2(codes *byte, offs *int32, lanes *int32, groups int, tile *byte)

//go:noescape
func gemm8x4AVXVNNI(tile *byte, wsc *float32, groups int, x *int8, k int, xsc *uint32, rs *float32, out *float32, outStride, tokens int, lanes *int32)

//go:noescape
func gemm8x4AVX2(tile *byte, wsc *float32, groups int, x *int8, k int, xsc *uint32, rs *float32, out *float32, outStride, tokens int, lanes *int32)

//go:noescape
func vnniPeakAVX512(n int)

// gemmGeometry gives the rows per tile and tokens per block of family i's
// prefill kernel; ok is false where there is none.
func gemmGeometry(i isa) (rows, tokens int, ok bool) {
	switch i {
	case isaAVX512:
		return 16, 8, true
	case isaAVXVNNI, isaAVX2:
		return 8, 4, true
	}
	return 0, 0, false
}

// gemmPrep widens rows [n0, n0+rows) of m (at most one tile) into tile.
func gemmPrep(i isa, m *format.Matrix, n0, rows int, tile []byte) {
	R, _, _ := gemmGeometry(i)
	groups := m.K / 128
	_ = tile[groups*R*128-1]
	// Rows past the matrix's end repeat row 0 (AVX-512) or are not read
	// (AVX2); either way their outputs are dropped.
	var offs, lanes [16]int32
	for r := 0; r < rows; r++ {
		offs[r], lanes[r] = int32(r*m.K/2), -1
	}
	codes := m.Codes[n0*m.K/2 : (n0+rows)*m.K/2]
	if i == isaAVX512 {
		gemmPrep16AVX512(&codes[0], &offs[0], groups, &tile[0])
	} else {
		gemmPrep8AVX2(&codes[0], &offs[0], &lanes[0], groups, &tile[0])
	}
}

// gemmBlock runs family i's kernel on one tile and one block of tokens (x
// and xsc start at the block's first token), writing the first rows
// outputs of the first tokens tokens to out, rows outStride apart.
func gemmBlock(i isa, tile []byte, wsc []float32, groups int, x []int8, k int, xsc []uint32, rs []float32, out []float32, outStride, tokens, rows int) {
	R, TB, _ := gemmGeometry(i)
	_, _, _, _ = tile[groups*R*128-1], wsc[groups*R-1], x[TB*k-1], xsc[2*TB*groups-1]
	_, _ = rs[R-1], out[(tokens-1)*outStride+rows-1]
	if tokens <= 0 || tokens > TB || rows <= 0 || rows > R {
		panic("cpu backend: gemm block out of range")
	}
	switch i {
	case isaAVX512:
		gemm16x8AVX512(&tile[0], &wsc[0], groups, &x[0], k, &xsc[0], &rs[0], &out[0], outStride, tokens, 1<<rows-1)
	case isaAVXVNNI, isaAVX2:
		var lanes [8]int32
		for r := 0; r < rows; r++ {
			lanes[r] = -1
		}
		if i == isaAVXVNNI {
			gemm8x4AVXVNNI(&tile[0], &wsc[0], groups, &x[0], k, &xsc[0], &rs[0], &out[0], outStride, tokens, &lanes[0])
		} else {
			gemm8x4AVX2(&tile[0], &wsc[0], groups, &x[0], k, &xsc[0], &rs[0], &out[0], outStride, tokens, &lanes[0])
		}
	}
}

//go:noescape
func readAVX512(p *byte, n int) uint64

//go:noescape
func fmaPeakAVX512(n int)
