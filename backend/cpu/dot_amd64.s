#include "textflag.h"

// Byte i is 2*e2m1(code i) as a signed byte.
DATA e2m1Doubled<>+0(SB)/8, $0x0c08060403020100
DATA e2m1Doubled<>+8(SB)/8, $0xf4f8fafcfdfeff00
GLOBL e2m1Doubled<>(SB), RODATA|NOPTR, $16

// One 16-float chunk: sign-extend 16 weight bytes from X register xr, convert,
// and fused-multiply-add coef (Z6) times them into acc at off(DI).
#define AXPY16(xr, off) \
	VPMOVSXBD xr, Z7; \
	VCVTDQ2PS Z7, Z7; \
	VMOVUPS off(DI), Z9; \
	VFMADD231PS Z7, Z6, Z9; \
	VMOVUPS Z9, off(DI)

// func axpyCodes128(acc *float32, codes *byte, coef *float32, groups int)
TEXT ·axpyCodes128(SB), NOSPLIT, $0-32
	MOVQ acc+0(FP), DI
	MOVQ codes+8(FP), SI
	MOVQ coef+16(FP), R8
	MOVQ groups+24(FP), CX
	VBROADCASTI32X4 e2m1Doubled<>(SB), Z4
	MOVL $0x0f0f0f0f, AX
	VPBROADCASTD AX, Z5

axpyloop:
	VMOVDQU8 (SI), Z0
	VPSRLW $4, Z0, Z1
	VPANDD Z5, Z0, Z0
	VPANDD Z5, Z1, Z1
	VPSHUFB Z0, Z4, Z0 // even columns
	VPSHUFB Z1, Z4, Z1 // odd columns
	VBROADCASTSS (R8), Z6

	AXPY16(X0, 0)
	VEXTRACTI32X4 $1, Z0, X8
	AXPY16(X8, 64)
	VEXTRACTI32X4 $2, Z0, X8
	AXPY16(X8, 128)
	VEXTRACTI32X4 $3, Z0, X8
	AXPY16(X8, 192)
	AXPY16(X1, 256)
	VEXTRACTI32X4 $1, Z1, X8
	AXPY16(X8, 320)
	VEXTRACTI32X4 $2, Z1, X8
	AXPY16(X8, 384)
	VEXTRACTI32X4 $3, Z1, X8
	AXPY16(X8, 448)

	ADDQ $64, SI
	ADDQ $4, R8
	ADDQ $512, DI
	DECQ CX
	JNZ axpyloop

	VZEROUPPER
	RET
