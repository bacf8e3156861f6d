// Single-token MMFP4 products that prepare their own input (decode at batch
// 1, where every dependent launch costs a few microseconds of device time
// however little it does). Every block first turns the float input row into
// int8 groups in its shared memory, exactly as rmsnorm_quant /
// rmsnorm_quant8 would (the same reduction order for the norm), then
// runs the split dp4a product of gemv_split_t1 on its 16 rows. The norm's
// results that other ops read (the residual sum, the float norm output and
// the int8 form) are written by the last block to finish reading the input,
// so an op writing over its own input (x = x + a, a norm in place) stays
// correct.
//
// Modes of the prologue:
//   FUSE_QUANT     quantize x (nothing is written besides y)
//   FUSE_NORM      v = gain * (x * inv), inv = 1/sqrt(mean(x^2) + eps); out = v
//   FUSE_ADD_NORM  d = a + c, then FUSE_NORM of d
// layout8 picks the sum-of-squares order of rmsnorm_quant8 (K/8 threads of 8
// values); otherwise that of rmsnorm_quant (256 threads, stride 256).
//
// Up to two matrices of K columns share the input: blocks [0, nb1) take
// matrix 1's rows, the rest matrix 2's. With head_rows > 0 (matrix 1 only)
// the input row holds one K-column block per head and rows [h*head_rows,
// (h+1)*head_rows) take block h (head_rows a multiple of 16).
//
// Dynamic shared memory: K bytes of codes, K/32 scales, and, for the norm
// modes, K floats of staged input.

#define FUSE_QUANT 0
#define FUSE_NORM 1
#define FUSE_ADD_NORM 2
#define FUSED_ROWS 16  // WARPS * 4 rows per block

// Warms L2 with this warp's four rows of codes (each K/2 bytes), so that
// their DRAM latency overlaps the prologue.
DEVICE void prefetch_rows(const u8* const (&rc)[4], int K) {
  const int lane = threadIdx.x & 31;
  const int lines = (K / 2 + 127) >> 7;
#pragma unroll
  for (int r = 0; r < 4; r++)
    for (int i = lane; i < lines; i += 32) asm volatile("prefetch.global.L2 [%0];" ::"l"(rc[r] + (i << 7)));
}

