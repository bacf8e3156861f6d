#include "textflag.h"

// Decode kernels for AVX2 + FMA machines, group size 128: the same
// arithmetic as gemv_avx512_amd64.s on 256-bit registers. The int8 products
// use AVX-VNNI's vpdpbusd where the CPU has it (gemvAVXVNNI), else
// vpmaddubsw + vpmaddwd (gemvAVX2): with weights 0..24 and |x| <= 127 the
// four 16-bit partial sums of a lane stay below 2^15.

DATA gemv2Biased<>+0(SB)/8, $0x181412100f0e0d0c
DATA gemv2Biased<>+8(SB)/8, $0x00040608090a0b0c
GLOBL gemv2Biased<>(SB), RODATA|NOPTR, $16

// The Go assembler knows only the EVEX form of vpdpbusd, which needs
// AVX-512; these are the VEX (AVX-VNNI) encodings of
// vpdpbusd ymm6, ymmW, [rdi+disp] for W = 2, 4, 3, 5.
#define VNNI_Y6_Y2_DI0 BYTE $0xC4; BYTE $0xE2; BYTE $0x6D; BYTE $0x50; BYTE $0x77; BYTE $0x00
#define VNNI_Y6_Y4_DI32 BYTE $0xC4; BYTE $0xE2; BYTE $0x5D; BYTE $0x50; BYTE $0x77; BYTE $0x20
#define VNNI_Y6_Y3_DI64 BYTE $0xC4; BYTE $0xE2; BYTE $0x65; BYTE $0x50; BYTE $0x77; BYTE $0x40
#define VNNI_Y6_Y5_DI96 BYTE $0xC4; BYTE $0xE2; BYTE $0x55; BYTE $0x50; BYTE $0x77; BYTE $0x60

// Widen the 64 code bytes at mem (mem32 is mem+32): Y2/Y4 the even columns (activations at
// 0(DI), 32(DI)), Y3/Y5 the odd ones (64(DI), 96(DI)), as biased bytes.
#define WIDEN(mem, mem32) \
	VMOVDQU mem, Y3; \
	VPAND Y14, Y3, Y2; \
	VPSRLW $4, Y3, Y3; \
	VPAND Y14, Y3, Y3; \
	VPSHUFB Y2, Y15, Y2; \
	VPSHUFB Y3, Y15, Y3; \
	VMOVDQU mem32, Y5; \
	VPAND Y14, Y5, Y4; \
	VPSRLW $4, Y5, Y5; \
	VPAND Y14, Y5, Y5; \
	VPSHUFB Y4, Y15, Y4; \
	VPSHUFB Y5, Y15, Y5

// Y6 = -12*sum(x) in lane 0 plus the group's products.
#define DOT_VNNI \
	VMOVDQA Y11, Y6; \
	VNNI_Y6_Y2_DI0; \
	VNNI_Y6_Y4_DI32; \
	VNNI_Y6_Y3_DI64; \
	VNNI_Y6_Y5_DI96

#define DOT_MADD \
	VPMADDUBSW (DI), Y2, Y2; \
	VPMADDUBSW 32(DI), Y4, Y4; \
	VPMADDUBSW 64(DI), Y3, Y3; \
	VPMADDUBSW 96(DI), Y5, Y5; \
	VPADDW Y4, Y2, Y2; \
	VPADDW Y5, Y3, Y3; \
	VPADDW Y3, Y2, Y2; \
	VPMADDWD Y13, Y2, Y2; \
	VPADDD Y11, Y2, Y6

// Scale the group's dot product and add it into facc.
#define SCALE(smem, facc) \
	VCVTDQ2PS Y6, Y6; \
	VMULPS Y12, Y6, Y6; \
	MOVBLZX smem, AX; \
	VBROADCASTSS (R10)(AX*4), Y7; \
	VFMADD231PS Y7, Y6, facc

#define GROUP_SETUP2 \
	VBROADCASTSS (R8), Y12; \
	MOVL (R9), AX; \
	IMULL $-12, AX; \
	VMOVD AX, X11

