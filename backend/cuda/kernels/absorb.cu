// The absorbed query of a prefill step on the tensor cores:
//   qlat[t, h*rank + n] = sum_i q_nope[t,h,i] * W_UK[h*dn + i, n]
// with W_UK in MMFP4 ([heads*dn, rank], groups of G along n). As on the
// CPU, the weight is the doubled E2M1 value times the E4M3 group scale,
// and the row scale (one per contraction index i) and the 1/2 go to the
// query side: a[t,i] = q_nope[t,h,i] * row_scale[i] * 0.5.
//
// Exactness: a doubled E2M1 value (at most 2 significant bits) times an
// E4M3 scale (4) has at most 6 significant bits and lies in [2^-9, 5376],
// so it is exact in f16. The fp32 query side is split as hi + lo, two f16
// numbers that carry 22 bits of its mantissa, and every product is issued
// for both halves into fp32 accumulators. f16 has a narrow range, so each
// token's row is first multiplied by a power of two that brings its
// largest magnitude into [2^14, 2^15) (exact), and the output row by the
// inverse power.
//
// Block: AT_M tokens x AT_N columns of one head, the whole contraction
// (dn) at once: the weight slab dequantized to f16 in shared memory, the
// queries split in shared memory, then 8 warps of 32 x 32 outputs. Grid
// (rank/AT_N, ceil(T/AT_M), heads), 256 threads; dynamic shared memory
// 4*AT_M*(dn+8) + 2*dn*(AT_N+8) + 4*AT_M + 4*256 + 4*dn bytes
// (absorbTCShared in absorb.go).

#define AT_M 64
#define AT_N 128
#define AT_LDB (AT_N + 8)  // f16 row stride of the weight slab

DEVICE float f16_lo_to_f32(u32 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((unsigned short)(h & 0xFFFFu)));
  return f;
}

DEVICE float f16_hi_to_f32(u32 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((unsigned short)(h >> 16)));
  return f;
}

// Two fp32 values as hi and lo f16 pairs (x = hi + lo + a rest under 2^-22
// of x when x is normal in f16 after scaling).
DEVICE void split_f16x2(float x0, float x1, u32& hi, u32& lo) {
  hi = f16x2_rn(x0, x1);
  lo = f16x2_rn(x0 - f16_lo_to_f32(hi), x1 - f16_hi_to_f32(hi));
}

DEVICE u32 mul_f16x2(u32 a, u32 b) {
  u32 r;
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}

// One E4M3 byte as an f16 pair (the value twice; exact).
DEVICE u32 e4m3_f16x2(u32 b) {
  u32 h;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"((unsigned short)(b | (b << 8))));
  return h;
}

// The weight slab of absorb_query_tc and absorb_query_tcm into registers:
// rows h*DN + i, columns [n0, n0 + AT_N); chunk c is row c/4, columns
// 32*(c%4) + [0, 32): 16 bytes of codes in one group. Also the head's row
// scales into rsm and lut[b]: the low half the doubled E2M1 value of nibble
// b&15, the high half that of b>>4.
template <int DN>
DEVICE void at_load_slab(const u8* __restrict__ codes, const u8* __restrict__ scales,
                         const float* __restrict__ row_scale, int G, int rank, int h, int n0, int tid,
                         uint4 (&cv)[DN * 4 / 256], u32 (&sv)[DN * 4 / 256], float* rsm, u32* lut) {
  static_assert(DN * 4 % 256 == 0, "dn must be a multiple of 64");
  const int GK = rank / G;
#pragma unroll
  for (int u = 0; u < DN * 4 / 256; u++) {
    const int c = tid + 256 * u, row = h * DN + (c >> 2), col = n0 + 32 * (c & 3);
    cv[u] = load_stream16(codes + (size_t)row * (rank / 2) + col / 2);
    sv[u] = scales[(size_t)row * GK + col / G];
  }
  if (tid < DN / 4) ((float4*)rsm)[tid] = *(const float4*)(row_scale + h * DN + 4 * tid);
  float v[2];
#pragma unroll
  for (int k = 0; k < 2; k++) {
    const int code = (tid >> (4 * k)) & 15, m = code & 7, e = m >> 1, f = m & 1;
    const float mag = e == 0 ? (float)f : (float)((2 + f) << (e - 1));
    v[k] = code & 8 ? -mag : mag;
  }
  lut[tid] = f16x2_rn(v[0], v[1]);
}

// The slab at_load_slab read, dequantized to f16 through lut into bs
// [DN][AT_LDB] (after a barrier: lut).
template <int chunks>
DEVICE void at_dequant_slab(const uint4 (&cv)[chunks], const u32 (&sv)[chunks], int tid, const u32* lut,
                            unsigned short* bs) {
#pragma unroll
  for (int u = 0; u < chunks; u++) {
    const int c = tid + 256 * u;
    const u32 s2 = e4m3_f16x2(sv[u]);
    const u32 w[4] = {cv[u].x, cv[u].y, cv[u].z, cv[u].w};
    u32 o[16];
#pragma unroll
    for (int j = 0; j < 16; j++) o[j] = mul_f16x2(lut[(w[j >> 2] >> (8 * (j & 3))) & 0xFFu], s2);
    uint4* dst = (uint4*)(bs + (c >> 2) * AT_LDB + 32 * (c & 3));
#pragma unroll
    for (int j = 0; j < 4; j++) dst[j] = make_uint4(o[4 * j], o[4 * j + 1], o[4 * j + 2], o[4 * j + 3]);
  }
}

