#include "textflag.h"

// vpdpbusd multiplies unsigned by signed bytes, so the weights enter as
// 2*e2m1(code) + 12 (0..24) and 12 * sum(x) is taken off afterwards.
// Byte i is the biased value of code i.
DATA e2m1Biased<>+0(SB)/8, $0x181412100f0e0d0c
DATA e2m1Biased<>+8(SB)/8, $0x00040608090a0b0c
GLOBL e2m1Biased<>(SB), RODATA|NOPTR, $16

// func dotGroups128VNNI(codes *byte, x *int8, xsum *int32, out *int32, groups int)
TEXT ·dotGroups128VNNI(SB), NOSPLIT, $0-40
	MOVQ codes+0(FP), SI
	MOVQ x+8(FP), DI
	MOVQ xsum+16(FP), R8
	MOVQ out+24(FP), R9
	MOVQ groups+32(FP), CX
	VBROADCASTI32X4 e2m1Biased<>(SB), Z4 // lookup table in every 128-bit lane
	MOVL $0x0f0f0f0f, AX
	VPBROADCASTD AX, Z5                  // nibble mask

loop:
	VMOVDQU8 (SI), Z0      // 64 code bytes = 128 weights
	VPSRLW $4, Z0, Z1
	VPANDD Z5, Z0, Z0      // low nibbles: even columns
	VPANDD Z5, Z1, Z1      // high nibbles: odd columns
	VPSHUFB Z0, Z4, Z0     // biased weights
	VPSHUFB Z1, Z4, Z1
	VPXORD Z2, Z2, Z2
	VPDPBUSD (DI), Z0, Z2  // even activations
	VPDPBUSD 64(DI), Z1, Z2 // odd activations

	// Sum the 16 int32 lanes.
	VEXTRACTI64X4 $1, Z2, Y3
	VPADDD Y3, Y2, Y2
	VEXTRACTI128 $1, Y2, X3
	VPADDD X3, X2, X2
	VPSHUFD $0x4e, X2, X3
	VPADDD X3, X2, X2
	VPSHUFD $0xb1, X2, X3
	VPADDD X3, X2, X2
	VMOVD X2, AX

	MOVL (R8), DX
	IMULL $12, DX
	SUBL DX, AX
	MOVL AX, (R9)

	ADDQ $64, SI
	ADDQ $128, DI
	ADDQ $4, R8
	ADDQ $4, R9
	DECQ CX
	JNZ loop

	VZEROUPPER
	RET
