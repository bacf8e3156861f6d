#include "textflag.h"

// Decode kernels, AVX-512 (F, BW, VL, VNNI), group size 128.
//
// Weights enter vpdpbusd as unsigned bytes 2*e2m1(code)+12 (0..24). For
// each group of a row the 16 lanes of its products are summed exactly in
// int32 (a transpose-and-add tree reduces 16 groups at once), 12*sum(x) is
// taken off, and only then is the group's dot product converted to float
// and scaled: sum_g dot_g * e4m3(s_g) * xs_g, with the e4m3 scales of 16
// groups decoded arithmetically in one vector.

// Byte i is the biased value 2*e2m1(i)+12 of code i.
DATA gemvBiased<>+0(SB)/8, $0x181412100f0e0d0c
DATA gemvBiased<>+8(SB)/8, $0x00040608090a0b0c
GLOBL gemvBiased<>(SB), RODATA|NOPTR, $16

// Entry n is the mask of the first n of 16 lanes.
DATA gemvLanes<>+0(SB)/8, $0x0007000300010000
DATA gemvLanes<>+8(SB)/8, $0x007f003f001f000f
DATA gemvLanes<>+16(SB)/8, $0x07ff03ff01ff00ff
DATA gemvLanes<>+24(SB)/8, $0x7fff3fff1fff0fff
DATA gemvLanes<>+32(SB)/8, $0x000000000000ffff
GLOBL gemvLanes<>(SB), RODATA|NOPTR, $40

// Group g of the batch: products of the 64 code bytes at off(SI) with the
// activations at xoff(DI) into the int32 lanes of acc. The line 4 KB ahead
// is prefetched: o_proj's rows (2048 x 5120) then stream at 46-53 GB/s
// instead of 37-47 (docs/perf.md).
#define GROUP(off, xoff, acc) \
	PREFETCHT0 4096+off(SI); \
	VPANDD off(SI), Z30, Z16; \
	VPSRLW $4, off(SI), Z17; \
	VPANDD Z30, Z17, Z17; \
	VPSHUFB Z16, Z31, Z16; \
	VPSHUFB Z17, Z31, Z17; \
	VPDPBUSD xoff(DI), Z16, acc; \
	VPDPBUSD 64+xoff(DI), Z17, acc

// Sum the lanes of a and b pairwise into a (one step of the tree).
#define PAIR_DQ(a, b) \
	VPUNPCKLDQ b, a, Z16; \
	VPUNPCKHDQ b, a, a; \
	VPADDD Z16, a, a

#define PAIR_QDQ(a, b) \
	VPUNPCKLQDQ b, a, Z16; \
	VPUNPCKHQDQ b, a, a; \
	VPADDD Z16, a, a

#define PAIR_128(a, b) \
	VSHUFI32X4 $0x88, b, a, Z16; \
	VSHUFI32X4 $0xDD, b, a, a; \
	VPADDD Z16, a, a

// func gemvAVX512(codes *byte, scales *byte, rowScale *float32, rows, groups int, x *int8, xs *float32, xsum *int32, out *float32)
//
// out[r] = rowScale[r]/2 * sum_g dot_g(r) * e4m3(scales[r*groups+g]) * xs[g]
// for r in [0, rows); row r's codes start at codes + r*groups*64. The rows
// are read one after the other, so the codes stream sequentially (four
// rows interleaved read at less than half the speed from memory).
TEXT ·gemvAVX512(SB), NOSPLIT, $0-72
	MOVQ codes+0(FP), SI
	MOVQ scales+8(FP), R12
	MOVQ rowScale+16(FP), DX
	MOVQ rows+24(FP), CX
	MOVQ out+64(FP), R14
	VBROADCASTI32X4 gemvBiased<>(SB), Z31
	MOVL $0x0f0f0f0f, AX
	VPBROADCASTD AX, Z30
	MOVL $0x3f000000, AX             // 0.5
	VMOVD AX, X29
	MOVL $12, AX
	VPBROADCASTD AX, Z27
	MOVL $0x7f, AX
	VPBROADCASTD AX, Z26
	MOVL $0x7b800000, AX             // 2^120
	VPBROADCASTD AX, Z25
	MOVL $0x7fc00000, AX             // NaN
	VPBROADCASTD AX, Z24
	MOVL $0x80, AX
	VPBROADCASTD AX, Z23