template <int DN>
__device__ __forceinline__ void absorb_query_tc(float* __restrict__ qlat, int ldql, const float* __restrict__ q,
                                                int ldq, const u8* __restrict__ codes, const u8* __restrict__ scales,
                                                const float* __restrict__ row_scale, int G, int rank, int dr, int T) {
  constexpr int lda = DN + 8;  // f16 row stride of the queries: an odd number of 16-byte units
  extern __shared__ __align__(16) u8 at_smem[];
  unsigned short* ahi = (unsigned short*)at_smem;  // [AT_M][lda]
  unsigned short* alo = ahi + AT_M * lda;          // [AT_M][lda]
  unsigned short* bs = alo + AT_M * lda;           // [DN][AT_LDB]
  float* down = (float*)(bs + DN * AT_LDB);        // [AT_M] 2^-e of each row
  u32* lut = (u32*)(down + AT_M);                  // [256] a byte of codes as two doubled E2M1 f16
  float* rsm = (float*)(lut + 256);                // [DN] row scales of the head

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int n0 = blockIdx.x * AT_N, t0 = blockIdx.y * AT_M, h = blockIdx.z;
  PDL_LAUNCH();

  // The weight slab (at_load_slab).
  constexpr int chunks = DN * 4 / 256;
  uint4 cv[chunks];
  u32 sv[chunks];
  at_load_slab<DN>(codes, scales, row_scale, G, rank, h, n0, tid, cv, sv, rsm, lut);

  __syncthreads();  // lut and rsm
  // The weight slab is dequantized before the wait: it depends on no
  // kernel of the step.
  at_dequant_slab<chunks>(cv, sv, tid, lut, bs);

  // The queries: row r = tid/4 (token t0 + r), float4s j = tid%4, +4, ...
  // of its DN values, after the wait for the kernel before.
  PDL_WAIT();
  constexpr int per = DN / 16;
  const int qr = tid >> 2, j0 = tid & 3;  // this thread's query row and first float4
  float4 x[per];
#pragma unroll
  for (int u = 0; u < per; u++) {
    const int i = 4 * (j0 + 4 * u);
    x[u] = t0 + qr < T ? *(const float4*)(q + (size_t)(t0 + qr) * ldq + (size_t)h * (DN + dr) + i)
                      : make_float4(0.f, 0.f, 0.f, 0.f);
  }

  {
    // a = q_nope * row_scale * 0.5 (the CPU's product order), then the
    // row's scale and the split.
    float m = 0.f;
#pragma unroll
    for (int u = 0; u < per; u++) {
      const float4 rs = ((const float4*)rsm)[j0 + 4 * u];
      x[u] = make_float4(x[u].x * rs.x * 0.5f, x[u].y * rs.y * 0.5f, x[u].z * rs.z * 0.5f, x[u].w * rs.w * 0.5f);
      m = fmaxf(m, fmaxf(fmaxf(fabsf(x[u].x), fabsf(x[u].y)), fmaxf(fabsf(x[u].z), fabsf(x[u].w))));
    }
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
    // 2^e with the row's largest magnitude times 2^e in [2^14, 2^15).
    const int eb = (__float_as_uint(m) >> 23) & 0xFF;
    const int e = (m == 0.f || eb == 0xFF) ? 0 : max(-126, min(126, 141 - eb));
    const float up = __uint_as_float((u32)(127 + e) << 23);
    if (j0 == 0) down[qr] = __uint_as_float((u32)(127 - e) << 23);
#pragma unroll
    for (int u = 0; u < per; u++) {
      const int i = 4 * (j0 + 4 * u);
      u32 h0, l0, h1, l1;
      split_f16x2(x[u].x * up, x[u].y * up, h0, l0);
      split_f16x2(x[u].z * up, x[u].w * up, h1, l1);
      *(uint2*)(ahi + qr * lda + i) = make_uint2(h0, h1);
      *(uint2*)(alo + qr * lda + i) = make_uint2(l0, l1);
    }
  }
  __syncthreads();

  // Warp w: rows 32*(w&1) + [0, 32), columns 32*(w>>1) + [0, 32).
  const int wm = (warp & 1) * 32, wn = (warp >> 1) * 32;
  if (t0 + wm >= T) return;
  const int mt = t0 + wm + 16 < T ? 2 : 1;  // row tiles with tokens
  const int a_off = (lane & 15) * lda + (lane >> 4) * 8;                              // A, row-major
  const int b_off = ((lane & 7) + (((lane >> 3) & 1) << 3)) * AT_LDB + (lane >> 4) * 8;  // B [k][n], .trans
  float acc[2][4][4];
#pragma unroll
  for (int m = 0; m < 2; m++)
#pragma unroll
    for (int n = 0; n < 4; n++) acc[m][n][0] = acc[m][n][1] = acc[m][n][2] = acc[m][n][3] = 0.f;
#pragma unroll
  for (int s = 0; s < DN / 16; s++) {
    u32 ah[2][4], al[2][4], b[4][2];
#pragma unroll
    for (int m = 0; m < 2; m++) {
      if (m < mt) {
        ldsm_x4(smem_addr(ahi + (wm + 16 * m) * lda + 16 * s + a_off), ah[m][0], ah[m][1], ah[m][2], ah[m][3]);
        ldsm_x4(smem_addr(alo + (wm + 16 * m) * lda + 16 * s + a_off), al[m][0], al[m][1], al[m][2], al[m][3]);
      }
    }
#pragma unroll
    for (int np = 0; np < 2; np++)
      ldsm_x4_t(smem_addr(bs + 16 * s * AT_LDB + wn + 16 * np + b_off), b[2 * np][0], b[2 * np][1], b[2 * np + 1][0],
                b[2 * np + 1][1]);
    // All hi products, then all lo: each accumulator's two products are
    // eight apart.
#pragma unroll
    for (int m = 0; m < 2; m++)
      if (m < mt)
#pragma unroll
        for (int n = 0; n < 4; n++) mma_f16(acc[m][n], ah[m], b[n][0], b[n][1]);
#pragma unroll
    for (int m = 0; m < 2; m++)
      if (m < mt)
#pragma unroll
        for (int n = 0; n < 4; n++) mma_f16(acc[m][n], al[m], b[n][0], b[n][1]);
  }

  // Fragment rows g and g+8 of each row tile, columns 2*(lane&3) + {0, 1}
  // of each 8-column tile.
  const int g = lane >> 2, c2 = 2 * (lane & 3);
#pragma unroll
  for (int m = 0; m < 2; m++) {
#pragma unroll
    for (int half = 0; half < 2; half++) {
      const int r = wm + 16 * m + 8 * half + g, t = t0 + r;
      if (m < mt && t < T) {
        const float d = down[r];
        float* o = qlat + (size_t)t * ldql + (size_t)h * rank + n0 + wn + c2;
#pragma unroll
        for (int n = 0; n < 4; n++)
          *(float2*)(o + 8 * n) = make_float2(acc[m][n][2 * half] * d, acc[m][n][2 * half + 1] * d);
      }
    }
  }
}

