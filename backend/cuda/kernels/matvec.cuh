// The dp4a matrix-vector core shared by the GEMV and MoE kernels: the
// decode of a 16-byte chunk of codes (32 weights) against 32 int8
// activations, and the warp-level product of R rows with T token rows.
// Layout (docs/format.md sections 5 and 9): codes [N][K/2] (low nibble =
// even column), scales [N][K/G]; xq [T][K] int8 in column order, xs [T][K/G],
// xsum [T][K/32] (the sum of each 32 activations). Lane l reads chunks l and
// l+32 of every row (16-byte coalesced loads, 2R of them in flight) and the
// matching activations; the warp then sums its lanes.

#define WARPS 4

// One word of codes (8 nibbles = 8 consecutive columns) against 8 int8
// activations (x0: columns 0-3, x1: 4-7), with the +128 offset of
// e2m1x4_biased: the caller starts acc at -128 * sum(x).
DEVICE i32 dot8_biased(u32 q, u32 x0, u32 x1, i32 acc) {
  acc = dp4a_us(e2m1x4_biased(q), x0, acc);
  return dp4a_us(e2m1x4_biased(q >> 16), x1, acc);
}

// A 16-byte chunk of codes as e2m1x4_biased's 8 words (word i: columns
// 4i..4i+3), for kernels that decode their weights ahead, while the
// activations are not yet written: after the wait a chunk's product is
// then dot32_biased's 8 dp4a, where dot32_split takes about 40 operations.
DEVICE void chunk_biased(uint4 q, u32 (&b)[8]) {
  const u32 w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int i = 0; i < 4; i++) {
    b[2 * i] = e2m1x4_biased(w[i]);
    b[2 * i + 1] = e2m1x4_biased(w[i] >> 16);
  }
}

// chunk_biased for the H chunks of R rows that a lane holds (chunk 32h +
// lane of each row, where it is below C), with their group scales as
// floats: the decode a kernel does before its wait.
template <int H, int R>
DEVICE void chunks_biased(const uint4 (&w)[H][R], const u32 (&s)[H][R], int C, u32 (&b)[H][R][8],
                          float (&ws)[H][R]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int h = 0; h < H; h++)
    if (32 * h + lane < C) {
#pragma unroll
      for (int r = 0; r < R; r++) {
        chunk_biased(w[h][r], b[h][r]);
        ws[h][r] = e4m3(s[h][r]);
      }
    }
}

