#include "textflag.h"

// Float32 kernels for AVX2 + FMA, as float_avx512_amd64.s on 256-bit
// registers. Lengths are multiples of 8.

#define CONST8(name, bits) \
	DATA name<>+0(SB)/4, $bits; DATA name<>+4(SB)/4, $bits; \
	DATA name<>+8(SB)/4, $bits; DATA name<>+12(SB)/4, $bits; \
	DATA name<>+16(SB)/4, $bits; DATA name<>+20(SB)/4, $bits; \
	DATA name<>+24(SB)/4, $bits; DATA name<>+28(SB)/4, $bits; \
	GLOBL name<>(SB), RODATA|NOPTR, $32

CONST8(expLo, 0xc2ae0000)
CONST8(expHi, 0x42b00000)
CONST8(expLog2e, 0x3fb8aa3b)
CONST8(expLn2Hi, 0x3f318000)
CONST8(expLn2Lo, 0xb95e8083)
CONST8(expC7, 0x39500d01)
CONST8(expC6, 0x3ab60b61)
CONST8(expC5, 0x3c088889)
CONST8(expC4, 0x3d2aaaab)
CONST8(expC3, 0x3e2aaaab)
CONST8(expC2, 0x3f000000)
CONST8(expOne, 0x3f800000)
CONST8(expBias, 0x0000007f)

#define HSUM8(y, x, tx) \
	VEXTRACTF128 $1, y, tx; \
	VADDPS tx, x, x; \
	VHADDPS x, x, x; \
	VHADDPS x, x, x

// func dotF32AVX2(a, b *float32, n int) float32
TEXT ·dotF32AVX2(SB), NOSPLIT, $0-28
	MOVQ a+0(FP), SI
	MOVQ b+8(FP), DI
	MOVQ n+16(FP), CX
	VXORPS Y0, Y0, Y0
	VXORPS Y1, Y1, Y1
	VXORPS Y2, Y2, Y2
	VXORPS Y3, Y3, Y3
	CMPQ CX, $32
	JLT  dot8

dot32:
	VMOVUPS (SI), Y4
	VMOVUPS 32(SI), Y5
	VMOVUPS 64(SI), Y6
	VMOVUPS 96(SI), Y7
	VFMADD231PS (DI), Y4, Y0
	VFMADD231PS 32(DI), Y5, Y1
	VFMADD231PS 64(DI), Y6, Y2
	VFMADD231PS 96(DI), Y7, Y3
	ADDQ $128, SI
	ADDQ $128, DI
	SUBQ $32, CX
	CMPQ CX, $32
	JGE  dot32

dot8:
	TESTQ CX, CX
	JZ   dotdone
	VMOVUPS (SI), Y4
	VFMADD231PS (DI), Y4, Y0
	ADDQ $32, SI
	ADDQ $32, DI
	SUBQ $8, CX
	JMP  dot8

dotdone:
	VADDPS Y1, Y0, Y0
	VADDPS Y3, Y2, Y2
	VADDPS Y2, Y0, Y0
	HSUM8(Y0, X0, X1)
	VMOVSS X0, ret+24(FP)
	VZEROUPPER
	RET

// func dots4F32AVX2(q, rows *float32, stride, n int, out *float32)
TEXT ·dots4F32AVX2(SB), NOSPLIT, $0-40
	MOVQ q+0(FP), SI
	MOVQ rows+8(FP), R8
	MOVQ stride+16(FP), AX
	MOVQ n+24(FP), CX
	SHLQ $2, AX
	LEAQ (R8)(AX*1), R9
	LEAQ (R8)(AX*2), R10
	LEAQ (R9)(AX*2), R11
	VXORPS Y0, Y0, Y0
	VXORPS Y1, Y1, Y1
	VXORPS Y2, Y2, Y2
	VXORPS Y3, Y3, Y3
	VXORPS Y4, Y4, Y4
	VXORPS Y5, Y5, Y5
	VXORPS Y6, Y6, Y6
	VXORPS Y7, Y7, Y7
	CMPQ CX, $16
	JLT  d4one

d4two:
	VMOVUPS (SI), Y8
	VMOVUPS 32(SI), Y9
	VFMADD231PS (R8), Y8, Y0
	VFMADD231PS (R9), Y8, Y1
	VFMADD231PS (R10), Y8, Y2
	VFMADD231PS (R11), Y8, Y3
	VFMADD231PS 32(R8), Y9, Y4
	VFMADD231PS 32(R9), Y9, Y5
	VFMADD231PS 32(R10), Y9, Y6
	VFMADD231PS 32(R11), Y9, Y7
	ADDQ $64, SI
	ADDQ $64, R8
	ADDQ $64, R9
	ADDQ $64, R10
	ADDQ $64, R11
	SUBQ $16, CX
	CMPQ CX, $16
	JGE  d4two

d4one:
	TESTQ CX, CX
	JZ   d4done
	VMOVUPS (SI), Y8
	VFMADD231PS (R8), Y8, Y0
	VFMADD231PS (R9), Y8, Y1
	VFMADD231PS (R10), Y8, Y2
	VFMADD231PS (R11), Y8, Y3

d4done:
	VADDPS Y4, Y0, Y0
	VADDPS Y5, Y1, Y1
	VADDPS Y6, Y2, Y2
	VADDPS Y7, Y3, Y3
	VHADDPS Y1, Y0, Y0
	VHADDPS Y3, Y2, Y2
	VHADDPS Y2, Y0, Y0
	VEXTRACTF128 $1, Y0, X1
	VADDPS X1, X0, X0
	MOVQ out+32(FP), AX
	VMOVUPS X0, (AX)
	VZEROUPPER
	RET