row:
	MOVQ x+40(FP), DI
	MOVQ xs+48(FP), R8
	MOVQ xsum+56(FP), R9
	VPXORD Z28, Z28, Z28             // float sum over groups, per lane
	MOVQ groups+32(FP), R11          // groups left

batch:
	MOVQ R11, R13
	CMPQ R13, $16
	JLE  counted
	MOVQ $16, R13                    // groups in this batch

counted:
	VPXORD Z0, Z0, Z0
	VPXORD Z1, Z1, Z1
	VPXORD Z2, Z2, Z2
	VPXORD Z3, Z3, Z3
	VPXORD Z4, Z4, Z4
	VPXORD Z5, Z5, Z5
	VPXORD Z6, Z6, Z6
	VPXORD Z7, Z7, Z7
	VPXORD Z8, Z8, Z8
	VPXORD Z9, Z9, Z9
	VPXORD Z10, Z10, Z10
	VPXORD Z11, Z11, Z11
	VPXORD Z12, Z12, Z12
	VPXORD Z13, Z13, Z13
	VPXORD Z14, Z14, Z14
	VPXORD Z15, Z15, Z15
	GROUP(0, 0, Z0)
	CMPQ R13, $1
	JEQ  reduce
	GROUP(64, 128, Z1)
	CMPQ R13, $2
	JEQ  reduce
	GROUP(128, 256, Z2)
	CMPQ R13, $3
	JEQ  reduce
	GROUP(192, 384, Z3)
	CMPQ R13, $4
	JEQ  reduce
	GROUP(256, 512, Z4)
	CMPQ R13, $5
	JEQ  reduce
	GROUP(320, 640, Z5)
	CMPQ R13, $6
	JEQ  reduce
	GROUP(384, 768, Z6)
	CMPQ R13, $7
	JEQ  reduce
	GROUP(448, 896, Z7)
	CMPQ R13, $8
	JEQ  reduce
	GROUP(512, 1024, Z8)
	CMPQ R13, $9
	JEQ  reduce
	GROUP(576, 1152, Z9)
	CMPQ R13, $10
	JEQ  reduce
	GROUP(640, 1280, Z10)
	CMPQ R13, $11
	JEQ  reduce
	GROUP(704, 1408, Z11)
	CMPQ R13, $12
	JEQ  reduce
	GROUP(768, 1536, Z12)
	CMPQ R13, $13
	JEQ  reduce
	GROUP(832, 1664, Z13)
	CMPQ R13, $14
	JEQ  reduce
	GROUP(896, 1792, Z14)
	CMPQ R13, $15
	JEQ  reduce
	GROUP(960, 1920, Z15)

reduce:
	PAIR_DQ(Z0, Z1)
	PAIR_DQ(Z2, Z3)
	PAIR_DQ(Z4, Z5)
	PAIR_DQ(Z6, Z7)
	PAIR_DQ(Z8, Z9)
	PAIR_DQ(Z10, Z11)
	PAIR_DQ(Z12, Z13)
	PAIR_DQ(Z14, Z15)
	PAIR_QDQ(Z0, Z2)
	PAIR_QDQ(Z4, Z6)
	PAIR_QDQ(Z8, Z10)
	PAIR_QDQ(Z12, Z14)
	PAIR_128(Z0, Z4)
	PAIR_128(Z8, Z12)
	PAIR_128(Z0, Z8)

	// Z0 lane g: the biased dot product of group g. Take off 12*sum(x),
	// convert, scale by e4m3(s) * xs and add into Z28. Lanes past the
	// batch load zeros.
	LEAQ gemvLanes<>(SB), AX
	MOVWLZX (AX)(R13*2), AX
	KMOVW AX, K1
	VMOVDQU32.Z (R9), K1, Z17
	VPMULLD Z27, Z17, Z17
	VPSUBD Z17, Z0, Z0
	VCVTDQ2PS Z0, Z0
	VPMOVZXBD.Z (R12), K1, Z17       // scale bytes
	VPANDD Z26, Z17, Z18             // magnitude bits
	VPSLLD $20, Z18, Z19
	VMULPS Z25, Z19, Z19             // 2^(e-7) (1 + m/8), subnormals included
	VPANDD Z23, Z17, Z20
	VPSLLD $24, Z20, Z20
	VPORD Z20, Z19, Z19              // sign
	VPCMPEQD Z26, Z18, K2
	VMOVAPS Z24, K2, Z19             // 0x7f and 0xff are NaN
	VMOVUPS.Z (R8), K1, Z20
	VMULPS Z20, Z19, Z19
	VFMADD231PS Z19, Z0, Z28

	MOVQ R13, AX
	SHLQ $6, AX
	ADDQ AX, SI
	SHLQ $1, AX
	ADDQ AX, DI
	ADDQ R13, R12
	LEAQ (R8)(R13*4), R8
	LEAQ (R9)(R13*4), R9
	SUBQ R13, R11
	JNZ  batch

	VEXTRACTF64X4 $1, Z28, Y0
	VADDPS Y28, Y0, Y0
	VEXTRACTF128 $1, Y0, X1
	VADDPS X1, X0, X0
	VHADDPS X0, X0, X0
	VHADDPS X0, X0, X0
	VMULSS (DX), X0, X0
	VMULSS X29, X0, X0
	VMOVSS X0, (R14)
	ADDQ $4, DX
	ADDQ $4, R14
	DECQ CX
	JNZ  row

	VZEROUPPER
	RET

