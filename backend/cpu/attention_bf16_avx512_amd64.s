#include "textflag.h"

// Attention kernels that read a bf16 latent cache in place (AVX-512).
//
// A 64-byte load holds 32 bf16 values; dword i holds value 2i in its low
// half and value 2i+1 in its high half. Shifting each dword left by 16
// gives the even values as float32, masking off the low half the odd ones:
// two instructions widen 32 values, with no shuffle. The kernels therefore
// work on each block of 32 values in even-then-odd order: the queries are
// given in that order, and the weighted sums are kept in it until the
// attention of a row is done, then put back in column order.

// bf16Interleave: indices that merge 16 even (table 0) and 16 odd (table 1)
// values back into column order, first the low 16 columns, then the high.
DATA bf16Interleave<>+0(SB)/4, $0
DATA bf16Interleave<>+4(SB)/4, $16
DATA bf16Interleave<>+8(SB)/4, $1
DATA bf16Interleave<>+12(SB)/4, $17
DATA bf16Interleave<>+16(SB)/4, $2
DATA bf16Interleave<>+20(SB)/4, $18
DATA bf16Interleave<>+24(SB)/4, $3
DATA bf16Interleave<>+28(SB)/4, $19
DATA bf16Interleave<>+32(SB)/4, $4
DATA bf16Interleave<>+36(SB)/4, $20
DATA bf16Interleave<>+40(SB)/4, $5
DATA bf16Interleave<>+44(SB)/4, $21
DATA bf16Interleave<>+48(SB)/4, $6
DATA bf16Interleave<>+52(SB)/4, $22
DATA bf16Interleave<>+56(SB)/4, $7
DATA bf16Interleave<>+60(SB)/4, $23
DATA bf16Interleave<>+64(SB)/4, $8
DATA bf16Interleave<>+68(SB)/4, $24
DATA bf16Interleave<>+72(SB)/4, $9
DATA bf16Interleave<>+76(SB)/4, $25
DATA bf16Interleave<>+80(SB)/4, $10
DATA bf16Interleave<>+84(SB)/4, $26
DATA bf16Interleave<>+88(SB)/4, $11
DATA bf16Interleave<>+92(SB)/4, $27
DATA bf16Interleave<>+96(SB)/4, $12
DATA bf16Interleave<>+100(SB)/4, $28
DATA bf16Interleave<>+104(SB)/4, $13
DATA bf16Interleave<>+108(SB)/4, $29
DATA bf16Interleave<>+112(SB)/4, $14
DATA bf16Interleave<>+116(SB)/4, $30
DATA bf16Interleave<>+120(SB)/4, $15
DATA bf16Interleave<>+124(SB)/4, $31
GLOBL bf16Interleave<>(SB), RODATA|NOPTR, $128

// The 16 accumulators Z0-Z15 set to zero.
#define ZERO16 \
	VPXORD Z0, Z0, Z0; \
	VPXORD Z1, Z1, Z1; \
	VPXORD Z2, Z2, Z2; \
	VPXORD Z3, Z3, Z3; \
	VPXORD Z4, Z4, Z4; \
	VPXORD Z5, Z5, Z5; \
	VPXORD Z6, Z6, Z6; \
	VPXORD Z7, Z7, Z7; \
	VPXORD Z8, Z8, Z8; \
	VPXORD Z9, Z9, Z9; \
	VPXORD Z10, Z10, Z10; \
	VPXORD Z11, Z11, Z11; \
	VPXORD Z12, Z12, Z12; \
	VPXORD Z13, Z13, Z13; \
	VPXORD Z14, Z14, Z14; \
	VPXORD Z15, Z15, Z15

// Four bf16 rows at DX bytes into R8-R11 widened to float32: the even
// values in Z20-Z23, the odd ones in Z16-Z19 (Z31 holds the high-half mask).
#define WIDEN4 \
	VMOVDQU32 (R8)(DX*1), Z16; \
	VMOVDQU32 (R9)(DX*1), Z17; \
	VMOVDQU32 (R10)(DX*1), Z18; \
	VMOVDQU32 (R11)(DX*1), Z19; \
	VPSLLD $16, Z16, Z20; \
	VPSLLD $16, Z17, Z21; \
	VPSLLD $16, Z18, Z22; \
	VPSLLD $16, Z19, Z23; \
	VPANDD Z31, Z16, Z16; \
	VPANDD Z31, Z17, Z17; \
	VPANDD Z31, Z18, Z18; \
	VPANDD Z31, Z19, Z19