#define ABSORB_TC(DN)                                                                                             \
  extern "C" __global__ void __launch_bounds__(256, 2)                                                          \
      absorb_query_tc_##DN(float* __restrict__ qlat, int ldql, const float* __restrict__ q, int ldq,            \
                           const u8* __restrict__ codes, const u8* __restrict__ scales,                         \
                           const float* __restrict__ row_scale, int G, int rank, int dr, int T) {               \
    absorb_query_tc<DN>(qlat, ldql, q, ldq, codes, scales, row_scale, G, rank, dr, T);                          \
  }
ABSORB_TC(128)
ABSORB_TC(192)

// absorb_query_tc with the RoPEs and the cache write of rope2_cache_write
// (rope.cuh) in blocks of an extra head slice, blockIdx.z = heads: block
// (x, 0, heads) does row x (T at most rank/AT_N). They share nothing with
// the absorbed query, which reads q's first DN columns of each head and
// writes qlat, while the RoPE rotates q's columns [qoffset, qoffset + dim)
// of each head (qoffset >= DN) and kpe, and stores lat and kpe in the cache:
// one launch less in a decode layer, each block computing what it computes
// in its own launch. rq is q for the RoPE (written; q is read-only here).
#define ABSORB_TC_ROPE(DN)                                                                                        \
  extern "C" __global__ void __launch_bounds__(256, 2) absorb_query_tc_rope_##DN(                               \
      float* __restrict__ qlat, int ldql, const float* __restrict__ q, int ldq, const u8* __restrict__ codes,   \
      const u8* __restrict__ scales, const float* __restrict__ row_scale, int G, int rank, int dr, int T,        \
      int heads, float* rq, int qheads, int qstride, int qoffset, float* kpe, int ldk, int kheads, int kstride,  \
      int koffset, int dim, int interleaved, const float* __restrict__ cs, void* layer, int dtype,               \
      const i32* __restrict__ slots, const float* lat, int ldl) {                                               \
    if ((int)blockIdx.z == heads) {                                                                              \
      PDL_LAUNCH();                                                                                              \
      rope2_cache_write_row(rq, ldq, qheads, qstride, qoffset, kpe, ldk, kheads, kstride, koffset, dim,          \
                            interleaved, cs, T, layer, dtype, slots, lat, ldl, rank, dr, blockIdx.x,             \
                            blockIdx.y == 0 && (int)blockIdx.x < T);                                             \
      return;                                                                                                    \
    }                                                                                                            \
    absorb_query_tc<DN>(qlat, ldql, q, ldq, codes, scales, row_scale, G, rank, dr, T);                          \
  }
ABSORB_TC_ROPE(128)
ABSORB_TC_ROPE(192)


