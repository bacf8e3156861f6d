#include "textflag.h"

// Decode kernels for AVX2 + FMA machines, group size 128: the arithmetic
// of gemv_avx512_amd64.s on 256-bit registers, 8 groups per batch. The int8
// products use AVX-VNNI's vpdpbusd where the CPU has it (gemvAVXVNNI), else
// vpmaddubsw + vpmaddwd (gemvAVX2): with weights 0..24 and |x| <= 127 the
// four 16-bit partial sums of a lane stay below 2^15.

DATA gemv2Biased<>+0(SB)/8, $0x181412100f0e0d0c
DATA gemv2Biased<>+8(SB)/8, $0x00040608090a0b0c
GLOBL gemv2Biased<>(SB), RODATA|NOPTR, $16

#define CONST8(name, bits) \
	DATA name<>+0(SB)/4, $bits; DATA name<>+4(SB)/4, $bits; \
	DATA name<>+8(SB)/4, $bits; DATA name<>+12(SB)/4, $bits; \
	DATA name<>+16(SB)/4, $bits; DATA name<>+20(SB)/4, $bits; \
	DATA name<>+24(SB)/4, $bits; DATA name<>+28(SB)/4, $bits; \
	GLOBL name<>(SB), RODATA|NOPTR, $32

CONST8(gemv2Twelve, 0x0000000c)
CONST8(gemv2Mag, 0x0000007f)
CONST8(gemv2Sign, 0x00000080)
CONST8(gemv2Exp, 0x7b800000)
CONST8(gemv2NaN, 0x7fc00000)

// Widen the 64 code bytes at off(SI): Y8/Y10 the even columns (activations
// at 0 and 32 of the group's), Y9/Y11 the odd ones (64 and 96), as biased
// bytes. The line 4 KB ahead is prefetched, as in the AVX-512 kernels.
#define WIDEN(off, off32) \
	PREFETCHT0 4096+off(SI); \
	VMOVDQU off(SI), Y9; \
	VPAND Y14, Y9, Y8; \
	VPSRLW $4, Y9, Y9; \
	VPAND Y14, Y9, Y9; \
	VPSHUFB Y8, Y15, Y8; \
	VPSHUFB Y9, Y15, Y9; \
	VMOVDQU off32(SI), Y11; \
	VPAND Y14, Y11, Y10; \
	VPSRLW $4, Y11, Y11; \
	VPAND Y14, Y11, Y11; \
	VPSHUFB Y10, Y15, Y10; \
	VPSHUFB Y11, Y15, Y11

// Group products with vpmaddubsw: the four 16-bit sums, then pairs of
// them into the 32-bit lanes of acc.
#define MADD(x0, x1, x2, x3, acc) \
	VPMADDUBSW x0(DI), Y8, Y8; \
	VPMADDUBSW x1(DI), Y10, Y10; \
	VPMADDUBSW x2(DI), Y9, Y9; \
	VPMADDUBSW x3(DI), Y11, Y11; \
	VPADDW Y10, Y8, Y8; \
	VPADDW Y11, Y9, Y9; \
	VPADDW Y9, Y8, Y8; \
	VPMADDWD Y13, Y8, acc

#define PAIR_DQ(a, b) \
	VPUNPCKLDQ b, a, Y12; \
	VPUNPCKHDQ b, a, a; \
	VPADDD Y12, a, a

#define PAIR_QDQ(a, b) \
	VPUNPCKLQDQ b, a, Y12; \
	VPUNPCKHQDQ b, a, a; \
	VPADDD Y12, a, a

// func gemvAVXVNNI(codes *byte, scales *byte, rowScale *float32, rows, groups int, x *int8, xs *float32, xsum *int32, out *float32)
//
// The frame holds the row's float sums per lane (96(SP)) and, for a batch
// of fewer than 8 groups, its scale bytes (0(SP)), activation scales
// (32(SP)) and sums (64(SP)) copied and zero-padded, so that nothing past
// the arrays is read.
TEXT ·gemvAVXVNNI(SB), NOSPLIT, $128-72
	MOVQ codes+0(FP), SI
	MOVQ scales+8(FP), R12
	MOVQ rowScale+16(FP), DX
	MOVQ rows+24(FP), CX
	MOVQ out+64(FP), R14
	VBROADCASTI128 gemv2Biased<>(SB), Y15
	MOVL $0x0f0f0f0f, AX
	VMOVD AX, X14
	VPBROADCASTD X14, Y14
	MOVL $0x00010001, AX
	VMOVD AX, X13
	VPBROADCASTD X13, Y13