// GEMV2(DOT, labels...) is the body of a decode kernel with the signature
// of gemvAVX512: one row after the other, so the codes stream sequentially.
#define GEMV2(DOT, row1, g1) \
	MOVQ codes+0(FP), SI; \
	MOVQ scales+8(FP), R12; \
	MOVQ rows+24(FP), CX; \
	MOVQ groups+32(FP), R13; \
	LEAQ ·e4m3Table(SB), R10; \
	VBROADCASTI128 gemv2Biased<>(SB), Y15; \
	MOVL $0x0f0f0f0f, AX; \
	VMOVD AX, X14; \
	VPBROADCASTD X14, Y14; \
	MOVL $0x00010001, AX; \
	VMOVD AX, X13; \
	VPBROADCASTD X13, Y13; \
	MOVQ rowScale+16(FP), DX; \
	MOVQ out+64(FP), R14; \
row1: \
	MOVQ x+40(FP), DI; \
	MOVQ xs+48(FP), R8; \
	MOVQ xsum+56(FP), R9; \
	VXORPS Y0, Y0, Y0; \
	MOVQ R13, R11; \
g1: \
	GROUP_SETUP2; \
	WIDEN((SI), 32(SI)); \
	DOT; \
	SCALE((R12), Y0); \
	ADDQ $64, SI; \
	INCQ R12; \
	SUBQ $-128, DI; \
	ADDQ $4, R8; \
	ADDQ $4, R9; \
	DECQ R11; \
	JNZ  g1; \
	VEXTRACTF128 $1, Y0, X1; \
	VADDPS X1, X0, X0; \
	VHADDPS X0, X0, X0; \
	VHADDPS X0, X0, X0; \
	VMULSS (DX), X0, X0; \
	MOVL $0x3f000000, AX; \
	VMOVD AX, X1; \
	VMULSS X1, X0, X0; \
	VMOVSS X0, (R14); \
	ADDQ $4, DX; \
	ADDQ $4, R14; \
	DECQ CX; \
	JNZ  row1; \
	VZEROUPPER; \
	RET

// func gemvAVXVNNI(codes *byte, scales *byte, rowScale *float32, rows, groups int, x *int8, xs *float32, xsum *int32, out *float32)
TEXT ·gemvAVXVNNI(SB), NOSPLIT, $0-72
	GEMV2(DOT_VNNI, vrow1, vg1)

// func gemvAVX2(codes *byte, scales *byte, rowScale *float32, rows, groups int, x *int8, xs *float32, xsum *int32, out *float32)
TEXT ·gemvAVX2(SB), NOSPLIT, $0-72
	GEMV2(DOT_MADD, mrow1, mg1)

// func quantRow128AVX2(x *float32, groups int, q *int8, s *float32, sum *int32)
//
// quantRow128AVX512 on 256-bit registers: 32 values at a time are
// converted, packed to bytes in column order, then split into even and
// odd columns.
TEXT ·quantRow128AVX2(SB), NOSPLIT, $0-40
	MOVQ x+0(FP), SI
	MOVQ groups+8(FP), CX
	MOVQ q+16(FP), DI
	MOVQ s+24(FP), R8
	MOVQ sum+32(FP), R9
	MOVL $0x7fffffff, AX
	VMOVD AX, X13
	VPBROADCASTD X13, Y13            // abs mask
	MOVL $0x80000000, AX
	VMOVD AX, X7
	VPBROADCASTD X7, Y7              // sign mask
	MOVL $0x3f000000, AX
	VMOVD AX, X8
	VPBROADCASTD X8, Y8              // 0.5
	MOVL $127, AX
	VMOVD AX, X9
	VPBROADCASTD X9, Y9
	MOVL $-127, AX
	VMOVD AX, X10
	VPBROADCASTD X10, Y10
	VMOVDQU q2PermIdx<>(SB), Y11
	VBROADCASTI128 q2Split<>(SB), Y12
	VXORPS Y14, Y14, Y14             // zero

q2loop:
	VANDPS (SI), Y13, Y0
	VXORPS Y2, Y2, Y2                // NaN flags
	MOVQ $32, AX

