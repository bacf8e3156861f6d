#include "textflag.h"

// Decode kernels, AVX-512 (F, BW, VL, VNNI), group size 128.
//
// Weights enter vpdpbusd as unsigned bytes 2*e2m1(code)+12 (0..24); the
// +12 bias adds 12*sum(x) to each group's dot product, which is taken off by
// starting the group's accumulator at -12*sum(x) in lane 0. The exact int32
// dot product of each group is converted to float, scaled by the group's
// activation scale and e4m3 block scale, and accumulated per lane in float;
// lanes are summed once per row.

// Byte i is the biased value 2*e2m1(i)+12 of code i.
DATA gemvBiased<>+0(SB)/8, $0x181412100f0e0d0c
DATA gemvBiased<>+8(SB)/8, $0x00040608090a0b0c
GLOBL gemvBiased<>(SB), RODATA|NOPTR, $16

// One group of one row: load the activations (xe even columns, xo odd)
// and their scale (xsr), start the accumulator iacc at -12*sum(x) in lane 0,
// (iaccx is iacc's X form), widen the 64 code bytes at mem, two vpdpbusd, convert, scale by the
// activation scale and by the e4m3 scale byte at smem, add into facc.
#define GROUP(xoff, sumoff, mem, smem, xe, xo, xsr, lo, hi, iacc, iaccx, facc) \
	VMOVDQU8 xoff(DI), xe; \
	VMOVDQU8 64+xoff(DI), xo; \
	VBROADCASTSS sumoff(R8), xsr; \
	MOVL sumoff(R9), AX; \
	IMULL $-12, AX; \
	VMOVD AX, iaccx; \
	VPANDD mem, Z30, lo; \
	VPSRLW $4, mem, hi; \
	VPANDD Z30, hi, hi; \
	VPSHUFB lo, Z31, lo; \
	VPSHUFB hi, Z31, hi; \
	VPDPBUSD xe, lo, iacc; \
	VPDPBUSD xo, hi, iacc; \
	VCVTDQ2PS iacc, iacc; \
	VMULPS xsr, iacc, iacc; \
	MOVBLZX smem, AX; \
	VFMADD231PS.BCST (R10)(AX*4), iacc, facc

// func gemvAVX512(codes *byte, scales *byte, rowScale *float32, rows, groups int, x *int8, xs *float32, xsum *int32, out *float32)
//
// out[r] = rowScale[r]/2 * sum_g dot_g(r) * e4m3(scales[r*groups+g]) * xs[g]
// for r in [0, rows); row r's codes start at codes + r*groups*64. The rows
// are read one after the other, so the codes stream sequentially (four
// rows interleaved read at less than half the speed from memory); two
// groups per step feed two accumulators.
TEXT ·gemvAVX512(SB), NOSPLIT, $0-72
	MOVQ codes+0(FP), SI
	MOVQ scales+8(FP), R12
	MOVQ rowScale+16(FP), DX
	MOVQ rows+24(FP), CX
	MOVQ groups+32(FP), R13
	MOVQ out+64(FP), R14
	LEAQ ·e4m3Table(SB), R10
	VBROADCASTI32X4 gemvBiased<>(SB), Z31
	MOVL $0x0f0f0f0f, AX
	VPBROADCASTD AX, Z30
	MOVL $0x3f000000, AX             // 0.5
	VPBROADCASTD AX, Z29

row:
	MOVQ x+40(FP), DI
	MOVQ xs+48(FP), R8
	MOVQ xsum+56(FP), R9
	VPXORD Z0, Z0, Z0
	VPXORD Z1, Z1, Z1
	MOVQ R13, R11                    // groups left
	CMPQ R11, $2
	JLT  one

pair:
	GROUP(0, 0, (SI), (R12), Z4, Z5, Z6, Z8, Z9, Z10, X10, Z0)
	GROUP(128, 4, 64(SI), 1(R12), Z14, Z15, Z16, Z18, Z19, Z20, X20, Z1)
	SUBQ $-128, SI
	ADDQ $2, R12
	ADDQ $256, DI
	ADDQ $8, R8
	ADDQ $8, R9
	SUBQ $2, R11
	CMPQ R11, $2
	JGE  pair

one:
	TESTQ R11, R11
	JZ   sum
	GROUP(0, 0, (SI), (R12), Z4, Z5, Z6, Z8, Z9, Z10, X10, Z0)
	ADDQ $64, SI
	INCQ R12

sum:
	VADDPS Z1, Z0, Z0
	VEXTRACTF64X4 $1, Z0, Y8
	VADDPS Y8, Y0, Y0
	VEXTRACTF128 $1, Y0, X8
	VADDPS X8, X0, X0
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
