#include "textflag.h"

// Float32 kernels, AVX-512: dot products, multi-row dot and axpy (attention),
// and exp (softmax, SiLU). Lengths are multiples of 16; the Go wrappers do
// the rest.

// Sum the 16 lanes of zmm z (clobbering the temporary t) into x-lane 0.
#define HSUM16(z, y, x, ty, tx) \
	VEXTRACTF64X4 $1, z, ty; \
	VADDPS ty, y, y; \
	VEXTRACTF128 $1, y, tx; \
	VADDPS tx, x, x; \
	VHADDPS x, x, x; \
	VHADDPS x, x, x

// func dotF32AVX512(a, b *float32, n int) float32
TEXT ·dotF32AVX512(SB), NOSPLIT, $0-28
	MOVQ a+0(FP), SI
	MOVQ b+8(FP), DI
	MOVQ n+16(FP), CX
	VPXORD Z0, Z0, Z0
	VPXORD Z1, Z1, Z1
	VPXORD Z2, Z2, Z2
	VPXORD Z3, Z3, Z3
	CMPQ CX, $64
	JLT  dot16

dot64:
	VMOVUPS (SI), Z4
	VMOVUPS 64(SI), Z5
	VMOVUPS 128(SI), Z6
	VMOVUPS 192(SI), Z7
	VFMADD231PS (DI), Z4, Z0
	VFMADD231PS 64(DI), Z5, Z1
	VFMADD231PS 128(DI), Z6, Z2
	VFMADD231PS 192(DI), Z7, Z3
	ADDQ $256, SI
	ADDQ $256, DI
	SUBQ $64, CX
	CMPQ CX, $64
	JGE  dot64

dot16:
	TESTQ CX, CX
	JZ   dotdone
	VMOVUPS (SI), Z4
	VFMADD231PS (DI), Z4, Z0
	ADDQ $64, SI
	ADDQ $64, DI
	SUBQ $16, CX
	JMP  dot16

dotdone:
	VADDPS Z1, Z0, Z0
	VADDPS Z3, Z2, Z2
	VADDPS Z2, Z0, Z0
	HSUM16(Z0, Y0, X0, Y1, X1)
	VMOVSS X0, ret+24(FP)
	VZEROUPPER
	RET

// func dots4F32AVX512(q, rows *float32, stride, n int, out *float32)
//
// out[i] = sum_k q[k] * rows[i*stride+k] for i < 4.
TEXT ·dots4F32AVX512(SB), NOSPLIT, $0-40
	MOVQ q+0(FP), SI
	MOVQ rows+8(FP), R8
	MOVQ stride+16(FP), AX
	MOVQ n+24(FP), CX
	SHLQ $2, AX
	LEAQ (R8)(AX*1), R9
	LEAQ (R8)(AX*2), R10
	LEAQ (R9)(AX*2), R11
	VPXORD Z0, Z0, Z0
	VPXORD Z1, Z1, Z1
	VPXORD Z2, Z2, Z2
	VPXORD Z3, Z3, Z3
	VPXORD Z4, Z4, Z4
	VPXORD Z5, Z5, Z5
	VPXORD Z6, Z6, Z6
	VPXORD Z7, Z7, Z7
	CMPQ CX, $32
	JLT  d4one

d4two:
	VMOVUPS (SI), Z8
	VMOVUPS 64(SI), Z9
	VFMADD231PS (R8), Z8, Z0
	VFMADD231PS (R9), Z8, Z1
	VFMADD231PS (R10), Z8, Z2
	VFMADD231PS (R11), Z8, Z3
	VFMADD231PS 64(R8), Z9, Z4
	VFMADD231PS 64(R9), Z9, Z5
	VFMADD231PS 64(R10), Z9, Z6
	VFMADD231PS 64(R11), Z9, Z7
	ADDQ $128, SI
	ADDQ $128, R8
	ADDQ $128, R9
	ADDQ $128, R10
	ADDQ $128, R11
	SUBQ $32, CX
	CMPQ CX, $32
	JGE  d4two

d4one:
	TESTQ CX, CX
	JZ   d4done
	VMOVUPS (SI), Z8
	VFMADD231PS (R8), Z8, Z0
	VFMADD231PS (R9), Z8, Z1
	VFMADD231PS (R10), Z8, Z2
	VFMADD231PS (R11), Z8, Z3