// absorb_query_tc_rope for the 2-64 rows of a serving step: row r's RoPEs
// and cache write in block (r % gridDim.x, 0, heads + r / gridDim.x) of
// ceil(T / gridDim.x) extra head slices (absorb_query_tc_rope has one, of
// rank/AT_N rows). Each block computes what it computes in its own launch.
#define ABSORB_TC_ROPE_ROWS(DN)                                                                                   \
  extern "C" __global__ void __launch_bounds__(256, 2) absorb_query_tc_rope_rows_##DN(                          \
      float* __restrict__ qlat, int ldql, const float* __restrict__ q, int ldq, const u8* __restrict__ codes,   \
      const u8* __restrict__ scales, const float* __restrict__ row_scale, int G, int rank, int dr, int T,        \
      int heads, float* rq, int qheads, int qstride, int qoffset, float* kpe, int ldk, int kheads, int kstride,  \
      int koffset, int dim, int interleaved, const float* __restrict__ cs, void* layer, int dtype,               \
      const i32* __restrict__ slots, const float* lat, int ldl) {                                               \
    if ((int)blockIdx.z >= heads) {                                                                              \
      PDL_LAUNCH();                                                                                              \
      const int r = ((int)blockIdx.z - heads) * (int)gridDim.x + (int)blockIdx.x;                               \
      rope2_cache_write_row(rq, ldq, qheads, qstride, qoffset, kpe, ldk, kheads, kstride, koffset, dim,          \
                            interleaved, cs, T, layer, dtype, slots, lat, ldl, rank, dr, r,                      \
                            blockIdx.y == 0 && r < T);                                                           \
      return;                                                                                                    \
    }                                                                                                            \
    absorb_query_tc<DN>(qlat, ldql, q, ldq, codes, scales, row_scale, G, rank, dr, T);                          \
  }
