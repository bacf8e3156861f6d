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

// func scoresHx4AVX512(q *float32, qStride int, qpe *float32, qpeStride int, heads int, lat, kpe *float32, rowStride, r, dr int, out *float32, outStride int, scale float32)
//
// For every head h < heads and the four cached positions i < 4:
// out[h*outStride+i] = scale * (q[h*qStride:][:r] . lat[i*rowStride:][:r] + qpe[h*qpeStride:][:dr] . kpe[i*rowStride:][:dr])
// (r and dr multiples of 16, strides in floats). Two heads per pass share
// the loads of the four latent rows, which stay in L1 while the heads loop.
TEXT ·scoresHx4AVX512(SB), NOSPLIT, $0-100
	MOVQ q+0(FP), SI
	MOVQ qpe+16(FP), DI
	MOVQ heads+32(FP), CX
	MOVQ out+80(FP), R13
	MOVQ qStride+8(FP), R14
	SHLQ $2, R14
	MOVQ qpeStride+24(FP), R15
	SHLQ $2, R15
	MOVQ outStride+88(FP), AX
	SHLQ $2, AX
	MOVQ AX, outStride+88(FP)        // now in bytes
	VBROADCASTSS scale+96(FP), X15
	CMPQ CX, $2
	JLT  sone

spair:
	VPXORD Z0, Z0, Z0
	VPXORD Z1, Z1, Z1
	VPXORD Z2, Z2, Z2
	VPXORD Z3, Z3, Z3
	VPXORD Z4, Z4, Z4
	VPXORD Z5, Z5, Z5
	VPXORD Z6, Z6, Z6
	VPXORD Z7, Z7, Z7
	LEAQ (SI)(R14*1), AX
	MOVQ lat+40(FP), R8
	MOVQ rowStride+56(FP), BX
	SHLQ $2, BX
	LEAQ (R8)(BX*1), R9
	LEAQ (R8)(BX*2), R10
	LEAQ (R9)(BX*2), R11
	MOVQ r+64(FP), R12
	XORQ DX, DX

slat2:
	VMOVUPS (R8)(DX*1), Z8
	VMOVUPS (R9)(DX*1), Z9
	VMOVUPS (R10)(DX*1), Z10
	VMOVUPS (R11)(DX*1), Z11
	VMOVUPS (SI)(DX*1), Z12
	VFMADD231PS Z8, Z12, Z0
	VFMADD231PS Z9, Z12, Z1
	VFMADD231PS Z10, Z12, Z2
	VFMADD231PS Z11, Z12, Z3
	VMOVUPS (AX)(DX*1), Z13
	VFMADD231PS Z8, Z13, Z4
	VFMADD231PS Z9, Z13, Z5
	VFMADD231PS Z10, Z13, Z6
	VFMADD231PS Z11, Z13, Z7
	ADDQ $64, DX
	SUBQ $16, R12
	JNZ  slat2
	LEAQ (DI)(R15*1), AX
	MOVQ kpe+48(FP), R8
	MOVQ rowStride+56(FP), BX
	SHLQ $2, BX
	LEAQ (R8)(BX*1), R9
	LEAQ (R8)(BX*2), R10
	LEAQ (R9)(BX*2), R11
	MOVQ dr+72(FP), R12
	XORQ DX, DX

spe2:
	VMOVUPS (R8)(DX*1), Z8
	VMOVUPS (R9)(DX*1), Z9
	VMOVUPS (R10)(DX*1), Z10
	VMOVUPS (R11)(DX*1), Z11
	VMOVUPS (DI)(DX*1), Z12
	VFMADD231PS Z8, Z12, Z0
	VFMADD231PS Z9, Z12, Z1
	VFMADD231PS Z10, Z12, Z2
	VFMADD231PS Z11, Z12, Z3
	VMOVUPS (AX)(DX*1), Z13
	VFMADD231PS Z8, Z13, Z4
	VFMADD231PS Z9, Z13, Z5
	VFMADD231PS Z10, Z13, Z6
	VFMADD231PS Z11, Z13, Z7
	ADDQ $64, DX
	SUBQ $16, R12
	JNZ  spe2
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
	VEXTRACTF128 $1, Y0, X8
	VADDPS X8, X0, X0
	VMULPS X15, X0, X0
	VMOVUPS X0, (R13)
	ADDQ outStride+88(FP), R13
	VEXTRACTF64X4 $1, Z4, Y8
	VADDPS Y8, Y4, Y4
	VEXTRACTF64X4 $1, Z5, Y9
	VADDPS Y9, Y5, Y5
	VEXTRACTF64X4 $1, Z6, Y10
	VADDPS Y10, Y6, Y6
	VEXTRACTF64X4 $1, Z7, Y11
	VADDPS Y11, Y7, Y7
	VHADDPS Y5, Y4, Y4
	VHADDPS Y7, Y6, Y6
	VHADDPS Y6, Y4, Y4
	VEXTRACTF128 $1, Y4, X8
	VADDPS X8, X4, X4
	VMULPS X15, X4, X4
	VMOVUPS X4, (R13)
	ADDQ outStride+88(FP), R13
	LEAQ (SI)(R14*2), SI
	LEAQ (DI)(R15*2), DI
	SUBQ $2, CX
	CMPQ CX, $2
	JGE  spair

