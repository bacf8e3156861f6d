// Flash-style causal latent attention for prefill, on the tensor cores.
//
// Every head attends over the same cached rows [c | k_pe] (MLA in latent
// space), so a block takes the rows of FA_TQ consecutive tokens times FA_HB
// heads (FA_M = 32 query rows) and streams the cached positions through
// shared memory in tiles of FA_N = 64, once for all its rows, with an online
// softmax:
//   S = scale * [qlat | q_pe] . [c | k_pe]   (32 x 64, k = rank + dr)
//   O = O * exp(m_old - m_new) + exp(S - m_new) . c
// and O / l at the end.
//
// Rounding: the cached values are exact in bfloat16 and in f16 (bf16
// cache, within f16's range; the fp8 cache's E4M3 codes, its two
// per-position scales applied in fp32 outside the products; the fp4
// cache's E2M1 codes times their group's E4M3 scale, at most six
// significant bits in [2^-10, 2688], and E4M3 rope codes, with the same
// two scales), so only the fp32 operands (the queries and the softmax
// weights) are rounded. Two forms:
// - f16 operands (the bf16 and fp8 caches' default; the fp4 cache's only
//   in tests, flash.go's flashFP4F16): each query row scaled by
//   a power of two (undone exactly in the softmax) and rounded to f16, the
//   weights rounded to f16, fp32 accumulators. The bf16 cache's key
//   fragments are widened to f16 in registers (exact for magnitudes in
//   [2^-14, 65504]; the latent cache's normalised values lie well inside),
//   the fp8 and fp4 caches' records converted to f16 in the tile. f16
//   carries 11 bits to bf16's 8: over the bf16 cache max |err| / max |ref|
//   2.7e-4 to 3.9e-4 against the CPU on an H200, where bf16 operands gave
//   1.7e-3 to 3.1e-3 and made the tiny test model's greedy ids part from
//   the CPU's (the weights' rounding did that, not the queries';
//   docs/perf.md). Its shared memory leaves room for two key tiles, so the
//   next tile's copies (bf16 cache) land during this one's products, or
//   its records (fp8, fp4) are loaded during the softmax and the products
//   and converted after them. The softmax runs in base 2 (ex2.approx, the
//   scale times log2(e) folded into the queries' power of two) with each
//   thread's row sum added to the others' at the end. The bf16 cache has
//   no per-position scales, so its scores take one accumulator; over the
//   fp8 and fp4 caches the values' weights carry the latent scale times a
//   power of two that keeps them in f16's normal range (flash_latent).
// - exact (the fp4 cache's default, every cache with
//   MMFP4_CUDA_FLASH_EXACT=1):
//   each operand split as hi + lo, two bfloat16 numbers that carry 16 bits
//   of its mantissa, every product issued for both halves: an error near
//   fp32 summation order (under 1e-5), twice the tensor work, one tile.
//
// Warps (8): for S, warp w takes keys [32*(w&1), +32) and every fourth k
// step (w>>1) for all 32 rows, keeping the latent and rope parts apart
// over the fp8 and fp4 caches (their scales differ); the four partial
// tiles go through shared memory and are added in a fixed order. The
// softmax gives 8 threads to a row. For O, warp w owns columns
// [w*rank/8, +rank/8) of all 32 rows. On a sequence's last tile, key
// steps past its positions are left out. The output is staged in shared
// memory and written a head's row per warp; with xq set, so is its int8
// form for the value expansion (as the quantization kernel writes it, bit
// for bit).
//
// Grid (ceil(T/FA_TQ), ceil(H/FA_HB)); the last tokens (most positions)
// start first, for every head group before the next tokens. Tokens of one
// block from different sequences are done one sequence after another.
// Each tile's cache slots are looked up a tile (two with two key tiles)
// ahead, so the copies wait on no block-table load.
//
// Shared memory (bytes), W = rank+dr, with parts p = 2 exact, else 1 and
// key tiles n = 1 exact, else 2: queries p*32*(W+8)*2, keys n*64*(W+8)*2,
// partial scores 4*32*72*4, weights p*32*72*2, 2*64 + 3*32 floats and n*64
// slots (flashShared in flash.go).

#define FA_TQ 8
#define FA_HB 4
#define FA_M 32
#define FA_N 64
#define FA_THREADS 256
#define FA_SLD 72  // partial score row stride (floats)
#define FA_PLD 72  // weight row stride (bf16)
#define FA_PHASES 10  // phase clocks of a warp (STAMP)

// 8 bytes through L1, zeros where not valid (the fp8 cache's records are
// multiples of 8 bytes, not of 16).
DEVICE void cp_async8(u32 dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(dst), "l"(src), "r"(valid ? 8 : 0) : "memory");
}

// 2^e for e in [-126, 127], exactly.
DEVICE float fa_pow2(int e) { return __int_as_float((127 + e) << 23); }

// The f16 operands' query scale: the power of two e (|e| <= 100) that
// takes a row's largest magnitude m into [2^14, 2^15), 0 for m = 0.
DEVICE int fa_query_exp(float m) {
  return m == 0.f ? 0 : max(-100, min(100, 14 - ((int)(__float_as_uint(m) >> 23) - 127)));
}

// The f16 form's weights over a quantized cache (flash_latent): the power
// of two e that takes a tile's largest latent scale smax into [2^14,
// 2^15), FA_WEMAX for smax = 0. |e| <= FA_WEMAX, so that a change of e
// (down to -2 FA_WEMAX) is a normal float's power of two; scales below
// 2^76, far beyond a cache's, keep the weights under 2^15.
#define FA_WEMAX 62
DEVICE int fa_weight_exp(float smax) {
  if (smax == 0.f) return FA_WEMAX;
  return max(-FA_WEMAX, min(FA_WEMAX, 14 - ((int)(__float_as_uint(smax) >> 23) - 127)));
}

// Round to nearest even bfloat16 (finite inputs), as bits.
DEVICE u32 fa_bf16(float f) {
  u32 b = __float_as_uint(f);
  b += 0x7FFFu + ((b >> 16) & 1u);
  return b >> 16;
}

// x = hi + lo (+ a rest under 2^-16 of x): the two halves as bf16 bits.
DEVICE void split_bf16(float x, u32& hi, u32& lo) {
  hi = fa_bf16(x);
  lo = fa_bf16(x - __uint_as_float(hi << 16));
}


// Two bf16 values (low half first) as two f16 values: exact for
// magnitudes in [2^-14, 65504], absolute error under 2^-25 below.
DEVICE u32 bf16x2_f16x2(u32 x) {
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(__uint_as_float(x & 0xFFFF0000u)), "f"(__uint_as_float(x << 16)));
  return r;
}
// A fragment's registers, each two bf16 values, widened as bf16x2_f16x2.
template <int N>
DEVICE void frag_f16(u32 (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; i++) r[i] = bf16x2_f16x2(r[i]);
}

// Two E4M3 codes (bits 0-7 and 8-15) as two bf16 values (exact: E4M3 is a
// subset of f16, and f16 values of at most 4 significant bits are exact in
// bf16), the first in the low half.
DEVICE u32 e4m3x2_bf16x2(u32 two) {
  u32 h;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"((unsigned short)two));
  float lo, hi;
  asm("cvt.f32.f16 %0, %1;" : "=f"(lo) : "h"((unsigned short)(h & 0xFFFFu)));
  asm("cvt.f32.f16 %0, %1;" : "=f"(hi) : "h"((unsigned short)(h >> 16)));
  return (__float_as_uint(lo) >> 16) | (__float_as_uint(hi) & 0xFFFF0000u);
}

// Eight E4M3 codes as eight bf16 values.
DEVICE uint4 e4m3x8_bf16(uint2 v) {
  return make_uint4(e4m3x2_bf16x2(v.x), e4m3x2_bf16x2(v.x >> 16), e4m3x2_bf16x2(v.y), e4m3x2_bf16x2(v.y >> 16));
}