ABSORB_TC_ROPE_ROWS(128)
ABSORB_TC_ROPE_ROWS(192)
// absorb_query_tc over TILES token tiles a block (a prefill's rows): the
// weight slab is dequantized once for all of them, and the next tile's
// queries are loaded into registers before this tile's products, so that
// their latency hides behind the tensor work. The same sums in the same
// order as absorb_query_tc, tile by tile. Grid (rank/AT_N,
// ceil(T/(TILES*AT_M)), heads); shared memory as absorb_query_tc's.
template <int DN, int TILES>
__device__ __forceinline__ void absorb_query_tcm(float* __restrict__ qlat, int ldql, const float* __restrict__ q,
                                                 int ldq, const u8* __restrict__ codes, const u8* __restrict__ scales,
                                                 const float* __restrict__ row_scale, int G, int rank, int dr, int T) {
  constexpr int lda = DN + 8;
  extern __shared__ __align__(16) u8 at_smem[];
  unsigned short* ahi = (unsigned short*)at_smem;  // [AT_M][lda]
  unsigned short* alo = ahi + AT_M * lda;          // [AT_M][lda]
  unsigned short* bs = alo + AT_M * lda;           // [DN][AT_LDB]
  float* down = (float*)(bs + DN * AT_LDB);        // [AT_M]
  u32* lut = (u32*)(down + AT_M);                  // [256]
  float* rsm = (float*)(lut + 256);                // [DN]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int n0 = blockIdx.x * AT_N, tb = blockIdx.y * (TILES * AT_M), h = blockIdx.z;
  PDL_LAUNCH();

  constexpr int chunks = DN * 4 / 256;
  uint4 cv[chunks];
  u32 sv[chunks];
  at_load_slab<DN>(codes, scales, row_scale, G, rank, h, n0, tid, cv, sv, rsm, lut);
  __syncthreads();
  at_dequant_slab<chunks>(cv, sv, tid, lut, bs);

  PDL_WAIT();
  constexpr int per = DN / 16;
  const int qr = tid >> 2, j0 = tid & 3;
  float4 x[per];
  auto load_queries = [&](int t0) {
#pragma unroll
    for (int u = 0; u < per; u++) {
      const int i = 4 * (j0 + 4 * u);
      x[u] = t0 + qr < T ? *(const float4*)(q + (size_t)(t0 + qr) * ldq + (size_t)h * (DN + dr) + i)
                        : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  };
  load_queries(tb);
  const int wm = (warp & 1) * 32, wn = (warp >> 1) * 32;
  const int a_off = (lane & 15) * lda + (lane >> 4) * 8;
  const int b_off = ((lane & 7) + (((lane >> 3) & 1) << 3)) * AT_LDB + (lane >> 4) * 8;
  const int g = lane >> 2, c2 = 2 * (lane & 3);
#pragma unroll 1
  for (int tile = 0; tile < TILES; tile++) {
    const int t0 = tb + tile * AT_M;
    if (t0 >= T) break;  // the same for the whole block
    if (tile > 0) __syncthreads();  // the last tile's products and stores are done with ahi, alo, down
    {
      float m = 0.f;
#pragma unroll
      for (int u = 0; u < per; u++) {
        const float4 rs = ((const float4*)rsm)[j0 + 4 * u];
        x[u] = make_float4(x[u].x * rs.x * 0.5f, x[u].y * rs.y * 0.5f, x[u].z * rs.z * 0.5f, x[u].w * rs.w * 0.5f);
        m = fmaxf(m, fmaxf(fmaxf(fabsf(x[u].x), fabsf(x[u].y)), fmaxf(fabsf(x[u].z), fabsf(x[u].w))));
      }
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
      const int eb = (__float_as_uint(m) >> 23) & 0xFF;
      const int e = (m == 0.f || eb == 0xFF) ? 0 : max(-126, min(126, 141 - eb));
      const float up = __uint_as_float((u32)(127 + e) << 23);
      if (j0 == 0) down[qr] = __uint_as_float((u32)(127 - e) << 23);
#pragma unroll
      for (int u = 0; u < per; u++) {
        const int i = 4 * (j0 + 4 * u);
        u32 h0, l0, h1, l1;
        split_f16x2(x[u].x * up, x[u].y * up, h0, l0);
        split_f16x2(x[u].z * up, x[u].w * up, h1, l1);
        *(uint2*)(ahi + qr * lda + i) = make_uint2(h0, h1);
        *(uint2*)(alo + qr * lda + i) = make_uint2(l0, l1);
      }
    }
    __syncthreads();
    // The next tile's queries, in flight during this tile's products.
    if (tile + 1 < TILES && t0 + AT_M < T) load_queries(t0 + AT_M);
    if (t0 + wm < T) {
      const int mt = t0 + wm + 16 < T ? 2 : 1;
      float acc[2][4][4];
#pragma unroll
      for (int m = 0; m < 2; m++)
#pragma unroll
        for (int n = 0; n < 4; n++) acc[m][n][0] = acc[m][n][1] = acc[m][n][2] = acc[m][n][3] = 0.f;
#pragma unroll
      for (int s = 0; s < DN / 16; s++) {
        u32 ah[2][4], al[2][4], b[4][2];
#pragma unroll
        for (int m = 0; m < 2; m++) {
          if (m < mt) {
            ldsm_x4(smem_addr(ahi + (wm + 16 * m) * lda + 16 * s + a_off), ah[m][0], ah[m][1], ah[m][2], ah[m][3]);
            ldsm_x4(smem_addr(alo + (wm + 16 * m) * lda + 16 * s + a_off), al[m][0], al[m][1], al[m][2], al[m][3]);
          }
        }
#pragma unroll
        for (int np = 0; np < 2; np++)
          ldsm_x4_t(smem_addr(bs + 16 * s * AT_LDB + wn + 16 * np + b_off), b[2 * np][0], b[2 * np][1],
                    b[2 * np + 1][0], b[2 * np + 1][1]);
#pragma unroll
        for (int m = 0; m < 2; m++)
          if (m < mt)
#pragma unroll
            for (int n = 0; n < 4; n++) mma_f16(acc[m][n], ah[m], b[n][0], b[n][1]);
#pragma unroll
        for (int m = 0; m < 2; m++)
          if (m < mt)
#pragma unroll
            for (int n = 0; n < 4; n++) mma_f16(acc[m][n], al[m], b[n][0], b[n][1]);
      }
#pragma unroll
      for (int m = 0; m < 2; m++) {
#pragma unroll
        for (int half = 0; half < 2; half++) {
          const int r = wm + 16 * m + 8 * half + g, t = t0 + r;
          if (m < mt && t < T) {
            const float d = down[r];
            float* o = qlat + (size_t)t * ldql + (size_t)h * rank + n0 + wn + c2;
#pragma unroll
            for (int n = 0; n < 4; n++)
              *(float2*)(o + 8 * n) = make_float2(acc[m][n][2 * half] * d, acc[m][n][2 * half + 1] * d);
          }
        }
      }
    }
  }
}

#define ABSORB_TCM(DN, TILES)                                                                                     \
  extern "C" __global__ void __launch_bounds__(256, 2)                                                          \
      absorb_query_tc##TILES##_##DN(float* __restrict__ qlat, int ldql, const float* __restrict__ q, int ldq,   \
                                    const u8* __restrict__ codes, const u8* __restrict__ scales,                \
                                    const float* __restrict__ row_scale, int G, int rank, int dr, int T) {      \
    absorb_query_tcm<DN, TILES>(qlat, ldql, q, ldq, codes, scales, row_scale, G, rank, dr, T);                  \
  }
ABSORB_TCM(128, 2)
ABSORB_TCM(192, 2)