gemvAVXVNNI_row:
	MOVQ x+40(FP), DI
	MOVQ xs+48(FP), R8
	MOVQ xsum+56(FP), R9
	VXORPS Y0, Y0, Y0
	VMOVUPS Y0, 96(SP)
	MOVQ groups+32(FP), R11

gemvAVXVNNI_batch:
	MOVQ R11, R13
	CMPQ R13, $8
	JLE  gemvAVXVNNI_counted
	MOVQ $8, R13

gemvAVXVNNI_counted:
	VPXOR Y0, Y0, Y0
	VPXOR Y1, Y1, Y1
	VPXOR Y2, Y2, Y2
	VPXOR Y3, Y3, Y3
	VPXOR Y4, Y4, Y4
	VPXOR Y5, Y5, Y5
	VPXOR Y6, Y6, Y6
	VPXOR Y7, Y7, Y7
	WIDEN(0, 32)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x3D; BYTE $0x50; BYTE $0x87; BYTE $0x00; BYTE $0x00; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm0, ymm8, 0(DI)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x2D; BYTE $0x50; BYTE $0x87; BYTE $0x20; BYTE $0x00; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm0, ymm10, 32(DI)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x35; BYTE $0x50; BYTE $0x87; BYTE $0x40; BYTE $0x00; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm0, ymm9, 64(DI)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x25; BYTE $0x50; BYTE $0x87; BYTE $0x60; BYTE $0x00; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm0, ymm11, 96(DI)
	CMPQ R13, $1
	JEQ  gemvAVXVNNI_reduce
	WIDEN(64, 96)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x3D; BYTE $0x50; BYTE $0x8F; BYTE $0x80; BYTE $0x00; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm1, ymm8, 128(DI)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x2D; BYTE $0x50; BYTE $0x8F; BYTE $0xA0; BYTE $0x00; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm1, ymm10, 160(DI)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x35; BYTE $0x50; BYTE $0x8F; BYTE $0xC0; BYTE $0x00; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm1, ymm9, 192(DI)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x25; BYTE $0x50; BYTE $0x8F; BYTE $0xE0; BYTE $0x00; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm1, ymm11, 224(DI)
	CMPQ R13, $2
	JEQ  gemvAVXVNNI_reduce
	WIDEN(128, 160)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x3D; BYTE $0x50; BYTE $0x97; BYTE $0x00; BYTE $0x01; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm2, ymm8, 256(DI)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x2D; BYTE $0x50; BYTE $0x97; BYTE $0x20; BYTE $0x01; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm2, ymm10, 288(DI)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x35; BYTE $0x50; BYTE $0x97; BYTE $0x40; BYTE $0x01; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm2, ymm9, 320(DI)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x25; BYTE $0x50; BYTE $0x97; BYTE $0x60; BYTE $0x01; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm2, ymm11, 352(DI)
	CMPQ R13, $3
	JEQ  gemvAVXVNNI_reduce
	WIDEN(192, 224)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x3D; BYTE $0x50; BYTE $0x9F; BYTE $0x80; BYTE $0x01; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm3, ymm8, 384(DI)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x2D; BYTE $0x50; BYTE $0x9F; BYTE $0xA0; BYTE $0x01; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm3, ymm10, 416(DI)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x35; BYTE $0x50; BYTE $0x9F; BYTE $0xC0; BYTE $0x01; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm3, ymm9, 448(DI)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x25; BYTE $0x50; BYTE $0x9F; BYTE $0xE0; BYTE $0x01; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm3, ymm11, 480(DI)
	CMPQ R13, $4
	JEQ  gemvAVXVNNI_reduce
	WIDEN(256, 288)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x3D; BYTE $0x50; BYTE $0xA7; BYTE $0x00; BYTE $0x02; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm4, ymm8, 512(DI)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x2D; BYTE $0x50; BYTE $0xA7; BYTE $0x20; BYTE $0x02; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm4, ymm10, 544(DI)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x35; BYTE $0x50; BYTE $0xA7; BYTE $0x40; BYTE $0x02; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm4, ymm9, 576(DI)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x25; BYTE $0x50; BYTE $0xA7; BYTE $0x60; BYTE $0x02; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm4, ymm11, 608(DI)
	CMPQ R13, $5
	JEQ  gemvAVXVNNI_reduce
	WIDEN(320, 352)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x3D; BYTE $0x50; BYTE $0xAF; BYTE $0x80; BYTE $0x02; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm5, ymm8, 640(DI)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x2D; BYTE $0x50; BYTE $0xAF; BYTE $0xA0; BYTE $0x02; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm5, ymm10, 672(DI)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x35; BYTE $0x50; BYTE $0xAF; BYTE $0xC0; BYTE $0x02; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm5, ymm9, 704(DI)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x25; BYTE $0x50; BYTE $0xAF; BYTE $0xE0; BYTE $0x02; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm5, ymm11, 736(DI)
	CMPQ R13, $6
	JEQ  gemvAVXVNNI_reduce
	WIDEN(384, 416)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x3D; BYTE $0x50; BYTE $0xB7; BYTE $0x00; BYTE $0x03; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm6, ymm8, 768(DI)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x2D; BYTE $0x50; BYTE $0xB7; BYTE $0x20; BYTE $0x03; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm6, ymm10, 800(DI)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x35; BYTE $0x50; BYTE $0xB7; BYTE $0x40; BYTE $0x03; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm6, ymm9, 832(DI)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x25; BYTE $0x50; BYTE $0xB7; BYTE $0x60; BYTE $0x03; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm6, ymm11, 864(DI)
	CMPQ R13, $7
	JEQ  gemvAVXVNNI_reduce
	WIDEN(448, 480)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x3D; BYTE $0x50; BYTE $0xBF; BYTE $0x80; BYTE $0x03; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm7, ymm8, 896(DI)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x2D; BYTE $0x50; BYTE $0xBF; BYTE $0xA0; BYTE $0x03; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm7, ymm10, 928(DI)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x35; BYTE $0x50; BYTE $0xBF; BYTE $0xC0; BYTE $0x03; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm7, ymm9, 960(DI)
	BYTE $0xC4; BYTE $0xE2; BYTE $0x25; BYTE $0x50; BYTE $0xBF; BYTE $0xE0; BYTE $0x03; BYTE $0x00; BYTE $0x00 // vpdpbusd ymm7, ymm11, 992(DI)