q2max:
	VANDPS (SI)(AX*1), Y13, Y1
	VCMPPS $3, Y1, Y1, Y3
	VORPS Y3, Y2, Y2
	VMAXPS Y1, Y0, Y0
	ADDQ $32, AX
	CMPQ AX, $512
	JLT  q2max

	VCMPPS $3, Y0, Y0, Y3            // the first vector's NaNs
	VORPS Y3, Y2, Y2
	VEXTRACTF128 $1, Y0, X1
	VMAXPS X1, X0, X0
	VPERMILPS $0x4e, X0, X1
	VMAXPS X1, X0, X0
	VPERMILPS $0xb1, X0, X1
	VMAXPS X1, X0, X0
	VPTEST Y2, Y2
	JZ   q2finite
	MOVL $0x7fc00000, AX             // NaN
	VMOVD AX, X0

q2finite:
	VUCOMISS X14, X0
	JNE  q2nonzero
	JP   q2nonzero
	VMOVDQU Y14, (DI)
	VMOVDQU Y14, 32(DI)
	VMOVDQU Y14, 64(DI)
	VMOVDQU Y14, 96(DI)
	MOVL $0, (R8)
	MOVL $0, (R9)
	JMP  q2next

q2nonzero:
	MOVL $0x42fe0000, AX             // 127.0
	VMOVD AX, X1
	VDIVSS X1, X0, X0
	VMOVSS X0, (R8)
	VBROADCASTSS X0, Y6
	VXORPS Y5, Y5, Y5                // integer sum

// Quantize the 8 values at off(SI) into y (int32), adding them to Y5.
#define Q2ONE(off, y) \
	VMOVUPS off(SI), y; \
	VDIVPS Y6, y, y; \
	VANDPS Y7, y, Y4; \
	VORPS Y8, Y4, Y4; \
	VADDPS Y4, y, y; \
	VCVTTPS2DQ y, y; \
	VPMINSD Y9, y, y; \
	VPMAXSD Y10, y, y; \
	VPADDD y, Y5, Y5

	// 32 values at a time: pack to bytes, restore column order, split.
	Q2ONE(0, Y0)
	Q2ONE(32, Y1)
	Q2ONE(64, Y2)
	Q2ONE(96, Y3)
	VPACKSSDW Y1, Y0, Y0
	VPACKSSDW Y3, Y2, Y2
	VPACKSSWB Y2, Y0, Y0
	VPERMD Y0, Y11, Y0
	VPSHUFB Y12, Y0, Y0
	VPERMQ $0xd8, Y0, Y0
	VMOVDQU X0, 0(DI)
	VEXTRACTI128 $1, Y0, 64(DI)

	Q2ONE(128, Y0)
	Q2ONE(160, Y1)
	Q2ONE(192, Y2)
	Q2ONE(224, Y3)
	VPACKSSDW Y1, Y0, Y0
	VPACKSSDW Y3, Y2, Y2
	VPACKSSWB Y2, Y0, Y0
	VPERMD Y0, Y11, Y0
	VPSHUFB Y12, Y0, Y0
	VPERMQ $0xd8, Y0, Y0
	VMOVDQU X0, 16(DI)
	VEXTRACTI128 $1, Y0, 80(DI)

	Q2ONE(256, Y0)
	Q2ONE(288, Y1)
	Q2ONE(320, Y2)
	Q2ONE(352, Y3)
	VPACKSSDW Y1, Y0, Y0
	VPACKSSDW Y3, Y2, Y2
	VPACKSSWB Y2, Y0, Y0
	VPERMD Y0, Y11, Y0
	VPSHUFB Y12, Y0, Y0
	VPERMQ $0xd8, Y0, Y0
	VMOVDQU X0, 32(DI)
	VEXTRACTI128 $1, Y0, 96(DI)

	Q2ONE(384, Y0)
	Q2ONE(416, Y1)
	Q2ONE(448, Y2)
	Q2ONE(480, Y3)
	VPACKSSDW Y1, Y0, Y0
	VPACKSSDW Y3, Y2, Y2
	VPACKSSWB Y2, Y0, Y0
	VPERMD Y0, Y11, Y0
	VPSHUFB Y12, Y0, Y0
	VPERMQ $0xd8, Y0, Y0
	VMOVDQU X0, 48(DI)
	VEXTRACTI128 $1, Y0, 112(DI)

	VEXTRACTI128 $1, Y5, X1
	VPADDD X1, X5, X5
	VPSHUFD $0x4e, X5, X1
	VPADDD X1, X5, X5
	VPSHUFD $0xb1, X5, X1
	VPADDD X1, X5, X5
	VMOVD X5, (R9)