// rope2_cache_write for the rows of a prefill, in the model's geometry: one
// key head whose rotated columns are its whole row (kheads 1, koffset 0,
// dim = rope), at most 256 RC_Q query pairs and 256 RC_L latent values a
// row, dim/2 <= 256. Every load of a row (the query and key pairs, the
// latent) is issued before any store, and the key's cache entries are
// written from the registers that rotated them, so a block waits for
// memory once; the standalone kernel waits for each of its loops in turn
// and for two barriers. The same arithmetic, so the same bits. One block
// of 256 threads a row; the table and the slot are read before the wait
// (they come from the step's uploads). A bf16 or f32 cache only
// (ropeRowsFit): an fp8 or fp4 record's scales need the whole row first.
#define RC_Q 4
#define RC_L 4
extern "C" __global__ void __launch_bounds__(256)
    rope2_cache_rows(float* q, int ldq, int qheads, int qstride, int qoffset, float* kpe, int ldk, int kheads,
                     int kstride, int koffset, int dim, int interleaved, const float* __restrict__ cs, int T,
                     void* layer, int dtype, const i32* __restrict__ slots, const float* lat, int ldl, int rank,
                     int rope) {
  PDL_LAUNCH();
  const int t = blockIdx.x, tid = threadIdx.x, half = dim / 2, width = rank + rope, nq = qheads * half;
  const float* ct = cs + (size_t)t * half;
  const float* st = cs + (size_t)T * half + (size_t)t * half;
  float qc[RC_Q], qsn[RC_Q], kc = 0.f, ks = 0.f;
#pragma unroll
  for (int u = 0; u < RC_Q; u++) {
    const int j = tid + 256 * u;
    qc[u] = qsn[u] = 0.f;
    if (j < nq) {
      qc[u] = ct[j % half];
      qsn[u] = st[j % half];
    }
  }
  if (tid < half) {
    kc = ct[tid];
    ks = st[tid];
  }
  const size_t slot = (size_t)slots[t];
  PDL_WAIT();
  float* qa[RC_Q];
  float q0[RC_Q], q1[RC_Q], lv[RC_L], k0 = 0.f, k1 = 0.f;
  int qb[RC_Q];
#pragma unroll
  for (int u = 0; u < RC_Q; u++) {
    const int j = tid + 256 * u, i = j % half;
    qa[u] = q + (size_t)t * ldq + (j / half) * qstride + qoffset + (interleaved ? 2 * i : i);
    qb[u] = interleaved ? 1 : half;
    q0[u] = q1[u] = 0.f;
    if (j < nq) {
      q0[u] = qa[u][0];
      q1[u] = qa[u][qb[u]];
    }
  }
  float* ka = kpe + (size_t)t * ldk + (interleaved ? 2 * tid : tid);
  const int kb = interleaved ? 1 : half;
  if (tid < half) {
    k0 = ka[0];
    k1 = ka[kb];
  }
#pragma unroll
  for (int u = 0; u < RC_L; u++) {
    const int j = tid + 256 * u;
    lv[u] = j < rank ? lat[(size_t)t * ldl + j] : 0.f;
  }
#pragma unroll
  for (int u = 0; u < RC_Q; u++) {
    if (tid + 256 * u < nq) {
      qa[u][0] = __fsub_rn(__fmul_rn(q0[u], qc[u]), __fmul_rn(q1[u], qsn[u]));
      qa[u][qb[u]] = __fadd_rn(__fmul_rn(q1[u], qc[u]), __fmul_rn(q0[u], qsn[u]));
    }
  }
  auto put = [&](int j, float v) {
    if (dtype == 1)
      ((float*)layer)[slot * width + j] = v;
    else
      ((unsigned short*)layer)[slot * width + j] = f32_to_bf16(v);
  };
  if (tid < half) {
    const float r0 = __fsub_rn(__fmul_rn(k0, kc), __fmul_rn(k1, ks));
    const float r1 = __fadd_rn(__fmul_rn(k1, kc), __fmul_rn(k0, ks));
    ka[0] = r0;
    ka[kb] = r1;
    const int a = interleaved ? 2 * tid : tid;
    put(rank + a, r0);
    put(rank + a + kb, r1);
  }
#pragma unroll
  for (int u = 0; u < RC_L; u++) {
    const int j = tid + 256 * u;
    if (j < rank) put(j, lv[u]);
  }
}