// Four heads' queries (at qp, index ix) against the four widened rows (even
// values in Z20-Z23, odd in Z16-Z19): accumulators a0-a3 for rows 0-3.
#define HEAD4(qp, ix, a0, a1, a2, a3) \
	VMOVUPS (qp)(ix), Z24; \
	VMOVUPS 64(qp)(ix), Z25; \
	VFMADD231PS Z24, Z20, a0; \
	VFMADD231PS Z24, Z21, a1; \
	VFMADD231PS Z24, Z22, a2; \
	VFMADD231PS Z24, Z23, a3; \
	VFMADD231PS Z25, Z16, a0; \
	VFMADD231PS Z25, Z17, a1; \
	VFMADD231PS Z25, Z18, a2; \
	VFMADD231PS Z25, Z19, a3

// The four rows' sums of one head, times the scale, stored at DI; DI moves
// on by the output stride (R15 bytes).
#define SCORES4(z0, z1, z2, z3, y0, y1, y2, y3, x0) \
	VEXTRACTF64X4 $1, z0, Y16; \
	VADDPS Y16, y0, y0; \
	VEXTRACTF64X4 $1, z1, Y17; \
	VADDPS Y17, y1, y1; \
	VEXTRACTF64X4 $1, z2, Y18; \
	VADDPS Y18, y2, y2; \
	VEXTRACTF64X4 $1, z3, Y19; \
	VADDPS Y19, y3, y3; \
	VHADDPS y1, y0, y0; \
	VHADDPS y3, y2, y2; \
	VHADDPS y2, y0, y0; \
	VEXTRACTF32X4 $1, y0, X16; \
	VADDPS X16, x0, x0; \
	VMULPS X30, x0, x0; \
	VMOVUPS x0, (DI); \
	ADDQ R15, DI

// func scoresBF16x4AVX512(q *float32, qStride, heads int, rows *uint16, rowStride, w int, out *float32, outStride int, scale float32)
//
// out[h*outStride+j] = scale * sum_{k<w} q[h*qStride+k'] * row_j[k] for
// h < heads (a multiple of 4) and the four rows j < 4 (rowStride values
// apart), where q holds each block of 32 values in even-then-odd order (k'
// is k's place in that order); w is a multiple of 32. Each block of the
// rows is widened once for four heads: 32 multiply-adds per 8 widening
// instructions.
TEXT ·scoresBF16x4AVX512(SB), NOSPLIT, $0-68
	MOVQ q+0(FP), SI
	MOVQ heads+16(FP), CX
	MOVQ rows+24(FP), R8
	MOVQ rowStride+32(FP), BX
	SHLQ $1, BX
	LEAQ (R8)(BX*1), R9
	LEAQ (R8)(BX*2), R10
	LEAQ (R9)(BX*2), R11
	MOVQ out+48(FP), DI
	MOVQ outStride+56(FP), R15
	SHLQ $2, R15
	VBROADCASTSS scale+64(FP), Z30
	MOVL $0xffff0000, AX
	VPBROADCASTD AX, Z31
	MOVQ w+40(FP), AX
	SHLQ $1, AX
	MOVQ AX, w+40(FP) // now the row length in bytes

shead:
	MOVQ qStride+8(FP), DX
	SHLQ $2, DX
	MOVQ SI, AX
	LEAQ (SI)(DX*1), BX
	LEAQ (SI)(DX*2), R12
	LEAQ (BX)(DX*2), R13
	ZERO16
	XORQ DX, DX   // byte offset in the rows
	XORQ R14, R14 // byte offset in the queries

sblock:
	WIDEN4
	HEAD4(AX, R14*1, Z0, Z1, Z2, Z3)
	HEAD4(BX, R14*1, Z4, Z5, Z6, Z7)
	HEAD4(R12, R14*1, Z8, Z9, Z10, Z11)
	HEAD4(R13, R14*1, Z12, Z13, Z14, Z15)
	ADDQ $64, DX
	ADDQ $128, R14
	CMPQ DX, w+40(FP)
	JLT  sblock

	SCORES4(Z0, Z1, Z2, Z3, Y0, Y1, Y2, Y3, X0)
	SCORES4(Z4, Z5, Z6, Z7, Y4, Y5, Y6, Y7, X4)
	SCORES4(Z8, Z9, Z10, Z11, Y8, Y9, Y10, Y11, X8)
	SCORES4(Z12, Z13, Z14, Z15, Y12, Y13, Y14, Y15, X12)
	MOVQ qStride+8(FP), DX
	SHLQ $4, DX
	ADDQ DX, SI // four heads on
	SUBQ $4, CX
	JNZ  shead
	VZEROUPPER
	RET