// func axpy4F32AVX2(dst, rows *float32, stride, n int, coef *float32)
TEXT ·axpy4F32AVX2(SB), NOSPLIT, $0-40
	MOVQ dst+0(FP), DI
	MOVQ rows+8(FP), R8
	MOVQ stride+16(FP), AX
	MOVQ n+24(FP), CX
	MOVQ coef+32(FP), DX
	SHLQ $2, AX
	LEAQ (R8)(AX*1), R9
	LEAQ (R8)(AX*2), R10
	LEAQ (R9)(AX*2), R11
	VBROADCASTSS (DX), Y12
	VBROADCASTSS 4(DX), Y13
	VBROADCASTSS 8(DX), Y14
	VBROADCASTSS 12(DX), Y15

a4loop:
	VMOVUPS (DI), Y0
	VFMADD231PS (R8), Y12, Y0
	VFMADD231PS (R9), Y13, Y0
	VFMADD231PS (R10), Y14, Y0
	VFMADD231PS (R11), Y15, Y0
	VMOVUPS Y0, (DI)
	ADDQ $32, DI
	ADDQ $32, R8
	ADDQ $32, R9
	ADDQ $32, R10
	ADDQ $32, R11
	SUBQ $8, CX
	JNZ  a4loop

	VZEROUPPER
	RET

// y = exp(y) as EXP16 of float_avx512_amd64.s; n and r are temporaries.
#define EXP8(y, n, r) \
	VMOVUPS expLo<>(SB), n; \
	VMAXPS y, n, y; \
	VMOVUPS expHi<>(SB), n; \
	VMINPS y, n, y; \
	VMULPS expLog2e<>(SB), y, n; \
	VROUNDPS $0, n, n; \
	VMOVAPS y, r; \
	VFNMADD231PS expLn2Hi<>(SB), n, r; \
	VFNMADD231PS expLn2Lo<>(SB), n, r; \
	VMOVUPS expC7<>(SB), y; \
	VFMADD213PS expC6<>(SB), r, y; \
	VFMADD213PS expC5<>(SB), r, y; \
	VFMADD213PS expC4<>(SB), r, y; \
	VFMADD213PS expC3<>(SB), r, y; \
	VFMADD213PS expC2<>(SB), r, y; \
	VFMADD213PS expOne<>(SB), r, y; \
	VFMADD213PS expOne<>(SB), r, y; \
	VCVTPS2DQ n, n; \
	VPADDD expBias<>(SB), n, n; \
	VPSLLD $23, n, n; \
	VMULPS n, y, y

// func expF32AVX2(dst, src *float32, n int, m float32) float32
TEXT ·expF32AVX2(SB), NOSPLIT, $0-36
	MOVQ dst+0(FP), DI
	MOVQ src+8(FP), SI
	MOVQ n+16(FP), CX
	VBROADCASTSS m+24(FP), Y15
	VXORPS Y0, Y0, Y0

exploop:
	VMOVUPS (SI), Y1
	VSUBPS Y15, Y1, Y1
	EXP8(Y1, Y2, Y3)
	VMOVUPS Y1, (DI)
	VADDPS Y1, Y0, Y0
	ADDQ $32, SI
	ADDQ $32, DI
	SUBQ $8, CX
	JNZ  exploop

	HSUM8(Y0, X0, X1)
	VMOVSS X0, ret+32(FP)
	VZEROUPPER
	RET

// func siluMulF32AVX2(dst, gate, up *float32, n int)
TEXT ·siluMulF32AVX2(SB), NOSPLIT, $0-32
	MOVQ dst+0(FP), DI
	MOVQ gate+8(FP), SI
	MOVQ up+16(FP), DX
	MOVQ n+24(FP), CX
	VXORPS Y15, Y15, Y15

siluloop:
	VMOVUPS (SI), Y0
	VSUBPS Y0, Y15, Y1
	EXP8(Y1, Y2, Y3)
	VADDPS expOne<>(SB), Y1, Y1
	VMULPS (DX), Y0, Y0
	VDIVPS Y1, Y0, Y0
	VMOVUPS Y0, (DI)
	ADDQ $32, SI
	ADDQ $32, DX
	ADDQ $32, DI
	SUBQ $8, CX
	JNZ  siluloop

	VZEROUPPER
	RET

// func maxF32AVX2(x *float32, n int) float32
TEXT ·maxF32AVX2(SB), NOSPLIT, $0-20
	MOVQ x+0(FP), SI
	MOVQ n+8(FP), CX
	VMOVUPS (SI), Y0
	ADDQ $32, SI
	SUBQ $8, CX
	JZ   maxdone

maxloop:
	VMAXPS (SI), Y0, Y0
	ADDQ $32, SI
	SUBQ $8, CX
	JNZ  maxloop

maxdone:
	VEXTRACTF128 $1, Y0, X1
	VMAXPS X1, X0, X0
	VPERMILPS $0x4e, X0, X1
	VMAXPS X1, X0, X0
	VPERMILPS $0xb1, X0, X1
	VMAXPS X1, X0, X0
	VMOVSS X0, ret+16(FP)
	VZEROUPPER
	RET

// func bf16ToF32AVX2(dst *float32, src *uint16, n int)
TEXT ·bf16ToF32AVX2(SB), NOSPLIT, $0-24
	MOVQ dst+0(FP), DI
	MOVQ src+8(FP), SI
	MOVQ n+16(FP), CX

bfloop:
	VPMOVZXWD (SI), Y0
	VPSLLD $16, Y0, Y0
	VMOVDQU Y0, (DI)
	ADDQ $16, SI
	ADDQ $32, DI
	SUBQ $8, CX
	JNZ  bfloop
	VZEROUPPER
	RET
