// Decode GEMV on MMFP4 weights with int8 activations (docs/format.md
// sections 5 and 9), for T = 1..8 tokens:
//
//   y[t*ldy + n] = row_scale[n]/2 * sum_g e4m3(s[n,g]) * xs[t,g] * acc[t,n,g]
//   acc[t,n,g]   = sum_{k in g} 2*e2m1(q[n,k]) * xq[t,k]     (exact int32)
//
// The dp4a kernels (gemv_t<T>, gemv_split_t1) give each warp R = 4 rows
// (matvec.cuh); gemv_mma uses the tensor cores. Blocks are 4 warps.

// Kernels gemv_t<T> (offset form) and gemv_split_t1; grid = ceil(N / (WARPS*R))
// blocks of 32*WARPS threads. gshift = log2(G/32).
#define GEMV_KERNEL(NAME, T, R, SPLIT)                                                            \
  extern "C" __global__ void __launch_bounds__(32 * WARPS) NAME(                                 \
      const u8* __restrict__ codes, const u8* __restrict__ scales,                                \
      const float* __restrict__ row_scale, int N, int K, int gshift, const i8* __restrict__ xq,   \
      const float* __restrict__ xs, const i32* __restrict__ xsum, float* __restrict__ y, int ldy) { \
    PDL_LAUNCH();                                                                                 \
    const int warp = blockIdx.x * WARPS + (threadIdx.x >> 5);                                     \
    if (warp * R >= N) return;                                                                    \
    gemv_rows<T, R, SPLIT>(codes, scales, row_scale, N, K, gshift, xq, xs, xsum, y, ldy, warp * R); \
  }

GEMV_KERNEL(gemv_split_t1, 1, 4, true)

#define GEMV_REGS_C 5

// gemv_split_t1_regs after its wait: the activations, the products of the
// decoded chunks b (scales ws), the rows' sums. FULL: C == 32 GEMV_REGS_C.
template <bool FULL>
DEVICE void gemv_t1_regs_tail(const u32 (&b)[GEMV_REGS_C][2][8], const float (&ws)[GEMV_REGS_C][2], int C,
                              int gshift, int lane, int row0, int N, const i8* __restrict__ xq,
                              const float* __restrict__ xs, const i32* __restrict__ xsum, float rs,
                              float* __restrict__ y) {
  constexpr int R = 2;
  uint4 xa[GEMV_REGS_C], xb[GEMV_REGS_C];
  float xscale[GEMV_REGS_C];
  i32 xsm[GEMV_REGS_C];
#pragma unroll
  for (int j = 0; j < GEMV_REGS_C; j++) {
    const int c = 32 * j + lane;
    if (FULL || c < C) {
      const uint4* xp = (const uint4*)(xq + c * 32);
      xa[j] = __ldg(xp);
      xb[j] = __ldg(xp + 1);
      xscale[j] = __ldg(xs + (c >> gshift));
      xsm[j] = __ldg(xsum + c);
    }
  }
  TRACE_MARK_DEP(xa[0].x ^ xb[GEMV_REGS_C - 1].w ^ __float_as_uint(xscale[GEMV_REGS_C - 1]));
  float out[R];
#pragma unroll
  for (int r = 0; r < R; r++) out[r] = 0.f;
#pragma unroll
  for (int j = 0; j < GEMV_REGS_C; j++) {
    const int c = 32 * j + lane;
    if (!FULL && c >= C) continue;
#pragma unroll
    for (int r = 0; r < R; r++) out[r] += (float)dot32_biased(b[j][r], xa[j], xb[j], xsm[j]) * (ws[j][r] * xscale[j]);
  }
  TRACE_MARK_DEP(__float_as_uint(out[0]));
  warp_rows_out(out, lane, row0, N, rs, y);
  TRACE_MARK();
}