// func quantRow128AVX512(x *float32, groups int, q *int8, s *float32, sum *int32)
//
// The int8 activation quantizer of quantizeRow for group size 128, bit for
// bit: scale = amax/127, q = trunc(x/scale + copysign(0.5, x/scale))
// clamped to [-127, 127], each group stored even columns first. A NaN in a
// group makes amax NaN, as Go's max does.
TEXT ·quantRow128AVX512(SB), NOSPLIT, $0-40
	MOVQ x+0(FP), SI
	MOVQ groups+8(FP), CX
	MOVQ q+16(FP), DI
	MOVQ s+24(FP), R8
	MOVQ sum+32(FP), R9
	MOVL $0x7fffffff, AX
	VPBROADCASTD AX, Z31             // abs mask
	MOVL $0x80000000, AX
	VPBROADCASTD AX, Z30             // sign mask
	MOVL $0x3f000000, AX
	VPBROADCASTD AX, Z29             // 0.5
	MOVL $127, AX
	VPBROADCASTD AX, Z28
	MOVL $-127, AX
	VPBROADCASTD AX, Z27
	VMOVDQU32 qEvenIdx<>(SB), Z26
	VMOVDQU32 qOddIdx<>(SB), Z25
	MOVL $0x42fe0000, AX             // 127.0
	VMOVD AX, X24
	VPXORD Z23, Z23, Z23             // zero

qloop:
	VMOVUPS (SI), Z0
	VMOVUPS 64(SI), Z1
	VMOVUPS 128(SI), Z2
	VMOVUPS 192(SI), Z3
	VMOVUPS 256(SI), Z4
	VMOVUPS 320(SI), Z5
	VMOVUPS 384(SI), Z6
	VMOVUPS 448(SI), Z7

	// amax, and whether any value is NaN.
	VANDPS Z31, Z0, Z8
	VANDPS Z31, Z1, Z9
	VANDPS Z31, Z2, Z10
	VANDPS Z31, Z3, Z11
	VANDPS Z31, Z4, Z12
	VANDPS Z31, Z5, Z13
	VANDPS Z31, Z6, Z14
	VANDPS Z31, Z7, Z15
	VCMPPS $3, Z9, Z8, K1
	VCMPPS $3, Z11, Z10, K2
	VCMPPS $3, Z13, Z12, K3
	VCMPPS $3, Z15, Z14, K4
	KORW K2, K1, K1
	KORW K4, K3, K3
	KORW K3, K1, K1
	VMAXPS Z9, Z8, Z8
	VMAXPS Z11, Z10, Z10
	VMAXPS Z13, Z12, Z12
	VMAXPS Z15, Z14, Z14
	VMAXPS Z10, Z8, Z8
	VMAXPS Z14, Z12, Z12
	VMAXPS Z12, Z8, Z8
	VEXTRACTF64X4 $1, Z8, Y9
	VMAXPS Y9, Y8, Y8
	VEXTRACTF128 $1, Y8, X9
	VMAXPS X9, X8, X8
	VPERMILPS $0x4e, X8, X9
	VMAXPS X9, X8, X8
	VPERMILPS $0xb1, X8, X9
	VMAXPS X9, X8, X8
	KORTESTW K1, K1
	JZ   qfinite
	MOVL $0x7fc00000, AX             // NaN
	VMOVD AX, X8