q2next:
	ADDQ $512, SI
	SUBQ $-128, DI
	ADDQ $4, R8
	ADDQ $4, R9
	DECQ CX
	JNZ  q2loop

	VZEROUPPER
	RET

// Dword order that puts the bytes of vpackssdw+vpacksswb back in column order.
DATA q2PermIdx<>+0(SB)/8, $0x0000000400000000
DATA q2PermIdx<>+8(SB)/8, $0x0000000500000001
DATA q2PermIdx<>+16(SB)/8, $0x0000000600000002
DATA q2PermIdx<>+24(SB)/8, $0x0000000700000003
GLOBL q2PermIdx<>(SB), RODATA|NOPTR, $32

// Within 16 bytes: the even ones, then the odd ones.
DATA q2Split<>+0(SB)/8, $0x0e0c0a0806040200
DATA q2Split<>+8(SB)/8, $0x0f0d0b0907050301
GLOBL q2Split<>(SB), RODATA|NOPTR, $16

// Byte i is 2*e2m1(code i) as a signed byte.
DATA axpy2Doubled<>+0(SB)/8, $0x0c08060403020100
DATA axpy2Doubled<>+8(SB)/8, $0xf4f8fafcfdfeff00
GLOBL axpy2Doubled<>(SB), RODATA|NOPTR, $16

// func axpyCodes128AVX2(acc *float32, codes *byte, coef *float32, groups int)
//
// axpyCodes128 of dot_amd64.s on 256-bit registers: the 128 weights of a
// group are widened to signed bytes in a 128-byte frame (the order of
// axpyCodesGo: low nibbles, then high ones), then converted 8 at a time.
TEXT ·axpyCodes128AVX2(SB), NOSPLIT, $128-32
	MOVQ acc+0(FP), DI
	MOVQ codes+8(FP), SI
	MOVQ coef+16(FP), R8
	MOVQ groups+24(FP), CX
	VBROADCASTI128 axpy2Doubled<>(SB), Y15
	MOVL $0x0f0f0f0f, AX
	VMOVD AX, X14
	VPBROADCASTD X14, Y14

axpy2loop:
	VMOVDQU (SI), Y0
	VPSRLW $4, Y0, Y1
	VPAND Y14, Y0, Y0
	VPAND Y14, Y1, Y1
	VPSHUFB Y0, Y15, Y0
	VPSHUFB Y1, Y15, Y1
	VMOVDQU 32(SI), Y2
	VPSRLW $4, Y2, Y3
	VPAND Y14, Y2, Y2
	VPAND Y14, Y3, Y3
	VPSHUFB Y2, Y15, Y2
	VPSHUFB Y3, Y15, Y3
	VMOVDQU Y0, 0(SP)
	VMOVDQU Y2, 32(SP)
	VMOVDQU Y1, 64(SP)
	VMOVDQU Y3, 96(SP)
	VBROADCASTSS (R8), Y13

#define AXPY8(off, aoff) \
	VPMOVSXBD off(SP), Y4; \
	VCVTDQ2PS Y4, Y4; \
	VMOVUPS aoff(DI), Y5; \
	VFMADD231PS Y4, Y13, Y5; \
	VMOVUPS Y5, aoff(DI)

	AXPY8(0, 0)
	AXPY8(8, 32)
	AXPY8(16, 64)
	AXPY8(24, 96)
	AXPY8(32, 128)
	AXPY8(40, 160)
	AXPY8(48, 192)
	AXPY8(56, 224)
	AXPY8(64, 256)
	AXPY8(72, 288)
	AXPY8(80, 320)
	AXPY8(88, 352)
	AXPY8(96, 384)
	AXPY8(104, 416)
	AXPY8(112, 448)
	AXPY8(120, 480)

	ADDQ $64, SI
	ADDQ $4, R8
	ADDQ $512, DI
	DECQ CX
	JNZ  axpy2loop

	VZEROUPPER
	RET