gemvAVXVNNI_reduce:
	PAIR_DQ(Y0, Y1)
	PAIR_DQ(Y2, Y3)
	PAIR_DQ(Y4, Y5)
	PAIR_DQ(Y6, Y7)
	PAIR_QDQ(Y0, Y2)
	PAIR_QDQ(Y4, Y6)
	VPERM2I128 $0x20, Y4, Y0, Y12
	VPERM2I128 $0x31, Y4, Y0, Y0
	VPADDD Y12, Y0, Y0               // lane g: the biased dot product of group g

	MOVQ R12, BX
	MOVQ R8, R10
	MOVQ R9, R15
	CMPQ R13, $8
	JEQ  gemvAVXVNNI_full
	VXORPS Y1, Y1, Y1
	VMOVDQU Y1, 0(SP)
	VMOVDQU Y1, 32(SP)
	VMOVDQU Y1, 64(SP)
	XORQ AX, AX

gemvAVXVNNI_copy:
	MOVBLZX (R12)(AX*1), BX
	MOVB BX, 0(SP)(AX*1)
	MOVL (R8)(AX*4), BX
	MOVL BX, 32(SP)(AX*4)
	MOVL (R9)(AX*4), BX
	MOVL BX, 64(SP)(AX*4)
	INCQ AX
	CMPQ AX, R13
	JLT  gemvAVXVNNI_copy
	LEAQ 0(SP), BX
	LEAQ 32(SP), R10
	LEAQ 64(SP), R15

