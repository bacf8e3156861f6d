// Decode GEMV on MMFP4 weights with int8 activations (docs/format.md
// sections 5 and 9), for T = 1..8 tokens:
//
//   y[t*ldy + n] = row_scale[n]/2 * sum_g e4m3(s[n,g]) * xs[t,g] * acc[t,n,g]
//   acc[t,n,g]   = sum_{k in g} 2*e2m1(q[n,k]) * xq[t,k]     (exact int32)
//
// Layout: codes [N][K/2] (low nibble = even column), scales [N][K/G],
// row_scale [N]; xq [T][K] int8 in column order, xs [T][K/G], and xsum
// [T][K/32], the sum of each 32 activations (from rmsnorm_quant).
//
// A chunk is 16 bytes of codes: 32 weights, inside one group for G >= 32.
// Each warp owns R rows; lane l reads chunks l and l+32 of every row (16-byte
// coalesced loads, 2R of them in flight) and the matching 32 activations,
// then the warp sums its lanes. Blocks are 4 warps.

#define WARPS 4

// One word of codes (8 nibbles = 8 consecutive columns) against 8 int8
// activations (x0: columns 0-3, x1: 4-7), with the +128 offset of
// e2m1x4_biased: the caller starts acc at -128 * sum(x).
DEVICE i32 dot8_biased(u32 q, u32 x0, u32 x1, i32 acc) {
  acc = dp4a_us(e2m1x4_biased(q), x0, acc);
  return dp4a_us(e2m1x4_biased(q >> 16), x1, acc);
}

// The same product without the offset: positive and negative codes go
// through separate dp4a into pos and neg, so no activation sum is needed
// (fewer integer operations per weight, twice the dp4a; for T = 1).
DEVICE void dot8_split(u32 q, u32 x0, u32 x1, i32& pos, i32& neg) {
  const u32 n = q ^ 0x88888888u;
  pos = dp4a_ss(prmt(E2M1_LO, E2M1_HI, q), x0, pos);
  pos = dp4a_ss(prmt(E2M1_LO, E2M1_HI, q >> 16), x1, pos);
  neg = dp4a_ss(prmt(E2M1_LO, E2M1_HI, n), x0, neg);
  neg = dp4a_ss(prmt(E2M1_LO, E2M1_HI, n >> 16), x1, neg);
}

template <int T, int R, bool SPLIT>
DEVICE void gemv_rows(const u8* __restrict__ codes, const u8* __restrict__ scales,
                      const float* __restrict__ row_scale, int N, int K, int gshift,
                      const i8* __restrict__ xq, const float* __restrict__ xs,
                      const i32* __restrict__ xsum, float* __restrict__ y, int ldy, int row0) {
  const int lane = threadIdx.x & 31;
  const int C = K >> 5;          // chunks per row
  const int GK = C >> gshift;    // groups per row
  const size_t rowBytes = (size_t)K / 2;

  int rows[R];
#pragma unroll
  for (int r = 0; r < R; r++) rows[r] = min(row0 + r, N - 1);

  float acc[R][T];
#pragma unroll
  for (int r = 0; r < R; r++)
#pragma unroll
    for (int t = 0; t < T; t++) acc[r][t] = 0.f;

  for (int c0 = 0; c0 < C; c0 += 64) {
    uint4 w[2][R];
    u32 s[2][R];
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int c = c0 + 32 * h + lane;
      if (c < C) {
#pragma unroll
        for (int r = 0; r < R; r++) w[h][r] = load_stream16(codes + rows[r] * rowBytes + c * 16);
#pragma unroll
        for (int r = 0; r < R; r++) s[h][r] = __ldg(scales + (size_t)rows[r] * GK + (c >> gshift));
      }
    }
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int c = c0 + 32 * h + lane;
      if (c >= C) continue;
      const int g = c >> gshift;
#pragma unroll
      for (int t = 0; t < T; t++) {
        const uint4* xp = (const uint4*)(xq + (size_t)t * K + c * 32);
        const uint4 xa = __ldg(xp), xb = __ldg(xp + 1);
        const float xscale = __ldg(xs + (size_t)t * GK + g);
        const i32 base = SPLIT ? 0 : -128 * __ldg(xsum + (size_t)t * C + c);
#pragma unroll
        for (int r = 0; r < R; r++) {
          const uint4 q = w[h][r];
          i32 d = base;
          if (SPLIT) {
            i32 neg = 0;
            dot8_split(q.x, xa.x, xa.y, d, neg);
            dot8_split(q.y, xa.z, xa.w, d, neg);
            dot8_split(q.z, xb.x, xb.y, d, neg);
            dot8_split(q.w, xb.z, xb.w, d, neg);
            d -= neg;
          } else {
            d = dot8_biased(q.x, xa.x, xa.y, d);
            d = dot8_biased(q.y, xa.z, xa.w, d);
            d = dot8_biased(q.z, xb.x, xb.y, d);
            d = dot8_biased(q.w, xb.z, xb.w, d);
          }
          acc[r][t] += (float)d * (e4m3(s[h][r]) * xscale);
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < R; r++) {
#pragma unroll
    for (int t = 0; t < T; t++) {
      const float v = warp_sum(acc[r][t]);
      if (lane == ((r * T + t) & 31) && row0 + r < N) {
        y[(size_t)t * ldy + row0 + r] = v * (row_scale[row0 + r] * 0.5f);
      }
    }
  }
}

// Kernels gemv_t<T> (offset form) and gemv_split_t1; grid = ceil(N / (WARPS*R))
// blocks of 32*WARPS threads. gshift = log2(G/32).
#define GEMV_KERNEL(NAME, T, R, SPLIT)                                                            \
  extern "C" __global__ void __launch_bounds__(32 * WARPS) NAME(                                 \
      const u8* __restrict__ codes, const u8* __restrict__ scales,                                \
      const float* __restrict__ row_scale, int N, int K, int gshift, const i8* __restrict__ xq,   \
      const float* __restrict__ xs, const i32* __restrict__ xsum, float* __restrict__ y, int ldy) { \
    const int warp = blockIdx.x * WARPS + (threadIdx.x >> 5);                                     \
    if (warp * R >= N) return;                                                                    \
    gemv_rows<T, R, SPLIT>(codes, scales, row_scale, N, K, gshift, xq, xs, xsum, y, ldy, warp * R); \
  }

GEMV_KERNEL(gemv_split_t1, 1, 4, true)
GEMV_KERNEL(gemv_t1, 1, 4, false)
GEMV_KERNEL(gemv_t2, 2, 4, false)
GEMV_KERNEL(gemv_t3, 3, 4, false)
GEMV_KERNEL(gemv_t4, 4, 4, false)
GEMV_KERNEL(gemv_t5, 5, 4, false)
GEMV_KERNEL(gemv_t6, 6, 4, false)
GEMV_KERNEL(gemv_t7, 7, 4, false)
GEMV_KERNEL(gemv_t8, 8, 4, false)
