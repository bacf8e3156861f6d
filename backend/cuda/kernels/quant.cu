// RMSNorm fused with int8 activation quantization (docs/format.md section
// 9), one block of 256 threads per token row t:
//
//   v[k]    = gain[k] * (x[k] * inv), inv = 1/sqrt(mean(x^2) + eps)   (gain != 0)
//           = x[k]                                                   (gain == 0)
//   out[k]  = v[k]                                                   (out != 0)
//   xs[g]   = amax_g / 127; xq[k] = round_half_away(v[k] / xs[g]), clamped to
//             [-127, 127], all zero when amax_g = 0                   (xq != 0)
//   xsum[c] = sum of xq over columns 32c .. 32c+31
//
// The quantization is evaluated as the CPU backend does it (the division by
// the scale in float32, the rounding by adding 0.5 and truncating); the
// norm's scale is float32 (prelude.cuh's norm_inv), a few ulp from the
// CPU's, so a code can differ by one where a value lies on a rounding
// boundary. Grid
// (rows, y): the y blocks of a row split its groups, eight at a time, so one
// long row is not one block's serial work; y = 1 with a gain (the norm may
// write over its input, which every block would read).

#define QUANT_THREADS 256

// The work of one block on row t (row: its values).
DEVICE void rmsnorm_quant_row(const float* row, int t, const float* __restrict__ gain, float eps,
                              float* out, int ldo, i8* __restrict__ xq, float* __restrict__ xs,
                              i32* __restrict__ xsum, int K, int G) {
  __shared__ float partial[QUANT_THREADS / 32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  float inv = 1.f;
  if (gain) {
    float ss = 0;
    for (int k = tid; k < K; k += QUANT_THREADS) {
      const float v = row[k];
      ss += v * v;
    }
    ss = warp_sum(ss);
    if (lane == 0) partial[warp] = ss;
    __syncthreads();
    inv = norm_inv8(partial, QUANT_THREADS / 32, K, eps);
  }

  // One warp per group; lane l holds E = G/32 consecutive columns.
  const int E = G >> 5;
  for (int g = blockIdx.y * (QUANT_THREADS / 32) + warp; g < K / G; g += gridDim.y * (QUANT_THREADS / 32)) {
    const int k0 = g * G + lane * E;
    float v[4];
    float amax = 0.f;
#pragma unroll
    for (int e = 0; e < 4; e++) {
      if (e < E) {
        float a = row[k0 + e];
        if (gain) a = gain[k0 + e] * (a * inv);
        v[e] = a;
        amax = fmaxf(amax, fabsf(a));
      }
    }
    if (out) {
#pragma unroll
      for (int e = 0; e < 4; e++)
        if (e < E) out[(size_t)t * ldo + k0 + e] = v[e];
    }
    if (!xq) continue;
    amax = warp_max(amax);
    const float scale = amax / 127.f;
    i32 sum = 0;
#pragma unroll
    for (int e = 0; e < 4; e++) {
      if (e < E) {
        const i32 q = quant8(v[e], amax, scale);
        xq[(size_t)t * K + k0 + e] = (i8)q;
        sum += q;
      }
    }
    // Sum over the 32/E lanes that share a 32-column chunk.
    for (int o = 1; o < 32 / E; o <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if ((lane & (32 / E - 1)) == 0) xsum[(size_t)t * (K / 32) + k0 / 32] = sum;
    if (lane == 0) xs[(size_t)t * (K / G) + g] = amax == 0.f ? 0.f : scale;
  }
}

extern "C" __global__ void __launch_bounds__(QUANT_THREADS)
    rmsnorm_quant(const float* x, int ldx, const float* __restrict__ gain, float eps, float* out,
                  int ldo, i8* __restrict__ xq, float* __restrict__ xs, i32* __restrict__ xsum,
                  int K, int G) {
  PDL_LAUNCH();
  PDL_WAIT();
  rmsnorm_quant_row(x + (size_t)blockIdx.x * ldx, blockIdx.x, gain, eps, out, ldo, xq, xs, xsum, K, G);
}

// d = a + c, then rmsnorm_quant of d (the residual add before a norm, in
// one launch); one block per row, grid.y = 1.
extern "C" __global__ void __launch_bounds__(QUANT_THREADS)
    add_rmsnorm_quant(float* d, int ldd, const float* a, int lda, const float* c, int ldc,
                      const float* __restrict__ gain, float eps, float* out, int ldo,
                      i8* __restrict__ xq, float* __restrict__ xs, i32* __restrict__ xsum, int K,
                      int G) {
  PDL_LAUNCH();
  PDL_WAIT();
  const int t = blockIdx.x;
  float* row = d + (size_t)t * ldd;
  for (int k = threadIdx.x; k < K; k += QUANT_THREADS) row[k] = a[(size_t)t * lda + k] + c[(size_t)t * ldc + k];
  __syncthreads();
  rmsnorm_quant_row(row, t, gain, eps, out, ldo, xq, xs, xsum, K, G);
}

// rmsnorm_quant8_row and rmsnorm_quant8_tail: norm8.cuh.

extern "C" __global__ void __launch_bounds__(1024)
    rmsnorm_quant8(const float* x, int ldx, float* d, int ldd, const float* a, int lda,
                   const float* c, int ldc, const float* __restrict__ gain, float eps, float* out,
                   int ldo, i8* __restrict__ xq, float* __restrict__ xs, i32* __restrict__ xsum,
                   int K, int G) {
  PDL_LAUNCH();
  rmsnorm_quant8_row(x, ldx, d, ldd, a, lda, c, ldc, gain, eps, out, ldo, xq, xs, xsum, K, G, blockIdx.x);
}

// Two single-row norms of rmsnorm_quant8 (no residual add) in one launch,
// block 0 the first, block 1 the second (the q_a norm and the latent's norm
// of a decode layer, which both read the q_a/kv_a launch's outputs):
// max(K1, K2)/8 threads.
extern "C" __global__ void __launch_bounds__(1024)
    rmsnorm_quant8_pair(const float* x1, const float* __restrict__ gain1, float eps1, float* out1,
                        i8* __restrict__ xq1, float* __restrict__ xs1, i32* __restrict__ xsum1,
                        int K1, int G1, const float* x2, const float* __restrict__ gain2,
                        float eps2, float* out2, i8* __restrict__ xq2, float* __restrict__ xs2,
                        i32* __restrict__ xsum2, int K2, int G2) {
  PDL_LAUNCH();
  if (blockIdx.x == 0) {
    rmsnorm_quant8_row(x1, 0, nullptr, 0, nullptr, 0, nullptr, 0, gain1, eps1, out1, 0, xq1, xs1, xsum1, K1, G1, 0);
  } else {
    rmsnorm_quant8_row(x2, 0, nullptr, 0, nullptr, 0, nullptr, 0, gain2, eps2, out2, 0, xq2, xs2, xsum2, K2, G2, 0);
  }
}

// rmsnorm_quant8_pair over rows (the q_a norm and the latent's norm of a
// serving step): block (i, t) normalises row t of norm i, the rows of x
// ldx and of out ldo floats apart; each row as rmsnorm_quant8 computes it.
extern "C" __global__ void __launch_bounds__(1024)
    rmsnorm_quant8_pair_rows(const float* x1, int ldx1, const float* __restrict__ gain1, float eps1, float* out1,
                             int ldo1, i8* __restrict__ xq1, float* __restrict__ xs1, i32* __restrict__ xsum1,
                             int K1, int G1, const float* x2, int ldx2, const float* __restrict__ gain2,
                             float eps2, float* out2, int ldo2, i8* __restrict__ xq2, float* __restrict__ xs2,
                             i32* __restrict__ xsum2, int K2, int G2) {
  PDL_LAUNCH();
  if (blockIdx.x == 0) {
    rmsnorm_quant8_row(x1, ldx1, nullptr, 0, nullptr, 0, nullptr, 0, gain1, eps1, out1, ldo1, xq1, xs1, xsum1, K1, G1,
                       blockIdx.y);
  } else {
    rmsnorm_quant8_row(x2, ldx2, nullptr, 0, nullptr, 0, nullptr, 0, gain2, eps2, out2, ldo2, xq2, xs2, xsum2, K2, G2,
                       blockIdx.y);
  }
}

// The MoE's weighted sum of each token's slots (moeb_combine_w's sums, in
// its order: total = sum over slots k with pos >= 0 of w_k * part[pos]),
// added to the residual row a into d (d = a + total, as the add of the
// MoE's output before a norm), then rmsnorm_quant8 of d, in one launch:
// block t is row t, K/8 threads (K a multiple of 256, at most 2048), at
// most CAN_MAXS slots. mo, when not null, also receives total (the MoE's
// output). pos, wts and a come from launches two or more back (the group
// and router kernels, and the add before the attention): read before the
// wait for the down products.
#define CAN_MAXS 8
extern "C" __global__ void __launch_bounds__(256)
    combine_add_rmsnorm_quant8(float* d, int ldd, const float* a, int lda, const float* part,
                               const i32* __restrict__ pos, const float* __restrict__ wts, int topk, int slots,
                               float* mo, int ldm, const float* __restrict__ gain, float eps, float* out, int ldo,
                               i8* __restrict__ xq, float* __restrict__ xs, i32* __restrict__ xsum, int K,
                               int G) {
  const int t = blockIdx.x, k0 = threadIdx.x * 8;
  const bool on = k0 < K;
  float gv[8], av[8];
  int p[CAN_MAXS];
  float w[CAN_MAXS];
#pragma unroll
  for (int k = 0; k < CAN_MAXS; k++) {
    p[k] = k < slots ? pos[t * slots + k] : -1;
    w[k] = k < topk ? wts[t * topk + k] : 1.f;
  }
  if (on) {
    ldg8(gain + k0, gv);
    const float4* pa = (const float4*)(a + (size_t)t * lda + k0);
    const float4 a0 = pa[0], a1 = pa[1];
    av[0] = a0.x; av[1] = a0.y; av[2] = a0.z; av[3] = a0.w;
    av[4] = a1.x; av[5] = a1.y; av[6] = a1.z; av[7] = a1.w;
  }
  PDL_WAIT();
  float v[8];
  if (on) {
    float4 pv[CAN_MAXS][2];
#pragma unroll
    for (int k = 0; k < CAN_MAXS; k++)
      if (p[k] >= 0) {
        const float4* pp = (const float4*)(part + (size_t)p[k] * K + k0);
        pv[k][0] = __ldcg(pp);
        pv[k][1] = __ldcg(pp + 1);
      }
    float4 t0 = make_float4(0.f, 0.f, 0.f, 0.f), t1 = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int k = 0; k < CAN_MAXS; k++) {
      if (p[k] < 0) continue;
      t0.x += w[k] * pv[k][0].x;
      t0.y += w[k] * pv[k][0].y;
      t0.z += w[k] * pv[k][0].z;
      t0.w += w[k] * pv[k][0].w;
      t1.x += w[k] * pv[k][1].x;
      t1.y += w[k] * pv[k][1].y;
      t1.z += w[k] * pv[k][1].z;
      t1.w += w[k] * pv[k][1].w;
    }
    v[0] = av[0] + t0.x; v[1] = av[1] + t0.y; v[2] = av[2] + t0.z; v[3] = av[3] + t0.w;
    v[4] = av[4] + t1.x; v[5] = av[5] + t1.y; v[6] = av[6] + t1.z; v[7] = av[7] + t1.w;
    float4* pd = (float4*)(d + (size_t)t * ldd + k0);
    pd[0] = make_float4(v[0], v[1], v[2], v[3]);
    pd[1] = make_float4(v[4], v[5], v[6], v[7]);
    if (mo) {
      float4* pm = (float4*)(mo + (size_t)t * ldm + k0);
      pm[0] = t0;
      pm[1] = t1;
    }
  }
  rmsnorm_quant8_tail(v, gv, on, eps, out, ldo, xq, xs, xsum, K, G, t);
}

// A single-token product y = W norm(x) with the single-row norm of its
// input (rmsnorm_quant8 without a residual add) in the same launch, and
// optionally a second single-row norm with no tie to either (x2 set): q_b
// of a decode layer after the q_a norm, and the latent's norm. Blocks
// [0, ceil(N/16)) each normalise the row of K values (K a multiple of 256,
// at most 1024: K/8 threads of 8 values, rmsnorm_quant8_row's order) into
// their shared memory as int8 groups of G = 32 << gshift, with W's rows
// and scales requested before the wait, then take gemv_split_t1's product
// of their 16 rows from there (at most 32 chunks a row: one a lane, the
// sums of gemv_dot in its order). Block 0 also writes the norm's float
// output and int8 form (out must not overlap x, which the other blocks
// read); the last block is rmsnorm_quant8_row of the second norm. Every
// output is the separate launches' bits.
extern "C" __global__ void __launch_bounds__(128)
    norm_gemv_t1(const u8* __restrict__ codes, const u8* __restrict__ scales,
                 const float* __restrict__ row_scale, int N, float* __restrict__ y, int K, int gshift,
                 const float* x, const float* __restrict__ gain, float eps, float* out, i8* __restrict__ xq,
                 float* __restrict__ xs, i32* __restrict__ xsum, const float* x2,
                 const float* __restrict__ gain2, float eps2, float* out2, i8* __restrict__ xq2,
                 float* __restrict__ xs2, i32* __restrict__ xsum2, int K2, int G2) {
  PDL_LAUNCH();
  const int nb = (N + 15) >> 4;
  if ((int)blockIdx.x >= nb) {
    rmsnorm_quant8_row(x2, 0, nullptr, 0, nullptr, 0, nullptr, 0, gain2, eps2, out2, 0, xq2, xs2, xsum2, K2, G2, 0);
    return;
  }
  __shared__ __align__(16) i8 sq[1024];
  __shared__ float ssc[32];
  __shared__ float partial[4];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, k0 = tid * 8;
  const int G = 32 << gshift, C = K >> 5, GK = C >> gshift;
  const int row0 = blockIdx.x * 16 + warp * 4;
  const bool on = k0 < K;
  // W's chunks of this lane (chunk lane of each of the warp's 4 rows), and
  // the gain, before the wait.
  uint4 w[4];
  u32 s[4];
  if (lane < C) {
#pragma unroll
    for (int r = 0; r < 4; r++) {
      const int n = min(row0 + r, N - 1);
      w[r] = load_stream16(codes + (size_t)n * (K / 2) + lane * 16);
      s[r] = __ldg(scales + (size_t)n * GK + (lane >> gshift));
    }
  }
  float gv[8];
  if (on) ldg8(gain + k0, gv);
  const float rs = lane_row_scale<4>(lane, row0, N, row_scale);
  PDL_WAIT();
  norm_row_shared(x, gv, eps, K, G, on, blockIdx.x == 0, lane, warp, k0, partial, sq, ssc, out, xq, xs, xsum);
  __syncthreads();
  if (row0 >= N) return;
  float o[4] = {0.f, 0.f, 0.f, 0.f};
  if (lane < C) {
    const uint4* xp = (const uint4*)(sq + lane * 32);
    const uint4 xa = xp[0], xb = xp[1];
    const float xscale = ssc[lane >> gshift];
#pragma unroll
    for (int r = 0; r < 4; r++) {
      o[r] += (float)dot32_split(w[r], xa, xb) * (e4m3(s[r]) * xscale);
    }
  }
  warp_rows_out(o, lane, row0, N, rs, y);
}

// The residual add and single-row norm before a layer's first products
// (rmsnorm_quant8 with a residual add: d = a + c, out = gain * norm(d),
// its int8 form xq, xs, xsum in groups of G = 32 << gshift) and one or two
// single-token products of out (y1 = W1 out, y2 = W2 out: q_a and kv_a)
// in one launch. Every block of NT threads adds and normalises the K <=
// 2048 values in registers in rmsnorm_quant8_row's order (pass p's thread
// t the virtual thread NT*p + t of 8 values; the partials of the
// K/256 virtual warps summed in order) into its shared memory as int8
// groups, with its weights requested before the wait, then takes
// gemv_split_t1's product of its NT/32 * R rows (R a warp) from there
// (chunks lane and lane + 32 of each row, gemv_dot's sums in its order):
// the first blocks matrix 1's rows, the rest matrix 2's. d may be a (the
// residual written in place): the block that takes the last ticket of
// *counter, after every block has read a and c, writes d, out and the
// int8 form, and zeroes the counter. Every output is the separate
// launches' bits, for every NT and R. Before its wait a block also asks
// L2 for up to four spans (l2_ahead): the next launch's weights, as
// moe_down_hq does.
template <int NT, int R>
DEVICE void add_norm_gemv(const u8* __restrict__ codes1, const u8* __restrict__ scales1,
                          const float* __restrict__ rs1, int N1, float* __restrict__ y1,
                          const u8* __restrict__ codes2, const u8* __restrict__ scales2,
                          const float* __restrict__ rs2, int N2, float* __restrict__ y2, int K, int gshift,
                          float* d, const float* a, const float* c, const float* __restrict__ gain, float eps,
                          float* out, i8* __restrict__ xq, float* __restrict__ xs, i32* __restrict__ xsum,
                          u32* counter, const u8* const (&ahead)[4], const int (&lines)[4]) {
  constexpr int NW = NT / 32, RB = NW * R, PM = 2048 / (8 * NT);  // warps, rows a block, passes
  __shared__ __align__(16) i8 sq[2048];
  __shared__ float ssc[64];
  __shared__ i32 ssum[64];
  __shared__ float partial[8];
  __shared__ bool last_s;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int G = 32 << gshift, C = K >> 5, GK = C >> gshift;
  const int nb1 = (N1 + RB - 1) / RB;
  const bool second = (int)blockIdx.x >= nb1;
  const u8* codes = second ? codes2 : codes1;
  const u8* scales = second ? scales2 : scales1;
  const float* row_scale = second ? rs2 : rs1;
  const int N = second ? N2 : N1;
  float* y = second ? y2 : y1;
  const int row0 = ((int)blockIdx.x - (second ? nb1 : 0)) * RB + warp * R;
  // Chunks lane and lane + 32 of the warp's rows, and the gain, before the
  // wait.
  uint4 w[2][R];
  u32 s[2][R];
#pragma unroll
  for (int hf = 0; hf < 2; hf++) {
    const int ch = 32 * hf + lane;
    if (ch < C) {
#pragma unroll
      for (int r = 0; r < R; r++) {
        const int n = min(row0 + r, N - 1);
        w[hf][r] = load_stream16(codes + (size_t)n * (K / 2) + ch * 16);
        s[hf][r] = __ldg(scales + (size_t)n * GK + (ch >> gshift));
      }
    }
  }
  // The codes decoded for dot32_biased and the scales, before the wait.
  u32 wb[2][R][8];
  float ws[2][R];
  chunks_biased(w, s, C, wb, ws);
  float gv[PM][8];
#pragma unroll
  for (int p = 0; p < PM; p++) {
    const int k0 = (NT * p + tid) * 8;
    if (k0 < K) {
      const float4 g0 = __ldg((const float4*)(gain + k0)), g1 = __ldg((const float4*)(gain + k0 + 4));
      gv[p][0] = g0.x; gv[p][1] = g0.y; gv[p][2] = g0.z; gv[p][3] = g0.w;
      gv[p][4] = g1.x; gv[p][5] = g1.y; gv[p][6] = g1.z; gv[p][7] = g1.w;
    }
  }
  const float rs = lane_row_scale<R>(lane, row0, N, row_scale);
  l2_ahead(ahead, lines);
  PDL_WAIT();
  STAGE_DELAY(0);
  float v[PM][8];
#pragma unroll
  for (int p = 0; p < PM; p++) {
    const int k0 = (NT * p + tid) * 8;
    if (k0 < K) {
      const float4* pa = (const float4*)(a + k0);
      const float4* pc = (const float4*)(c + k0);
      const float4 a0 = pa[0], a1 = pa[1], c0 = pc[0], c1 = pc[1];
      v[p][0] = a0.x + c0.x; v[p][1] = a0.y + c0.y; v[p][2] = a0.z + c0.z; v[p][3] = a0.w + c0.w;
      v[p][4] = a1.x + c1.x; v[p][5] = a1.y + c1.y; v[p][6] = a1.z + c1.z; v[p][7] = a1.w + c1.w;
      sumsq8_partial(v[p], lane, NW * p + warp, partial);
    }
  }
  __syncthreads();
  TRACE_MARK();
  // Every thread of the block has read a and c: take a ticket (its answer
  // is needed only at the end).
  u32 ticket = 0;
  if (tid == 0) ticket = atomicAdd(counter, 1u);
  const float inv = norm_inv8(partial, K >> 8, K, eps);
  const int L = G >> 3, gs = gshift + 5;  // lanes per group, log2 G
  float nv[PM][8];
  u32 packed[PM][2];
  i32 sums[PM];
#pragma unroll
  for (int p = 0; p < PM; p++) {
    const int k0 = (NT * p + tid) * 8;
    if (k0 < K) {
#pragma unroll
      for (int e = 0; e < 8; e++) nv[p][e] = gv[p][e] * (v[p][e] * inv);
      i32 sum;
      const float sc = quant8_lane8(nv[p], L, packed[p], sum);
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      sums[p] = sum;
      if ((lane & 3) == 0) ssum[k0 >> 5] = sum;
      *(uint2*)(sq + k0) = make_uint2(packed[p][0], packed[p][1]);
      if ((lane & (L - 1)) == 0) ssc[k0 >> gs] = sc;
    }
  }
  __syncthreads();
  TRACE_MARK();
  if (row0 < N) {
    float o[R];
#pragma unroll
    for (int r = 0; r < R; r++) o[r] = 0.f;
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
      const int ch = 32 * hf + lane;
      if (ch >= C) continue;
      const uint4* xp = (const uint4*)(sq + ch * 32);
      const uint4 xa = xp[0], xb = xp[1];
      const float xscale = ssc[ch >> gshift];
      const i32 xsm = ssum[ch];
#pragma unroll
      for (int r = 0; r < R; r++) o[r] += (float)dot32_biased(wb[hf][r], xa, xb, xsm) * (ws[hf][r] * xscale);
    }
    warp_rows_out(o, lane, row0, N, rs, y);
  }
  TRACE_MARK();
  if (tid == 0) last_s = ticket == gridDim.x - 1;
  __syncthreads();
  if (!last_s) return;
#pragma unroll
  for (int p = 0; p < PM; p++) {
    const int k0 = (NT * p + tid) * 8;
    if (k0 < K) {
      float4* pd = (float4*)(d + k0);
      pd[0] = make_float4(v[p][0], v[p][1], v[p][2], v[p][3]);
      pd[1] = make_float4(v[p][4], v[p][5], v[p][6], v[p][7]);
      float4* po = (float4*)(out + k0);
      po[0] = make_float4(nv[p][0], nv[p][1], nv[p][2], nv[p][3]);
      po[1] = make_float4(nv[p][4], nv[p][5], nv[p][6], nv[p][7]);
      *(uint2*)(xq + k0) = make_uint2(packed[p][0], packed[p][1]);
      if ((lane & 3) == 0) xsum[k0 / 32] = sums[p];
      if ((lane & (L - 1)) == 0) xs[k0 >> gs] = ssc[k0 >> gs];
    }
  }
  if (tid == 0) *counter = 0u;
  TRACE_MARK();
}