// gemv_split_t1 for rows of 64*32 < K <= GEMV_REGS_C*32 columns (o_proj's
// 5120 at batch 1): a lane requests all its chunks of the warp's R rows
// (chunks lane, lane + 32, ...) before the wait and decodes them there
// (chunks_biased), so that after it only the activations (with their
// chunk sums) are read and each chunk's product is 8 dp4a: 201
// instructions a warp after the wait where dot32_split took 733 (NVRTC
// 12.4, sm_90a). The same integers and float operations in the same
// order: the same bits. Two rows a warp (256 blocks for o_proj's 2048
// rows) measured faster end to end than four or one (docs/perf.md,
// 2026-11-29 (11)).
extern "C" __global__ void __launch_bounds__(32 * WARPS)
    gemv_split_t1_regs(const u8* __restrict__ codes, const u8* __restrict__ scales,
                       const float* __restrict__ row_scale, int N, int K, int gshift,
                       const i8* __restrict__ xq, const float* __restrict__ xs,
                       const i32* __restrict__ xsum, float* __restrict__ y, int ldy) {
  constexpr int R = 2;
  PDL_LAUNCH();
  const int warp = blockIdx.x * WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  const int row0 = warp * R;
  if (row0 >= N) return;
  const int C = K >> 5, GK = C >> gshift;
  const u8* rc[R];
  const u8* rs[R];
#pragma unroll
  for (int r = 0; r < R; r++) {
    const int n = min(row0 + r, N - 1);
    rc[r] = codes + (size_t)n * (K / 2);
    rs[r] = scales + (size_t)n * GK;
  }
  uint4 w[GEMV_REGS_C][R];
  u32 s[GEMV_REGS_C][R];
#pragma unroll
  for (int j = 0; j < GEMV_REGS_C; j++) {
    const int c = 32 * j + lane;
    if (c < C) {
#pragma unroll
      for (int r = 0; r < R; r++) w[j][r] = load_stream16(rc[r] + c * 16);
#pragma unroll
      for (int r = 0; r < R; r++) s[j][r] = __ldg(rs[r] + (c >> gshift));
    }
  }
  u32 b[GEMV_REGS_C][R][8];
  float ws[GEMV_REGS_C][R];
  chunks_biased(w, s, C, b, ws);
  const float rsv = lane_row_scale<R>(lane, row0, N, row_scale);
  PDL_WAIT();
  STAGE_DELAY(4);
  // Where every lane has a chunk in every slot (o_proj: K = 5120), the
  // activations' loads carry no condition, so that ptxas can issue all of
  // them at once; with a condition a slot, it issued each slot's loads
  // after the slot before's products (one L2 round trip a slot).
  if (C == 32 * GEMV_REGS_C)
    gemv_t1_regs_tail<true>(b, ws, C, gshift, lane, row0, N, xq, xs, xsum, rsv, y);
  else
    gemv_t1_regs_tail<false>(b, ws, C, gshift, lane, row0, N, xq, xs, xsum, rsv, y);
}

// One token against per-head column blocks: rows [h*rows, (h+1)*rows) of W
// (K columns) take columns [h*K, (h+1)*K) of the quantized row (whole
// groups), and y is one row of N. rows is a multiple of R, so each warp's
// rows lie in one head. Grid = ceil(N / (WARPS*4)).
extern "C" __global__ void __launch_bounds__(32 * WARPS)
    gemv_split_heads(const u8* __restrict__ codes, const u8* __restrict__ scales,
                     const float* __restrict__ row_scale, int N, int K, int gshift,
                     const i8* __restrict__ xq, const float* __restrict__ xs,
                     const i32* __restrict__ xsum, float* __restrict__ y, int rows) {
  PDL_LAUNCH();
  const int warp = blockIdx.x * WARPS + (threadIdx.x >> 5);
  if (warp * 4 >= N) return;
  const size_t h = (size_t)(warp * 4 / rows);
  const int C = K >> 5;
  gemv_rows<1, 4, true>(codes, scales, row_scale, N, K, gshift, xq + h * K, xs + h * (C >> gshift),
                        xsum + h * C, y, N, warp * 4);
}