// q_b's product with the q_a norm (norm_gemv_t1, quant.cu), the absorbed
// query (absorb_query_tc_rope_192) and the RoPEs and cache write, for one
// token, in one launch: GLM-4.7-Flash's attention (dn 192, rope 64, rank
// 512 = 4 column slabs of AT_N). Grid (4, 1, heads + 1), clusters of the 4
// blocks of a head, 256 threads.
//
// Block (c, 0, h), h < heads: rows h*256 + 64c + [0, 64) of q_b (blocks 0-2
// the head's 192 nope rows, block 3 its 64 rope rows). Before the wait it
// requests those rows of W_qb (warp w rows 8w + [0, 8), chunk lane of each
// as norm_gemv_t1's warps), the gain, and dequantizes its slab of W_UK
// (columns 128c + [0, 128) of head h) into shared memory. After the wait
// it normalises q_a's row into int8 groups as norm_gemv_t1's blocks do
// (block (0, 0, 0) writes the norm's float output and int8 form) and takes
// its 64 rows' products in norm_gemv_t1's arithmetic. Blocks 0-2 write
// their rows to q and store them into the shared memory of the cluster's
// four blocks; block 3 rotates its rows (rope_row_cs's arithmetic, the
// table's row 0) and writes them to q's rope columns. After a cluster
// barrier every block holds the head's 192 nope values and takes its
// slab's absorbed query as absorb_query_tc does for one token (the same
// splits and products: the same bits; one row tile of 16, whose other
// rows are zero, and 8 warps of 16 columns, each accumulator taking the
// products in absorb_query_tc's order).
//
// Block (0, 0, heads): the latent's norm (rmsnorm_quant8_row; none when
// x2 is null), then the key's RoPE and the cache write of row 0
// (rope2_cache_write_row without queries: one key head of 64 rotated
// columns). Blocks (1-3, 0, heads) do nothing.
//
// kg and kg2 hold K | gshift << 16 (q_b's columns, G = 32 << gshift) and
// K2 | G2 << 16; flags interleaved | dtype << 1. Dynamic shared memory
// QA_SHARED bytes (qAbsorbShared in chain.go).
#define QA_DN 192
#define QA_LDA (QA_DN + 8)
#define QA_SHARED (2 * 16 * QA_LDA * 2 + QA_DN * AT_LDB * 2 + 4 * 256 + 4 * QA_DN)
extern "C" __global__ void __cluster_dims__(4, 1, 1) __launch_bounds__(256, 2)
    norm_qb_absorb_192(const u8* __restrict__ qcodes, const u8* __restrict__ qscales,
                       const float* __restrict__ qrs, int kg, const float* x, const float* __restrict__ gain,
                       float eps, float* out, i8* __restrict__ xq, float* __restrict__ xs, i32* __restrict__ xsum,
                       float* q, float* __restrict__ qlat, const u8* __restrict__ codes,
                       const u8* __restrict__ scales, const float* __restrict__ row_scale, int G,
                       const float* __restrict__ cs, int flags, const float* x2, const float* __restrict__ gain2,
                       float eps2, float* out2, i8* __restrict__ xq2, float* __restrict__ xs2,
                       i32* __restrict__ xsum2, int kg2, float* kpe, void* layer, const i32* __restrict__ slots,
                       const float* lat) {
  constexpr int DN = QA_DN, DR = 64, rank = 4 * AT_N, R = DN + DR;
  const int heads = (int)gridDim.z - 1, interleaved = flags & 1;
  PDL_LAUNCH();
  if ((int)blockIdx.z == heads) {
    if (blockIdx.x != 0) return;
    if (x2) {
      rmsnorm_quant8_row(x2, 0, nullptr, 0, nullptr, 0, nullptr, 0, gain2, eps2, out2, 0, xq2, xs2, xsum2,
                         kg2 & 0xFFFF, kg2 >> 16, 0);
      __syncthreads();  // out2 (the latent the cache takes) written
      TRACE_MARK();
    }
    rope2_cache_write_row(nullptr, 0, 0, 0, 0, kpe, 0, 1, DR, 0, DR, interleaved, cs, 1, layer, flags >> 1, slots,
                          lat, 0, rank, DR, 0, true);
    TRACE_MARK();
    return;
  }
  extern __shared__ __align__(16) u8 qa_smem[];
  unsigned short* ahi = (unsigned short*)qa_smem;  // [16][QA_LDA]: row 0 the query, rows 1-15 zero
  unsigned short* alo = ahi + 16 * QA_LDA;         // [16][QA_LDA]
  unsigned short* bs = alo + 16 * QA_LDA;          // [DN][AT_LDB]
  u32* lut = (u32*)(bs + DN * AT_LDB);             // [256]
  float* rsm = (float*)(lut + 256);                // [DN] W_UK's row scales of the head
  __shared__ __align__(16) i8 sq[1024];            // the normalised q_a row, int8
  __shared__ float ssc[32];                        // its group scales
  __shared__ float partial[4];
  __shared__ __align__(16) float qn[DN];  // the head's nope values (from blocks 0-2)
  __shared__ float qp[DR];                // block 3: the head's rope values
  __shared__ float down;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, k0 = tid * 8;
  const int c = blockIdx.x, h = blockIdx.z;
  const int K = kg & 0xFFFF, gshift = kg >> 16, Gq = 32 << gshift, C = K >> 5, GK = C >> gshift;
  const int row0 = h * R + 64 * c + 8 * warp;  // this warp's first row of q_b
  const bool on = k0 < K;
  // Every block of the cluster has started, and has unset qn, before any
  // store into its shared memory (the wait is after the product).
  for (int i = tid; i < DN; i += 256) ((volatile u32*)qn)[i] = CLUSTER_UNSET;
  cluster_arrive();

  // W_qb's chunks of this lane (chunk lane of the warp's 8 rows), the row
  // scale of row lane, the gain, before the wait.
  uint4 w[8];
  u32 s[8];
  if (lane < C) {
#pragma unroll
    for (int r = 0; r < 8; r++) {
      w[r] = load_stream16(qcodes + (size_t)(row0 + r) * (K / 2) + lane * 16);
      s[r] = __ldg(qscales + (size_t)(row0 + r) * GK + (lane >> gshift));
    }
  }
  const float rs = lane < 8 ? qrs[row0 + lane] : 0.f;
  float gv[8];
  if (on) ldg8(gain + k0, gv);
  float cq = 0.f, sn = 0.f;  // block 3: the table's row 0, pair tid
  if (c == 3 && tid < DR / 2) {
    cq = cs[tid];
    sn = cs[DR / 2 + tid];
  }
  // W_UK's slab, dequantized before the wait (absorb_query_tc).
  constexpr int chunks = DN * 4 / 256;
  {
    uint4 cv[chunks];
    u32 sv[chunks];
    at_load_slab<DN>(codes, scales, row_scale, G, rank, h, c * AT_N, tid, cv, sv, rsm, lut);
    for (int i = tid; i < 15 * QA_LDA / 2; i += 256) {
      ((u32*)(ahi + QA_LDA))[i] = 0u;
      ((u32*)(alo + QA_LDA))[i] = 0u;
    }
    __syncthreads();  // lut and rsm
    at_dequant_slab<chunks>(cv, sv, tid, lut, bs);
  }

  PDL_WAIT();
  STAGE_DELAY(1);
  // The q_a norm, norm_gemv_t1's arithmetic.
  norm_row_shared(x, gv, eps, K, Gq, on, c == 0 && h == 0, lane, warp, k0, partial, sq, ssc, out, xq, xs, xsum);
  __syncthreads();
  TRACE_MARK();
  // The warp's 8 rows of q_b (gemv_split_t1's sums); lane r < 8 takes row
  // row0 + r.
  float o[8];
#pragma unroll
  for (int r = 0; r < 8; r++) o[r] = 0.f;
  if (lane < C) {
    const uint4* xp = (const uint4*)(sq + lane * 32);
    const uint4 xa = xp[0], xb = xp[1];
    const float xscale = ssc[lane >> gshift];
#pragma unroll
    for (int r = 0; r < 8; r++) o[r] += (float)dot32_split(w[r], xa, xb) * (e4m3(s[r]) * xscale);
  }
  const float y = warp_sum_rows(o, lane) * (rs * 0.5f);
  TRACE_MARK();
  cluster_wait();  // every block of the cluster has started
  if (lane < 8) {
    const int i = 8 * warp + lane;  // this block's row
    if (c < 3) {
      q[row0 + lane] = y;
#pragma unroll
      for (int b = 0; b < 4; b++) st_cluster(&qn[64 * c + i], b, y);
    } else {
      qp[i] = y;
    }
  }
  __syncthreads();  // qp holds this block's rope values; qn is awaited word by word below
  TRACE_MARK();

  if (c == 3 && tid < DR / 2) {
    // The queries' RoPE (rope_row_cs on the head's rope columns).
    const int a = interleaved ? 2 * tid : tid, b = interleaved ? 2 * tid + 1 : tid + DR / 2;
    const float x0 = qp[a], x1 = qp[b];
    float* qh = q + h * R + DN;
    qh[a] = __fsub_rn(__fmul_rn(x0, cq), __fmul_rn(x1, sn));
    qh[b] = __fadd_rn(__fmul_rn(x1, cq), __fmul_rn(x0, sn));
  }

  // The absorbed query of the row (absorb_query_tc's arithmetic): warp 0
  // scales and splits the 192 values, lane pairs 2*(lane + 32k).
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < 3; k++) {
      wait_cluster_set(&qn[2 * (lane + 32 * k)]);
      wait_cluster_set(&qn[2 * (lane + 32 * k) + 1]);
    }
    __syncwarp();
    float a0[3], a1[3], m = 0.f;