// Blocks of 256 threads with 4 rows a warp (32 rows a block: 42 blocks
// at GLM-4.7-Flash's q_a and kv_a) measured about 1% faster end to end
// than 2 rows a warp (84 blocks): q_b's blocks, one a multiprocessor,
// need not wait for this launch's blocks to leave (docs/perf.md,
// 2026-12-01 (32)). 2 rows had measured faster than 128 threads with 4
// (two passes of the norm a thread) and than 256 with 1 (168 blocks):
// 2026-11-29 (11).
extern "C" __global__ void __launch_bounds__(256)
    add_norm_gemv_pair(const u8* __restrict__ codes1, const u8* __restrict__ scales1, const float* __restrict__ rs1,
                       int N1, float* __restrict__ y1, const u8* __restrict__ codes2, const u8* __restrict__ scales2,
                       const float* __restrict__ rs2, int N2, float* __restrict__ y2, int K, int gshift, float* d,
                       const float* a, const float* c, const float* __restrict__ gain, float eps, float* out,
                       i8* __restrict__ xq, float* __restrict__ xs, i32* __restrict__ xsum, u32* counter,
                       const u8* a0, int n0, const u8* a1, int n1, const u8* a2, int n2, const u8* a3, int n3) {
  PDL_LAUNCH();
  const u8* ahead[4] = {a0, a1, a2, a3};
  const int lines[4] = {n0, n1, n2, n3};
  add_norm_gemv<256, 4>(codes1, scales1, rs1, N1, y1, codes2, scales2, rs2, N2, y2, K, gshift, d, a, c, gain, eps,
                        out, xq, xs, xsum, counter, ahead, lines);
}