// Two products of one token's quantized row in one launch (q_a and kv_a of
// a decode layer read the same input): blocks [0, ceil(N1/16)) take matrix
// 1's rows into y1, the rest matrix 2's into y2, each block exactly as
// gemv_split_t1 would (the same values, bit for bit). Both matrices have K
// columns in groups of the same size.
extern "C" __global__ void __launch_bounds__(32 * WARPS)
    gemv_split_pair(const u8* __restrict__ codes1, const u8* __restrict__ scales1,
                    const float* __restrict__ rs1, int N1, float* __restrict__ y1,
                    const u8* __restrict__ codes2, const u8* __restrict__ scales2,
                    const float* __restrict__ rs2, int N2, float* __restrict__ y2, int K,
                    int gshift, const i8* __restrict__ xq, const float* __restrict__ xs,
                    const i32* __restrict__ xsum) {
  PDL_LAUNCH();
  const int nb1 = (N1 + WARPS * 4 - 1) / (WARPS * 4);
  const bool second = (int)blockIdx.x >= nb1;
  const int N = second ? N2 : N1;
  const int warp = ((int)blockIdx.x - (second ? nb1 : 0)) * WARPS + (threadIdx.x >> 5);
  if (warp * 4 >= N) return;
  if (second) {
    gemv_rows<1, 4, true>(codes2, scales2, rs2, N2, K, gshift, xq, xs, xsum, y2, N2, warp * 4);
  } else {
    gemv_rows<1, 4, true>(codes1, scales1, rs1, N1, K, gshift, xq, xs, xsum, y1, N1, warp * 4);
  }
}

// gemv_split_heads for rows of at most 512 columns (K/32 <= 16 chunks) with
// the int8 quantization of its output (docs/format.md section 9) in the
// same launch, for the product that reads it (o_proj after the value
// expansion). A block owns qg consecutive rows, one group of the output's
// quantization (qg = 32, 64 or 128; qg*4 threads): half-warp j takes rows
// 4j..4j+3 of the block (one head: rows % 4 == 0), lane l of the half chunk
// l of each. With at most 16 chunks a row, every lane of gemv_split_heads
// past the 16th adds an exact zero, so the half-warp's sum is that kernel's
// value bit for bit. The block then quantizes its qg values as
// rmsnorm_quant (without a gain) does: yq, ys and ysum as QActs of one row.
extern "C" __global__ void __launch_bounds__(512)
    gemv_heads_quant(const u8* __restrict__ codes, const u8* __restrict__ scales,
                     const float* __restrict__ row_scale, int K, int gshift,
                     const i8* __restrict__ xq, const float* __restrict__ xs,
                     float* __restrict__ y, int rows, int qg, i8* __restrict__ yq,
                     float* __restrict__ ys, i32* __restrict__ ysum) {
  PDL_LAUNCH();
  __shared__ float vals[128];
  const int lane = threadIdx.x & 31, sl = lane & 15;
  const int local = (threadIdx.x >> 5) * 8 + (lane >> 4) * 4;  // the half-warp's first row in the block
  const int row0 = blockIdx.x * qg + local;
  const int C = K >> 5, GK = C >> gshift;
  const size_t h = (size_t)(row0 / rows);
  const bool on = sl < C;
  uint4 w[4];
  u32 s[4];
  if (on) {
#pragma unroll
    for (int r = 0; r < 4; r++) w[r] = load_stream16(codes + (size_t)(row0 + r) * (K / 2) + sl * 16);
#pragma unroll
    for (int r = 0; r < 4; r++) s[r] = __ldg(scales + (size_t)(row0 + r) * GK + (sl >> gshift));
  }
  PDL_WAIT();
  float out[4] = {0.f, 0.f, 0.f, 0.f};
  if (on) {
    const uint4* xp = (const uint4*)(xq + h * K + sl * 32);
    const uint4 xa = __ldg(xp), xb = __ldg(xp + 1);
    const float xscale = __ldg(xs + h * GK + (sl >> gshift));
#pragma unroll
    for (int r = 0; r < 4; r++) {
      out[r] += (float)dot32_split(w[r], xa, xb) * (e4m3(s[r]) * xscale);
    }
  }
#pragma unroll
  for (int r = 0; r < 4; r++)
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) out[r] += __shfl_xor_sync(0xffffffffu, out[r], o);
#pragma unroll
  for (int r = 0; r < 4; r++) {
    if (sl == r) {
      const float v = out[r] * (row_scale[row0 + r] * 0.5f);
      y[row0 + r] = v;
      vals[local + r] = v;
    }
  }
  __syncthreads();
  if (threadIdx.x >= 32) return;
  // One warp over the group, lane l holding E = qg/32 consecutive values.
  const int E = qg >> 5, k0 = lane * E;
  float v[4];