sone:
	TESTQ CX, CX
	JZ   sdone
	VPXORD Z0, Z0, Z0
	VPXORD Z1, Z1, Z1
	VPXORD Z2, Z2, Z2
	VPXORD Z3, Z3, Z3
	MOVQ lat+40(FP), R8
	MOVQ rowStride+56(FP), BX
	SHLQ $2, BX
	LEAQ (R8)(BX*1), R9
	LEAQ (R8)(BX*2), R10
	LEAQ (R9)(BX*2), R11
	MOVQ r+64(FP), R12
	XORQ DX, DX

slat1:
	VMOVUPS (R8)(DX*1), Z8
	VMOVUPS (R9)(DX*1), Z9
	VMOVUPS (R10)(DX*1), Z10
	VMOVUPS (R11)(DX*1), Z11
	VMOVUPS (SI)(DX*1), Z12
	VFMADD231PS Z8, Z12, Z0
	VFMADD231PS Z9, Z12, Z1
	VFMADD231PS Z10, Z12, Z2
	VFMADD231PS Z11, Z12, Z3
	ADDQ $64, DX
	SUBQ $16, R12
	JNZ  slat1
	MOVQ kpe+48(FP), R8
	MOVQ rowStride+56(FP), BX
	SHLQ $2, BX
	LEAQ (R8)(BX*1), R9
	LEAQ (R8)(BX*2), R10
	LEAQ (R9)(BX*2), R11
	MOVQ dr+72(FP), R12
	XORQ DX, DX

spe1:
	VMOVUPS (R8)(DX*1), Z8
	VMOVUPS (R9)(DX*1), Z9
	VMOVUPS (R10)(DX*1), Z10
	VMOVUPS (R11)(DX*1), Z11
	VMOVUPS (DI)(DX*1), Z12
	VFMADD231PS Z8, Z12, Z0
	VFMADD231PS Z9, Z12, Z1
	VFMADD231PS Z10, Z12, Z2
	VFMADD231PS Z11, Z12, Z3
	ADDQ $64, DX
	SUBQ $16, R12
	JNZ  spe1
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
	VEXTRACTF128 $1, Y0, X8
	VADDPS X8, X0, X0
	VMULPS X15, X0, X0
	VMOVUPS X0, (R13)

sdone:
	VZEROUPPER
	RET

// func axpyHx4AVX512(out *float32, heads int, lat *float32, r, rowStride int, p *float32, pStride int)
//
// For every head h < heads: out[h*r:][:r] += sum_{i<4} p[h*pStride+i] * lat[i*rowStride:][:r],
// r a multiple of 16.
TEXT ·axpyHx4AVX512(SB), NOSPLIT, $0-56
	MOVQ out+0(FP), DI
	MOVQ heads+8(FP), CX
	MOVQ p+40(FP), DX
	MOVQ pStride+48(FP), R13
	SHLQ $2, R13

ahead:
	VBROADCASTSS (DX), Z28
	VBROADCASTSS 4(DX), Z29
	VBROADCASTSS 8(DX), Z30
	VBROADCASTSS 12(DX), Z31
	MOVQ lat+16(FP), R8
	MOVQ rowStride+32(FP), BX
	SHLQ $2, BX
	LEAQ (R8)(BX*1), R9
	LEAQ (R8)(BX*2), R10
	LEAQ (R9)(BX*2), R11
	MOVQ r+24(FP), R12