// Quantization of rows without a norm (rmsnorm_quant's gain == 0 case, the
// same values bit for bit): each warp takes up to QR_GROUPS consecutive
// groups of the flattened rows x groups and issues all their loads (E = G/32
// floats a lane, as one vector load) before the first group's amax.
// rmsnorm_quant took one group a warp, one load in flight, and spent most of
// a 1024 x 10240 quantization (25 us) on blocks starting and waiting. gpw
// (1..QR_GROUPS) is the groups a warp, chosen so that short inputs still
// spread over the multiprocessors. Rows start 16-byte aligned.
#define QR_GROUPS 8
template <int E>
DEVICE void quant_rows_warp(const float* x, int ldx, i8* __restrict__ xq, float* __restrict__ xs,
                            i32* __restrict__ xsum, int rows, int K, int gpw) {
  constexpr int G = 32 * E;
  const int lane = threadIdx.x & 31;
  const int ng = K / G, total = rows * ng;  // under 2^31 (checked by the caller)
  const int first = (blockIdx.x * (QUANT_THREADS / 32) + (threadIdx.x >> 5)) * gpw;
  if (first >= total) return;
  // The groups' rows and columns by stepping, not by a division each.
  const int t0 = first / ng, g0 = first - t0 * ng;
  float v[QR_GROUPS][E];
  {
    int t = t0, g = g0;
#pragma unroll
    for (int j = 0; j < QR_GROUPS; j++) {
      if (j < gpw && first + j < total) {
        const float* p = x + (size_t)t * ldx + g * G + lane * E;
        if (E == 4) {
          const float4 f = *(const float4*)p;
          v[j][0] = f.x; v[j][1] = f.y; v[j][2] = f.z; v[j][3] = f.w;
        } else if (E == 2) {
          const float2 f = *(const float2*)p;
          v[j][0] = f.x; v[j][1] = f.y;
        } else {
          v[j][0] = p[0];
        }
      }
      if (++g == ng) g = 0, t++;
    }
  }
  int t = t0, g = g0;
#pragma unroll
  for (int j = 0; j < QR_GROUPS; j++) {
    if (j >= gpw || first + j >= total) break;  // the same for the whole warp
    const int k0 = g * G + lane * E;
    float amax = 0.f;
#pragma unroll
    for (int e = 0; e < E; e++) amax = fmaxf(amax, fabsf(v[j][e]));
    amax = warp_max(amax);
    const float scale = amax / 127.f;
    u32 packed = 0u;
    i32 sum = 0;
#pragma unroll
    for (int e = 0; e < E; e++) {
      const i32 q = quant8(v[j][e], amax, scale);
      packed |= ((u32)q & 0xFFu) << (8 * e);
      sum += q;
    }
    i8* o = xq + (size_t)t * K + k0;
    if (E == 4) {
      *(u32*)o = packed;
    } else if (E == 2) {
      *(unsigned short*)o = (unsigned short)packed;
    } else {
      *o = (i8)packed;
    }
    // Sum over the 32/E lanes that share a 32-column chunk.
    for (int s = 1; s < 32 / E; s <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, s);
    if ((lane & (32 / E - 1)) == 0) xsum[(size_t)t * (K / 32) + k0 / 32] = sum;
    if (lane == 0) xs[(size_t)t * ng + g] = amax == 0.f ? 0.f : scale;
    if (++g == ng) g = 0, t++;
  }
}