// Four heads' coefficients (broadcast in Z20-Z23) times the widened values
// of one row (even Z18, Z19; odd Z16, Z17).
#define COEF4(c, a0, a1, a2, a3) \
	VFMADD231PS c, Z18, a0; \
	VFMADD231PS c, Z16, a1; \
	VFMADD231PS c, Z19, a2; \
	VFMADD231PS c, Z17, a3

// bf16EvenOdd: indices of the even, then the odd, values of 32.
DATA bf16EvenOdd<>+0(SB)/4, $0
DATA bf16EvenOdd<>+4(SB)/4, $2
DATA bf16EvenOdd<>+8(SB)/4, $4
DATA bf16EvenOdd<>+12(SB)/4, $6
DATA bf16EvenOdd<>+16(SB)/4, $8
DATA bf16EvenOdd<>+20(SB)/4, $10
DATA bf16EvenOdd<>+24(SB)/4, $12
DATA bf16EvenOdd<>+28(SB)/4, $14
DATA bf16EvenOdd<>+32(SB)/4, $16
DATA bf16EvenOdd<>+36(SB)/4, $18
DATA bf16EvenOdd<>+40(SB)/4, $20
DATA bf16EvenOdd<>+44(SB)/4, $22
DATA bf16EvenOdd<>+48(SB)/4, $24
DATA bf16EvenOdd<>+52(SB)/4, $26
DATA bf16EvenOdd<>+56(SB)/4, $28
DATA bf16EvenOdd<>+60(SB)/4, $30
DATA bf16EvenOdd<>+64(SB)/4, $1
DATA bf16EvenOdd<>+68(SB)/4, $3
DATA bf16EvenOdd<>+72(SB)/4, $5
DATA bf16EvenOdd<>+76(SB)/4, $7
DATA bf16EvenOdd<>+80(SB)/4, $9
DATA bf16EvenOdd<>+84(SB)/4, $11
DATA bf16EvenOdd<>+88(SB)/4, $13
DATA bf16EvenOdd<>+92(SB)/4, $15
DATA bf16EvenOdd<>+96(SB)/4, $17
DATA bf16EvenOdd<>+100(SB)/4, $19
DATA bf16EvenOdd<>+104(SB)/4, $21
DATA bf16EvenOdd<>+108(SB)/4, $23
DATA bf16EvenOdd<>+112(SB)/4, $25
DATA bf16EvenOdd<>+116(SB)/4, $27
DATA bf16EvenOdd<>+120(SB)/4, $29
DATA bf16EvenOdd<>+124(SB)/4, $31
GLOBL bf16EvenOdd<>(SB), RODATA|NOPTR, $128

// PERMUTE32 is the body of the two reorders below: each block of 32
// floats of src to dst through the index tables at t0 (dst's first 16)
// and t1 (its last 16); n is a multiple of 32.
#define PERMUTE32(t0, t1) \
	MOVQ dst+0(FP), DI \
	MOVQ src+8(FP), SI \
	MOVQ n+16(FP), CX \
	SHRQ $5, CX \
	JZ   done \
	VMOVDQU32 t0, Z2 \
	VMOVDQU32 t1, Z3 \
loop: \
	VMOVUPS (SI), Z0 \
	VMOVUPS 64(SI), Z1 \
	VMOVAPS Z2, Z4 \
	VPERMI2PS Z1, Z0, Z4 \
	VMOVAPS Z3, Z5 \
	VPERMI2PS Z1, Z0, Z5 \
	VMOVUPS Z4, (DI) \
	VMOVUPS Z5, 64(DI) \
	ADDQ $128, SI \
	ADDQ $128, DI \
	DECQ CX \
	JNZ  loop \
done: \
	VZEROUPPER

// func evenOdd32AVX512(dst, src *float32, n int)
//
// Each block of 32 values of src to dst in even-then-odd order; n is a
// multiple of 32.
TEXT ·evenOdd32AVX512(SB), NOSPLIT, $0-24
	PERMUTE32(bf16EvenOdd<>+0(SB), bf16EvenOdd<>+64(SB))
	RET