d4done:
	VADDPS Z4, Z0, Z0
	VADDPS Z5, Z1, Z1
	VADDPS Z6, Z2, Z2
	VADDPS Z7, Z3, Z3
	VEXTRACTF64X4 $1, Z0, Y8
	VADDPS Y8, Y0, Y0
	VEXTRACTF64X4 $1, Z1, Y9
	VADDPS Y9, Y1, Y1
	VEXTRACTF64X4 $1, Z2, Y10
	VADDPS Y10, Y2, Y2
	VEXTRACTF64X4 $1, Z3, Y11
	VADDPS Y11, Y3, Y3
	VHADDPS Y1, Y0, Y0
	VHADDPS Y3, Y2, Y2
	VHADDPS Y2, Y0, Y0
	VEXTRACTF128 $1, Y0, X1
	VADDPS X1, X0, X0
	MOVQ out+32(FP), AX
	VMOVUPS X0, (AX)
	VZEROUPPER
	RET

// func axpy4F32AVX512(dst, rows *float32, stride, n int, coef *float32)
//
// dst[k] += sum_i coef[i] * rows[i*stride+k] for i < 4.
TEXT ·axpy4F32AVX512(SB), NOSPLIT, $0-40
	MOVQ dst+0(FP), DI
	MOVQ rows+8(FP), R8
	MOVQ stride+16(FP), AX
	MOVQ n+24(FP), CX
	MOVQ coef+32(FP), DX
	SHLQ $2, AX
	LEAQ (R8)(AX*1), R9
	LEAQ (R8)(AX*2), R10
	LEAQ (R9)(AX*2), R11
	VBROADCASTSS (DX), Z28
	VBROADCASTSS 4(DX), Z29
	VBROADCASTSS 8(DX), Z30
	VBROADCASTSS 12(DX), Z31
	CMPQ CX, $32
	JLT  a4one

a4two:
	VMOVUPS (DI), Z0
	VMOVUPS 64(DI), Z1
	VFMADD231PS (R8), Z28, Z0
	VFMADD231PS 64(R8), Z28, Z1
	VFMADD231PS (R9), Z29, Z0
	VFMADD231PS 64(R9), Z29, Z1
	VFMADD231PS (R10), Z30, Z0
	VFMADD231PS 64(R10), Z30, Z1
	VFMADD231PS (R11), Z31, Z0
	VFMADD231PS 64(R11), Z31, Z1
	VMOVUPS Z0, (DI)
	VMOVUPS Z1, 64(DI)
	ADDQ $128, DI
	ADDQ $128, R8
	ADDQ $128, R9
	ADDQ $128, R10
	ADDQ $128, R11
	SUBQ $32, CX
	CMPQ CX, $32
	JGE  a4two

a4one:
	TESTQ CX, CX
	JZ   a4done
	VMOVUPS (DI), Z0
	VFMADD231PS (R8), Z28, Z0
	VFMADD231PS (R9), Z29, Z0
	VFMADD231PS (R10), Z30, Z0
	VFMADD231PS (R11), Z31, Z0
	VMOVUPS Z0, (DI)

a4done:
	VZEROUPPER
	RET

// Constants of exp: clamp range, Cody-Waite split of ln 2, and the Taylor
// coefficients 1/k! up to k = 7 (|r| <= ln2/2 leaves a truncation error
// below 5e-9 relative).
#define EXP_CONSTANTS \
	MOVL $0xc2ae0000, AX; VPBROADCASTD AX, Z20; \
	MOVL $0x42b00000, AX; VPBROADCASTD AX, Z21; \
	MOVL $0x3fb8aa3b, AX; VPBROADCASTD AX, Z22; \
	MOVL $0x3f318000, AX; VPBROADCASTD AX, Z23; \
	MOVL $0xb95e8083, AX; VPBROADCASTD AX, Z24; \
	MOVL $0x39500d01, AX; VPBROADCASTD AX, Z25; \
	MOVL $0x3ab60b61, AX; VPBROADCASTD AX, Z26; \
	MOVL $0x3c088889, AX; VPBROADCASTD AX, Z27; \
	MOVL $0x3d2aaaab, AX; VPBROADCASTD AX, Z28; \
	MOVL $0x3e2aaaab, AX; VPBROADCASTD AX, Z29; \
	MOVL $0x3f000000, AX; VPBROADCASTD AX, Z30; \
	MOVL $0x3f800000, AX; VPBROADCASTD AX, Z31