gemvAVXVNNI_full:
	VMOVDQU (R15), Y2
	VPMULLD gemv2Twelve<>(SB), Y2, Y2
	VPSUBD Y2, Y0, Y0
	VCVTDQ2PS Y0, Y0
	VPMOVZXBD (BX), Y1               // scale bytes
	VPAND gemv2Mag<>(SB), Y1, Y4
	VPSLLD $20, Y4, Y5
	VMULPS gemv2Exp<>(SB), Y5, Y5     // 2^(e-7) (1 + m/8), subnormals included
	VPAND gemv2Sign<>(SB), Y1, Y6
	VPSLLD $24, Y6, Y6
	VPOR Y6, Y5, Y5
	VPCMPEQD gemv2Mag<>(SB), Y4, Y6
	VMOVUPS gemv2NaN<>(SB), Y7
	VBLENDVPS Y6, Y7, Y5, Y5         // 0x7f and 0xff are NaN
	VMULPS (R10), Y5, Y5
	VMOVUPS 96(SP), Y6
	VFMADD231PS Y5, Y0, Y6
	VMOVUPS Y6, 96(SP)

	MOVQ R13, AX
	SHLQ $6, AX
	ADDQ AX, SI
	SHLQ $1, AX
	ADDQ AX, DI
	ADDQ R13, R12
	LEAQ (R8)(R13*4), R8
	LEAQ (R9)(R13*4), R9
	SUBQ R13, R11
	JNZ  gemvAVXVNNI_batch

	VMOVUPS 96(SP), Y0
	VEXTRACTF128 $1, Y0, X1
	VADDPS X1, X0, X0
	VHADDPS X0, X0, X0
	VHADDPS X0, X0, X0
	VMULSS (DX), X0, X0
	MOVL $0x3f000000, AX
	VMOVD AX, X1
	VMULSS X1, X0, X0
	VMOVSS X0, (R14)
	ADDQ $4, DX
	ADDQ $4, R14
	DECQ CX
	JNZ  gemvAVXVNNI_row

	VZEROUPPER
	RET

// func gemvAVX2(codes *byte, scales *byte, rowScale *float32, rows, groups int, x *int8, xs *float32, xsum *int32, out *float32)
//
// The frame holds the row's float sums per lane (96(SP)) and, for a batch
// of fewer than 8 groups, its scale bytes (0(SP)), activation scales
// (32(SP)) and sums (64(SP)) copied and zero-padded, so that nothing past
// the arrays is read.
TEXT ·gemvAVX2(SB), NOSPLIT, $128-72
	MOVQ codes+0(FP), SI
	MOVQ scales+8(FP), R12
	MOVQ rowScale+16(FP), DX
	MOVQ rows+24(FP), CX
	MOVQ out+64(FP), R14
	VBROADCASTI128 gemv2Biased<>(SB), Y15
	MOVL $0x0f0f0f0f, AX
	VMOVD AX, X14
	VPBROADCASTD X14, Y14
	MOVL $0x00010001, AX
	VMOVD AX, X13
	VPBROADCASTD X13, Y13

gemvAVX2_row:
	MOVQ x+40(FP), DI
	MOVQ xs+48(FP), R8
	MOVQ xsum+56(FP), R9
	VXORPS Y0, Y0, Y0
	VMOVUPS Y0, 96(SP)
	MOVQ groups+32(FP), R11

gemvAVX2_batch:
	MOVQ R11, R13
	CMPQ R13, $8
	JLE  gemvAVX2_counted
	MOVQ $8, R13

gemvAVX2_counted:
	VPXOR Y0, Y0, Y0
	VPXOR Y1, Y1, Y1
	VPXOR Y2, Y2, Y2
	VPXOR Y3, Y3, Y3
	VPXOR Y4, Y4, Y4
	VPXOR Y5, Y5, Y5
	VPXOR Y6, Y6, Y6
	VPXOR Y7, Y7, Y7
	WIDEN(0, 32)
	MADD(0, 32, 64, 96, Y0)
	CMPQ R13, $1
	JEQ  gemvAVX2_reduce
	WIDEN(64, 96)
	MADD(128, 160, 192, 224, Y1)
	CMPQ R13, $2
	JEQ  gemvAVX2_reduce
	WIDEN(128, 160)
	MADD(256, 288, 320, 352, Y2)
	CMPQ R13, $3
	JEQ  gemvAVX2_reduce
	WIDEN(192, 224)
	MADD(384, 416, 448, 480, Y3)
	CMPQ R13, $4
	JEQ  gemvAVX2_reduce
	WIDEN(256, 288)
	MADD(512, 544, 576, 608, Y4)
	CMPQ R13, $5
	JEQ  gemvAVX2_reduce
	WIDEN(320, 352)
	MADD(640, 672, 704, 736, Y5)
	CMPQ R13, $6
	JEQ  gemvAVX2_reduce
	WIDEN(384, 416)
	MADD(768, 800, 832, 864, Y6)
	CMPQ R13, $7
	JEQ  gemvAVX2_reduce
	WIDEN(448, 480)
	MADD(896, 928, 960, 992, Y7)