// func prefetchLines(p *uint16, n int)
//
// PREFETCHT0 of every 64-byte line of the n values at p (n a multiple of
// 32): the next cached rows of attention come from memory while the
// current ones are multiplied.
TEXT ·prefetchLines(SB), NOSPLIT, $0-16
	MOVQ p+0(FP), SI
	MOVQ n+8(FP), CX
	SHRQ $5, CX
	JZ   pfdone

pfloop:
	PREFETCHT0 (SI)
	ADDQ $64, SI
	DECQ CX
	JNZ  pfloop

pfdone:
	RET

// func scoresBF16RowsAVX512(q *float32, qStride int, rows *uint16, rowStride, n, w int, out *float32, outStride int, scale float32, pf, pfEnd *uint16)
//
// scoresBF16x4AVX512 for four heads and n rows (a multiple of 4), four at a
// time: out[h*outStride+j] for h < 4, j < n. The four heads' queries stay
// in L1 across the rows. One line of [pf, pfEnd) is prefetched per block
// of 32 values multiplied, so the next rows arrive while these are used.
TEXT ·scoresBF16RowsAVX512(SB), NOSPLIT, $0-88
	MOVQ q+0(FP), AX
	MOVQ qStride+8(FP), DX
	SHLQ $2, DX
	LEAQ (AX)(DX*1), BX
	LEAQ (AX)(DX*2), R12
	LEAQ (BX)(DX*2), R13
	MOVQ rows+16(FP), R8
	MOVQ rowStride+24(FP), SI
	SHLQ $1, SI
	LEAQ (R8)(SI*1), R9
	LEAQ (R8)(SI*2), R10
	LEAQ (R9)(SI*2), R11
	SHLQ $2, SI // four rows, in bytes
	MOVQ n+32(FP), CX
	SHRQ $2, CX
	MOVQ out+48(FP), DI
	MOVQ outStride+56(FP), R15
	SHLQ $2, R15
	VBROADCASTSS scale+64(FP), Z30
	MOVL $0xffff0000, DX
	VPBROADCASTD DX, Z31
	MOVQ w+40(FP), DX
	SHLQ $1, DX
	MOVQ DX, w+40(FP) // now the row length in bytes
	MOVQ pf+72(FP), R14
	TESTQ CX, CX
	JZ   rdone

rgroup:
	ZERO16
	XORQ DX, DX // byte offset in the rows; the queries' is twice it

rblock:
	CMPQ R14, pfEnd+80(FP)
	JAE  rnopf
	PREFETCHT0 (R14)
	ADDQ $64, R14

rnopf:
	WIDEN4
	HEAD4(AX, DX*2, Z0, Z1, Z2, Z3)
	HEAD4(BX, DX*2, Z4, Z5, Z6, Z7)
	HEAD4(R12, DX*2, Z8, Z9, Z10, Z11)
	HEAD4(R13, DX*2, Z12, Z13, Z14, Z15)
	ADDQ $64, DX
	CMPQ DX, w+40(FP)
	JLT  rblock

	SCORES4(Z0, Z1, Z2, Z3, Y0, Y1, Y2, Y3, X0)
	SCORES4(Z4, Z5, Z6, Z7, Y4, Y5, Y6, Y7, X4)
	SCORES4(Z8, Z9, Z10, Z11, Y8, Y9, Y10, Y11, X8)
	SCORES4(Z12, Z13, Z14, Z15, Y12, Y13, Y14, Y15, X12)
	MOVQ R15, DX
	SHLQ $2, DX
	SUBQ DX, DI
	ADDQ $16, DI // the next four rows' column
	ADDQ SI, R8
	ADDQ SI, R9
	ADDQ SI, R10
	ADDQ SI, R11
	DECQ CX
	JNZ  rgroup

rdone:
	VZEROUPPER
	RET

// One head's 64 sums in even-then-odd order per block of 32, stored to
// (SETEO) or added to the 64 floats at DI scaled by the head's factor
// broadcast in a (ADDEO); DI moves on by the output stride (BX bytes).
#define SETEO(e0, o0, e1, o1) \
	VMOVUPS e0, (DI); \
	VMOVUPS o0, 64(DI); \
	VMOVUPS e1, 128(DI); \
	VMOVUPS o1, 192(DI); \
	ADDQ BX, DI