#pragma unroll
  for (int e = 0; e < 4; e++)
    if (e < E) v[e] = vals[k0 + e];
  const size_t c0 = (size_t)blockIdx.x * qg + k0;
  quant_group_warp(v, E, lane, yq + c0, ysum + c0 / 32, ys + blockIdx.x);
}
GEMV_KERNEL(gemv_t1, 1, 4, false)
GEMV_KERNEL(gemv_t2, 2, 4, false)
GEMV_KERNEL(gemv_t3, 3, 4, false)
GEMV_KERNEL(gemv_t4, 4, 4, false)
GEMV_KERNEL(gemv_t5, 5, 4, false)
GEMV_KERNEL(gemv_t6, 6, 4, false)
GEMV_KERNEL(gemv_t7, 7, 4, false)
GEMV_KERNEL(gemv_t8, 8, 4, false)

// ---------------------------------------------------------------------------
// GEMV on the tensor cores for T = 1..8 tokens and G = 128:
// mma.sync.m16n8k32 with the weights as A (16 rows x 32 k, unsigned: the
// +128 offset codes of e2m1x4_biased) and the activations as B (32 k x 8
// tokens, signed). A block of 4 warps owns 16 rows; warp w takes groups w,
// w+4, ... (so that each warp has few groups in sequence and many bytes in
// flight), and the warps' partial sums meet in shared memory at the end.
// Lane l holds rows l/4 and l/4 + 8 of the block. Per group, thread
// (g = l/4, i = l%4) loads 16 bytes of codes of each of its two rows
// (columns 32i..32i+31 of the group) and the 32 activations of token g at
// the same columns. The order of k inside an mma does not matter as long as
// A and B agree, so mma j takes word j of each thread's codes (8 columns:
// low half as k-slots 4i..4i+3, high half as 16+4i..16+4i+3) and the
// matching 8 activation bytes. The four mmas cover the group once; the
// group's int32 result, less 128 * sum(x) for the offset, is scaled in float
// as in the other kernels.