extern "C" __global__ void __launch_bounds__(QUANT_THREADS)
    quant_rows(const float* x, int ldx, i8* __restrict__ xq, float* __restrict__ xs,
               i32* __restrict__ xsum, int rows, int K, int G, int gpw) {
  PDL_LAUNCH();
  PDL_WAIT();
  if (G == 128) {
    quant_rows_warp<4>(x, ldx, xq, xs, xsum, rows, K, gpw);
  } else if (G == 64) {
    quant_rows_warp<2>(x, ldx, xq, xs, xsum, rows, K, gpw);
  } else {
    quant_rows_warp<1>(x, ldx, xq, xs, xsum, rows, K, gpw);
  }
}

// quant8_lane8 and quant8_lane8_div on n groups of 8 values, one a thread
// (L = 1): out[8i..8i+3] the first's codes (two words), code sum and
// scale's bits, out[8i+4..8i+7] the second's (tests).
extern "C" __global__ void quant8_lane8_check(const float* __restrict__ x, int n, u32* __restrict__ out) {
  PDL_WAIT();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float v[8];
#pragma unroll
  for (int e = 0; e < 8; e++) v[e] = x[8 * i + e];
  u32 p[2], pd[2];
  i32 s, sd;
  const float sc = quant8_lane8(v, 1, p, s), scd = quant8_lane8_div(v, 1, pd, sd);
  u32* o = out + 8 * (size_t)i;
  o[0] = p[0], o[1] = p[1], o[2] = (u32)s, o[3] = __float_as_uint(sc);
  o[4] = pd[0], o[5] = pd[1], o[6] = (u32)sd, o[7] = __float_as_uint(scd);
}