#pragma unroll
    for (int k = 0; k < 3; k++) {
      const int i = 2 * (lane + 32 * k);
      const float2 qv = *(const float2*)(qn + i);
      a0[k] = qv.x * rsm[i] * 0.5f;
      a1[k] = qv.y * rsm[i + 1] * 0.5f;
      m = fmaxf(m, fmaxf(fabsf(a0[k]), fabsf(a1[k])));
    }
    m = warp_max(m);
    const int eb = (__float_as_uint(m) >> 23) & 0xFF;
    const int e = (m == 0.f || eb == 0xFF) ? 0 : max(-126, min(126, 141 - eb));
    const float up = __uint_as_float((u32)(127 + e) << 23);
    if (lane == 0) down = __uint_as_float((u32)(127 - e) << 23);
#pragma unroll
    for (int k = 0; k < 3; k++) {
      const int i = 2 * (lane + 32 * k);
      u32 hi, lo;
      split_f16x2(a0[k] * up, a1[k] * up, hi, lo);
      *(u32*)(ahi + i) = hi;
      *(u32*)(alo + i) = lo;
    }
  }
  __syncthreads();
  // Warp w: columns 16w + [0, 16) of the slab.
  const int wn = 16 * warp;
  const int a_off = (lane & 15) * QA_LDA + (lane >> 4) * 8;
  const int b_off = ((lane & 7) + (((lane >> 3) & 1) << 3)) * AT_LDB + (lane >> 4) * 8;
  float acc[2][4];
#pragma unroll
  for (int n = 0; n < 2; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
#pragma unroll
  for (int st = 0; st < DN / 16; st++) {
    u32 ah[4], al[4], b[2][2];
    ldsm_x4(smem_addr(ahi + 16 * st + a_off), ah[0], ah[1], ah[2], ah[3]);
    ldsm_x4(smem_addr(alo + 16 * st + a_off), al[0], al[1], al[2], al[3]);
    ldsm_x4_t(smem_addr(bs + 16 * st * AT_LDB + wn + b_off), b[0][0], b[0][1], b[1][0], b[1][1]);
#pragma unroll
    for (int n = 0; n < 2; n++) mma_f16(acc[n], ah, b[n][0], b[n][1]);
#pragma unroll
    for (int n = 0; n < 2; n++) mma_f16(acc[n], al, b[n][0], b[n][1]);
  }
  if (lane < 4) {
    const float d = down;
    float* o2 = qlat + (size_t)h * rank + c * AT_N + wn + 2 * lane;
#pragma unroll
    for (int n = 0; n < 2; n++) *(float2*)(o2 + 8 * n) = make_float2(acc[n][0] * d, acc[n][1] * d);
  }
  TRACE_MARK();
}
