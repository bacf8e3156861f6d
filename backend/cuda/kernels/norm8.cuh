// The single-row RMSNorm with its int8 form in registers, shared by the
// norm kernels (quant.cu) and the absorbed query's module (absorb.cu),
// which runs it in a block of its own launch.

// rmsnorm_quant with each row in registers: K/8 threads (a multiple of 32,
// at most 1024) hold 8 consecutive values each, so a group of G = 32, 64 or
// 128 columns is G/8 lanes of one warp and a row is read once. With a != 0
// the row is d = a + c first (stored), as add_rmsnorm_quant; else x. The
// gain is loaded before waiting for the kernel before. Same values as
// rmsnorm_quant but for the order of the sum of squares. Every row
// pointer and stride is 16-byte aligned. rmsnorm_quant8_row is one block's
// work on row t; threads from K/8 on (whole warps) only take part in the
// block's barriers.
DEVICE void rmsnorm_quant8_tail(float (&v)[8], const float (&gv)[8], bool on, float eps, float* out, int ldo,
                                i8* __restrict__ xq, float* __restrict__ xs, i32* __restrict__ xsum, int K, int G,
                                int t);
DEVICE void rmsnorm_quant8_row(const float* x, int ldx, float* d, int ldd, const float* a, int lda,
                               const float* c, int ldc, const float* __restrict__ gain, float eps,
                               float* out, int ldo, i8* __restrict__ xq, float* __restrict__ xs,
                               i32* __restrict__ xsum, int K, int G, int t) {
  const int tid = threadIdx.x, k0 = tid * 8;
  const bool on = k0 < K;
  float gv[8];
  if (on) ldg8(gain + k0, gv);
  PDL_WAIT();
  float v[8];
  if (on) {
    if (a) {
      const float4* pa = (const float4*)(a + (size_t)t * lda + k0);
      const float4* pc = (const float4*)(c + (size_t)t * ldc + k0);
      const float4 a0 = pa[0], a1 = pa[1], c0 = pc[0], c1 = pc[1];
      v[0] = a0.x + c0.x; v[1] = a0.y + c0.y; v[2] = a0.z + c0.z; v[3] = a0.w + c0.w;
      v[4] = a1.x + c1.x; v[5] = a1.y + c1.y; v[6] = a1.z + c1.z; v[7] = a1.w + c1.w;
      float4* pd = (float4*)(d + (size_t)t * ldd + k0);
      pd[0] = make_float4(v[0], v[1], v[2], v[3]);
      pd[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
      const float4* px = (const float4*)(x + (size_t)t * ldx + k0);
      const float4 x0 = px[0], x1 = px[1];
      v[0] = x0.x; v[1] = x0.y; v[2] = x0.z; v[3] = x0.w;
      v[4] = x1.x; v[5] = x1.y; v[6] = x1.z; v[7] = x1.w;
    }
  }
  rmsnorm_quant8_tail(v, gv, on, eps, out, ldo, xq, xs, xsum, K, G, t);
}

// rmsnorm_quant8_row after its loads: the norm of row t's values v (this
// thread's 8, on: the thread holds values), its output and int8 form.
DEVICE void rmsnorm_quant8_tail(float (&v)[8], const float (&gv)[8], bool on, float eps, float* out, int ldo,
                                i8* __restrict__ xq, float* __restrict__ xs, i32* __restrict__ xsum, int K, int G,
                                int t) {
  __shared__ float partial[32];
  __shared__ float inv_s;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, k0 = tid * 8;
  if (on) sumsq8_partial(v, lane, warp, partial);
  __syncthreads();
  if (tid == 0) inv_s = norm_inv(partial, K >> 8, K, eps);
  __syncthreads();
  if (!on) return;
  const float inv = inv_s;
#pragma unroll
  for (int e = 0; e < 8; e++) v[e] = gv[e] * (v[e] * inv);
  if (out) {
    float4* po = (float4*)(out + (size_t)t * ldo + k0);
    po[0] = make_float4(v[0], v[1], v[2], v[3]);
    po[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
  if (!xq) return;
  const int L = G >> 3;  // lanes per group
  u32 packed[2];
  i32 sum;
  const float sc = quant8_lane8(v, L, packed, sum);
  *(uint2*)(xq + (size_t)t * K + k0) = make_uint2(packed[0], packed[1]);
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  sum += __shfl_xor_sync(0xffffffffu, sum, 2);
  if ((lane & 3) == 0) xsum[(size_t)t * (K / 32) + k0 / 32] = sum;
  if ((lane & (L - 1)) == 0) xs[(size_t)t * (K / G) + k0 / G] = sc;
}

// norm_gemv_t1's norm in every block of a product that reads it: this
// thread's 8 values of x at k0 (on: k0 < K, K/8 threads) normalised with
// the gain gv (every thread sums the warps' partials in
// rmsnorm_quant8_row's order) into the block's shared int8 row sq and its
// group scales ssc (groups of G); where first, also the norm's output out
// (if set) and its int8 form xq, xs, xsum. Every thread of the block calls
// it (a barrier inside).
DEVICE void norm_row_shared(const float* x, const float (&gv)[8], float eps, int K, int G, bool on, bool first,
                            int lane, int warp, int k0, float* partial, i8* sq, float* ssc, float* out,
                            i8* __restrict__ xq, float* __restrict__ xs, i32* __restrict__ xsum) {
  float v[8];
  if (on) {
    const float4* px = (const float4*)(x + k0);
    const float4 x0 = px[0], x1 = px[1];
    v[0] = x0.x; v[1] = x0.y; v[2] = x0.z; v[3] = x0.w;
    v[4] = x1.x; v[5] = x1.y; v[6] = x1.z; v[7] = x1.w;
    sumsq8_partial(v, lane, warp, partial);
  }
  __syncthreads();
  if (on) {
    // Every thread sums the partials in rmsnorm_quant8_row's order.
    const float inv = norm_inv8(partial, K >> 8, K, eps);
#pragma unroll
    for (int e = 0; e < 8; e++) v[e] = gv[e] * (v[e] * inv);
    const int L = G >> 3, gs = __ffs(G) - 1;  // lanes per group, log2 G
    u32 packed[2];
    i32 sum;
    const float sc = quant8_lane8(v, L, packed, sum);
    *(uint2*)(sq + k0) = make_uint2(packed[0], packed[1]);
    if ((lane & (L - 1)) == 0) ssc[k0 >> gs] = sc;
    if (first) {
      if (out) {
        float4* po = (float4*)(out + k0);
        po[0] = make_float4(v[0], v[1], v[2], v[3]);
        po[1] = make_float4(v[4], v[5], v[6], v[7]);
      }
      *(uint2*)(xq + k0) = make_uint2(packed[0], packed[1]);
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      if ((lane & 3) == 0) xsum[k0 / 32] = sum;
      if ((lane & (L - 1)) == 0) xs[k0 >> gs] = sc;
    }
  }
}