alat:
	VMOVUPS (DI), Z0
	VFMADD231PS (R8), Z28, Z0
	VFMADD231PS (R9), Z29, Z0
	VFMADD231PS (R10), Z30, Z0
	VFMADD231PS (R11), Z31, Z0
	VMOVUPS Z0, (DI)
	ADDQ $64, DI
	ADDQ $64, R8
	ADDQ $64, R9
	ADDQ $64, R10
	ADDQ $64, R11
	SUBQ $16, R12
	JNZ  alat

	ADDQ R13, DX
	DECQ CX
	JNZ  ahead
	VZEROUPPER
	RET

// func bf16ToF32AVX512(dst *float32, src *uint16, n int)
//
// dst[i] = the float32 whose high half is src[i]; n a multiple of 16.
TEXT ·bf16ToF32AVX512(SB), NOSPLIT, $0-24
	MOVQ dst+0(FP), DI
	MOVQ src+8(FP), SI
	MOVQ n+16(FP), CX

bfloop:
	VPMOVZXWD (SI), Z0
	VPSLLD $16, Z0, Z0
	VMOVDQU32 Z0, (DI)
	ADDQ $32, SI
	ADDQ $64, DI
	SUBQ $16, CX
	JNZ  bfloop
	VZEROUPPER
	RET

// func interleave128AVX512(dst, src *float32, groups int)
//
// For each group of 128 values, dst[2k] = src[k] and dst[2k+1] = src[64+k]
// (k < 64): the column order of sums kept even columns first, then odd.
TEXT ·interleave128AVX512(SB), NOSPLIT, $0-24
	MOVQ dst+0(FP), DI
	MOVQ src+8(FP), SI
	MOVQ groups+16(FP), CX
	VMOVDQU32 interleaveIdx<>+0(SB), Z30
	VMOVDQU32 interleaveIdx<>+64(SB), Z31

#define INTERLEAVE16(off) \
	VMOVUPS off(SI), Z0; \
	VMOVUPS 256+off(SI), Z1; \
	VMOVAPS Z0, Z2; \
	VPERMT2PS Z1, Z30, Z2; \
	VPERMT2PS Z1, Z31, Z0; \
	VMOVUPS Z2, (2*off)(DI); \
	VMOVUPS Z0, (2*off+64)(DI)

ilvloop:
	INTERLEAVE16(0)
	INTERLEAVE16(64)
	INTERLEAVE16(128)
	INTERLEAVE16(192)
	ADDQ $512, SI
	ADDQ $512, DI
	DECQ CX
	JNZ  ilvloop
	VZEROUPPER
	RET

// Lane 2i takes a[i] and lane 2i+1 b[i] (b is the second table, index
// 16+i): the first 16 outputs from the first 8 of each, then the next.
DATA interleaveIdx<>+0(SB)/8, $0x0000001000000000
DATA interleaveIdx<>+8(SB)/8, $0x0000001100000001
DATA interleaveIdx<>+16(SB)/8, $0x0000001200000002
DATA interleaveIdx<>+24(SB)/8, $0x0000001300000003
DATA interleaveIdx<>+32(SB)/8, $0x0000001400000004
DATA interleaveIdx<>+40(SB)/8, $0x0000001500000005
DATA interleaveIdx<>+48(SB)/8, $0x0000001600000006
DATA interleaveIdx<>+56(SB)/8, $0x0000001700000007
DATA interleaveIdx<>+64(SB)/8, $0x0000001800000008
DATA interleaveIdx<>+72(SB)/8, $0x0000001900000009
DATA interleaveIdx<>+80(SB)/8, $0x0000001a0000000a
DATA interleaveIdx<>+88(SB)/8, $0x0000001b0000000b
DATA interleaveIdx<>+96(SB)/8, $0x0000001c0000000c
DATA interleaveIdx<>+104(SB)/8, $0x0000001d0000000d
DATA interleaveIdx<>+112(SB)/8, $0x0000001e0000000e
DATA interleaveIdx<>+120(SB)/8, $0x0000001f0000000f
GLOBL interleaveIdx<>(SB), RODATA|NOPTR, $128