DEVICE void mma_u8s8(i32 (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One group (128 columns) of the block's 16 rows: wa, wb are the thread's
// codes of rows g and g+8, x0 and x1 token g's 32 activations.
DEVICE void mma_group(i32 (&d)[4], uint4 wa, uint4 wb, uint4 x0, uint4 x1) {
  mma_u8s8(d, e2m1x4_biased(wa.x), e2m1x4_biased(wb.x), e2m1x4_biased(wa.x >> 16), e2m1x4_biased(wb.x >> 16), x0.x, x0.y);
  mma_u8s8(d, e2m1x4_biased(wa.y), e2m1x4_biased(wb.y), e2m1x4_biased(wa.y >> 16), e2m1x4_biased(wb.y >> 16), x0.z, x0.w);
  mma_u8s8(d, e2m1x4_biased(wa.z), e2m1x4_biased(wb.z), e2m1x4_biased(wa.z >> 16), e2m1x4_biased(wb.z >> 16), x1.x, x1.y);
  mma_u8s8(d, e2m1x4_biased(wa.w), e2m1x4_biased(wb.w), e2m1x4_biased(wa.w >> 16), e2m1x4_biased(wb.w >> 16), x1.z, x1.w);
}

DEVICE i32 group_sum(const i32* __restrict__ xsum, int grp) {
  const int4 s = __ldg((const int4*)xsum + grp);
  return s.x + s.y + s.z + s.w;
}

// U groups per warp are loaded before the first is used.
template <int MMA_UNROLL>
DEVICE void gemv_mma_block(const u8* __restrict__ codes, const u8* __restrict__ scales,
                           const float* __restrict__ row_scale, int N, int K,
                           const i8* __restrict__ xq, const float* __restrict__ xs,
                           const i32* __restrict__ xsum, float* __restrict__ y, int ldy, int T) {
  __shared__ float part[4][4][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, i = lane & 3;
  const int row0 = blockIdx.x * 16;
  const int GK = K >> 7;
  const int ra = min(row0 + g, N - 1), rb = min(row0 + g + 8, N - 1);
  const u8* pa = codes + (size_t)ra * (K / 2) + i * 16;
  const u8* pb = codes + (size_t)rb * (K / 2) + i * 16;
  const u8* sa_p = scales + (size_t)ra * GK;
  const u8* sb_p = scales + (size_t)rb * GK;
  // B column g is token g (zeros past T); C columns are tokens 2i, 2i+1.
  const bool has_x = g < T;
  const i8* px = xq + (size_t)min(g, T - 1) * K + i * 32;
  const int t0 = 2 * i, t1 = 2 * i + 1;
  const int u0 = min(t0, T - 1), u1 = min(t1, T - 1);
  const float* xs0 = xs + (size_t)u0 * GK;
  const float* xs1 = xs + (size_t)u1 * GK;
  const i32* xsum0 = xsum + (size_t)u0 * (K / 32);
  const i32* xsum1 = xsum + (size_t)u1 * (K / 32);

  float acc[4] = {0.f, 0.f, 0.f, 0.f};  // (ra,t0) (ra,t1) (rb,t0) (rb,t1)
  for (int base = warp; base < GK; base += 4 * MMA_UNROLL) {
    uint4 wa[MMA_UNROLL], wb[MMA_UNROLL], x0[MMA_UNROLL], x1[MMA_UNROLL];
#pragma unroll
    for (int u = 0; u < MMA_UNROLL; u++) {
      const int grp = base + 4 * u;
      x0[u] = x1[u] = make_uint4(0, 0, 0, 0);
      if (grp < GK) {
        wa[u] = load_stream16(pa + grp * 64);
        wb[u] = load_stream16(pb + grp * 64);
        if (has_x) {
          const uint4* p = (const uint4*)(px + grp * 128);
          x0[u] = __ldg(p);
          x1[u] = __ldg(p + 1);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < MMA_UNROLL; u++) {
      const int grp = base + 4 * u;
      if (grp < GK) {
        i32 d[4] = {0, 0, 0, 0};
        mma_group(d, wa[u], wb[u], x0[u], x1[u]);
        const float sa = e4m3(__ldg(sa_p + grp)), sb = e4m3(__ldg(sb_p + grp));
        const float f0 = __ldg(xs0 + grp), f1 = __ldg(xs1 + grp);
        const i32 c0 = 128 * group_sum(xsum0, grp), c1 = 128 * group_sum(xsum1, grp);
        acc[0] += (float)(d[0] - c0) * (sa * f0);
        acc[1] += (float)(d[1] - c1) * (sa * f1);
        acc[2] += (float)(d[2] - c0) * (sb * f0);
        acc[3] += (float)(d[3] - c1) * (sb * f1);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < 4; j++) part[warp][j][lane] = acc[j];
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int j = 0; j < 4; j++) acc[j] = (part[0][j][lane] + part[1][j][lane]) + (part[2][j][lane] + part[3][j][lane]);
  if (row0 + g < N) {
    const float s = row_scale[row0 + g] * 0.5f;
    if (t0 < T) y[(size_t)t0 * ldy + row0 + g] = acc[0] * s;
    if (t1 < T) y[(size_t)t1 * ldy + row0 + g] = acc[1] * s;
  }
  if (row0 + g + 8 < N) {
    const float s = row_scale[row0 + g + 8] * 0.5f;
    if (t0 < T) y[(size_t)t0 * ldy + row0 + g + 8] = acc[2] * s;
    if (t1 < T) y[(size_t)t1 * ldy + row0 + g + 8] = acc[3] * s;
  }
}

// Grid: ceil(N/16) blocks of 128 threads.
#define GEMV_MMA_KERNEL(NAME, U)                                                                  \
  extern "C" __global__ void __launch_bounds__(128) NAME(                                        \
      const u8* __restrict__ codes, const u8* __restrict__ scales,                                \
      const float* __restrict__ row_scale, int N, int K, const i8* __restrict__ xq,               \
      const float* __restrict__ xs, const i32* __restrict__ xsum, float* __restrict__ y, int ldy, \
      int T) {                                                                                    \
    PDL_LAUNCH();                                                                                 \
    PDL_WAIT();                                                                                   \
    gemv_mma_block<U>(codes, scales, row_scale, N, K, xq, xs, xsum, y, ldy, T);                   \
  }

GEMV_MMA_KERNEL(gemv_mma, 2)