extern "C" __global__ void __launch_bounds__(128)
    gemv_fused(const u8* __restrict__ codes1, const u8* __restrict__ scales1,
               const float* __restrict__ rs1, int N1, float* y1, const u8* __restrict__ codes2,
               const u8* __restrict__ scales2, const float* __restrict__ rs2, int N2, float* y2,
               int K, int gshift, int head_rows, int mode, int layout8, const float* x,
               float* d, const float* a, const float* c, const float* __restrict__ gain,
               float eps, float* out, i8* xq, float* xs, i32* xsum, u32* counter) {
  PDL_LAUNCH();
  extern __shared__ __align__(16) u8 smem[];
  i8* sq = (i8*)smem;
  float* ss = (float*)(smem + K);
  float* raw = ss + (K >> 5);
  __shared__ float partial[32];
  __shared__ float inv_s;
  __shared__ bool last_s;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int G = 32 << gshift, GK = K / G, E = G >> 5;
  const int nb1 = (N1 + FUSED_ROWS - 1) / FUSED_ROWS;
  const bool second = (int)blockIdx.x >= nb1;
  const u8* codes = second ? codes2 : codes1;
  const u8* scales = second ? scales2 : scales1;
  const float* row_scale = second ? rs2 : rs1;
  const int N = second ? N2 : N1;
  float* y = second ? y2 : y1;
  const int brow = (second ? blockIdx.x - nb1 : blockIdx.x) * FUSED_ROWS;
  const int row0 = brow + warp * 4;

  const u8* rc[4];
  const u8* rs[4];
#pragma unroll
  for (int r = 0; r < 4; r++) {
    const int n = min(row0 + r, N - 1);
    rc[r] = codes + (size_t)n * (K / 2);
    rs[r] = scales + (size_t)n * GK;
  }
  if (row0 < N) prefetch_rows(rc, K);
  if (head_rows > 0) x += (size_t)(brow / head_rows) * K;
  PDL_WAIT();

  float inv = 1.f;
  bool last = false;
  if (mode != FUSE_QUANT) {
    // Pass 1: the input into shared memory and its sum of squares, in the
    // order of the standalone norm kernel.
    if (layout8) {
      const int V = K >> 3;  // virtual threads of 8 values, V % 32 == 0
      for (int j = 0; j * 128 < V; j++) {
        const int vt = j * 128 + tid;
        if (j * 128 + warp * 32 >= V) break;  // warp-uniform
        const int k0 = vt * 8;
        float v[8];
        if (mode == FUSE_ADD_NORM) {
          const float4* pa = (const float4*)(a + k0);
          const float4* pc = (const float4*)(c + k0);
          const float4 a0 = pa[0], a1 = pa[1], c0 = pc[0], c1 = pc[1];
          v[0] = a0.x + c0.x; v[1] = a0.y + c0.y; v[2] = a0.z + c0.z; v[3] = a0.w + c0.w;
          v[4] = a1.x + c1.x; v[5] = a1.y + c1.y; v[6] = a1.z + c1.z; v[7] = a1.w + c1.w;
        } else {
          const float4* px = (const float4*)(x + k0);
          const float4 x0 = px[0], x1 = px[1];
          v[0] = x0.x; v[1] = x0.y; v[2] = x0.z; v[3] = x0.w;
          v[4] = x1.x; v[5] = x1.y; v[6] = x1.z; v[7] = x1.w;
        }
#pragma unroll
        for (int e = 0; e < 8; e++) raw[k0 + e] = v[e];
        sumsq8_partial(v, lane, warp, partial + j * 4);
      }
    } else {
      for (int j = 0; j < 2; j++) {
        const int vt = j * 128 + tid;
        float s = 0;
        for (int k = vt; k < K; k += 256) {
          const float v = mode == FUSE_ADD_NORM ? a[k] + c[k] : x[k];
          raw[k] = v;
          s += v * v;
        }
        s = warp_sum(s);
        if (lane == 0) partial[j * 4 + warp] = s;
      }
    }
    __syncthreads();
    if (tid == 0) {
      inv_s = norm_inv(partial, layout8 ? K >> 8 : 8, K, eps);
      // Every thread of this block has read its input (the loads fed the
      // sums above): the last block may now write over it.
      last_s = atomicAdd(counter, 1u) == gridDim.x - 1;
      if (last_s) *counter = 0;
    }
    __syncthreads();
    inv = inv_s;
    last = last_s;
  }

  // Pass 2: one warp per group, lane l holding E consecutive values (as
  // rmsnorm_quant_row; the int8 values do not depend on the layout).
  for (int g = warp; g < GK; g += 4) {
    const int k0 = g * G + lane * E;
    float v[4];
    float amax = 0.f;
#pragma unroll
    for (int e = 0; e < 4; e++) {
      if (e < E) {
        float t;
        if (mode == FUSE_QUANT) {
          t = x[k0 + e];
        } else {
          t = raw[k0 + e];
          if (last && mode == FUSE_ADD_NORM) d[k0 + e] = t;
          t = gain[k0 + e] * (t * inv);
          if (last && out) out[k0 + e] = t;
        }
        v[e] = t;
        amax = fmaxf(amax, fabsf(t));
      }
    }
    amax = warp_max(amax);
    const float scale = amax / 127.f;
    i32 sum = 0;
#pragma unroll
    for (int e = 0; e < 4; e++) {
      if (e < E) {
        const i32 q = quant8(v[e], amax, scale);
        sq[k0 + e] = (i8)q;
        if (last) xq[k0 + e] = (i8)q;
        sum += q;
      }
    }
    const float sc = amax == 0.f ? 0.f : scale;
    if (lane == 0) ss[g] = sc;
    if (last) {
      for (int o = 1; o < 32 / E; o <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      if ((lane & (32 / E - 1)) == 0) xsum[k0 / 32] = sum;
      if (lane == 0) xs[g] = sc;
    }
  }
  __syncthreads();

  if (row0 >= N) return;
  const float v = gemv_dot<1, 4, true, true>(rc, rs, K, gshift, sq, ss, nullptr);
  if (lane < 4 && row0 + lane < N) y[row0 + lane] = v * (row_scale[row0 + lane] * 0.5f);
}