// tailMask16: the mask of the first i lanes of 16, for i < 16.
DATA tailMask16<>+0(SB)/2, $0x0000
DATA tailMask16<>+2(SB)/2, $0x0001
DATA tailMask16<>+4(SB)/2, $0x0003
DATA tailMask16<>+6(SB)/2, $0x0007
DATA tailMask16<>+8(SB)/2, $0x000f
DATA tailMask16<>+10(SB)/2, $0x001f
DATA tailMask16<>+12(SB)/2, $0x003f
DATA tailMask16<>+14(SB)/2, $0x007f
DATA tailMask16<>+16(SB)/2, $0x00ff
DATA tailMask16<>+18(SB)/2, $0x01ff
DATA tailMask16<>+20(SB)/2, $0x03ff
DATA tailMask16<>+22(SB)/2, $0x07ff
DATA tailMask16<>+24(SB)/2, $0x0fff
DATA tailMask16<>+26(SB)/2, $0x1fff
DATA tailMask16<>+28(SB)/2, $0x3fff
DATA tailMask16<>+30(SB)/2, $0x7fff
GLOBL tailMask16<>(SB), RODATA|NOPTR, $32

// func softmaxRowsAVX512(sc *float32, scStride, heads, n int, m, l, alpha *float32)
//
// One step of a running softmax over a tile of n scores per head (n >= 1;
// head h's at sc[h*scStride:]): with M = max(m[h], the tile's scores),
// alpha[h] = exp(m[h] - M), each score becomes exp(score - M), l[h] =
// l[h]*alpha[h] + their sum, and m[h] = M.
TEXT ·softmaxRowsAVX512(SB), NOSPLIT, $0-56
	MOVQ sc+0(FP), SI
	MOVQ scStride+8(FP), R8
	SHLQ $2, R8
	MOVQ heads+16(FP), CX
	MOVQ n+24(FP), DX
	MOVQ m+32(FP), R9
	MOVQ l+40(FP), R10
	MOVQ alpha+48(FP), R11
	MOVQ DX, BX
	ANDQ $15, BX
	LEAQ tailMask16<>(SB), R12
	KMOVW (R12)(BX*2), K1
	SHRQ $4, DX // whole vectors of 16
	EXP_CONSTANTS

smhead:
	VBROADCASTSS (R9), Z0 // m[h]
	VMOVAPS Z0, Z1
	MOVQ SI, DI
	MOVQ DX, R13
	TESTQ R13, R13
	JZ   smmaxtail

smmax:
	VMAXPS (DI), Z1, Z1
	ADDQ $64, DI
	DECQ R13
	JNZ  smmax

smmaxtail:
	TESTQ BX, BX
	JZ   smmaxdone
	VMAXPS (DI), Z1, K1, Z1

smmaxdone:
	VSHUFF32X4 $0x4e, Z1, Z1, Z2
	VMAXPS Z2, Z1, Z1
	VSHUFF32X4 $0xb1, Z1, Z1, Z2
	VMAXPS Z2, Z1, Z1
	VPERMILPS $0x4e, Z1, Z2
	VMAXPS Z2, Z1, Z1
	VPERMILPS $0xb1, Z1, Z2
	VMAXPS Z2, Z1, Z1 // the new maximum in every lane
	VMOVSS X1, (R9)
	VSUBPS Z1, Z0, Z2
	EXP16(Z2, Z3, Z4) // alpha
	VMOVSS X2, (R11)
	VPXORD Z5, Z5, Z5
	MOVQ SI, DI
	MOVQ DX, R13
	TESTQ R13, R13
	JZ   smexptail

smexp:
	VMOVUPS (DI), Z6
	VSUBPS Z1, Z6, Z6
	EXP16(Z6, Z3, Z4)
	VMOVUPS Z6, (DI)
	VADDPS Z6, Z5, Z5
	ADDQ $64, DI
	DECQ R13
	JNZ  smexp

smexptail:
	TESTQ BX, BX
	JZ   smsum
	VMOVUPS.Z (DI), K1, Z6
	VSUBPS Z1, Z6, Z6
	EXP16(Z6, Z3, Z4)
	VMOVUPS Z6, K1, (DI)
	VADDPS Z6, Z5, K1, Z5

smsum:
	HSUM16(Z5, Y5, X5, Y7, X7)
	VMOVSS (R10), X8
	VFMADD231SS X2, X8, X5
	VMOVSS X5, (R10)
	ADDQ R8, SI
	ADDQ $4, R9
	ADDQ $4, R10
	ADDQ $4, R11
	DECQ CX
	JNZ  smhead
	VZEROUPPER
	RET