qfinite:
	VUCOMISS X23, X8
	JNE  qnonzero
	JP   qnonzero
	VMOVDQU8 Z23, (DI)
	VMOVDQU8 Z23, 64(DI)
	MOVL $0, (R8)
	MOVL $0, (R9)
	JMP  qnext

qnonzero:
	VDIVSS X24, X8, X8               // scale = amax / 127
	VMOVSS X8, (R8)
	VBROADCASTSS X8, Z8
	VPXORD Z22, Z22, Z22             // integer sum

#define QPAIR(a, b, off) \
	VDIVPS Z8, a, a; \
	VPANDD Z30, a, Z16; \
	VPORD Z29, Z16, Z16; \
	VADDPS Z16, a, a; \
	VCVTTPS2DQ a, a; \
	VPMINSD Z28, a, a; \
	VPMAXSD Z27, a, a; \
	VDIVPS Z8, b, b; \
	VPANDD Z30, b, Z16; \
	VPORD Z29, Z16, Z16; \
	VADDPS Z16, b, b; \
	VCVTTPS2DQ b, b; \
	VPMINSD Z28, b, b; \
	VPMAXSD Z27, b, b; \
	VPADDD a, Z22, Z22; \
	VPADDD b, Z22, Z22; \
	VMOVDQA32 a, Z16; \
	VPERMT2D b, Z26, Z16; \
	VMOVDQA32 a, Z17; \
	VPERMT2D b, Z25, Z17; \
	VPMOVDB Z16, off(DI); \
	VPMOVDB Z17, 64+off(DI)

	QPAIR(Z0, Z1, 0)
	QPAIR(Z2, Z3, 16)
	QPAIR(Z4, Z5, 32)
	QPAIR(Z6, Z7, 48)

	VEXTRACTI64X4 $1, Z22, Y9
	VPADDD Y9, Y22, Y9
	VEXTRACTI128 $1, Y9, X10
	VPADDD X10, X9, X9
	VPSHUFD $0x4e, X9, X10
	VPADDD X10, X9, X9
	VPSHUFD $0xb1, X9, X10
	VPADDD X10, X9, X9
	VMOVD X9, (R9)

qnext:
	ADDQ $512, SI
	SUBQ $-128, DI
	ADDQ $4, R8
	ADDQ $4, R9
	DECQ CX
	JNZ  qloop

	VZEROUPPER
	RET

DATA qEvenIdx<>+0(SB)/8, $0x0000000200000000
DATA qEvenIdx<>+8(SB)/8, $0x0000000600000004
DATA qEvenIdx<>+16(SB)/8, $0x0000000a00000008
DATA qEvenIdx<>+24(SB)/8, $0x0000000e0000000c
DATA qEvenIdx<>+32(SB)/8, $0x0000001200000010
DATA qEvenIdx<>+40(SB)/8, $0x0000001600000014
DATA qEvenIdx<>+48(SB)/8, $0x0000001a00000018
DATA qEvenIdx<>+56(SB)/8, $0x0000001e0000001c
GLOBL qEvenIdx<>(SB), RODATA|NOPTR, $64

DATA qOddIdx<>+0(SB)/8, $0x0000000300000001
DATA qOddIdx<>+8(SB)/8, $0x0000000700000005
DATA qOddIdx<>+16(SB)/8, $0x0000000b00000009
DATA qOddIdx<>+24(SB)/8, $0x0000000f0000000d
DATA qOddIdx<>+32(SB)/8, $0x0000001300000011
DATA qOddIdx<>+40(SB)/8, $0x0000001700000015
DATA qOddIdx<>+48(SB)/8, $0x0000001b00000019
DATA qOddIdx<>+56(SB)/8, $0x0000001f0000001d
GLOBL qOddIdx<>(SB), RODATA|NOPTR, $64