// A chunk decoded by chunk_biased against 32 int8 activations (xa: columns
// 0-15, xb: 16-31) whose sum is xsum: dot32_split's exact integer.
DEVICE i32 dot32_biased(const u32 (&b)[8], uint4 xa, uint4 xb, i32 xsum) {
  i32 acc = -128 * xsum;
  acc = dp4a_us(b[0], xa.x, acc);
  acc = dp4a_us(b[1], xa.y, acc);
  acc = dp4a_us(b[2], xa.z, acc);
  acc = dp4a_us(b[3], xa.w, acc);
  acc = dp4a_us(b[4], xb.x, acc);
  acc = dp4a_us(b[5], xb.y, acc);
  acc = dp4a_us(b[6], xb.z, acc);
  return dp4a_us(b[7], xb.w, acc);
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

// One 16-byte chunk of codes (32 weights) against 32 int8 activations
// (xa: columns 0-15, xb: 16-31) through dot8_split: one lane's chunk of a
// row in the single-token kernels.
DEVICE i32 dot32_split(uint4 q, uint4 xa, uint4 xb) {
  i32 d = 0, neg = 0;
  dot8_split(q.x, xa.x, xa.y, d, neg);
  dot8_split(q.y, xa.z, xa.w, d, neg);
  dot8_split(q.z, xb.x, xb.y, d, neg);
  dot8_split(q.w, xb.z, xb.w, d, neg);
  return d - neg;
}

// The warp-summed products of R rows (row r: codes rc[r], group scales
// rs[r]) with T token rows of activations (R T <= 32), before the row
// scale: sum_g e4m3(s[r,g]) * xs[t,g] * acc[t,r,g], row r's with token t's
// in lane r T + t (warp_sum_rows).
// XSHARED: the activations are in shared memory (plain loads, not __ldg).
// L2REST: rows of more than 2048 columns have their rest (past the first
// 1024 bytes, loaded into registers before the wait) warmed in L2 before
// the wait too (a separate instance: the loop costs registers).
template <int T, int R, bool SPLIT, bool XSHARED = false, bool L2REST = false, bool TM = false>
DEVICE float gemv_dot(const u8* const (&rc)[R], const u8* const (&rs)[R], int K, int gshift,
                      const i8* __restrict__ xq, const float* __restrict__ xs,
                      const i32* __restrict__ xsum) {
  static_assert(!(TM && L2REST), "L2REST warms row-major rows");
  static_assert(R * T <= 32, "gemv_dot: a lane for each row and token");
  float out[R][T];
  const int lane = threadIdx.x & 31;
  const int C = K >> 5;        // chunks per row
  const int GK = C >> gshift;  // groups per row

#pragma unroll
  for (int r = 0; r < R; r++)
#pragma unroll
    for (int t = 0; t < T; t++) out[r][t] = 0.f;

  for (int c0 = 0; c0 < C; c0 += 64) {
    uint4 w[2][R];
    u32 s[2][R];
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int c = c0 + 32 * h + lane;
      if (c < C) {
#pragma unroll
        for (int r = 0; r < R; r++) w[h][r] = load_stream16(rc[r] + code_off<TM>(c * 16));
#pragma unroll
        for (int r = 0; r < R; r++) s[h][r] = __ldg(rs[r] + (c >> gshift));
      }
    }
    // The weights are in flight; the activations come from the kernel
    // before (programmatic dependent launch).
    if (c0 == 0) {
      if (L2REST) {
#pragma unroll 1
        for (int i = 8 + lane; i < (C >> 3); i += 32)
#pragma unroll
          for (int r = 0; r < R; r++) asm volatile("prefetch.global.L2 [%0];" ::"l"(rc[r] + (i << 7)));
      }
      PDL_WAIT();
    }
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int c = c0 + 32 * h + lane;
      if (c >= C) continue;
      const int g = c >> gshift;
#pragma unroll
      for (int t = 0; t < T; t++) {
        const uint4* xp = (const uint4*)(xq + (size_t)t * K + c * 32);
        const uint4 xa = XSHARED ? xp[0] : __ldg(xp), xb = XSHARED ? xp[1] : __ldg(xp + 1);
        const float xscale = XSHARED ? xs[(size_t)t * GK + g] : __ldg(xs + (size_t)t * GK + g);
        const i32 base = SPLIT ? 0 : -128 * __ldg(xsum + (size_t)t * C + c);
#pragma unroll
        for (int r = 0; r < R; r++) {
          const uint4 q = w[h][r];
          i32 d = base;
          if (SPLIT) {
            d = dot32_split(q, xa, xb);
          } else {
            d = dot8_biased(q.x, xa.x, xa.y, d);
            d = dot8_biased(q.y, xa.z, xa.w, d);
            d = dot8_biased(q.z, xb.x, xb.y, d);
            d = dot8_biased(q.w, xb.z, xb.w, d);
          }
          out[r][t] += (float)d * (e4m3(s[h][r]) * xscale);
        }
      }
    }
  }
  return warp_sum_rows(reinterpret_cast<const float(&)[R * T]>(out), lane);
}

// R consecutive rows of one matrix, stored to y.
template <int T, int R, bool SPLIT>
DEVICE void gemv_rows(const u8* __restrict__ codes, const u8* __restrict__ scales,
                      const float* __restrict__ row_scale, int N, int K, int gshift,
                      const i8* __restrict__ xq, const float* __restrict__ xs,
                      const i32* __restrict__ xsum, float* __restrict__ y, int ldy, int row0) {
  const int lane = threadIdx.x & 31;
  const int GK = (K >> 5) >> gshift;
  const u8* rc[R];
  const u8* rs[R];
#pragma unroll
  for (int r = 0; r < R; r++) {
    const int n = min(row0 + r, N - 1);
    rc[r] = codes + (size_t)n * (K / 2);
    rs[r] = scales + (size_t)n * GK;
  }
  const float v = gemv_dot<T, R, SPLIT, false, T == 1>(rc, rs, K, gshift, xq, xs, xsum);
  const int r = lane / T, t = lane % T;
  if (lane < R * T && row0 + r < N) y[(size_t)t * ldy + row0 + r] = v * (row_scale[row0 + r] * 0.5f);
}