// y = exp(y), with y clamped to [-87, 88] (a NaN stays NaN); n and r are
// temporaries.
#define EXP16(y, n, r) \
	VMAXPS y, Z20, y; \
	VMINPS y, Z21, y; \
	VMULPS Z22, y, n; \
	VRNDSCALEPS $0, n, n; \
	VMOVAPS y, r; \
	VFNMADD231PS Z23, n, r; \
	VFNMADD231PS Z24, n, r; \
	VMOVAPS Z25, y; \
	VFMADD213PS Z26, r, y; \
	VFMADD213PS Z27, r, y; \
	VFMADD213PS Z28, r, y; \
	VFMADD213PS Z29, r, y; \
	VFMADD213PS Z30, r, y; \
	VFMADD213PS Z31, r, y; \
	VFMADD213PS Z31, r, y; \
	VSCALEFPS n, y, y

// func expF32AVX512(dst, src *float32, n int, m float32) float32
//
// dst[i] = exp(src[i] - m); returns the sum of dst.
TEXT ·expF32AVX512(SB), NOSPLIT, $0-36
	MOVQ dst+0(FP), DI
	MOVQ src+8(FP), SI
	MOVQ n+16(FP), CX
	VBROADCASTSS m+24(FP), Z19
	EXP_CONSTANTS
	VPXORD Z0, Z0, Z0

exploop:
	VMOVUPS (SI), Z1
	VSUBPS Z19, Z1, Z1
	EXP16(Z1, Z2, Z3)
	VMOVUPS Z1, (DI)
	VADDPS Z1, Z0, Z0
	ADDQ $64, SI
	ADDQ $64, DI
	SUBQ $16, CX
	JNZ  exploop

	HSUM16(Z0, Y0, X0, Y1, X1)
	VMOVSS X0, ret+32(FP)
	VZEROUPPER
	RET

// func siluMulF32AVX512(dst, gate, up *float32, n int)
//
// dst[i] = g[i] / (1 + exp(-g[i])) * u[i].
TEXT ·siluMulF32AVX512(SB), NOSPLIT, $0-32
	MOVQ dst+0(FP), DI
	MOVQ gate+8(FP), SI
	MOVQ up+16(FP), DX
	MOVQ n+24(FP), CX
	EXP_CONSTANTS
	VPXORD Z19, Z19, Z19

siluloop:
	VMOVUPS (SI), Z0
	VSUBPS Z0, Z19, Z1               // -g
	EXP16(Z1, Z2, Z3)
	VADDPS Z31, Z1, Z1               // 1 + exp(-g)
	VMULPS (DX), Z0, Z0              // g * u
	VDIVPS Z1, Z0, Z0
	VMOVUPS Z0, (DI)
	ADDQ $64, SI
	ADDQ $64, DX
	ADDQ $64, DI
	SUBQ $16, CX
	JNZ  siluloop

	VZEROUPPER
	RET

// func maxF32AVX512(x *float32, n int) float32
TEXT ·maxF32AVX512(SB), NOSPLIT, $0-20
	MOVQ x+0(FP), SI
	MOVQ n+8(FP), CX
	VMOVUPS (SI), Z0
	ADDQ $64, SI
	SUBQ $16, CX
	JZ   maxdone

maxloop:
	VMAXPS (SI), Z0, Z0
	ADDQ $64, SI
	SUBQ $16, CX
	JNZ  maxloop

maxdone:
	VEXTRACTF64X4 $1, Z0, Y1
	VMAXPS Y1, Y0, Y0
	VEXTRACTF128 $1, Y0, X1
	VMAXPS X1, X0, X0
	VPERMILPS $0x4e, X0, X1
	VMAXPS X1, X0, X0
	VPERMILPS $0xb1, X0, X1
	VMAXPS X1, X0, X0
	VMOVSS X0, ret+16(FP)
	VZEROUPPER
	RET