#define ADDEO(e0, o0, e1, o1, a) \
	VFMADD231PS (DI), a, e0; \
	VMOVUPS e0, (DI); \
	VFMADD231PS 64(DI), a, o0; \
	VMOVUPS o0, 64(DI); \
	VFMADD231PS 128(DI), a, e1; \
	VMOVUPS e1, 128(DI); \
	VFMADD231PS 192(DI), a, o1; \
	VMOVUPS o1, 192(DI); \
	ADDQ BX, DI

// func axpyBF16PanelsAVX512(p *float32, pStride int, rows *uint16, rowStride, n, panels int, out *float32, outStride int, alpha *float32)
//
// axpyBF16x4x64AVX512 for panels consecutive panels of 64 columns, with
// the sums kept in even-then-odd order per block of 32 (evenOdd32's
// order): out[h*outStride+64*k:][:64] for panel k, scaled by alpha[h] and
// added to, or overwritten when alpha is nil.
TEXT ·axpyBF16PanelsAVX512(SB), NOSPLIT, $0-72
	MOVQ p+0(FP), R8
	MOVQ pStride+8(FP), AX
	SHLQ $2, AX
	LEAQ (R8)(AX*1), R9
	LEAQ (R8)(AX*2), R10
	LEAQ (R9)(AX*2), R11
	MOVQ rows+16(FP), R13
	MOVQ rowStride+24(FP), BX
	SHLQ $1, BX
	MOVQ n+32(FP), CX
	MOVQ panels+40(FP), DX
	MOVQ out+48(FP), R12
	MOVQ alpha+64(FP), AX
	MOVL $0xffff0000, R14
	VPBROADCASTD R14, Z31
	TESTQ AX, AX
	JZ   ppanel
	VBROADCASTSS (AX), Z24
	VBROADCASTSS 4(AX), Z25
	VBROADCASTSS 8(AX), Z26
	VBROADCASTSS 12(AX), Z27

ppanel:
	ZERO16
	MOVQ R13, SI
	XORQ R15, R15
	TESTQ CX, CX
	JZ   pstore

prow:
	VMOVDQU32 (SI), Z16
	VMOVDQU32 64(SI), Z17
	VPSLLD $16, Z16, Z18
	VPSLLD $16, Z17, Z19
	VPANDD Z31, Z16, Z16
	VPANDD Z31, Z17, Z17
	VBROADCASTSS (R8)(R15*4), Z20
	VBROADCASTSS (R9)(R15*4), Z21
	VBROADCASTSS (R10)(R15*4), Z22
	VBROADCASTSS (R11)(R15*4), Z23
	COEF4(Z20, Z0, Z1, Z2, Z3)
	COEF4(Z21, Z4, Z5, Z6, Z7)
	COEF4(Z22, Z8, Z9, Z10, Z11)
	COEF4(Z23, Z12, Z13, Z14, Z15)
	ADDQ BX, SI
	INCQ R15
	CMPQ R15, CX
	JLT  prow

pstore:
	MOVQ R12, DI
	MOVQ BX, R14 // the row stride, while BX is the output's
	MOVQ outStride+56(FP), BX
	SHLQ $2, BX
	TESTQ AX, AX
	JNZ  padd
	SETEO(Z0, Z1, Z2, Z3)
	SETEO(Z4, Z5, Z6, Z7)
	SETEO(Z8, Z9, Z10, Z11)
	SETEO(Z12, Z13, Z14, Z15)
	JMP  pnext

padd:
	ADDEO(Z0, Z1, Z2, Z3, Z24)
	ADDEO(Z4, Z5, Z6, Z7, Z25)
	ADDEO(Z8, Z9, Z10, Z11, Z26)
	ADDEO(Z12, Z13, Z14, Z15, Z27)

pnext:
	MOVQ R14, BX
	ADDQ $256, R12 // the next 64 columns of out
	ADDQ $128, R13 // and of the rows
	DECQ DX
	JNZ  ppanel
	VZEROUPPER
	RET

// func interleave32AVX512(dst, src *float32, n int)
//
// Each block of 32 values of src, in even-then-odd order, back in column
// order in dst; n is a multiple of 32.
TEXT ·interleave32AVX512(SB), NOSPLIT, $0-24
	PERMUTE32(bf16Interleave<>+0(SB), bf16Interleave<>+64(SB))
	RET