// Eight E2M1 codes (four bytes, each byte's low nibble first) times their
// group's E4M3 scale (byte sb) as eight bf16 values: exact, a product of
// at most two and four significant bits. The reference form, one float
// product a value.
DEVICE uint4 e2m1x8_bf16_ref(u32 codes, u32 sb) {
  const float d = e4m3(sb);
  u32 w[4];
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const u32 b = codes >> (8 * i);
    const float lo = e2m1_value(b & 15u) * d, hi = e2m1_value((b >> 4) & 15u) * d;
    w[i] = (__float_as_uint(lo) >> 16) | (__float_as_uint(hi) & 0xFFFF0000u);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// e2m1x8_bf16_ref's values (the same bits) with byte permutes: the eight
// magnitudes' bf16 high and low bytes looked up four codes at a time (the
// codes' low three bits select a byte of a table pair), interleaved into
// bf16 pairs, the sign bits moved in, then one bf16x2 multiply-add by the
// scale (with -0 added: exact products stay exact, a -0 product stays -0).
#define E2M1_BF16_HI_A 0x3F3F3F00u  // magnitudes 0, 0.5, 1, 1.5: high bytes
#define E2M1_BF16_HI_B 0x40404040u  // 2, 3, 4, 6
#define E2M1_BF16_LO_A 0xC0800000u  // low bytes
#define E2M1_BF16_LO_B 0xC0804000u
// The sign bits of four codes (c's low 16 bits) into two pairs of 16-bit
// magnitudes, codes 0 and 1 in w0, 2 and 3 in w1.
DEVICE uint2 e2m1x4_signs(u32 c, u32 w0, u32 w1) {
  w0 |= ((c << 12) & 0x8000u) | ((c << 24) & 0x80000000u);
  w1 |= ((c << 4) & 0x8000u) | ((c << 16) & 0x80000000u);
  return make_uint2(w0, w1);
}
DEVICE uint2 e2m1x4_bf16_mags(u32 c) {  // c: four codes, low 16 bits
  const u32 sel = c & 0x7777u;
  const u32 hi = prmt(E2M1_BF16_HI_A, E2M1_BF16_HI_B, sel), lo = prmt(E2M1_BF16_LO_A, E2M1_BF16_LO_B, sel);
  return e2m1x4_signs(c, prmt(lo, hi, 0x5140), prmt(lo, hi, 0x7362));
}
DEVICE u32 bf16x2_mul_exact(u32 a, u32 b) {
  u32 d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
  return d;
}
DEVICE uint4 e2m1x8_bf16(u32 codes, u32 sb) {
  const u32 d = __float_as_uint(e4m3(sb)) >> 16;  // exact in bf16 (three fraction bits)
  const u32 d2 = d | (d << 16);
  const uint2 a = e2m1x4_bf16_mags(codes), b = e2m1x4_bf16_mags(codes >> 16);
  return make_uint4(bf16x2_mul_exact(a.x, d2), bf16x2_mul_exact(a.y, d2), bf16x2_mul_exact(b.x, d2),
                    bf16x2_mul_exact(b.y, d2));
}

// The f16 form's tiles: the same values as f16, exact too. E4M3 codes
// are f16 values (one conversion a pair). An E2M1 value times its E4M3
// group scale has at most six significant bits and a magnitude of 0 or
// 2^-10 to 2688, inside f16's normal range: the magnitudes' f16 bits
// (their low bytes are zero) looked up four codes at a time by a byte
// permute, the sign bits moved in, then one f16x2 multiply-add by the
// scale (with -0 added, as in e2m1x8_bf16).
DEVICE u32 e4m3x2_f16x2(u32 two) {
  u32 h;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"((unsigned short)two));
  return h;
}
DEVICE uint4 e4m3x8_f16(uint2 v) {
  return make_uint4(e4m3x2_f16x2(v.x), e4m3x2_f16x2(v.x >> 16), e4m3x2_f16x2(v.y), e4m3x2_f16x2(v.y >> 16));
}
#define E2M1_F16_HI_A 0x3E3C3800u  // magnitudes 0, 0.5, 1, 1.5: high bytes
#define E2M1_F16_HI_B 0x46444240u  // 2, 3, 4, 6
DEVICE uint2 e2m1x4_f16_mags(u32 c) {  // c: four codes, low 16 bits
  const u32 hi = prmt(E2M1_F16_HI_A, E2M1_F16_HI_B, c & 0x7777u);
  return e2m1x4_signs(c, prmt(hi, 0u, 0x1404u), prmt(hi, 0u, 0x3424u));  // zero low bytes
}
DEVICE u32 f16x2_mul_exact(u32 a, u32 b) {
  u32 d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
  return d;
}
DEVICE uint4 e2m1x8_f16(u32 codes, u32 sb) {
  const u32 d2 = e4m3x2_f16x2(sb | (sb << 8));
  const uint2 a = e2m1x4_f16_mags(codes), b = e2m1x4_f16_mags(codes >> 16);
  return make_uint4(f16x2_mul_exact(a.x, d2), f16x2_mul_exact(a.y, d2), f16x2_mul_exact(b.x, d2),
                    f16x2_mul_exact(b.y, d2));
}

// The conversions (tests): block s (a scale byte) and thread c write, for
// codes made from c (every byte value in each of the four places across
// the threads), into out[4][256][256]: e2m1x8_bf16, e2m1x8_bf16_ref and
// e2m1x8_f16 of the codes with scale s, and e4m3x8_f16 of the codes then
// four bytes s.
extern "C" __global__ void flash_convert(uint4* __restrict__ out) {
  const u32 c = threadIdx.x, sb = blockIdx.x;
  const u32 codes = c | ((255u - c) << 8) | (((c * 7u) & 255u) << 16) | (((c * 13u + 5u) & 255u) << 24);
  out[sb * 256 + c] = e2m1x8_bf16(codes, sb);
  out[65536 + sb * 256 + c] = e2m1x8_bf16_ref(codes, sb);
  out[2 * 65536 + sb * 256 + c] = e2m1x8_f16(codes, sb);
  out[3 * 65536 + sb * 256 + c] = e4m3x8_f16(make_uint2(codes, sb * 0x01010101u));
}

// A quantized cache's record for the tiles: its bytes, the offset of its
// two float scales (the latent's, then k_pe's), and 8 of its values from
// column k (a multiple of 8) as stored, as bf16 and as f16 (both exact).
// fp8: rank + dr E4M3 codes, then the scales. fp4 (fp4_slot_bytes in
// prelude.cuh): the latent's E2M1 codes two a byte, k_pe's E4M3 codes, the
// latent's group scales, the float scales; 8 latent values load as their
// 4 code bytes and their group's scale byte.
template <bool FP4>
constexpr DEVICE int rec_bytes(int rank, int dr) {
  return FP4 ? fp4_slot_bytes(rank, dr) : rank + dr + 8;
}
template <bool FP4>
DEVICE int rec_scales(int rank, int dr) {
  return FP4 ? fp4_scale_offset(rank, dr) : rank + dr;
}
template <bool FP4>
DEVICE uint2 rec_load8(const u8* rec, int k, int rank, int dr) {
  if (!FP4) return *(const uint2*)(rec + k);
  return k < rank ? make_uint2(*(const u32*)(rec + k / 2), rec[rank / 2 + dr + k / 32])
                  : *(const uint2*)(rec + rank / 2 + (k - rank));
}
template <bool FP4>
DEVICE uint4 rec_bf16x8(uint2 v, int k, int rank) {
  return FP4 && k < rank ? e2m1x8_bf16(v.x, v.y) : e4m3x8_bf16(v);
}
template <bool FP4>
DEVICE uint4 rec_f16x8(uint2 v, int k, int rank) {
  return FP4 && k < rank ? e2m1x8_f16(v.x, v.y) : e4m3x8_f16(v);
}

// The queries of the block's 32 rows (row r: token t0 + r/FA_HB, head
// h0 + r%FA_HB; zeros past the ends), W = rank + dr columns: [qlat | q_pe],
// as hi and lo bf16 halves (qhi, qlo), or with F16 as f16 (qhi) after
// scaling each row by a power of two that takes its largest magnitude into
// [2^14, 2^15) (qinv[r]: the inverse, exact; 1 without F16). Warp w loads
// rows [4w, +4), lane l every 32nd float4 of a row from the l-th, so a
// row's largest magnitude is a warp's reduction (shared-memory atomics on
// 32 words, 144 a row, took about a tenth of the kernel). All of a
// thread's loads are issued before the first is used, and between() is
// called after they are issued.
template <int RANK, int W, bool F16, typename F>
DEVICE void load_queries(unsigned short* qhi, unsigned short* qlo, float* qinv, int ld,
                         const float* __restrict__ qlat, int ldql, const float* __restrict__ q, int ldq, int t0,
                         int h0, int T, int heads, int dn, F between) {
  constexpr int per = W / 4, iters = (per + 31) / 32, RPW = FA_M / (FA_THREADS / 32);
  constexpr int dr = W - RANK;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float4 v[RPW][iters];
#pragma unroll
  for (int j = 0; j < RPW; j++) {
    const int r = warp * RPW + j, t = t0 + r / FA_HB, h = h0 + r % FA_HB;
#pragma unroll
    for (int u = 0; u < iters; u++) {
      const int k = (lane + 32 * u) * 4;
      v[j][u] = make_float4(0.f, 0.f, 0.f, 0.f);
      if ((per % 32 == 0 || k < W) && t < T && h < heads)
        v[j][u] = k < RANK ? *(const float4*)(qlat + (size_t)t * ldql + (size_t)h * RANK + k)
                           : *(const float4*)(q + (size_t)t * ldq + (size_t)h * (dn + dr) + dn + (k - RANK));
    }
  }
  between();  // while the loads are in flight
#pragma unroll
  for (int j = 0; j < RPW; j++) {
    const int r = warp * RPW + j;
    float f = 1.f;
    if (F16) {
      float m = 0.f;
#pragma unroll
      for (int u = 0; u < iters; u++)
        m = fmaxf(m, fmaxf(fmaxf(fabsf(v[j][u].x), fabsf(v[j][u].y)), fmaxf(fabsf(v[j][u].z), fabsf(v[j][u].w))));
      m = warp_max(m);
      const int e = fa_query_exp(m);
      f = fa_pow2(e);
      if (lane == 0) qinv[r] = fa_pow2(-e);
    } else if (lane == 0) {
      qinv[r] = 1.f;
    }
#pragma unroll
    for (int u = 0; u < iters; u++) {
      const int k = (lane + 32 * u) * 4;
      if (per % 32 != 0 && k >= W) break;
      if (F16) {
        *(uint2*)(qhi + r * ld + k) =
            make_uint2(f16x2_rn(v[j][u].x * f, v[j][u].y * f), f16x2_rn(v[j][u].z * f, v[j][u].w * f));
        continue;
      }
      u32 h0b, l0b, h1b, l1b, h2b, l2b, h3b, l3b;
      split_bf16(v[j][u].x, h0b, l0b);
      split_bf16(v[j][u].y, h1b, l1b);
      split_bf16(v[j][u].z, h2b, l2b);
      split_bf16(v[j][u].w, h3b, l3b);
      *(uint2*)(qhi + r * ld + k) = make_uint2(h0b | (h1b << 16), h2b | (h3b << 16));
      *(uint2*)(qlo + r * ld + k) = make_uint2(l0b | (l1b << 16), l2b | (l3b << 16));
    }
  }
}

// Cache slots of positions [kb, kb+n) into sslot (0 past nkeys), n <=
// FA_THREADS.
DEVICE void tile_slots(u32* sslot, int n, int kb, int nkeys, const i32* __restrict__ table, int block_size) {
  if (threadIdx.x < n) {
    const int j = kb + threadIdx.x;
    sslot[threadIdx.x] = j < nkeys ? (u32)(table[j / block_size] * block_size + j % block_size) : 0u;
  }
}

// F16: f16 operands and two key tiles (155 + 75 KB): the next tile's
// copies (bf16 cache) are in flight during this one's products, or its
// records (fp8 or fp4 cache) are loaded into registers after this one's
// scores and converted to f16 after its products; the bf16 cache's key
// fragments are widened to f16 in registers, and the score loop is
// unrolled whole so that the next step's loads (and widening) need not
// wait for this step's products. Else exact: the queries and the weights
// split hi + lo, one key tile (196 KB). FP4: the fp4 cache (dtype 3).
// FP8: the f16 form's fp8 instance; else the f16 form takes the bf16
// cache, and the exact form the bf16 or the fp8 cache by dtype.
template <int NT, int DR, bool F16, bool STAMP = false, bool FP4 = false, bool FP8 = false>
DEVICE void flash_latent(float* __restrict__ olat, int ldo, const float* __restrict__ qlat, int ldql,
                         const float* __restrict__ q, int ldq, const u8* __restrict__ layer, int dtype,
                         const i32* __restrict__ pos, const i32* __restrict__ row_seq,
                         const i32* __restrict__ seq_blocks, const i32* __restrict__ blocks, int block_size,
                         int T, int heads, int dn, float scale, i8* __restrict__ xq, float* __restrict__ xs,
                         i32* __restrict__ xsum, int G, unsigned long long* stamps = nullptr) {
  constexpr int rank = NT * 64;  // warp w owns columns [w*NT*8, +NT*8)
  constexpr int W = rank + DR, ld = W + 8;  // bf16 row stride: an odd number of 16-byte units
  constexpr bool QLO = !F16, PLO = !F16, DB = F16;  // lo halves, two key tiles
  constexpr int NB = DB ? 2 : 1;                    // key tiles
  constexpr bool QF = F16 && (FP4 || FP8);          // f16 operands, a quantized cache
  // F16: the softmax in base 2 on ex2.approx with the row sums kept per
  // thread, its partial-score reads free of bank conflicts; over the bf16
  // cache (no per-position scales) one score accumulator.
  constexpr bool ONE = F16 && !QF, LEAN = F16;
  extern __shared__ __align__(16) u8 fa_smem[];
  unsigned short* qhi = (unsigned short*)fa_smem;
  unsigned short* qlo = qhi + FA_M * ld;                       // with QLO
  unsigned short* kbuf = qhi + (QLO ? 2 : 1) * FA_M * ld;      // [NB][FA_N][ld]
  float* sp = (float*)(kbuf + NB * FA_N * ld);                 // [4][FA_M][FA_SLD]
  unsigned short* phi = (unsigned short*)(sp + 4 * FA_M * FA_SLD);  // [FA_M][FA_PLD]
  unsigned short* plo = phi + FA_M * FA_PLD;                   // with PLO
  float* sc0 = (float*)(phi + (PLO ? 2 : 1) * FA_M * FA_PLD);  // [FA_N] scale of c (fp8), else 1
  float* sc1 = sc0 + FA_N;                     // [FA_N] scale of k_pe
  float* alpha_s = sc1 + FA_N;                 // [FA_M]
  float* l_s = alpha_s + FA_M;                 // [FA_M]
  float* qinv = l_s + FA_M;                    // [FA_M] inverse scale of a query row
  u32* sslot = (u32*)(qinv + FA_M);            // [NB][FA_N] cache slots of the next tiles

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, c4 = lane & 3;
  // Blocks start in the order of their linear index: the token chunks
  // with the most positions first, each for all head groups in turn, so
  // that the light blocks of every head group come last (with the head
  // group as the slower index, each group's heavy blocks waited for the
  // group before, and the kernel's tail grew by about an eighth).
  const int bl = blockIdx.y * gridDim.x + blockIdx.x;
  const int t0 = (gridDim.x - 1 - bl / gridDim.y) * FA_TQ, h0 = (bl % gridDim.y) * FA_HB;
  // With STAMP (a benchmark's probe), each warp sums the clock cycles of
  // its phases: 0 the copies' wait and the tile's first barrier, 1 the
  // partial scores, 2 the second barrier, 3 the softmax, 4 the third
  // barrier, 5 the weighted values, 6 the queries' loads issued and a
  // sequence's start, 7 the rest of the queries and of the start, 8 the
  // output; 9 counts tiles.
  long long st_acc[FA_PHASES], st_t = 0;
  if (STAMP) {
#pragma unroll
    for (int k = 0; k < FA_PHASES; k++) st_acc[k] = 0;
    st_t = clock64();
  }
#define FA_STAMP(k)                 \
  if (STAMP) {                      \
    const long long now = clock64(); \
    st_acc[k] += now - st_t;        \
    st_t = now;                     \
  }
  const int nt = min(FA_TQ, T - t0);

  // Softmax role: row sr, keys [8*sq, +8).
  const int sr = tid >> 3, sq = tid & 7;
  // S role: key half kh, k steps kw, kw+4, ...
  const int kh = warp & 1, kw = warp >> 1;
  constexpr int lsteps = rank / 16, steps = W / 16;
  // ldmatrix lane addresses (bf16 offsets inside a 16x16 tile).
  const int a_off = (lane & 15) * ld + (lane >> 4) * 8;                          // A, row-major
  const int b_off = ((lane & 7) + ((lane >> 4) << 3)) * ld + ((lane >> 3) & 1) * 8;  // B from [key][k]
  const int v_off = ((lane & 7) + (((lane >> 3) & 1) << 3)) * ld + (lane >> 4) * 8;  // B from [key][col], .trans
  const int p_off = (lane & 15) * FA_PLD + (lane >> 4) * 8;

  // Copies of a tile of the bf16 cache (zeros past nkeys).
  // Four threads a row, each every fourth 16-byte chunk: one slot and one
  // address a tile, the chunks at constant offsets from it.
  auto issue_bf16 = [&](unsigned short* dst, const u32* sl, int kb, int nkeys) {
    constexpr int per = W / 8, TPR = FA_THREADS / FA_N;  // chunks a row, threads a row
    const int jj = tid / TPR, sub = tid % TPR;
    const bool valid = kb + jj < nkeys;
    const u8* src = layer + ((size_t)sl[jj] * W + sub * 8) * 2;
    const u32 d = smem_addr(dst + jj * ld + sub * 8);
#pragma unroll
    for (int c = 0; c < per; c += TPR)
      if (c + sub < per) cp_async16(d + c * 16, src + c * 16, valid);
  };

  // Records of a quantized cache (rec_bytes: fp4 in the fp4 instances,
  // dtype 3; else fp8) for positions [kb, +FA_N) at the slots sl, zeros
  // past nkeys: rec_load issues all of this thread's loads (8 values a
  // chunk and, for tid < FA_N, the position's two float scales, the
  // latent's and k_pe's); rec_store converts the values exactly (f16 in
  // the f16 form, else bf16) into dst and stores the scales in sc0 and
  // sc1, which are applied in fp32 outside the products.
  constexpr int rper = W / 8, rtotal = FA_N * rper, riters = (rtotal + FA_THREADS - 1) / FA_THREADS;
  uint2 rv[riters];
  float rs0 = 0.f, rs1 = 0.f;
  auto rec_load = [&](const u32* sl, int kb, int nkeys) {
    const int rb = rec_bytes<FP4>(rank, DR), so = rec_scales<FP4>(rank, DR);
#pragma unroll
    for (int u = 0; u < riters; u++) {
      const int i = tid + u * FA_THREADS, jj = i / rper, k = (i % rper) * 8;
      rv[u] = (rtotal % FA_THREADS == 0 || i < rtotal) && kb + jj < nkeys
                  ? rec_load8<FP4>(layer + (size_t)sl[jj] * rb, k, rank, DR)
                  : make_uint2(0, 0);
    }
    rs0 = rs1 = 0.f;
    if (tid < FA_N && kb + tid < nkeys) {
      const float* sc = (const float*)(layer + (size_t)sl[tid] * rb + so);
      rs0 = sc[0];
      rs1 = sc[1];
    }
  };
  auto rec_store = [&](unsigned short* dst) {
#pragma unroll
    for (int u = 0; u < riters; u++) {
      const int i = tid + u * FA_THREADS, jj = i / rper, k = (i % rper) * 8;
      if (rtotal % FA_THREADS == 0 || i < rtotal)
        *(uint4*)(dst + jj * ld + k) = QF ? rec_f16x8<FP4>(rv[u], k, rank) : rec_bf16x8<FP4>(rv[u], k, rank);
    }
    if (tid < FA_N) sc0[tid] = rs0, sc1[tid] = rs1;
  };

  // The start of one sequence's tokens [ta, tb) of the block: its keys,
  // block table and this thread's softmax row's position, the slots of
  // the first NB tiles (tile i in sslot[i]) and, with DB, the first
  // tile's copies (bf16 cache) or its converted records (QF).
  int ta = 0, tb = 0, nkeys = 0, rowpos = -1;
  const i32* table = blocks;
  auto start_seq = [&]() {
    const int seq = row_seq[t0 + ta];
    tb = ta + 1;
    while (tb < nt && row_seq[t0 + tb] == seq) tb++;
    nkeys = 0;
    for (int i = ta; i < tb; i++) nkeys = max(nkeys, pos[t0 + i] + 1);
    table = blocks + seq_blocks[seq];
    const int st = sr / FA_HB, sh = h0 + sr % FA_HB;
    rowpos = (st >= ta && st < tb && sh < heads) ? pos[t0 + st] : -1;
    tile_slots(sslot, NB * FA_N, 0, nkeys, table, block_size);
    if (dtype == 0 && tid < FA_N) sc0[tid] = sc1[tid] = 1.f;
    __syncthreads();
    if (DB && !QF && dtype == 0) {
      issue_bf16(kbuf, sslot, 0, nkeys);
      asm volatile("cp.async.commit_group;" ::: "memory");
    }
    if (QF) {
      rec_load(sslot, 0, nkeys);
      rec_store(kbuf);
    }
    FA_STAMP(6);
  };
  // The first sequence starts while the queries' loads are in flight.
  load_queries<rank, W, F16>(qhi, qlo, qinv, ld, qlat, ldql, q, ldq, t0, h0, T, heads, dn, start_seq);

  while (ta < nt) {
    if (ta > 0) start_seq();
    float m_run = __int_as_float(0xff800000), l_run = 0.f;
    int e_run = FA_WEMAX;  // QF: the weights' power of two (below)
    float o[2][NT][4];
#pragma unroll
    for (int m = 0; m < 2; m++)
#pragma unroll
      for (int n = 0; n < NT; n++) o[m][n][0] = o[m][n][1] = o[m][n][2] = o[m][n][3] = 0.f;

    int it = 0;
    FA_STAMP(7);
    for (int kb = 0; kb < nkeys; kb += FA_N, it++) {
      if (STAMP) st_acc[9]++;
      const int cur = DB ? (it & 1) : 0;
      unsigned short* ks = kbuf + cur * FA_N * ld;
      const u32* slots = sslot + cur * FA_N;
      // The tile's cached rows as bf16 or f16 (zeros past nkeys); QF
      // converted its records a tile earlier (or at the sequence's start).
      if (!QF && !FP4 && dtype == 0) {
        if (!DB) issue_bf16(ks, slots, kb, nkeys);
        cp_async_wait_all();  // with DB, copies issued a tile earlier
      } else if (!QF) {
        rec_load(slots, kb, nkeys);
        rec_store(ks);
      }
      __syncthreads();
      FA_STAMP(0);
      // The block-table entry of the tile NB ahead, stored to its slot
      // after the scores (the load's latency off the softmax's path).
      const int jn = kb + NB * FA_N + tid;
      i32 tv = 0;
      if (tid < FA_N && jn < nkeys) tv = table[jn / block_size];
      // With DB, the next tile's copies into the other buffer: every warp
      // is past the products of the tile before, which used it.
      if (DB && !QF && dtype == 0 && kb + FA_N < nkeys) {
        issue_bf16(kbuf + (cur ^ 1) * FA_N * ld, sslot + (cur ^ 1) * FA_N, kb + FA_N, nkeys);
        asm volatile("cp.async.commit_group;" ::: "memory");
      }

      // S partials: 32 rows x 32 keys over this warp's k steps.
      {
        float al[2][4][4], ap[2][4][4];
#pragma unroll
        for (int m = 0; m < 2; m++)
#pragma unroll
          for (int n = 0; n < 4; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) al[m][n][e] = ap[m][n][e] = 0.f;
        // One k step s into acc: the hi halves into all eight tiles, then
        // the lo halves, so that no product waits for the one just before.
        auto step = [&](int s, float(&acc)[2][4][4]) {
          u32 ah[2][4], alo[2][4], b[4][2];
#pragma unroll
          for (int m = 0; m < 2; m++) {
            ldsm_x4(smem_addr(qhi + m * 16 * ld + s * 16 + a_off), ah[m][0], ah[m][1], ah[m][2], ah[m][3]);
            if (QLO)
              ldsm_x4(smem_addr(qlo + m * 16 * ld + s * 16 + a_off), alo[m][0], alo[m][1], alo[m][2], alo[m][3]);
          }
#pragma unroll
          for (int np = 0; np < 2; np++)
            ldsm_x4(smem_addr(ks + (kh * 32 + np * 16) * ld + s * 16 + b_off), b[2 * np][0], b[2 * np][1],
                    b[2 * np + 1][0], b[2 * np + 1][1]);
          if (F16) {
            if (!QF) {  // bf16 keys (QF's tile is f16)
#pragma unroll
              for (int n = 0; n < 4; n++) frag_f16(b[n]);
            }
#pragma unroll
            for (int m = 0; m < 2; m++)
#pragma unroll
              for (int n = 0; n < 4; n++) mma_f16(acc[m][n], ah[m], b[n][0], b[n][1]);
          } else {
#pragma unroll
            for (int m = 0; m < 2; m++)
#pragma unroll
              for (int n = 0; n < 4; n++) mma_bf16(acc[m][n], ah[m], b[n][0], b[n][1]);
          }
          if (QLO) {
#pragma unroll
            for (int m = 0; m < 2; m++)
#pragma unroll
              for (int n = 0; n < 4; n++) mma_bf16(acc[m][n], alo[m], b[n][0], b[n][1]);
          }
        };
        // This warp's k steps are kw, kw+4, ...: the latent ones (rank/16
        // = 4 NT of them), then the rope ones (QF: below). None where all
        // its keys lie past the sequence's (its partial scores are masked).
        if (kb + kh * 32 < nkeys) {
          if (F16) {
#pragma unroll
            for (int i = 0; i < NT; i++) step(kw + 4 * i, al);
          } else {
#pragma unroll 2
            for (int i = 0; i < NT; i++) step(kw + 4 * i, al);
          }
          if (!QF) {
#pragma unroll
            for (int s = lsteps + kw; s < steps; s += 4) step(s, ONE ? al : ap);
          }
        }
        // QF: the rope steps into ar, 16 rows at a time, after the latent
        // ones (half of ap's registers: the model's instance has none to
        // spare).
        auto rope_half = [&](int m, float(&ar)[4][4]) {
#pragma unroll
          for (int n = 0; n < 4; n++) ar[n][0] = ar[n][1] = ar[n][2] = ar[n][3] = 0.f;
          if (kb + kh * 32 >= nkeys) return;
#pragma unroll
          for (int s = lsteps + kw; s < steps; s += 4) {
            u32 a[4], b[4][2];
            ldsm_x4(smem_addr(qhi + m * 16 * ld + s * 16 + a_off), a[0], a[1], a[2], a[3]);
#pragma unroll
            for (int np = 0; np < 2; np++)
              ldsm_x4(smem_addr(ks + (kh * 32 + np * 16) * ld + s * 16 + b_off), b[2 * np][0], b[2 * np][1],
                      b[2 * np + 1][0], b[2 * np + 1][1]);
#pragma unroll
            for (int n = 0; n < 4; n++) mma_f16(ar[n], a, b[n][0], b[n][1]);
          }
        };
        float* mine = sp + kw * FA_M * FA_SLD;
#pragma unroll
        for (int m = 0; m < 2; m++) {
          float ar[4][4];
          if (QF) rope_half(m, ar);
#pragma unroll
          for (int n = 0; n < 4; n++) {
            const int col = kh * 32 + n * 8 + 2 * c4;
            const int row = m * 16 + g;
            if (ONE) {  // one accumulator, unit scales (bf16 cache)
              *(float2*)(mine + row * FA_SLD + col) = make_float2(al[m][n][0], al[m][n][1]);
              *(float2*)(mine + (row + 8) * FA_SLD + col) = make_float2(al[m][n][2], al[m][n][3]);
              continue;
            }
            const float* r = QF ? ar[n] : ap[m][n];  // the rope part
            const float s00 = sc0[col], s01 = sc0[col + 1], s10 = sc1[col], s11 = sc1[col + 1];
            *(float2*)(mine + row * FA_SLD + col) =
                make_float2(al[m][n][0] * s00 + r[0] * s10, al[m][n][1] * s01 + r[1] * s11);
            *(float2*)(mine + (row + 8) * FA_SLD + col) =
                make_float2(al[m][n][2] * s00 + r[2] * s10, al[m][n][3] * s01 + r[3] * s11);
          }
        }
      }
      // QF: the next tile's records, loaded now that the score
      // accumulators are free and converted after this tile's products
      // into the other key buffer (its last reads were before the top
      // barrier), so that the loads' latency passes under the softmax and
      // the products.
      const bool next = QF && kb + FA_N < nkeys;
      if (next) rec_load(sslot + (cur ^ 1) * FA_N, kb + FA_N, nkeys);
      FA_STAMP(1);
      __syncthreads();
      FA_STAMP(2);

      // Slots of the tile NB ahead (this buffer's slots are used).
      if (tid < FA_N) sslot[cur * FA_N + tid] = jn < nkeys ? (u32)(tv * block_size + jn % block_size) : 0u;

      // Online softmax: 8 threads a row.
      if (LEAN) {
        // Thread sq takes keys [4*sq, +4) and [32 + 4*sq, +4).
        float sv[8];
#pragma unroll
        for (int u = 0; u < 8; u++) sv[u] = 0.f;
#pragma unroll
        for (int w = 0; w < 4; w++) {
          const float4 x0 = *(const float4*)(sp + (w * FA_M + sr) * FA_SLD + sq * 4);
          const float4 x1 = *(const float4*)(sp + (w * FA_M + sr) * FA_SLD + 32 + sq * 4);
          sv[0] += x0.x, sv[1] += x0.y, sv[2] += x0.z, sv[3] += x0.w;
          sv[4] += x1.x, sv[5] += x1.y, sv[6] += x1.z, sv[7] += x1.w;
        }
        float mx = __int_as_float(0xff800000);
        const float rscale = scale * 1.4426950408889634f * qinv[sr];  // log2(e) / sqrt(d); qinv a power of two
        const bool full = kb + FA_N - 1 <= rowpos;
#pragma unroll
        for (int u = 0; u < 8; u++) {
          const bool valid = full || kb + (u >> 2) * 32 + sq * 4 + (u & 3) <= rowpos;
          sv[u] = valid ? sv[u] * rscale : __int_as_float(0xff800000);
          mx = fmaxf(mx, sv[u]);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
        const float m_new = fmaxf(m_run, mx);
        const bool none = m_new == __int_as_float(0xff800000);
        const float alpha = none ? 1.f : fa_ex2(m_run - m_new);
        float sum = 0.f;
#pragma unroll
        for (int u = 0; u < 8; u++) {
          sv[u] = none ? 0.f : fa_ex2(sv[u] - m_new);  // ex2(-inf) = 0 for masked keys
          sum += sv[u];
        }
        l_run = l_run * alpha + sum;  // this thread's keys: the row's eight are added at the end
        m_run = m_new;
        float oalpha = alpha;  // the output's factor
        if (QF) {
          // The values' weights p * sc0 * 2^e (sc0 the position's latent
          // scale), rounded to f16. p * sc0 alone can fall far below f16's
          // normal range (2^-14) for small scales; e takes the largest sc0
          // seen so far in the sequence into [2^14, 2^15) (so every weight
          // is under 2^15), so e only falls and the output, held as 2^e
          // times its sum, is rescaled by the exact 2^(e - e_old) with
          // alpha. Its terms stay under 2^15 times a value's magnitude, far
          // from fp32's range. The row's eight threads see all 64 scales,
          // so every row takes the same e; l is scaled by 2^e at the end.
          const float4 a = *(const float4*)(sc0 + sq * 4), b = *(const float4*)(sc0 + 32 + sq * 4);
          const float w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
          float smax = 0.f;
#pragma unroll
          for (int u = 0; u < 8; u++) smax = fmaxf(smax, fabsf(w[u]));
          smax = fmaxf(smax, __shfl_xor_sync(0xffffffffu, smax, 1));
          smax = fmaxf(smax, __shfl_xor_sync(0xffffffffu, smax, 2));
          smax = fmaxf(smax, __shfl_xor_sync(0xffffffffu, smax, 4));
          const int e = min(e_run, fa_weight_exp(smax));
          oalpha = alpha * fa_pow2(e - e_run);
          e_run = e;
          const float f = fa_pow2(e);
#pragma unroll
          for (int u = 0; u < 8; u++) sv[u] *= w[u] * f;
        }
        *(uint2*)(phi + sr * FA_PLD + sq * 4) = make_uint2(f16x2_rn(sv[0], sv[1]), f16x2_rn(sv[2], sv[3]));
        *(uint2*)(phi + sr * FA_PLD + 32 + sq * 4) = make_uint2(f16x2_rn(sv[4], sv[5]), f16x2_rn(sv[6], sv[7]));
        if (sq == 0) alpha_s[sr] = oalpha;
      } else {
        float sv[8];
#pragma unroll
        for (int u = 0; u < 8; u++) sv[u] = 0.f;
#pragma unroll
        for (int w = 0; w < 4; w++) {
          const float4 x0 = *(const float4*)(sp + (w * FA_M + sr) * FA_SLD + sq * 8);
          const float4 x1 = *(const float4*)(sp + (w * FA_M + sr) * FA_SLD + sq * 8 + 4);
          sv[0] += x0.x, sv[1] += x0.y, sv[2] += x0.z, sv[3] += x0.w;
          sv[4] += x1.x, sv[5] += x1.y, sv[6] += x1.z, sv[7] += x1.w;
        }
        float mx = __int_as_float(0xff800000);
        const float rscale = scale * qinv[sr];  // exact: qinv is a power of two
#pragma unroll
        for (int u = 0; u < 8; u++) {
          const bool valid = kb + sq * 8 + u <= rowpos;
          sv[u] = valid ? sv[u] * rscale : __int_as_float(0xff800000);
          mx = fmaxf(mx, sv[u]);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
        const float m_new = fmaxf(m_run, mx);
        const bool none = m_new == __int_as_float(0xff800000);
        const float alpha = none ? 1.f : expf(m_run - m_new);
        float sum = 0.f;
        u32 hb[8], lb[8];
#pragma unroll
        for (int u = 0; u < 8; u++) {
          const float p = (none || sv[u] == __int_as_float(0xff800000)) ? 0.f : expf(sv[u] - m_new);
          sum += p;
          if (F16)
            sv[u] = p * sc0[sq * 8 + u];
          else
            split_bf16(p * sc0[sq * 8 + u], hb[u], lb[u]);
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        sum += __shfl_xor_sync(0xffffffffu, sum, 4);
        l_run = l_run * alpha + sum;
        m_run = m_new;
        if (F16)
          *(uint4*)(phi + sr * FA_PLD + sq * 8) =
              make_uint4(f16x2_rn(sv[0], sv[1]), f16x2_rn(sv[2], sv[3]), f16x2_rn(sv[4], sv[5]), f16x2_rn(sv[6], sv[7]));
        else
          *(uint4*)(phi + sr * FA_PLD + sq * 8) =
              make_uint4(hb[0] | (hb[1] << 16), hb[2] | (hb[3] << 16), hb[4] | (hb[5] << 16), hb[6] | (hb[7] << 16));
        if (PLO)
          *(uint4*)(plo + sr * FA_PLD + sq * 8) =
              make_uint4(lb[0] | (lb[1] << 16), lb[2] | (lb[3] << 16), lb[4] | (lb[5] << 16), lb[6] | (lb[7] << 16));
        if (sq == 0) alpha_s[sr] = alpha;
      }
      FA_STAMP(3);
      __syncthreads();
      FA_STAMP(4);

      // O = O * alpha + P . c over this warp's columns.
      {
        const float a0 = alpha_s[g], a1 = alpha_s[g + 8], a2 = alpha_s[16 + g], a3 = alpha_s[24 + g];
#pragma unroll
        for (int n = 0; n < NT; n++) {
          o[0][n][0] *= a0, o[0][n][1] *= a0, o[0][n][2] *= a1, o[0][n][3] *= a1;
          o[1][n][0] *= a2, o[1][n][1] *= a2, o[1][n][2] *= a3, o[1][n][3] *= a3;
        }
        // One 16-key step kk (the products of keys whose weights are all
        // zero are left out on a sequence's last tile: the same sums).
        auto vstep = [&](int kk) {
          u32 ah[2][4], alo[2][4];
#pragma unroll
          for (int m = 0; m < 2; m++) {
            ldsm_x4(smem_addr(phi + m * 16 * FA_PLD + kk * 16 + p_off), ah[m][0], ah[m][1], ah[m][2], ah[m][3]);
            if (PLO)
              ldsm_x4(smem_addr(plo + m * 16 * FA_PLD + kk * 16 + p_off), alo[m][0], alo[m][1], alo[m][2], alo[m][3]);
          }
          u32 b[NT][2];
#pragma unroll
          for (int np = 0; np < NT / 2; np++)
            ldsm_x4_t(smem_addr(ks + kk * 16 * ld + warp * NT * 8 + np * 16 + v_off), b[2 * np][0], b[2 * np][1],
                      b[2 * np + 1][0], b[2 * np + 1][1]);
          if (F16) {
            if (!QF) {
#pragma unroll
              for (int n = 0; n < NT; n++) frag_f16(b[n]);
            }
#pragma unroll
            for (int m = 0; m < 2; m++)
#pragma unroll
              for (int n = 0; n < NT; n++) mma_f16(o[m][n], ah[m], b[n][0], b[n][1]);
          } else {
#pragma unroll
            for (int m = 0; m < 2; m++)
#pragma unroll
              for (int n = 0; n < NT; n++) mma_bf16(o[m][n], ah[m], b[n][0], b[n][1]);
          }
          if (PLO) {
#pragma unroll
            for (int m = 0; m < 2; m++)
#pragma unroll
              for (int n = 0; n < NT; n++) mma_bf16(o[m][n], alo[m], b[n][0], b[n][1]);
          }
        };
        if (kb + FA_N <= nkeys) {
#pragma unroll
          for (int kk = 0; kk < FA_N / 16; kk++) vstep(kk);
        } else {
#pragma unroll
          for (int kk = 0; kk < FA_N / 16; kk++)
            if (kb + kk * 16 < nkeys) vstep(kk);
        }
      }
      if (next) rec_store(kbuf + (cur ^ 1) * FA_N * ld);  // sc0 and sc1 are read before the third barrier
      // Without DB the next tile's copies overwrite this one. With DB the
      // next barrier (the top of the loop) orders the reads of the
      // weights and this buffer before their next writes.
      if (!DB) __syncthreads();
      FA_STAMP(5);
    }

    // O / l for this sequence's rows, staged in shared memory (the key
    // tiles are done with: the barrier orders every warp's last products
    // before), then written a row at a time, lane l holding columns
    // [l*E, +E) of a head's row: with xq set, the row's int8 form in groups
    // of G (32, 64 or 128; E divides G) as rmsnorm_quant writes it without
    // a gain (the quantization's bits: the same values, scales and sums).
    // Float4 c of a staged row sits at c ^ ((c >> 3) & 3), so that the
    // reads of eight lanes fall in eight different bank groups.
    if (LEAN) {  // the row's eight threads' sums
      l_run += __shfl_xor_sync(0xffffffffu, l_run, 1);
      l_run += __shfl_xor_sync(0xffffffffu, l_run, 2);
      l_run += __shfl_xor_sync(0xffffffffu, l_run, 4);
    }
    if (sq == 0) l_s[sr] = QF ? l_run * fa_pow2(e_run) : l_run;  // in the weights' scale (QF)
    __syncthreads();
    {
      constexpr int OLD = rank + 4, E = rank / 32, E4 = E / 4;
      float* ost = (float*)kbuf;  // [FA_M][OLD]
      auto swz = [](int c) { return c ^ ((c >> 3) & 3); };
#pragma unroll
      for (int m = 0; m < 2; m++)
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
          const int row = m * 16 + hf * 8 + g;
          const float inv = 1.f / l_s[row];
#pragma unroll
          for (int n = 0; n < NT; n++) {
            const int c = warp * NT * 2 + 2 * n + (c4 >> 1);
            *(float2*)(ost + row * OLD + swz(c) * 4 + (c4 & 1) * 2) =
                make_float2(o[m][n][2 * hf] * inv, o[m][n][2 * hf + 1] * inv);
          }
        }
      __syncthreads();
      const int K = heads * rank;
#pragma unroll 1
      for (int j = 0; j < FA_M / 8; j++) {
        const int row = warp + 8 * j, ti = row / FA_HB, h = h0 + row % FA_HB;
        if (ti < ta || ti >= tb || h >= heads) continue;  // whole warps
        const int t = t0 + ti, col = h * rank + lane * E;
        float x[E];
#pragma unroll
        for (int i = 0; i < E4; i++) {
          const float4 v = *(const float4*)(ost + row * OLD + swz(lane * E4 + i) * 4);
          x[4 * i] = v.x, x[4 * i + 1] = v.y, x[4 * i + 2] = v.z, x[4 * i + 3] = v.w;
          *(float4*)(olat + (size_t)t * ldo + col + 4 * i) = v;
        }
        if (!xq) continue;
        float amax = 0.f;
#pragma unroll
        for (int e = 0; e < E; e++) amax = fmaxf(amax, fabsf(x[e]));
        for (int o2 = 1; o2 < G / E; o2 <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o2));
        const float qs = amax / 127.f;
        u32 pk[E4];
        i32 sum = 0;
#pragma unroll
        for (int i = 0; i < E4; i++) {
          const i32 q0 = quant8(x[4 * i], amax, qs), q1 = quant8(x[4 * i + 1], amax, qs);
          const i32 q2 = quant8(x[4 * i + 2], amax, qs), q3 = quant8(x[4 * i + 3], amax, qs);
          sum += q0 + q1 + q2 + q3;
          pk[i] = (u32)(q0 & 0xFF) | ((u32)(q1 & 0xFF) << 8) | ((u32)(q2 & 0xFF) << 16) | ((u32)q3 << 24);
        }
#pragma unroll
        for (int o2 = 1; o2 < 32 / E; o2 <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o2);
        i8* dq = xq + (size_t)t * K + col;
        if (E4 == 4)
          *(uint4*)dq = make_uint4(pk[0], pk[E4 > 1 ? 1 : 0], pk[E4 > 2 ? 2 : 0], pk[E4 > 3 ? 3 : 0]);
        else if (E4 == 2)
          *(uint2*)dq = make_uint2(pk[0], pk[E4 > 1 ? 1 : 0]);
        else
          *(u32*)dq = pk[0];
        if (lane % (32 / E) == 0) xsum[(size_t)t * (K / 32) + col / 32] = sum;
        if (lane % (G / E) == 0) xs[(size_t)t * (K / G) + col / G] = amax == 0.f ? 0.f : qs;
      }
    }
    __syncthreads();
    FA_STAMP(8);
    ta = tb;
  }
  if (STAMP && lane == 0) {
#pragma unroll
    for (int k = 0; k < FA_PHASES; k++) atomicAdd(stamps + warp * FA_PHASES + k, (unsigned long long)st_acc[k]);
  }
#undef FA_STAMP
}

#define FLASH_LATENT(NT, DR, F16, FP4, FP8, NAME)                                                                \
  extern "C" __global__ void __launch_bounds__(FA_THREADS, 1)                                                    \
      NAME(float* olat, int ldo, const float* qlat, int ldql, const float* q, int ldq, const u8* layer,          \
           int dtype, const i32* __restrict__ pos, const i32* __restrict__ row_seq,                              \
           const i32* __restrict__ seq_blocks, const i32* __restrict__ blocks, int block_size, int T, int heads, \
           int dn, float scale, i8* xq, float* xs, i32* xsum, int G) {                                           \
    PDL_LAUNCH();                                                                                                \
    PDL_WAIT();                                                                                                  \
    flash_latent<NT, DR, F16, false, FP4, FP8>(olat, ldo, qlat, ldql, q, ldq, layer, dtype, pos, row_seq,        \
                                               seq_blocks, blocks, block_size, T, heads, dn, scale, xq, xs, xsum, \
                                               G);                                                                \
  }

// Instances: (rank/64, rope dims) of the model (8, 64) and of the tests
// (the last, the tiny test model's), each in f16 operands over the bf16
// (_h), fp8 (_h8) and fp4 (_h4) caches, exact over the bf16 and fp8
// caches (_exact), and exact over the fp4 cache (_fp4: its own instance,
// so that the others keep their registers).
#define FLASH_FORMS(NT, DR)                                                   \
  FLASH_LATENT(NT, DR, true, false, false, flash_latent_##NT##_##DR##_h)      \
  FLASH_LATENT(NT, DR, true, false, true, flash_latent_##NT##_##DR##_h8)      \
  FLASH_LATENT(NT, DR, true, true, false, flash_latent_##NT##_##DR##_h4)      \
  FLASH_LATENT(NT, DR, false, false, false, flash_latent_##NT##_##DR##_exact) \
  FLASH_LATENT(NT, DR, false, true, false, flash_latent_##NT##_##DR##_fp4)
FLASH_FORMS(8, 64)

// The model's f16 form with phase clocks (a benchmark's probe; STAMP in
// flash_latent): stamps holds 8 warps x FA_PHASES sums.
extern "C" __global__ void __launch_bounds__(FA_THREADS, 1)
    flash_latent_8_64_h_stamp(float* olat, int ldo, const float* qlat, int ldql, const float* q, int ldq,
                              const u8* layer, int dtype, const i32* __restrict__ pos, const i32* __restrict__ row_seq,
                              const i32* __restrict__ seq_blocks, const i32* __restrict__ blocks, int block_size, int T,
                              int heads, int dn, float scale, i8* xq, float* xs, i32* xsum, int G,
                              unsigned long long* stamps) {
  PDL_LAUNCH();
  PDL_WAIT();
  flash_latent<8, 64, true, true>(olat, ldo, qlat, ldql, q, ldq, layer, dtype, pos, row_seq, seq_blocks, blocks,
                                  block_size, T, heads, dn, scale, xq, xs, xsum, G, stamps);
}

FLASH_FORMS(4, 32)
FLASH_FORMS(2, 64)
FLASH_FORMS(2, 16)

// Decode attention on the tensor cores: a few rows (one a sequence), each
// against its own cached positions, split over blocks by position.
//
// Block (s, t, z) of the grid (splits, rows, head groups) takes the
// positions [s*chunk, +chunk) of row t (chunk = ceil(n/splits) rounded up
// to 16, n = pos[t]+1) for the heads [z*8*HT, +8*HT) (HT = DM_HT: all of
// up to DM_NH = 24 heads in one block; HT = 1: blocks of 8 heads, a third
// of the queries, products and partials a block, each head's sums those of
// the all-heads blocks), in tiles of TP = 16 or 32
// positions copied to shared memory by cp.async, DM_NST tiles in flight.
// The leading tiles' rows of positions written by earlier steps are
// copied before the wait for the kernel before (with ahead set): under
// programmatic dependent launch they stream while the absorbed query
// still runs; this step's rows (and the queries) are read after it.
// With the heads as the n side of m16n8k16 (3 tiles of 8):
//   S^T (TP x 24)  = [c | k_pe] (TP x W) . [qlat | q_pe]^T   warp w: its own k steps
//   O^T (rank x 24) += c^T (rank x TP) . P^T (TP x 24)        warp w: columns [w*rank/8, +rank/8)
// The queries and the softmax weights are float32: each is split into
// three bf16 parts (hi + mid + lo hold its 24 bits), each product issued
// for the three parts into fp32 accumulators, so the results stay within
// float32 rounding of the CPU reference (the cache's values are exact in
// bf16). Each warp keeps its queries' parts in registers for its k steps
// (the latent ones that match its output columns, and one rope step for
// warps < DR/16); the eight partial score tiles are added in shared memory
// in a fixed order, then an online softmax per head.
//
// With one split the block writes olat; otherwise its partial (max, sum
// and unnormalised values per head). With counters set, the row's blocks
// then meet at a barrier (an arrival count per row; the host launches
// this only when the whole grid is resident at once) and each merges a
// share of the row's outputs (dm_merge_share); the last to leave resets
// the counts. Else decode_combine (a second launch) merges.
//
// Timer stamps (benchmarks), per block: entry, the wait returned, warp
// 0's queries in registers, first tile in shared memory, positions done,
// output or partials written (or merged).

#define DM_THREADS 256
#define DM_HT 3
#define DM_NH (8 * DM_HT)
#define DM_PROWS 80  // weight rows: part*DM_NH + head, padded to ten groups of 8
#define DM_NST 4     // tiles in flight
#define DM_MAXS 256

// The bf16 pair nearest (x0, x1) (rounded to nearest even, fa_bf16's bits,
// x0's in the low half), taken off x0 and x1 (exactly).
DEVICE u32 take_bf16x2(float& x0, float& x1) {
  const u32 p = bf16x2_rn(x0, x1);
  x0 -= __uint_as_float(p << 16);
  x1 -= __uint_as_float(p & 0xFFFF0000u);
  return p;
}

// x0 = hi + mid + lo exactly and x1 the same (finite values), each part a
// bf16 packed two a word: one conversion a part for two values.
DEVICE void split3_bf16x2(float x0, float x1, u32& hi, u32& mid, u32& lo) {
  hi = take_bf16x2(x0, x1);
  mid = take_bf16x2(x0, x1);
  lo = bf16x2_rn(x0, x1);
}

// x0 = hi + lo and a rest under 2^-16 of x0 (x1 the same): split3_bf16x2's
// first two parts.
DEVICE void split2_bf16x2(float x0, float x1, u32& hi, u32& lo) {
  hi = take_bf16x2(x0, x1);
  lo = bf16x2_rn(x0, x1);
}

// The int8 form of row t of a K-column output held four values a lane
// (lane: columns [4f, 4f+4)), as rmsnorm_quant writes it without a gain
// (quant.cu): codes, a scale per group of G = 32, 64 or 128 columns and
// the sums of 32 codes. The G/4 lanes of a group are consecutive lanes of
// one warp (f = lane mod 32) and all valid or all not; whole warps call
// it.
DEVICE void quant_row4(float4 v, bool valid, int f, int t, int K, int G, i8* __restrict__ xq,
                       float* __restrict__ xs, i32* __restrict__ xsum) {
  const int gl = log2_pow2(G);
  float amax = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
  for (int m = 1; m < G / 4; m <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, m));
  const float scale = amax / 127.f;
  const float u[4] = {v.x, v.y, v.z, v.w};
  i32 c[4];
  quant8_codes(u, amax, scale, c);
  const i32 q0 = c[0], q1 = c[1], q2 = c[2], q3 = c[3];
  i32 sum = q0 + q1 + q2 + q3;
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  sum += __shfl_xor_sync(0xffffffffu, sum, 2);
  sum += __shfl_xor_sync(0xffffffffu, sum, 4);
  if (!valid) return;
  const int col = 4 * f, lane = threadIdx.x & 31;
  *(u32*)(xq + (size_t)t * K + col) = (u32)(q0 & 0xFF) | ((u32)(q1 & 0xFF) << 8) | ((u32)(q2 & 0xFF) << 16) | ((u32)q3 << 24);
  if ((lane & 7) == 0) xsum[(size_t)t * (K / 32) + col / 32] = sum;
  if ((lane & ((G >> 2) - 1)) == 0) xs[(size_t)t * (K >> gl) + (col >> gl)] = amax == 0.f ? 0.f : scale;
}

// Block s of S merges its share of row t's outputs: float4 columns [f0,
// f1) of the row's heads*rank/4, every split's partial weighted by exp(m_s
// - M) of its head (0 for a split that saw no positions). Threads take a
// column and every R-th split (R = threads a column); the R sums are added
// in a fixed order. sm holds 2*S + DM_NH + 4*DM_THREADS floats.
DEVICE void dm_merge_share(float* __restrict__ olat, int ldo, const float* part_ml, const float* part_acc, int t,
                           int s, int S, int heads, int rank, float* sm, i8* __restrict__ xq, float* __restrict__ xs,
                           i32* __restrict__ xsum, int G) {
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  // Shares of whole 32-float4 chunks: a quantization group never
  // straddles two blocks, and a warp's lanes hold consecutive columns.
  const int C4 = rank / 4, NF = heads * C4, per = ((NF + S - 1) / S + 31) & ~31;
  const int f0 = s * per, f1 = min(NF, f0 + per), nf = f1 - f0;
  if (nf <= 0) return;
  const int h0 = f0 / C4, nhs = (f1 - 1) / C4 - h0 + 1;  // heads of the share
  float* wts = sm;                // [nhs][S]
  float* linv = sm + nhs * S;     // [nhs]
  float4* red = (float4*)(sm + ((nhs * S + nhs + 3) & ~3));
  const size_t stride = (size_t)heads * rank;  // between splits
  const float* ml = part_ml + (size_t)t * S * heads * 2;
  for (int hh = warp; hh < nhs; hh += DM_THREADS / 32) {
    const int h = h0 + hh;
    float M = __int_as_float(0xff800000);
    for (int q = lane; q < S; q += 32) {
      const float2 v = __ldcg((const float2*)(ml + ((size_t)q * heads + h) * 2));
      if (v.y > 0.f) M = fmaxf(M, v.x);
    }
    M = warp_max(M);
    float L = 0.f;
    for (int q = lane; q < S; q += 32) {
      const float2 v = __ldcg((const float2*)(ml + ((size_t)q * heads + h) * 2));
      const float e = v.y > 0.f ? expf(v.x - M) : 0.f;
      wts[hh * S + q] = e;
      L += e * v.y;
    }
    L = warp_sum(L);
    if (lane == 0) linv[hh] = 1.f / L;
  }
  __syncthreads();
  const int R = max(1, DM_THREADS / nf);
  const float* acc = part_acc + (size_t)t * S * stride;
  float4* out = (float4*)(olat + (size_t)t * ldo);
  if (R == 1) {
    for (int jb = 0; jb < nf; jb += DM_THREADS) {
      const int j = jb + tid, f = f0 + j;
      const bool ok = j < nf;
      float4 r = make_float4(0.f, 0.f, 0.f, 0.f);
      if (ok) {
        const int hh = f / C4 - h0;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
        for (int q = 0; q < S; q++) {
          const float w = wts[hh * S + q];
          const float4 x = __ldcg((const float4*)(acc + q * stride + 4 * (size_t)f));
          v.x += w * x.x, v.y += w * x.y, v.z += w * x.z, v.w += w * x.w;
        }
        const float inv = linv[hh];
        r = make_float4(v.x * inv, v.y * inv, v.z * inv, v.w * inv);
        out[f] = r;
      }
      if (xq) quant_row4(r, ok, f, t, NF * 4, G, xq, xs, xsum);
    }
    return;
  }
  const int j = tid % nf, r = tid / nf, f = f0 + j, hh = f / C4 - h0;
  if (r < R) {
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
    for (int q = r; q < S; q += R) {
      const float w = wts[hh * S + q];
      const float4 x = __ldcg((const float4*)(acc + q * stride + 4 * (size_t)f));
      v.x += w * x.x, v.y += w * x.y, v.z += w * x.z, v.w += w * x.w;
    }
    red[r * nf + j] = v;
  }
  __syncthreads();
  float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
  if (tid < nf) {
    float4 v = red[tid];
    for (int q = 1; q < R; q++) {
      const float4 x = red[q * nf + tid];
      v.x += x.x, v.y += x.y, v.z += x.z, v.w += x.w;
    }
    const float inv = linv[hh];
    o = make_float4(v.x * inv, v.y * inv, v.z * inv, v.w * inv);
    out[f] = o;
  }
  if (xq) quant_row4(o, tid < nf, f0 + tid, t, NF * 4, G, xq, xs, xsum);
}

// CT, the cache's kernel type: 0 bf16 (the rows copied to the tiles as
// they are); 2 fp8 and 3 fp4 (the records copied raw to the stages, then
// each tile's converted to bf16 in one tile of shared memory, exact as
// in the flash kernel, with the records' latent and k_pe scales per
// position: the rope k step's products kept apart, the scores
// sc0 * latent + sc1 * rope, and the weights times sc0 for the values).
//
// F16 (the bf16 cache): the flash kernel's f16 operands instead of three
// bf16 parts of the queries and of the weights: each head's query scaled
// by the power of two that takes its largest magnitude into [2^14, 2^15)
// (undone exactly in the softmax) and rounded to f16, the weights (in
// [0,1]) rounded to f16, and the cached rows' fragments widened to f16 in
// registers (exact for the normalised latent's magnitudes). A third of
// the tensor work and of the weights' stores a tile; errors near the
// flash kernel's f16 form (about 3e-4 of the largest output).
//
// PARTS = 2 (the bf16 cache, not F16): two bf16 parts of the queries and
// of the weights instead of three: the cached fragments as they are (no
// widening, which is about a quarter of the f16 form's instructions), two
// thirds of the exact form's products; each part's rest under 2^-16 of
// its value, so the output stays within about 4e-6 of the CPU's.
template <int RANK, int DR, int TP, int HT, int CT = 0, bool F16 = false, int PARTS = 3>
DEVICE void decode_mma(float* __restrict__ olat, int ldo, const float* __restrict__ qlat, int ldql,
                       const float* __restrict__ q, int ldq, const u8* __restrict__ layer,
                       const i32* __restrict__ pos, const i32* __restrict__ row_seq,
                       const i32* __restrict__ seq_blocks, const i32* __restrict__ blocks, int block_size, int heads,
                       int dn, float scale, float* part_ml, float* part_acc, u32* counters, int ahead,
                       i8* __restrict__ xq, float* __restrict__ xs, i32* __restrict__ xsum, int G,
                       unsigned long long* stamps) {
  constexpr int W = RANK + DR, LD = W + 8;  // cached row stride in shared memory (bf16)
  constexpr int KL = RANK / 128;            // latent k steps a warp; also its 16-column output tiles
  constexpr int KR = DR / 16;               // rope k steps: one each for warps < KR
  constexpr int KS = KL + 1;
  constexpr int CH = W / 8;                 // 16-byte pieces of a cached row
  constexpr int OLD = RANK + 4;             // output transpose row stride (floats)
  constexpr int PLD = TP + 8;               // weight row stride (bf16)
  constexpr int MT = TP / 16;               // 16-position tiles of a tile
  constexpr int TPR = DM_THREADS / TP;      // threads copying a row
  // Parts of the queries and the weights: PARTS bf16, or one f16.
  constexpr int NQP = F16 ? 1 : PARTS;
  // Score accumulators: with one position tile, one a part (or with F16
  // one for the even and one for the odd k steps): shorter chains of
  // dependent products; else one.
  constexpr int NA = MT == 1 ? (F16 ? 2 : NQP) : 1;
  // Heads: HT tiles of 8 (NH slots), the block's heads [hb, hb + NH) of
  // grid z; the weights' rows part*NH + head, in PRG groups of 8 (an even
  // count for the paired fragment loads).
  constexpr int NH = 8 * HT, PRG = (NQP * HT + 1) & ~1, PROWS = 8 * PRG;
  static_assert(KR <= 8 && DR % 16 == 0 && RANK % 128 == 0 && (TP == 16 || TP == 32), "shape");
  static_assert(CT == 0 || CT == 2 || CT == 3, "cache type");
  static_assert(!F16 || CT == 0, "the f16 form reads the bf16 cache");
  static_assert(PARTS == 3 || (PARTS == 2 && CT == 0 && !F16), "two parts: the bf16 cache");
  // A record's bytes (the stages' row stride) and its copy pieces.
  constexpr bool RAW = CT != 0;
  constexpr int RB = RAW ? rec_bytes<CT == 3>(RANK, DR) : LD * 2;
  constexpr int PB = CT == 2 ? 8 : 16, NP = CT == 0 ? CH : RB / PB;
  static_assert(RB % PB == 0, "record pieces");

  extern __shared__ __align__(16) u8 dm_smem[];
  unsigned short* stage = (unsigned short*)dm_smem;  // [DM_NST][TP][RB bytes]
  // RAW: the converted tile, after the stages.
  unsigned short* conv = (unsigned short*)(dm_smem + DM_NST * TP * RB);  // [TP][LD]
  float* ot = (float*)dm_smem;                                            // [NH][OLD], after the tiles
  constexpr int TILE_BYTES = DM_NST * TP * RB + (RAW ? TP * LD * 2 : 0);
  constexpr int STAGE_BYTES = TILE_BYTES > NH * OLD * 4 ? TILE_BYTES : NH * OLD * 4;
  constexpr int NSP = RAW ? 8 + KR : 8;                       // partial score tiles (RAW: the rope steps' apart)
  float* sp = (float*)(dm_smem + STAGE_BYTES);             // [NSP][TP][NH] partial scores; the merge's
  unsigned short* pw = (unsigned short*)(sp + NSP * TP * NH);  // [PROWS][PLD] weights
  float* alpha_s = (float*)(pw + PROWS * PLD);               // [NH]
  float* m_s = alpha_s + NH;
  float* l_s = m_s + NH;
  float* sc0 = l_s + NH;  // RAW: [TP] the latent's scale of each position
  float* sc1 = sc0 + TP;  // [TP] k_pe's
  float* qinv = l_s + NH;  // F16 (not RAW): [NH] the queries' inverse powers of two
  // The in-launch merge (all heads in one block only) uses sp as scratch.
  static_assert(HT != DM_HT || 8 * TP * NH >= 2 * DM_MAXS + 2 * NH + 4 + 4 * DM_THREADS, "merge scratch");

  PDL_LAUNCH();
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c4 = lane & 3;
  const int s = blockIdx.x, t = blockIdx.y, S = gridDim.x, hb = NH * blockIdx.z, nhb = min(NH, heads - hb);
  unsigned long long* stamp = stamps ? stamps + 6 * (((size_t)blockIdx.z * gridDim.y + t) * S + s) : nullptr;
#define DM_STAMP(k) \
  if (stamp && tid == 0) stamp[k] = globaltimer()
  DM_STAMP(0);
  // Row metadata: uploaded before the step, written by no kernel.
  const int n = pos[t] + 1;
  const i32* table = blocks + seq_blocks[row_seq[t]];
  const int chunk = ((n + S - 1) / S + 15) & ~15;
  const int j0 = s * chunk, nb = max(0, min(n - j0, chunk)), ntiles = (nb + TP - 1) / TP;
  // Positions before `early` were written by earlier steps (this step's
  // rows of one sequence are at most gridDim.y consecutive positions
  // ending at or after this row's), so with ahead set their copies are
  // issued before the wait for the kernel before; the rest (this step's
  // entries, which a kernel of this step may still be writing) after it.
  const int early = ahead ? n - (int)gridDim.y : -1;

  // Copies: thread tid takes row tid/TPR of a tile, pieces tid%TPR + TPR*i.
  const int crow = tid / TPR, csub = tid % TPR;
  auto slot_of = [&](int k) -> u32 {
    const int r = k * TP + crow;
    if (r >= nb) return 0u;
    const int j = j0 + r;
    return (u32)(table[j / block_size] * block_size + j % block_size);
  };
  const u32 stage_addr = smem_addr(stage);
  // Tile k into stage k % DM_NST: part 0 the rows copied before the wait
  // (earlier steps' positions, and zero fill past the split), part 1 the
  // others, part 2 all; parts 1 and 2 close a group (an empty one past
  // the last tile, so that every iteration waits for the same count).
  auto issue = [&](int k, u32 slot, int part) {
    if (k < ntiles) {
      const int r = k * TP + crow;
      const bool valid = r < nb, before = ahead && (!valid || j0 + r < early);
      if (part == 2 || (part == 0) == before) {
        if (RAW) {
          const u8* src = layer + (size_t)slot * RB;
          const u32 dst = stage_addr + (u32)(((k % DM_NST) * TP + crow) * RB);
          for (int c = csub; c < NP; c += TPR) {
            if (PB == 8)
              cp_async8(dst + c * 8, src + c * 8, valid);
            else
              cp_async16(dst + c * 16, src + c * 16, valid);
          }
        } else {
          const u8* src = layer + (size_t)slot * W * 2;
          const u32 dst = stage_addr + (u32)(((k % DM_NST) * TP + crow) * LD * 2);
          for (int c = csub; c < CH; c += TPR) cp_async16(dst + c * 16, src + c * 16, valid);
        }
      }
    }
    if (part != 0) asm volatile("cp.async.commit_group;" ::: "memory");
  };
  u32 lead[DM_NST - 1];
#pragma unroll
  for (int k = 0; k < DM_NST - 1; k++) lead[k] = slot_of(k);
  if (ahead) {
#pragma unroll
    for (int k = 0; k < DM_NST - 1; k++) issue(k, lead[k], 0);
  }
  // Weights of the padding rows and heads stay zero.
  for (int i = tid; i < PROWS * PLD / 2; i += DM_THREADS) ((u32*)pw)[i] = 0u;
  PDL_WAIT();  // the queries and this step's cache entries
  STAGE_DELAY(2);
  if (stamp && tid == 0) stamp[1] = globaltimer_after((int)lead[0]);

#pragma unroll
  for (int k = 0; k < DM_NST - 1; k++) issue(k, lead[k], ahead ? 1 : 2);
  u32 nslot = slot_of(DM_NST - 1);

  // This warp's query parts as B fragments: k step kk covers query
  // columns kcol(kk) .. +16; heads 8j + g.
  auto kcol = [&](int kk) { return kk < KL ? (warp * KL + kk) * 16 : RANK + 16 * warp; };
  u32 qb[KS][HT][NQP][2];
  {
    float2 qv[KS][HT][2];
#pragma unroll
    for (int kk = 0; kk < KS; kk++) {
#pragma unroll
      for (int j = 0; j < HT; j++) {
        const int h = hb + 8 * j + g;
        qv[kk][j][0] = qv[kk][j][1] = make_float2(0.f, 0.f);
        if (h < heads && (kk < KL || warp < KR)) {
          const int kc = kcol(kk);
          const float* src = kk < KL ? qlat + (size_t)t * ldql + (size_t)h * RANK + kc
                                     : q + (size_t)t * ldq + (size_t)h * (dn + DR) + dn + (kc - RANK);
          qv[kk][j][0] = *(const float2*)(src + 2 * c4);
          qv[kk][j][1] = *(const float2*)(src + 2 * c4 + 8);
        }
      }
    }
    float f[HT];
#pragma unroll
    for (int j = 0; j < HT; j++) f[j] = 1.f;
    if (F16) {
      // Each head's largest magnitude: its 4 lanes of a warp, then the 8
      // warps through shared memory (the partial scores' space, unused
      // until the first tile's products, which follow a barrier).
      float* red = sp;  // [8][NH]
#pragma unroll
      for (int j = 0; j < HT; j++) {
        float m = 0.f;
#pragma unroll
        for (int kk = 0; kk < KS; kk++)
#pragma unroll
          for (int u = 0; u < 2; u++) m = fmaxf(m, fmaxf(fabsf(qv[kk][j][u].x), fabsf(qv[kk][j][u].y)));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
        if (c4 == 0) red[warp * NH + 8 * j + g] = m;
      }
      __syncthreads();
#pragma unroll
      for (int j = 0; j < HT; j++) {
        float m = 0.f;
#pragma unroll
        for (int w = 0; w < 8; w++) m = fmaxf(m, red[w * NH + 8 * j + g]);
        const int e = fa_query_exp(m);
        f[j] = fa_pow2(e);
        if (warp == 0 && c4 == 0) qinv[8 * j + g] = fa_pow2(-e);
      }
    }
#pragma unroll
    for (int kk = 0; kk < KS; kk++)
#pragma unroll
      for (int j = 0; j < HT; j++)
#pragma unroll
        for (int u = 0; u < 2; u++) {
          const float2 v = qv[kk][j][u];
          if constexpr (F16)
            qb[kk][j][0][u] = f16x2_rn(v.x * f[j], v.y * f[j]);
          else if constexpr (NQP == 2)
            split2_bf16x2(v.x, v.y, qb[kk][j][0][u], qb[kk][j][1][u]);
          else
            split3_bf16x2(v.x, v.y, qb[kk][j][0][u], qb[kk][j][1][u], qb[kk][j][2][u]);
        }
  }
  if (stamp && tid == 0) stamp[2] = globaltimer_after((int)(qb[0][0][0][0] ^ qb[KS - 1][HT - 1][NQP - 1][1]));
  TRACE_MARK_DEP(qb[0][0][0][0] ^ qb[KS - 1][HT - 1][NQP - 1][1]);

  // The softmax state lives in the threads tid < 8*NH (head tid/8,
  // positions tid%8 + 8i).
  const int sh = tid >> 3, sq = tid & 7;
  float m_run = __int_as_float(0xff800000), l_run = 0.f;

  float o[KL][HT][4];
#pragma unroll
  for (int m = 0; m < KL; m++)
#pragma unroll
    for (int j = 0; j < HT; j++) o[m][j][0] = o[m][j][1] = o[m][j][2] = o[m][j][3] = 0.f;

  const int a_off = ((lane & 15) * LD + (lane >> 4) * 8) * 2;                           // A from [pos][k]
  const int t_off = (((lane & 7) + ((lane >> 4) << 3)) * LD + ((lane >> 3) & 1) * 8) * 2;  // A = c^T, .trans
  const int b_off = (((lane & 7) + ((lane >> 4) << 3)) * PLD + ((lane >> 3) & 1) * 8) * 2;  // B from [n][pos]
  const u32 pw_addr = smem_addr(pw);

  for (int k = 0; k < ntiles; k++) {
    issue(k + DM_NST - 1, nslot, 2);
    nslot = slot_of(k + DM_NST);
    asm volatile("cp.async.wait_group %0;" ::"n"(DM_NST - 1) : "memory");
    __syncthreads();
    if (k == 0) DM_STAMP(3);
    if (k == 0) TRACE_MARK();
    u32 tile = stage_addr + (u32)((k % DM_NST) * TP * LD * 2);
    if (RAW) {
      // The stage's records as a bf16 tile and two scales a position
      // (zeros for the rows past the split: their copies were zero
      // filled).
      const u8* recs = dm_smem + (k % DM_NST) * TP * RB;
      constexpr int per = W / 8, total = TP * per;
#pragma unroll 4
      for (int i = tid; i < total; i += DM_THREADS) {
        const int r = i / per, c = (i % per) * 8;
        *(uint4*)(conv + r * LD + c) = rec_bf16x8<CT == 3>(rec_load8<CT == 3>(recs + r * RB, c, RANK, DR), c, RANK);
      }
      if (tid < TP) {
        const float* scs = (const float*)(recs + tid * RB + rec_scales<CT == 3>(RANK, DR));
        sc0[tid] = scs[0];
        sc1[tid] = scs[1];
      }
      __syncthreads();
      tile = smem_addr(conv);
    }

    // Partial scores over this warp's k steps: TP positions x NH heads.
    {
      float sacc[NA][MT][HT][4];
      float srope[RAW ? MT : 1][HT][4];  // RAW: the rope step's products
#pragma unroll
      for (int a = 0; a < NA; a++)
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
          for (int j = 0; j < HT; j++)
            sacc[a][mt][j][0] = sacc[a][mt][j][1] = sacc[a][mt][j][2] = sacc[a][mt][j][3] = 0.f;
#pragma unroll
      for (int mt = 0; mt < (RAW ? MT : 1); mt++)
#pragma unroll
        for (int j = 0; j < HT; j++) srope[mt][j][0] = srope[mt][j][1] = srope[mt][j][2] = srope[mt][j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < KS; kk++) {
        if (kk < KL || warp < KR) {
          u32 a[MT][4];
#pragma unroll
          for (int mt = 0; mt < MT; mt++)
            ldsm_x4(tile + (u32)(mt * 16 * LD * 2 + kcol(kk) * 2 + a_off), a[mt][0], a[mt][1], a[mt][2], a[mt][3]);
          if (F16) {
#pragma unroll
            for (int mt = 0; mt < MT; mt++) frag_f16(a[mt]);
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
              for (int j = 0; j < HT; j++) mma_f16(sacc[kk % NA][mt][j], a[mt], qb[kk][j][0][0], qb[kk][j][0][1]);
          } else {
#pragma unroll
            for (int p = 0; p < NQP; p++)
#pragma unroll
              for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int j = 0; j < HT; j++) {
                  if (RAW && kk == KL)
                    mma_bf16(srope[RAW ? mt : 0][j], a[mt], qb[kk][j][p][0], qb[kk][j][p][1]);
                  else
                    mma_bf16(sacc[p % NA][mt][j], a[mt], qb[kk][j][p][0], qb[kk][j][p][1]);
                }
          }
        }
      }
      float* mine = sp + warp * TP * NH;
#pragma unroll
      for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int j = 0; j < HT; j++) {
          float v[4];
#pragma unroll
          for (int e = 0; e < 4; e++) {
            v[e] = sacc[0][mt][j][e];
#pragma unroll
            for (int a = 1; a < NA; a++) v[e] += sacc[a][mt][j][e];
          }
          const int row = mt * 16 + g, col = 8 * j + 2 * c4;
          *(float2*)(mine + row * NH + col) = make_float2(v[0], v[1]);
          *(float2*)(mine + (row + 8) * NH + col) = make_float2(v[2], v[3]);
          if (RAW && warp < KR) {
            float* rope = sp + (8 + warp) * TP * NH;
            const float* e = srope[RAW ? mt : 0][j];
            *(float2*)(rope + row * NH + col) = make_float2(e[0], e[1]);
            *(float2*)(rope + (row + 8) * NH + col) = make_float2(e[2], e[3]);
          }
        }
    }
    __syncthreads();

    // Online softmax, eight threads a head (warps 0-5; every head slot,
    // padding heads fully masked).
    if (tid < 8 * NH) {
      float sv[TP / 8];
      float mx = __int_as_float(0xff800000);
      const float rscale = F16 ? scale * qinv[sh] : scale;  // exact: qinv is a power of two
#pragma unroll
      for (int i = 0; i < TP / 8; i++) {
        const int r = sq + 8 * i;
        float a = 0.f;
#pragma unroll
        for (int w = 0; w < 8; w++) a += sp[(w * TP + r) * NH + sh];
        if (RAW) {
          float b = 0.f;
#pragma unroll
          for (int w = 0; w < KR; w++) b += sp[((8 + w) * TP + r) * NH + sh];
          a = sc0[r] * a + sc1[r] * b;
        }
        const bool valid = hb + sh < heads && k * TP + r < nb;
        sv[i] = valid ? a * rscale : __int_as_float(0xff800000);
        mx = fmaxf(mx, sv[i]);
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
      const float m_new = fmaxf(m_run, mx);
      const bool none = m_new == __int_as_float(0xff800000);
      const float alpha = none ? 1.f : expf(m_run - m_new);
      float sum = 0.f;
      // Positions sq + 8i and sq + 8(i+1) split together.
#pragma unroll
      for (int i = 0; i < TP / 8; i += 2) {
        const float p0 = (none || sv[i] == __int_as_float(0xff800000)) ? 0.f : expf(sv[i] - m_new);
        const float p1 = (none || sv[i + 1] == __int_as_float(0xff800000)) ? 0.f : expf(sv[i + 1] - m_new);
        sum += p0;
        sum += p1;
        const int r = sq + 8 * i;
        u32 part[NQP];
        if constexpr (F16)
          part[0] = f16x2_rn(p0, p1);
        else if constexpr (NQP == 2)
          split2_bf16x2(p0, p1, part[0], part[1]);
        else if (RAW)
          split3_bf16x2(p0 * sc0[r], p1 * sc0[r + 8], part[0], part[1], part[2]);
        else
          split3_bf16x2(p0, p1, part[0], part[1], part[2]);
#pragma unroll
        for (int q = 0; q < NQP; q++) {
          pw[(q * NH + sh) * PLD + r] = (unsigned short)(part[q] & 0xFFFFu);
          pw[(q * NH + sh) * PLD + r + 8] = (unsigned short)(part[q] >> 16);
        }
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      sum += __shfl_xor_sync(0xffffffffu, sum, 4);
      l_run = l_run * alpha + sum;
      m_run = m_new;
      if (sq == 0) alpha_s[sh] = alpha;
    }
    __syncthreads();

    // O^T = O^T * alpha + c^T . P^T over this warp's columns.
    {
#pragma unroll
      for (int j = 0; j < HT; j++) {
        const float a0 = alpha_s[8 * j + 2 * c4], a1 = alpha_s[8 * j + 2 * c4 + 1];
#pragma unroll
        for (int m = 0; m < KL; m++) o[m][j][0] *= a0, o[m][j][1] *= a1, o[m][j][2] *= a0, o[m][j][3] *= a1;
      }
#pragma unroll
      for (int ks = 0; ks < MT; ks++) {
        u32 b[PRG][2];
#pragma unroll
        for (int rg = 0; rg < PRG; rg += 2)
          ldsm_x4(pw_addr + (u32)(rg * 8 * PLD * 2 + ks * 32 + b_off), b[rg][0], b[rg][1], b[rg + 1][0],
                  b[rg + 1][1]);
        u32 a[KL][4];
#pragma unroll
        for (int m = 0; m < KL; m++)
          ldsm_x4_t(tile + (u32)(ks * 16 * LD * 2 + (warp * KL + m) * 32 + t_off), a[m][0], a[m][1], a[m][2], a[m][3]);
        if (F16) {
#pragma unroll
          for (int m = 0; m < KL; m++) frag_f16(a[m]);
#pragma unroll
          for (int m = 0; m < KL; m++)
#pragma unroll
            for (int j = 0; j < HT; j++) mma_f16(o[m][j], a[m], b[j][0], b[j][1]);
        } else {
#pragma unroll
          for (int p = 0; p < NQP; p++)
#pragma unroll
            for (int m = 0; m < KL; m++)
#pragma unroll
              for (int j = 0; j < HT; j++) mma_bf16(o[m][j], a[m], b[HT * p + j][0], b[HT * p + j][1]);
        }
      }
    }
    __syncthreads();  // the tile and the weights are read before they are rewritten
  }
  asm volatile("cp.async.wait_group 0;" ::: "memory");  // the empty groups
  DM_STAMP(4);
  TRACE_MARK();

  // Head-major values in shared memory (the tiles are done with).
#pragma unroll
  for (int m = 0; m < KL; m++)
#pragma unroll
    for (int j = 0; j < HT; j++) {
      const int col = (warp * KL + m) * 16 + g, h = 8 * j + 2 * c4;
      ot[h * OLD + col] = o[m][j][0];
      ot[(h + 1) * OLD + col] = o[m][j][1];
      ot[h * OLD + col + 8] = o[m][j][2];
      ot[(h + 1) * OLD + col + 8] = o[m][j][3];
    }
  if (tid < 8 * NH && sq == 0) m_s[sh] = m_run, l_s[sh] = l_run;
  __syncthreads();

  constexpr int C4 = RANK / 4;
  if (S == 1) {
    for (int ib = 0; ib < nhb * C4; ib += DM_THREADS) {
      const int i = ib + tid;
      const bool ok = i < nhb * C4;
      float4 r = make_float4(0.f, 0.f, 0.f, 0.f);
      if (ok) {
        const int h = i / C4, c = (i - h * C4) * 4;
        const float4 v = *(const float4*)(ot + h * OLD + c);
        const float inv = 1.f / l_s[h];
        r = make_float4(v.x * inv, v.y * inv, v.z * inv, v.w * inv);
        *(float4*)(olat + (size_t)t * ldo + (size_t)(hb + h) * RANK + c) = r;
      }
      if (xq) quant_row4(r, ok, hb * C4 + i, t, heads * RANK, G, xq, xs, xsum);
    }
    DM_STAMP(5);
    return;
  }
  const size_t part = (size_t)t * S + s;
  for (int i = tid; i < nhb * C4; i += DM_THREADS) {
    const int h = i / C4, c = (i - h * C4) * 4;
    *(float4*)(part_acc + (part * heads + hb + h) * RANK + c) = *(const float4*)(ot + h * OLD + c);
  }
  if (tid < nhb) *(float2*)(part_ml + (part * heads + hb + tid) * 2) = make_float2(m_s[tid], l_s[tid]);
  if (HT != DM_HT || counters == nullptr) {
    DM_STAMP(5);
    return;
  }
  // Barrier of the row's S blocks, then each merges its share.
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    atomicAdd(&counters[t], 1u);
    while (ld_acquire(&counters[t]) < (u32)S) asm volatile("nanosleep.u32 32;");
  }
  __syncthreads();
  dm_merge_share(olat, ldo, part_ml, part_acc, t, s, S, heads, RANK, sp, xq, xs, xsum, G);
  __syncthreads();
  if (tid == 0 && atomicAdd(&counters[gridDim.y + t], 1u) == (u32)(S - 1)) {
    counters[t] = 0;  // every block of the row has left the barrier
    counters[gridDim.y + t] = 0;
  }
  DM_STAMP(5);
#undef DM_STAMP
}

#define DECODE_MMA_P(RANK, DR, TP, HT, CT, F16, PARTS, NAME)                                                   \
  extern "C" __global__ void __launch_bounds__(DM_THREADS, 1)                                                        \
      NAME(float* olat, int ldo, const float* qlat, int ldql, const float* q, int ldq, const u8* layer,              \
           const i32* __restrict__ pos, const i32* __restrict__ row_seq, const i32* __restrict__ seq_blocks,         \
           const i32* __restrict__ blocks, int block_size, int heads, int dn, float scale, float* part_ml,           \
           float* part_acc, u32* counters, int ahead, i8* xq, float* xs, i32* xsum, int G,                          \
           unsigned long long* stamps) {                                                                             \
    decode_mma<RANK, DR, TP, HT, CT, F16, PARTS>(olat, ldo, qlat, ldql, q, ldq, layer, pos, row_seq, seq_blocks,   \
                                                 blocks, block_size, heads, dn, scale, part_ml, part_acc, counters,  \
                                                 ahead, xq, xs, xsum, G, stamps);                                    \
  }
#define DECODE_MMA_F(RANK, DR, TP, HT, CT, F16, NAME) DECODE_MMA_P(RANK, DR, TP, HT, CT, F16, 3, NAME)

// Instances: the model's (rank 512, rope 64), the tests' small shape and
// the built-in and tiny test models' (rank 128, rope 32 and 16; so that
// their GPU runs against the CPU take this kernel), tiles of 16
// positions (splits of at most 16) and of 32, all heads in a block; and
// the model's with a block for each 8 heads (grid z). CT and F16 as
// decode_mma's: the bf16 cache exact (no suffix) and in its f16 form
// ("_f16"), the fp8 and fp4 caches ("_fp8", "_fp4").
#define DECODE_MMA_SET(CT, F16, SUF)                                                   \
  DECODE_MMA_F(512, 64, 16, DM_HT, CT, F16, decode_mma_512_64_t16##SUF)                \
  DECODE_MMA_F(512, 64, 32, DM_HT, CT, F16, decode_mma_512_64_t32##SUF)                \
  DECODE_MMA_F(256, 32, 16, DM_HT, CT, F16, decode_mma_256_32_t16##SUF)                \
  DECODE_MMA_F(256, 32, 32, DM_HT, CT, F16, decode_mma_256_32_t32##SUF)                \
  DECODE_MMA_F(128, 32, 16, DM_HT, CT, F16, decode_mma_128_32_t16##SUF)                \
  DECODE_MMA_F(128, 32, 32, DM_HT, CT, F16, decode_mma_128_32_t32##SUF)                \
  DECODE_MMA_F(128, 16, 16, DM_HT, CT, F16, decode_mma_128_16_t16##SUF)                \
  DECODE_MMA_F(128, 16, 32, DM_HT, CT, F16, decode_mma_128_16_t32##SUF)                \
  DECODE_MMA_F(512, 64, 16, 1, CT, F16, decode_mma_512_64_t16_h8##SUF)                 \
  DECODE_MMA_F(512, 64, 32, 1, CT, F16, decode_mma_512_64_t32_h8##SUF)
DECODE_MMA_SET(0, false, )
DECODE_MMA_SET(0, true, _f16)
DECODE_MMA_SET(2, false, _fp8)
DECODE_MMA_SET(3, false, _fp4)
// Blocks of 8 heads of the model's shape over the bf16 cache with two
// bf16 parts of the queries and weights ("_bf2": no widening of the cached
// fragments, two thirds of the exact form's products).
DECODE_MMA_P(512, 64, 16, 1, 0, false, 2, decode_mma_512_64_t16_h8_bf2)
DECODE_MMA_P(512, 64, 32, 1, 0, false, 2, decode_mma_512_64_t32_h8_bf2)

// The splits' merge as a second launch: grid (rank/128, heads, rows),
// eight warps a block for one row, head and 128 columns. Warp w takes the
// splits w, w+8, ...: its loads are issued before the maximum over all
// splits is known, so a block waits on about one round of loads; the
// warps' sums are then added in a fixed order. With xq set, the merged
// row's int8 form in groups of G (32, 64 or 128 columns, within a head's
// 128) is written as rmsnorm_quant writes it without a gain (quant.cu),
// for the value expansion: codes, scales and the sums of 32 codes.
extern "C" __global__ void __launch_bounds__(256) decode_combine(float* olat, int ldo, const float* part_ml,
                                                                 const float* part_acc, int S, int heads, int rank,
                                                                 i8* __restrict__ xq, float* __restrict__ xs,
                                                                 i32* __restrict__ xsum, int G) {
  __shared__ float4 red[8][32];
  __shared__ float lred[8];
  PDL_LAUNCH();
  PDL_WAIT();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int t = blockIdx.z, h = blockIdx.y, c0 = blockIdx.x * 128;
  const size_t mls = (size_t)heads * 2, accs = (size_t)heads * rank;
  const float* ml = part_ml + ((size_t)t * S * heads + h) * 2;
  const float* acc = part_acc + ((size_t)t * S * heads + h) * rank + c0 + 4 * lane;
  float M = __int_as_float(0xff800000), lw = 0.f;
  float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int s0 = warp; s0 < S; s0 += 64) {
    float2 v[8];
    float4 x[8];
#pragma unroll
    for (int u = 0; u < 8; u++) {
      const int s = s0 + 8 * u;
      v[u] = s < S ? __ldcg((const float2*)(ml + s * mls)) : make_float2(0.f, 0.f);
      x[u] = s < S ? __ldcg((const float4*)(acc + s * accs)) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    if (s0 == warp) {
      for (int s = lane; s < S; s += 32) {
        const float2 m = __ldcg((const float2*)(ml + s * mls));
        if (m.y > 0.f) M = fmaxf(M, m.x);
      }
      M = warp_max(M);
    }
#pragma unroll
    for (int u = 0; u < 8; u++) {
      const float e = v[u].y > 0.f ? expf(v[u].x - M) : 0.f;
      lw += e * v[u].y;
      o.x += e * x[u].x, o.y += e * x[u].y, o.z += e * x[u].z, o.w += e * x[u].w;
    }
  }
  red[warp][lane] = o;
  if (lane == 0) lred[warp] = lw;
  __syncthreads();
  if (warp == 0) {
    float4 r = red[0][lane];
    float L = lred[0];
#pragma unroll
    for (int w = 1; w < 8; w++) {
      const float4 y = red[w][lane];
      r.x += y.x, r.y += y.y, r.z += y.z, r.w += y.w;
      L += lred[w];
    }
    const float inv = 1.f / L;
    const float4 out = make_float4(r.x * inv, r.y * inv, r.z * inv, r.w * inv);
    const int col = h * rank + c0 + 4 * lane;
    *(float4*)(olat + (size_t)t * ldo + col) = out;
    if (xq) quant_row4(out, true, col / 4, t, heads * rank, G, xq, xs, xsum);
  }
}

// decode_combine and the value expansion with its output's int8 form
// (gemv_heads_quant) in one launch, for one row: a cluster of CL = 2
// blocks of 512 threads a head h of 256 rows, block r of the cluster
// owning rows [128r, 128r+128) (half-warp j rows 4j..4j+3) and the merge
// of the head's latent columns [256r, 256r+256). After the wait a block
// requests its columns of every split's partial, 64 splits a round, and
// merges them as decode_combine does (class c = s mod 8 summing its
// splits in order, the eight classes then added in order: the same bits).
// It quantizes them in W_UV's groups of G as decode_combine's quant_row4
// does, writes them into the other block's shared memory (so that neither
// reads the whole head's partials) and takes its products from there as
// gemv_heads_quant does from memory; with yq set, its rows' int8 form in
// groups of qg (at most 128: no group spans the blocks). Each block also
// writes its columns of olat and of its int8 form (olq, ols, olsum). K
// (rank) 512, rows 256, at most DM_MAXS splits. Clusters of four blocks
// of 64 rows, which trade half a group's largest magnitude, were 1.2%
// slower end to end (docs/perf.md, 2026-11-29 (12)).
#define DCV_CL 2
extern "C" __global__ void __cluster_dims__(DCV_CL, 1, 1) __launch_bounds__(1024 / DCV_CL)
    decode_combine_values(const u8* __restrict__ codes, const u8* __restrict__ scales,
                          const float* __restrict__ row_scale, int K, int gshift, float* __restrict__ y, int qg,
                          i8* __restrict__ yq, float* __restrict__ ys, i32* __restrict__ ysum, const float* part_ml,
                          const float* part_acc, int S, int heads, float* __restrict__ olat, i8* __restrict__ olq,
                          float* __restrict__ ols, i32* __restrict__ olsum, int G) {
  constexpr int CL = DCV_CL, NT = 1024 / CL, ROWS = 256 / CL, F4 = 128 / CL;  // threads, rows, float4 columns
  PDL_LAUNCH();
  // Every block of the cluster has started before any writes into
  // another's shared memory.
  cluster_arrive();
  __shared__ float4 red[8][F4];
  __shared__ float2 mlsh[DM_MAXS];
  __shared__ float wmax[NT / 32], lred[8], vals[ROWS];
  __shared__ __align__(16) i8 xq_sh[512];
  __shared__ float xs_sh[16];
  __shared__ i32 xsum_sh[16];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, sl = lane & 15;
  const int cl = tid / F4, f = tid % F4;  // the merge's class and float4 column
  const u32 rank = cluster_rank();
  const int local = warp * 8 + (lane >> 4) * 4;  // the half-warp's first row in the block
  const int row0 = blockIdx.x * ROWS + local;
  const int h = blockIdx.x / CL;
  const int GK = (K >> 5) >> gshift;
  const int gl = log2_pow2(G);  // olat's groups as a shift
  u32 s[4];
  // This thread's W_UV chunks copied into shared memory before the wait:
  // as loads into registers, ptxas placed them after griddepcontrol.wait
  // (NVRTC 12.4; the registers are needed through the merge), where they
  // queued beside the partials' loads.
  __shared__ uint4 wsh[4][NT];
#pragma unroll
  for (int r = 0; r < 4; r++) cp_async16(smem_addr(&wsh[r][tid]), codes + (size_t)(row0 + r) * (K / 2) + sl * 16, true);
#pragma unroll
  for (int r = 0; r < 4; r++) s[r] = __ldg(scales + (size_t)(row0 + r) * GK + (sl >> gshift));
  const float rs = __ldg(row_scale + row0 + (sl & 3));
  PDL_WAIT();
  STAGE_DELAY(3);
  // This thread's split's maximum and sum (tid < S), and its float4 column
  // f in every eighth split from cl's.
  const size_t mls = (size_t)heads * 2, accs = (size_t)heads * K;
  const float* ml = part_ml + (size_t)h * 2;
  const float* acc = part_acc + (size_t)h * K + 4 * (F4 * rank + f);
  const float2 mine = tid < S ? __ldcg((const float2*)(ml + tid * mls)) : make_float2(0.f, 0.f);
  TRACE_MARK_DEP(__float_as_uint(mine.x));
  float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
  float lw = 0.f, M = 0.f;
  for (int base = 0; base < S; base += 64) {
    float4 x[8];
#pragma unroll
    for (int u = 0; u < 8; u++) {
      const int q = base + cl + 8 * u;
      x[u] = q < S ? __ldcg((const float4*)(acc + q * accs)) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    if (base == 0) {
      TRACE_MARK_DEP(__float_as_uint(x[0].x));
      // The largest maximum of a split with positions.
      if (tid < S) mlsh[tid] = mine;
      M = warp_max(mine.y > 0.f ? mine.x : __int_as_float(0xff800000));
      if (lane == 0) wmax[warp] = M;
      __syncthreads();
      M = wmax[0];
#pragma unroll
      for (int v = 1; v < NT / 32; v++) M = fmaxf(M, wmax[v]);
      TRACE_MARK();
    }
#pragma unroll
    for (int u = 0; u < 8; u++) {
      const int q = base + cl + 8 * u;
      const float2 m = q < S ? mlsh[q] : make_float2(0.f, 0.f);
      const float e = m.y > 0.f ? expf(m.x - M) : 0.f;
      o.x += e * x[u].x, o.y += e * x[u].y, o.z += e * x[u].z, o.w += e * x[u].w;
      lw += e * m.y;
    }
  }
  red[cl][f] = o;
  if (f == 0) lred[cl] = lw;
  __syncthreads();
  cluster_wait();
  TRACE_MARK();
  // Threads tid < F4 (whole warps) finish column fc of the head's row.
  const int fc = F4 * rank + tid;
  u32 word = 0u;
  float4 olv;
  if (tid < F4) {
    float4 r = red[0][tid];
    float L = lred[0];
#pragma unroll
    for (int q = 1; q < 8; q++) {
      const float4 v = red[q][tid];
      r.x += v.x, r.y += v.y, r.z += v.z, r.w += v.w;
      L += lred[q];
    }
    const float inv = 1.f / L;
    olv = make_float4(r.x * inv, r.y * inv, r.z * inv, r.w * inv);
    quant_row4(olv, true, fc, 0, K, G, xq_sh, xs_sh, xsum_sh);
    __syncwarp();
    word = ((const u32*)xq_sh)[fc];
    for (u32 p = 0; p < CL; p++) {
      if (p == rank) continue;
      st_cluster_u32((u32*)xq_sh + fc, p, word);
      if ((tid & ((G >> 2) - 1)) == 0) st_cluster(&xs_sh[(4 * fc) >> gl], p, xs_sh[(4 * fc) >> gl]);
    }
  }
  // The global stores after the arrive, whose release would wait for them.
  cluster_arrive();
  if (tid < F4) {
    *(float4*)(olat + (size_t)h * K + 4 * fc) = olv;
    if (olq) {  // olat's groups are W_UV's: the same codes, sums and scales
      ((u32*)(olq + (size_t)h * K))[fc] = word;
      if ((tid & 7) == 0) olsum[(size_t)h * (K / 32) + fc / 8] = xsum_sh[fc / 8];
      if ((tid & ((G >> 2) - 1)) == 0) ols[(size_t)h * (K >> gl) + ((4 * fc) >> gl)] = xs_sh[(4 * fc) >> gl];
    }
  }
  cluster_wait();
  TRACE_MARK();
  cp_async_wait_all();  // this thread's own copies: no barrier needed
  uint4 w[4];
#pragma unroll
  for (int r = 0; r < 4; r++) w[r] = wsh[r][tid];
  float out[4] = {0.f, 0.f, 0.f, 0.f};
  {
    const uint4* xp = (const uint4*)(xq_sh + sl * 32);
    const uint4 xa = xp[0], xb = xp[1];
    const float xscale = xs_sh[sl >> gshift];
#pragma unroll
    for (int r = 0; r < 4; r++) out[r] += (float)dot32_split(w[r], xa, xb) * (e4m3(s[r]) * xscale);
  }
#pragma unroll
  for (int r = 0; r < 4; r++)
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) out[r] += __shfl_xor_sync(0xffffffffu, out[r], o);
  // Lane sl < 4 of a half-warp holds row row0 + sl's value.
  float yv = 0.f;
#pragma unroll
  for (int r = 0; r < 4; r++) {
    if (sl == r) {
      yv = out[r] * (rs * 0.5f);
      vals[local + r] = yv;
    }
  }
  if (!yq) {
    if (sl < 4) y[row0 + sl] = yv;
    return;
  }
  __syncthreads();
  if (sl < 4) y[row0 + sl] = yv;
  // Warp j < ROWS/qg takes group j of the block's values, E = qg/32 to a
  // lane.
  const int qgl = log2_pow2(qg);
  if (warp >= (ROWS >> qgl)) return;
  const int E = qg >> 5, k0 = warp * qg + lane * E;
  float v[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int e = 0; e < 4; e++)
    if (e < E) v[e] = vals[k0 + e];
  const size_t c0 = (size_t)blockIdx.x * ROWS + k0;
  quant_group_warp(v, E, lane, yq + c0, ysum + c0 / 32, ys + (size_t)blockIdx.x * (ROWS >> qgl) + warp);
  TRACE_MARK();
}