gemvAVX2_reduce:
	PAIR_DQ(Y0, Y1)
	PAIR_DQ(Y2, Y3)
	PAIR_DQ(Y4, Y5)
	PAIR_DQ(Y6, Y7)
	PAIR_QDQ(Y0, Y2)
	PAIR_QDQ(Y4, Y6)
	VPERM2I128 $0x20, Y4, Y0, Y12
	VPERM2I128 $0x31, Y4, Y0, Y0
	VPADDD Y12, Y0, Y0               // lane g: the biased dot product of group g

	MOVQ R12, BX
	MOVQ R8, R10
	MOVQ R9, R15
	CMPQ R13, $8
	JEQ  gemvAVX2_full
	VXORPS Y1, Y1, Y1
	VMOVDQU Y1, 0(SP)
	VMOVDQU Y1, 32(SP)
	VMOVDQU Y1, 64(SP)
	XORQ AX, AX

gemvAVX2_copy:
	MOVBLZX (R12)(AX*1), BX
	MOVB BX, 0(SP)(AX*1)
	MOVL (R8)(AX*4), BX
	MOVL BX, 32(SP)(AX*4)
	MOVL (R9)(AX*4), BX
	MOVL BX, 64(SP)(AX*4)
	INCQ AX
	CMPQ AX, R13
	JLT  gemvAVX2_copy
	LEAQ 0(SP), BX
	LEAQ 32(SP), R10
	LEAQ 64(SP), R15

gemvAVX2_full:
	VMOVDQU (R15), Y2
	VPMULLD gemv2Twelve<>(SB), Y2, Y2
	VPSUBD Y2, Y0, Y0
	VCVTDQ2PS Y0, Y0
	VPMOVZXBD (BX), Y1               // scale bytes
	VPAND gemv2Mag<>(SB), Y1, Y4
	VPSLLD $20, Y4, Y5
	VMULPS gemv2Exp<>(SB), Y5, Y5     // 2^(e-7) (1 + m/8), subnormals included
	VPAND gemv2Sign<>(SB), Y1, Y6
	VPSLLD $24, Y6, Y6
	VPOR Y6, Y5, Y5
	VPCMPEQD gemv2Mag<>(SB), Y4, Y6
	VMOVUPS gemv2NaN<>(SB), Y7
	VBLENDVPS Y6, Y7, Y5, Y5         // 0x7f and 0xff are NaN
	VMULPS (R10), Y5, Y5
	VMOVUPS 96(SP), Y6
	VFMADD231PS Y5, Y0, Y6
	VMOVUPS Y6, 96(SP)

	MOVQ R13, AX
	SHLQ $6, AX
	ADDQ AX, SI
	SHLQ $1, AX
	ADDQ AX, DI
	ADDQ R13, R12
	LEAQ (R8)(R13*4), R8
	LEAQ (R9)(R13*4), R9
	SUBQ R13, R11
	JNZ  gemvAVX2_batch

	VMOVUPS 96(SP), Y0
	VEXTRACTF128 $1, Y0, X1
	VADDPS X1, X0, X0
	VHADDPS X0, X0, X0
	VHADDPS X0, X0, X0
	VMULSS (DX), X0, X0
	MOVL $0x3f000000, AX
	VMOVD AX, X1
	VMULSS X1, X0, X0
	VMOVSS X0, (R14)
	ADDQ $4, DX
	ADDQ $4, R14
	DECQ CX
	JNZ  gemvAVX2_row

	VZEROUPPER
	RET

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
