// Mixture of experts for one token (DESIGN.md section 3): the router, then
// every selected expert's gate and up products with the SiLU product fused
// (one launch over all experts), the int8 quantization of those (through
// rmsnorm_quant), and the down products summed with the routing weights
// (one launch). Slots 0..topk-1 are the routed experts ids[s] with weight
// wts[s]; slots topk.. are the shared experts (table entries nexperts..),
// weight 1.

struct QMat {
  const u8* codes;
  const u8* scales;
  const float* row_scale;
};

// One expert's three matrices: gate and up [I][K], down [K][I].
struct Expert {
  QMat gate, up, down;
};

DEVICE int slot_expert(const i32* __restrict__ ids, int slot, int topk, int nexperts) {
  return slot < topk ? ids[slot] : nexperts + (slot - topk);
}

// silu(x) = x / (1 + e^-x), the exponential in double as the CPU backend
// takes it.
DEVICE float silu(float x) { return x / (1.f + (float)exp(-(double)x)); }

// Router, one block of 256 threads per token t: logits[e] = W[e] . x[t]
// (fp32, W [E][K]), scores sigmoid(logits), choice scores + bias; with
// groups > 1 only the best topk_groups groups (a group's worth is the sum of
// its two best choices) stay eligible; the topk best choices win (ties to
// the lower index) and their weights are their scores, normalised when
// norm != 0, times scaling. As cpu.SelectExperts.
#define ROUTE_THREADS 256
#define MAX_EXPERTS 512
#define MAX_GROUPS 64

extern "C" __global__ void __launch_bounds__(ROUTE_THREADS)
    moe_route(const float* __restrict__ W, const float* __restrict__ bias,
              const float* __restrict__ x, int ldx, int E, int K, int topk, int groups,
              int topk_groups, int norm, float scaling, i32* __restrict__ ids,
              float* __restrict__ wts, float* __restrict__ logits_out) {
  PDL_LAUNCH();
  PDL_WAIT();
  __shared__ float score[MAX_EXPERTS], choice[MAX_EXPERTS];
  const int t = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float* xr = x + (size_t)t * ldx;
  for (int e = warp; e < E; e += ROUTE_THREADS / 32) {
    const float* w = W + (size_t)e * K;
    float acc = 0.f;
    for (int k = lane * 4; k < K; k += 128) {
      const float4 a = *(const float4*)(w + k), b = *(const float4*)(xr + k);
      acc += a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
    }
    acc = warp_sum(acc);
    if (lane == 0) {
      if (logits_out) logits_out[(size_t)t * E + e] = acc;
      const float s = (float)(1.0 / (1.0 + exp(-(double)acc)));
      score[e] = s;
      choice[e] = s + bias[e];
    }
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  const float NEG_INF = __int_as_float(0xff800000);
  if (groups > 1) {
    // A group stays eligible when it ranks among the best topk_groups by
    // worth, ties to the lower group (a stable sort, as the CPU's).
    __shared__ float worth[MAX_GROUPS];
    const int per = E / groups;
    for (int g = 0; g < groups; g++) {
      float m1 = NEG_INF, m2 = NEG_INF;
      for (int e = g * per; e < (g + 1) * per; e++) {
        const float v = choice[e];
        if (v > m1) {
          m2 = m1;
          m1 = v;
        } else if (v > m2) {
          m2 = v;
        }
      }
      worth[g] = m1 + m2;
    }
    for (int g = 0; g < groups; g++) {
      int rank = 0;
      for (int h = 0; h < groups; h++) rank += worth[h] > worth[g] || (worth[h] == worth[g] && h < g);
      if (rank >= topk_groups) {
        for (int e = g * per; e < (g + 1) * per; e++) choice[e] = NEG_INF;
      }
    }
  }
  __shared__ bool taken[MAX_EXPERTS];
  for (int e = 0; e < E; e++) taken[e] = false;
  float sum = 0.f;
  for (int k = 0; k < topk; k++) {
    int best = -1;
    for (int e = 0; e < E; e++) {
      if (!taken[e] && (best < 0 || choice[e] > choice[best])) best = e;
    }
    taken[best] = true;
    ids[(size_t)t * topk + k] = best;
    wts[(size_t)t * topk + k] = score[best];
    sum += score[best];
  }
  for (int k = 0; k < topk; k++) {
    float w = wts[(size_t)t * topk + k];
    if (norm) w /= sum + 1e-20f;
    wts[(size_t)t * topk + k] = w * scaling;
  }
}

// Gate and up products of every slot's expert with the SiLU product:
// h[slot][n] = silu(gate_n . x) * (up_n . x), for one token. Grid
// (ceil(I/16), nslots) blocks of 4 warps; a warp takes 4 rows of gate and the
// same 4 rows of up (8 rows in flight against the same activations).
// At most 128 registers a thread, so that four blocks fit on a
// multiprocessor and the 5 x 96 blocks of GLM-4.7-Flash's MoE are resident
// at once (168 registers left 3 a multiprocessor: two waves).
extern "C" __global__ void __launch_bounds__(128, 4)
    moe_gate_up(const Expert* __restrict__ experts, const i32* __restrict__ ids, int topk,
                int nexperts, int I, int K, int gshift, const i8* __restrict__ xq,
                const float* __restrict__ xs, const i32* __restrict__ xsum, float* __restrict__ h) {
  PDL_LAUNCH();
  PDL_WAIT();
  const int slot = blockIdx.y, lane = threadIdx.x & 31;
  const int row0 = (blockIdx.x * 4 + (threadIdx.x >> 5)) * 4;
  if (row0 >= I) return;
  const Expert& ex = experts[slot_expert(ids, slot, topk, nexperts)];
  const int GK = (K >> 5) >> gshift;
  const u8* rc[8];
  const u8* rs[8];
#pragma unroll
  for (int r = 0; r < 4; r++) {
    const int n = min(row0 + r, I - 1);
    rc[r] = ex.gate.codes + (size_t)n * (K / 2);
    rs[r] = ex.gate.scales + (size_t)n * GK;
    rc[4 + r] = ex.up.codes + (size_t)n * (K / 2);
    rs[4 + r] = ex.up.scales + (size_t)n * GK;
  }
  float out[8][1];
  gemv_dot<1, 8, true>(rc, rs, K, gshift, xq, xs, xsum, out);
#pragma unroll
  for (int r = 0; r < 4; r++) {
    const int n = row0 + r;
    if (lane == r && n < I) {
      const float g = out[r][0] * (ex.gate.row_scale[n] * 0.5f);
      const float u = out[4 + r][0] * (ex.up.row_scale[n] * 0.5f);
      h[(size_t)slot * I + n] = silu(g) * u;
    }
  }
}

// A warp's 4 down-product rows from row0 of one slot (out, the same in
// every lane, before the row scale) into partial[slot][n], one lane each.
DEVICE void moe_down_store(const float (&out)[4][1], const float* __restrict__ row_scale, int row0,
                           int N, int slot, float* __restrict__ partial) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int r = 0; r < 4; r++) {
    const int n = row0 + r;
    if (lane == r && n < N) partial[(size_t)slot * N + n] = out[r][0] * (row_scale[n] * 0.5f);
  }
}

// The end of a down kernel's block: the last of the nslots blocks of column
// block blockIdx.x to finish (counted in counters, which it resets) sums
// the slots' partial products in slot order with their weights (1 for the
// shared slots after topk) into y, so the result does not depend on the
// blocks' timing. Every thread of the block must call it.
DEVICE void moe_down_sum(const float* __restrict__ partial, u32* __restrict__ counters,
                         const float* __restrict__ wts, int topk, int nslots, int N,
                         float* __restrict__ y, int accumulate) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&counters[blockIdx.x], 1u) == (u32)(nslots - 1);
  __syncthreads();
  if (!last) return;
  __threadfence();
  const int n = blockIdx.x * 16 + threadIdx.x;
  if (threadIdx.x < 16 && n < N) {
    float total = 0.f;
    for (int s = 0; s < nslots; s++) {
      const float w = s < topk ? wts[s] : 1.f;
      total += w * __ldcg(partial + (size_t)s * N + n);
    }
    y[n] = accumulate ? y[n] + total : total;
  }
  if (threadIdx.x == 0) counters[blockIdx.x] = 0;
}

// Down products summed over the slots with their weights:
// y[n] (+)= sum_s w_s * (down_s,n . hq[s]), for one token; hq holds each
// slot's h quantized to int8 (nslots rows of I). Grid (ceil(N/16), nslots)
// blocks of 4 warps, a warp taking 4 rows of one slot's down matrix, so that
// every slot's weights stream at once. Each block leaves its products in
// partial[slot][n]; the last block of a row block to finish (counted in
// counters, which it resets) sums the slots in order, so the result does
// not depend on the blocks' timing.
extern "C" __global__ void __launch_bounds__(128)
    moe_down(const Expert* __restrict__ experts, const i32* __restrict__ ids,
             const float* __restrict__ wts, int topk, int nslots, int nexperts, int N, int I,
             int gshift, const i8* __restrict__ hq, const float* __restrict__ hs,
             const i32* __restrict__ hsum, float* __restrict__ partial, u32* __restrict__ counters,
             float* __restrict__ y, int accumulate) {
  PDL_LAUNCH();
  PDL_WAIT();
  const int slot = blockIdx.y;
  const int row0 = (blockIdx.x * 4 + (threadIdx.x >> 5)) * 4;
  const int GK = (I >> 5) >> gshift;
  if (row0 < N) {
    const Expert& ex = experts[slot_expert(ids, slot, topk, nexperts)];
    const u8* rc[4];
    const u8* rs[4];
#pragma unroll
    for (int r = 0; r < 4; r++) {
      const int n = min(row0 + r, N - 1);
      rc[r] = ex.down.codes + (size_t)n * (I / 2);
      rs[r] = ex.down.scales + (size_t)n * GK;
    }
    float out[4][1];
    gemv_dot<1, 4, true>(rc, rs, I, gshift, hq + (size_t)slot * I, hs + (size_t)slot * GK,
                         hsum + (size_t)slot * (I / 32), out);
    moe_down_store(out, ex.down.row_scale, row0, N, slot, partial);
  }
  moe_down_sum(partial, counters, wts, topk, nslots, N, y, accumulate);
}

// moe_down with the quantization of h fused in: each block first quantizes
// its slot's row of h (I floats, as rmsnorm_quant does without a gain) into
// shared memory, then runs its rows against it; the rest is moe_down.
// I <= MOE_MAX_I.
#define MOE_MAX_I 4096

extern "C" __global__ void __launch_bounds__(128)
    moe_down_q(const Expert* __restrict__ experts, const i32* __restrict__ ids,
               const float* __restrict__ wts, int topk, int nslots, int nexperts, int N, int I,
               int gshift, const float* __restrict__ h, float* __restrict__ partial,
               u32* __restrict__ counters, float* __restrict__ y, int accumulate) {
  PDL_LAUNCH();
  __shared__ __align__(16) i8 sq[MOE_MAX_I];
  __shared__ float ss[MOE_MAX_I / 32];
  const int slot = blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row0 = (blockIdx.x * 4 + warp) * 4;
  __shared__ __align__(16) float sh[MOE_MAX_I];
  const int G = 32 << gshift, GK = I / G, E = G >> 5;
  PDL_WAIT();
  // This block's rows of the slot's down matrix go to L2 while h is
  // quantized below.
  const Expert& ex = experts[slot_expert(ids, slot, topk, nexperts)];
  const u8* rc[4];
  const u8* rs[4];
#pragma unroll
  for (int r = 0; r < 4; r++) {
    const int n = min(row0 + r, N - 1);
    rc[r] = ex.down.codes + (size_t)n * (I / 2);
    rs[r] = ex.down.scales + (size_t)n * GK;
  }
  if (row0 < N) {
    const int lines = (I / 2 + 127) >> 7;
#pragma unroll
    for (int r = 0; r < 4; r++)
      for (int i = lane; i < lines; i += 32) asm volatile("prefetch.global.L2 [%0];" ::"l"(rc[r] + (i << 7)));
  }
  // The slot's row of h into shared memory, every load issued first (I a
  // multiple of 4, at most MOE_MAX_I).
  const float* hr = h + (size_t)slot * I;
  {
    float4 hv[MOE_MAX_I / 512];
#pragma unroll
    for (int j = 0; j < MOE_MAX_I / 512; j++)
      if ((j * 128 + threadIdx.x) * 4 < I) hv[j] = __ldcg((const float4*)hr + j * 128 + threadIdx.x);
#pragma unroll
    for (int j = 0; j < MOE_MAX_I / 512; j++)
      if ((j * 128 + threadIdx.x) * 4 < I) ((float4*)sh)[j * 128 + threadIdx.x] = hv[j];
  }
  __syncthreads();
  for (int g = warp; g < GK; g += 4) {
    const int k0 = g * G + lane * E;
    float v[4];
    float amax = 0.f;
#pragma unroll
    for (int e = 0; e < 4; e++) {
      if (e < E) {
        v[e] = sh[k0 + e];
        amax = fmaxf(amax, fabsf(v[e]));
      }
    }
    amax = warp_max(amax);
    const float scale = amax / 127.f;
#pragma unroll
    for (int e = 0; e < 4; e++) {
      if (e < E) {
        const i32 q = quant8(v[e], amax, scale);
        sq[k0 + e] = (i8)q;
      }
    }
    if (lane == 0) ss[g] = amax == 0.f ? 0.f : scale;
  }
  __syncthreads();
  if (row0 < N) {
    float out[4][1];
    gemv_dot<1, 4, true, true>(rc, rs, I, gshift, sq, ss, nullptr, out);
    moe_down_store(out, ex.down.row_scale, row0, N, slot, partial);
  }
  moe_down_sum(partial, counters, wts, topk, nslots, N, y, accumulate);
}

// The expert choice of moe_route from router logits when there are no
// expert groups (groups <= 1), one warp per token: lane l holds experts l,
// l+32, ... (E <= 32*ROUTE_PER). Each of the topk rounds takes the best
// untaken choice, ties to the lower index, by a warp reduction; weights and
// their normalisation as moe_route.
#define ROUTE_PER 16

// One warp's expert choice for one token from its logits (loaded through
// L2: another block may have written them).
DEVICE void route_warp(const float* logits, const float* __restrict__ bias, int E, int topk,
                       int norm, float scaling, i32* __restrict__ ids, float* __restrict__ wts) {
  const int lane = threadIdx.x & 31;
  const float NEG_INF = __int_as_float(0xff800000);
  float score[ROUTE_PER], choice[ROUTE_PER];
#pragma unroll
  for (int i = 0; i < ROUTE_PER; i++) {
    const int e = lane + 32 * i;
    score[i] = 0.f;
    choice[i] = NEG_INF;
    if (e < E) {
      const float acc = __ldcg(logits + e);
      const float sg = (float)(1.0 / (1.0 + exp(-(double)acc)));
      score[i] = sg;
      choice[i] = sg + bias[e];
    }
  }
  u32 taken = 0;
  float sum = 0.f, mine = 0.f;  // lane k keeps the k-th weight (topk <= 32)
  for (int k = 0; k < topk; k++) {
    float bv = NEG_INF, bs = 0.f;
    int bi = 1 << 30;
#pragma unroll
    for (int i = 0; i < ROUTE_PER; i++) {
      const int e = lane + 32 * i;
      if (e < E && !(taken >> i & 1u) && (bi == (1 << 30) || choice[i] > bv)) {
        bv = choice[i];
        bi = e;
        bs = score[i];
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      const float os = __shfl_xor_sync(0xffffffffu, bs, o);
      if (oi != (1 << 30) && (bi == (1 << 30) || ov > bv || (ov == bv && oi < bi))) {
        bv = ov;
        bi = oi;
        bs = os;
      }
    }
    if ((bi & 31) == lane) taken |= 1u << (bi >> 5);
    sum += bs;
    if (lane == k) mine = bs;
    if (lane == 0) ids[k] = bi;
  }
  if (lane < topk) {
    float w = mine;
    if (norm) w /= sum + 1e-20f;
    wts[lane] = w * scaling;
  }
}

extern "C" __global__ void __launch_bounds__(32)
    moe_route_logits(const float* __restrict__ logits, int ld, const float* __restrict__ bias, int E,
                     int topk, int norm, float scaling, i32* __restrict__ ids,
                     float* __restrict__ wts) {
  PDL_LAUNCH();
  PDL_WAIT();
  const int t = blockIdx.x;
  route_warp(logits + (size_t)t * ld, bias, E, topk, norm, scaling, ids + (size_t)t * topk, wts + (size_t)t * topk);
}

#define ROUTER_LOADS 32

// The router's product and the expert choice in one launch: grid
// (ceil(E/8), T) blocks of 8 warps, warp w of block b computing logit
// e = 8b + w of token t exactly as dense_matmul does; the last block of a
// token to finish (counters[t], which it resets) picks the experts as
// moe_route_logits.
extern "C" __global__ void __launch_bounds__(256)
    moe_router_route(const float* __restrict__ W, int E, int K, const float* __restrict__ x, int ldx,
                     float* logits, int ldl, const float* __restrict__ bias, int topk, int norm,
                     float scaling, i32* __restrict__ ids, float* __restrict__ wts,
                     u32* __restrict__ counters) {
  PDL_LAUNCH();
  PDL_WAIT();
  __shared__ bool last;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, t = blockIdx.y;
  const int e = blockIdx.x * 8 + warp;
  if (e < E) {
    const float* w = W + (size_t)e * K;
    const float* xr = x + (size_t)t * ldx;
    float acc = 0.f;
    // The same sum in the same order, with ROUTER_LOADS loads of each
    // operand in flight before the first multiply.
    for (int k0 = lane; k0 < K; k0 += 32 * ROUTER_LOADS) {
      float wv[ROUTER_LOADS], xv[ROUTER_LOADS];
#pragma unroll
      for (int u = 0; u < ROUTER_LOADS; u++) {
        if (k0 + 32 * u < K) {
          wv[u] = w[k0 + 32 * u];
          xv[u] = xr[k0 + 32 * u];
        }
      }
#pragma unroll
      for (int u = 0; u < ROUTER_LOADS; u++)
        if (k0 + 32 * u < K) acc += wv[u] * xv[u];
    }
    acc = warp_sum(acc);
    if (lane == 0) logits[(size_t)t * ldl + e] = acc;
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&counters[t], 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  if (warp == 0) route_warp(logits + (size_t)t * ldl, bias, E, topk, norm, scaling, ids + (size_t)t * topk, wts + (size_t)t * topk);
  if (threadIdx.x == 0) counters[t] = 0;
}

// moe_router_route with the RMSNorm of its input (and the residual add
// before it) in every block's prologue, one token: the block normalises
// the row into shared memory in the order of the standalone norm kernel
// (layout8: rmsnorm_quant8's K/8 threads of 8 values; else
// rmsnorm_quant's stride of 256), takes its logits from there, and the
// last block writes what the norm would have: d = a + c (mode 2), the
// float output and its int8 form in groups of G. Modes as gemv_fused
// (1: norm of x, 2: add then norm). Dynamic shared memory: 2K floats.
extern "C" __global__ void __launch_bounds__(256)
    moe_router_route_norm(const float* __restrict__ W, int E, int K, float* logits,
                          const float* __restrict__ bias, int topk, int norm, float scaling,
                          i32* __restrict__ ids, float* __restrict__ wts, u32* __restrict__ counters,
                          int mode, int layout8, const float* x, float* d, const float* a,
                          const float* c, const float* __restrict__ gain, float eps, float* out,
                          i8* xq, float* xs, i32* xsum, int G) {
  PDL_LAUNCH();
  extern __shared__ __align__(16) float rsm[];
  float* raw = rsm;    // [K] the input row
  float* xn = rsm + K; // [K] its norm
  __shared__ double partial[32];
  __shared__ float inv_s;
  __shared__ bool last;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  PDL_WAIT();
  if (layout8) {
    const int V = K >> 3;  // a multiple of 32
    for (int j = 0; j * 256 + warp * 32 < V; j++) {
      const int k0 = (j * 256 + tid) * 8;
      float v[8];
      if (mode == 2) {
        const float4 a0 = *(const float4*)(a + k0), a1 = *(const float4*)(a + k0 + 4);
        const float4 c0 = *(const float4*)(c + k0), c1 = *(const float4*)(c + k0 + 4);
        v[0] = a0.x + c0.x; v[1] = a0.y + c0.y; v[2] = a0.z + c0.z; v[3] = a0.w + c0.w;
        v[4] = a1.x + c1.x; v[5] = a1.y + c1.y; v[6] = a1.z + c1.z; v[7] = a1.w + c1.w;
      } else {
        const float4 x0 = *(const float4*)(x + k0), x1 = *(const float4*)(x + k0 + 4);
        v[0] = x0.x; v[1] = x0.y; v[2] = x0.z; v[3] = x0.w;
        v[4] = x1.x; v[5] = x1.y; v[6] = x1.z; v[7] = x1.w;
      }
      double s = 0;
#pragma unroll
      for (int e = 0; e < 8; e++) {
        s += (double)v[e] * (double)v[e];
        raw[k0 + e] = v[e];
      }
      s = warp_sum_d(s);
      if (lane == 0) partial[j * 8 + warp] = s;
    }
  } else {
    double s = 0;
    for (int k = tid; k < K; k += 256) {
      const float v = mode == 2 ? a[k] + c[k] : x[k];
      raw[k] = v;
      const double dv = v;
      s += dv * dv;
    }
    s = warp_sum_d(s);
    if (lane == 0) partial[warp] = s;
  }
  __syncthreads();
  if (tid == 0) {
    const int nw = layout8 ? K >> 8 : 8;
    double total = 0;
    for (int w = 0; w < nw; w++) total += partial[w];
    inv_s = (float)(1.0 / sqrt(total / K + (double)eps));
  }
  __syncthreads();
  const float inv = inv_s;
  for (int k = tid; k < K; k += 256) xn[k] = gain[k] * (raw[k] * inv);
  __syncthreads();

  const int e = blockIdx.x * 8 + warp;
  if (e < E) {
    const float* w = W + (size_t)e * K;
    float acc = 0.f;
    for (int k0 = lane; k0 < K; k0 += 32 * ROUTER_LOADS) {
      float wv[ROUTER_LOADS];
#pragma unroll
      for (int u = 0; u < ROUTER_LOADS; u++)
        if (k0 + 32 * u < K) wv[u] = w[k0 + 32 * u];
#pragma unroll
      for (int u = 0; u < ROUTER_LOADS; u++)
        if (k0 + 32 * u < K) acc += wv[u] * xn[k0 + 32 * u];
    }
    acc = warp_sum(acc);
    if (lane == 0) logits[e] = acc;
  }
  __threadfence();
  __syncthreads();
  // Every block has read its input (the prologue above): the last one may
  // write over it.
  if (tid == 0) last = atomicAdd(&counters[0], 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  if (warp == 0) route_warp(logits, bias, E, topk, norm, scaling, ids, wts);
  for (int k = tid; k < K; k += 256) {
    if (mode == 2) d[k] = raw[k];
    if (out) out[k] = xn[k];
  }
  // The int8 form, one warp per group as rmsnorm_quant_row.
  const int Eg = G >> 5;
  for (int g = warp; g < K / G; g += 8) {
    const int k0 = g * G + lane * Eg;
    float v[4];
    float amax = 0.f;
#pragma unroll
    for (int u = 0; u < 4; u++) {
      if (u < Eg) {
        v[u] = xn[k0 + u];
        amax = fmaxf(amax, fabsf(v[u]));
      }
    }
    amax = warp_max(amax);
    const float scale = amax / 127.f;
    i32 sum = 0;
#pragma unroll
    for (int u = 0; u < 4; u++) {
      if (u < Eg) {
        const i32 q = quant8(v[u], amax, scale);
        xq[k0 + u] = (i8)q;
        sum += q;
      }
    }
    for (int o = 1; o < 32 / Eg; o <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if ((lane & (32 / Eg - 1)) == 0) xsum[k0 / 32] = sum;
    if (lane == 0) xs[g] = amax == 0.f ? 0.f : scale;
  }
  if (tid == 0) counters[0] = 0;
}

// moe_router_route with one round of loads and a parallel choice: grid
// (ceil(E/4), T) blocks of 4 warps, warp w of block b computing logit
// e = 4b + w of token t in moe_router_route's order, its whole weight row
// (K <= 2048) requested at once and the input row from shared memory
// (dynamic, K floats); the last block of a token to finish (counters[t],
// which it resets) ranks the E <= 128 choices, one thread per expert
// (ties to the lower index), and writes the topk winners in rank order
// with their weights normalised in that order: route_warp's result.
#define ROUTER_FAST_MAX_K 2048
extern "C" __global__ void __launch_bounds__(128)
    moe_router_fast(const float* __restrict__ W, int E, int K, const float* __restrict__ x, int ldx,
                    float* logits, int ldl, const float* __restrict__ bias, int topk, int norm,
                    float scaling, i32* __restrict__ ids, float* __restrict__ wts,
                    u32* __restrict__ counters) {
  PDL_LAUNCH();
  extern __shared__ __align__(16) float rxs[];  // [K] the input row
  __shared__ float score[128], choice[128], pick[32];
  __shared__ bool last;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, t = blockIdx.y;
  const int e = blockIdx.x * 4 + warp;
  float wv[ROUTER_FAST_MAX_K / 32];
  if (e < E) {
    const float* w = W + (size_t)e * K;
#pragma unroll
    for (int u = 0; u < ROUTER_FAST_MAX_K / 32; u++)
      if (32 * u < K) wv[u] = w[lane + 32 * u];
  }
  PDL_WAIT();
  const float* xr = x + (size_t)t * ldx;
  for (int k = tid * 4; k < K; k += 512) *(float4*)&rxs[k] = *(const float4*)(xr + k);
  __syncthreads();
  if (e < E) {
    float acc = 0.f;
#pragma unroll
    for (int u = 0; u < ROUTER_FAST_MAX_K / 32; u++)
      if (32 * u < K) acc += wv[u] * rxs[lane + 32 * u];
    acc = warp_sum(acc);
    if (lane == 0) logits[(size_t)t * ldl + e] = acc;
  }
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    last = atomicAdd(&counters[t], 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  if (tid < E) {
    const float acc = __ldcg(logits + (size_t)t * ldl + tid);
    const float sg = (float)(1.0 / (1.0 + exp(-(double)acc)));
    score[tid] = sg;
    choice[tid] = sg + bias[tid];
  }
  __syncthreads();
  if (tid < E) {
    const float c = choice[tid];
    int rank = 0;
    for (int j = 0; j < E; j++) {
      const float o = choice[j];
      rank += o > c || (o == c && j < tid);
    }
    if (rank < topk) {
      ids[(size_t)t * topk + rank] = tid;
      pick[rank] = score[tid];
    }
  }
  __syncthreads();
  if (tid < topk) {
    float sum = 0.f;
    for (int k = 0; k < topk; k++) sum += pick[k];
    float w = pick[tid];
    if (norm) w /= sum + 1e-20f;
    wts[(size_t)t * topk + tid] = w * scaling;
  }
  if (tid == 0) counters[t] = 0;
}

// ---------------------------------------------------------------------------
// The whole MoE block of one token in one persistent launch (moe_one): the
// router (optional), the gate/up products of every slot with the SiLU
// product, and the down products summed with the routing weights. Blocks of
// 4 warps take work items from a ticket counter in a fixed order:
//   router items (one logit a warp), the shared experts' gate/up items
//   (MOE1_GU_ROWS rows of h each), their down items (MOE1_DN_ROWS output
//   rows each), then the same for the routed slots.
// Each block streams its items' weights (codes, scales, row scales) into a
// ring of MOE1_STAGES shared-memory buffers with cp.async, MOE1_STAGES - 1
// items ahead of the one it computes, so that about 32 KB a block stay in
// flight while it computes, waits and signals.
// An item waits (spinning) only on items with smaller tickets: a routed
// item on the router's count, a down item on its slot's count of finished
// gate/up items. Each block takes its tickets in increasing order and waits
// only at an item's turn (a routed item's loads go out once the routing is
// known, at the latest at its turn), so the
// unfinished item with the smallest ticket is always held by a running
// block that waits on nothing unfinished: no deadlock, whatever the number
// of resident blocks. Every product and sum is computed as in
// moe_router_route, moe_gate_up and moe_down_q (same lanes, same order), so
// the result is the same bit for bit.
//
// ctl (zero between launches; the last block to leave resets it), each
// counter that blocks poll or take tickets from on its own 128-byte line:
// [MOE1_TICKETS] tickets, [MOE1_ROUTED] router items done, [MOE1_LEFT]
// blocks done, [MOE1_HDONE(s)] gate/up items of slot s done, [MOE1_CTL + b]
// down items of output row block b done. With flags & 1, block b takes
// tickets b, b + gridDim.x, ... instead (no ticket counter; needs every
// block resident at once, as the grid is sized).
#define MOE1_THREADS 128
#define MOE1_NW (MOE1_THREADS / 32)
#define MOE1_MAX_SLOTS 16
#define MOE1_MAX_I 2048
#define MOE1_MAX_K 2048
// Rows per warp of a gate/up item (half gate, half up) and of a down item.
#define MOE1_R 4
#define MOE1_GU_ROWS (MOE1_NW * MOE1_R / 2)
#define MOE1_DN_ROWS (MOE1_NW * MOE1_R)
#define MOE1_TICKETS 0
#define MOE1_ROUTED 32
#define MOE1_LEFT 64
#define MOE1_HDONE(s) (96 + 32 * (s))
#define MOE1_CTL (96 + 32 * MOE1_MAX_SLOTS)
#define MOE1_STAGES 3
// A stage: the item's codes (16 rows of at most 1 KB), scales (16 rows of
// at most 64 bytes) and row scales.
#define MOE1_CODES (16 * MOE1_MAX_K / 2)
#define MOE1_SCALES (16 * MOE1_MAX_K / 32)
#define MOE1_STAGE (MOE1_CODES + MOE1_SCALES + 16 * 4)
// Dynamic shared memory: the block's state (Moe1Shared) in the first
// MOE1_HEAD bytes, then the stages (MOE1_HEAD + MOE1_STAGES * MOE1_STAGE
// bytes in all: moeOneShared in ops.go).
#define MOE1_HEAD 10240
// Groups of h a warp quantizes with all loads in flight (the rest after).
#define MOE1_QG 4
// Experts of its router at most.
#define MOE1_MAX_EXPERTS 64

DEVICE u32 ld_acquire(const u32* p) {
  u32 v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Thread 0 spins until *p >= target (pausing between reads, so that the
// pollers leave the counter's L2 slice to the others); then the whole
// block goes on.
DEVICE void moe1_wait(const u32* p, u32 target) {
  if (threadIdx.x == 0) {
    while (ld_acquire(p) < target) asm volatile("nanosleep.u32 200;");
  }
  __syncthreads();
}

// Everything this block wrote is visible before *p is counted up (the
// barrier orders the block's writes before thread 0's fence).
DEVICE void moe1_signal(u32* p) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(p, 1u);
  }
}

// 16 bytes from global to shared memory without registers (cp.async).
DEVICE void copy16_async(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"((u32)__cvta_generic_to_shared(dst)), "l"(src)
               : "memory");
}

// n bytes (a multiple of 16, both ends 16-byte aligned, or else of 4 and
// 4-byte aligned), spread over the block's threads.
DEVICE void copy_async(u8* dst, const u8* src, int n) {
  if ((n & 15) == 0) {
    for (int o = threadIdx.x * 16; o < n; o += MOE1_THREADS * 16) copy16_async(dst + o, src + o);
  } else {
    for (int o = threadIdx.x * 4; o < n; o += MOE1_THREADS * 4)
      asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"((u32)__cvta_generic_to_shared(dst + o)), "l"(src + o)
                   : "memory");
  }
}

// The kind of work item it (0 router, 1 gate/up, 2 down), its slot and its
// index sub among the slot's items (gate/up first, then down).
DEVICE int moe1_item(int it, int nr, int topk, int nshared, int ngu, int ndn, int& slot, int& sub) {
  slot = sub = 0;
  if (it < nr) return 0;
  it -= nr;
  const int nsh = nshared * (ngu + ndn);
  if (it < nsh) {
    slot = topk + it / (ngu + ndn);
    sub = it % (ngu + ndn);
  } else {
    it -= nsh;
    const int ngur = topk * ngu;
    if (it < ngur) {
      slot = it / ngu;
      sub = it % ngu;
    } else {
      slot = (it - ngur) / ndn;
      sub = ngu + (it - ngur) % ndn;
    }
  }
  return sub < ngu ? 1 : 2;
}

// The warp-summed products of R rows (codes and scale bytes in shared
// memory, rows stride and sstride bytes apart) with one token's int8
// activations, before the row scale: gemv_dot<1, R, true> for C <= 64
// chunks, lane l taking chunks l and l + 32.
template <int R, bool XSHARED>
DEVICE void moe1_dot(const u8* codes, int stride, const u8* scales, int sstride, int C, int gshift,
                     const i8* __restrict__ xq, const float* __restrict__ xs, float (&out)[R]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int r = 0; r < R; r++) out[r] = 0.f;
#pragma unroll
  for (int p = 0; p < 2; p++) {
    const int c = 32 * p + lane;
    if (c >= C) continue;
    const int g = c >> gshift;
    const uint4* xp = (const uint4*)(xq + c * 32);
    const uint4 xa = XSHARED ? xp[0] : __ldg(xp), xb = XSHARED ? xp[1] : __ldg(xp + 1);
    const float xscale = XSHARED ? xs[g] : __ldg(xs + g);
#pragma unroll
    for (int r = 0; r < R; r++) {
      const uint4 q = *(const uint4*)(codes + r * stride + c * 16);
      i32 d = 0, neg = 0;
      dot8_split(q.x, xa.x, xa.y, d, neg);
      dot8_split(q.y, xa.z, xa.w, d, neg);
      dot8_split(q.z, xb.x, xb.y, d, neg);
      dot8_split(q.w, xb.z, xb.w, d, neg);
      d -= neg;
      out[r] += (float)d * (e4m3(scales[r * sstride + g]) * xscale);
    }
  }
#pragma unroll
  for (int r = 0; r < R; r++) out[r] = warp_sum(out[r]);
}

// Per-block state of moe_one (dynamic shared memory, then the stages).
struct Moe1Shared {
  i32 ids[MOE1_MAX_SLOTS];
  float wts[MOE1_MAX_SLOTS];
  int tk[MOE1_STAGES];     // the ticket of each stage
  int routed;              // ids and wts hold this token's routing
  int router_done;         // thread 0 saw the router's items done
  int last;                // this block finished an output row block last
  float score[MOE1_MAX_EXPERTS], choice[MOE1_MAX_EXPERTS], pick[MOE1_MAX_SLOTS];
  union {
    struct {  // a down item: the slot's h in int8
      __align__(16) i8 hq[MOE1_MAX_I];
      float hs[MOE1_MAX_I / 32];
    } d;
    __align__(16) float x[MOE1_MAX_K];  // a router item: the input row
  } u;
};

// The expert choice of route_warp by the whole block, from E <= 64 logits
// (through L2: other blocks wrote them): thread e ranks expert e's choice
// among all (ties to the lower index); the first topk ranks win, in rank
// order, and their weights are normalised in that order, as route_warp
// does. The caller synchronises after.
DEVICE void moe1_route(const float* logits, const float* __restrict__ bias, int E, int topk, int norm,
                       float scaling, Moe1Shared& sm) {
  const int tid = threadIdx.x;
  if (tid < E) {
    const float acc = __ldcg(logits + tid);
    const float sg = (float)(1.0 / (1.0 + exp(-(double)acc)));
    sm.score[tid] = sg;
    sm.choice[tid] = sg + bias[tid];
  }
  __syncthreads();
  if (tid < E) {
    const float c = sm.choice[tid];
    int rank = 0;
    for (int j = 0; j < E; j++) {
      const float o = sm.choice[j];
      rank += o > c || (o == c && j < tid);
    }
    if (rank < topk) {
      sm.ids[rank] = tid;
      sm.pick[rank] = sm.score[tid];
    }
  }
  __syncthreads();
  if (tid < topk) {
    float sum = 0.f;
    for (int k = 0; k < topk; k++) sum += sm.pick[k];
    float w = sm.pick[tid];
    if (norm) w /= sum + 1e-20f;
    sm.wts[tid] = w * scaling;
  }
}

extern "C" __global__ void __launch_bounds__(MOE1_THREADS, 3)
    moe_one(const Expert* __restrict__ experts, int nexperts, int topk, int nshared, int I, int K,
            int gshift, const float* __restrict__ W, const float* __restrict__ xf,
            const float* __restrict__ bias, int norm, float scaling, float* logits, i32* ids,
            float* wts, const i8* __restrict__ xq, const float* __restrict__ xs, float* h,
            float* partial, u32* ctl, float* __restrict__ y, int accumulate, int flags) {
  extern __shared__ __align__(16) u8 moe1_smem[];
  static_assert(sizeof(Moe1Shared) <= MOE1_HEAD, "moe_one's shared state outgrew MOE1_HEAD");
  static_assert(MOE1_STAGES == 3, "the cp.async waits below count three stages");
  Moe1Shared& sm = *(Moe1Shared*)moe1_smem;
  u8* const stages = moe1_smem + MOE1_HEAD;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int S = topk + nshared;
  const int nr = W ? (nexperts + MOE1_NW - 1) / MOE1_NW : 0;  // router items
  const int ngu = I / MOE1_GU_ROWS, ndn = K / MOE1_DN_ROWS;     // items per slot
  const int total = nr + S * (ngu + ndn);
  const int G = 32 << gshift, GKx = (K >> 5) >> gshift, GKh = (I >> 5) >> gshift;
  const int Cx = K >> 5, Ch = I >> 5;
  PDL_LAUNCH();
  PDL_WAIT();

  auto expert_of = [&](int slot) -> const Expert& {
    return experts[slot < topk ? sm.ids[slot] : nexperts + (slot - topk)];
  };
  // This token's routing into sm once the router's items are done (or
  // from ids and wts when the router ran before). Block-wide.
  auto route = [&]() {
    if (W) {
      moe1_route(logits, bias, nexperts, topk, norm, scaling, sm);
    } else if (tid < topk) {
      sm.ids[tid] = __ldcg(ids + tid);
      sm.wts[tid] = __ldcg(wts + tid);
    }
    __syncthreads();
    if (tid == 0) sm.routed = 1;
    __syncthreads();
  };
  // Item t's weights into stage st (block-wide; one cp.async group per
  // call, empty when there is nothing to load).
  auto issue = [&](int t, int st) {
    int slot, sub;
    const int kind = t < total ? moe1_item(t, nr, topk, nshared, ngu, ndn, slot, sub) : 0;
    if (kind != 0) {
      const Expert& ex = expert_of(slot);
      u8* b = stages + st * MOE1_STAGE;
      if (kind == 1) {
        const int row0 = sub * MOE1_GU_ROWS, cb = MOE1_GU_ROWS * (K / 2), sb = MOE1_GU_ROWS * GKx;
        copy_async(b, ex.gate.codes + (size_t)row0 * (K / 2), cb);
        copy_async(b + cb, ex.up.codes + (size_t)row0 * (K / 2), cb);
        copy_async(b + MOE1_CODES, ex.gate.scales + (size_t)row0 * GKx, sb);
        copy_async(b + MOE1_CODES + sb, ex.up.scales + (size_t)row0 * GKx, sb);
        copy_async(b + MOE1_CODES + MOE1_SCALES, (const u8*)(ex.gate.row_scale + row0), MOE1_GU_ROWS * 4);
        copy_async(b + MOE1_CODES + MOE1_SCALES + MOE1_GU_ROWS * 4, (const u8*)(ex.up.row_scale + row0), MOE1_GU_ROWS * 4);
      } else {
        const int row0 = (sub - ngu) * MOE1_DN_ROWS;
        copy_async(b, ex.down.codes + (size_t)row0 * (I / 2), MOE1_DN_ROWS * (I / 2));
        copy_async(b + MOE1_CODES, ex.down.scales + (size_t)row0 * GKh, MOE1_DN_ROWS * GKh);
        copy_async(b + MOE1_CODES + MOE1_SCALES, (const u8*)(ex.down.row_scale + row0), MOE1_DN_ROWS * 4);
      }
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
  };
  // Loads are issued in ticket order (cp.async groups complete in commit
  // order), as far as the routing allows: a routed item's loads wait until
  // the routing is known. issued counts the tickets from item i on whose
  // loads are committed (the same in every thread).
  int issued = 0;
  auto issue_more = [&](int i) {
    while (issued < MOE1_STAGES) {
      const int t = sm.tk[(i + issued) % MOE1_STAGES];
      int slot, sub;
      if (t < total && moe1_item(t, nr, topk, nshared, ngu, ndn, slot, sub) != 0 && slot < topk && !sm.routed) break;
      issue(t, (i + issued) % MOE1_STAGES);
      issued++;
    }
  };

  // Prologue: the first MOE1_STAGES tickets (their loads go out in the
  // first iteration).
  if (tid == 0) {
    sm.routed = 0;
    sm.router_done = nr == 0;
    for (int st = 0; st < MOE1_STAGES; st++)
      sm.tk[st] = (flags & 1) ? (int)(blockIdx.x + st * gridDim.x) : (int)atomicAdd(&ctl[MOE1_TICKETS], 1u);
  }
  __syncthreads();
  if (!W) route();

  for (int i = 0;; i++) {
    const int cur = i % MOE1_STAGES;
    const int item = sm.tk[cur];
    if (item >= total) break;  // the later tickets are larger
    if (!sm.routed && sm.router_done) route();
    issue_more(i);
    u32 next = 0;
    if (tid == 0)  // in flight during the item
      next = (flags & 1) ? blockIdx.x + (i + MOE1_STAGES) * gridDim.x : atomicAdd(&ctl[MOE1_TICKETS], 1u);
    int slot, sub;
    const int kind = moe1_item(item, nr, topk, nshared, ngu, ndn, slot, sub);
    u8* const b = stages + cur * MOE1_STAGE;
    if (issued == 0) {
      // This item is routed and the routing unknown: its turn has come,
      // so waiting here holds up no earlier item.
      moe1_wait(&ctl[MOE1_ROUTED], (u32)nr);
      route();
      issue_more(i);
    }
    // This item's group is the oldest of the issued ones.
    if (issued == 1) {
      asm volatile("cp.async.wait_group 0;" ::: "memory");
    } else if (issued == 2) {
      asm volatile("cp.async.wait_group 1;" ::: "memory");
    } else {
      asm volatile("cp.async.wait_group 2;" ::: "memory");
    }
    __syncthreads();

    if (kind == 0) {
      // Router: warp w computes logit NW * item + w as moe_router_route
      // (lane l sums columns l, l + 32, ... in order): the weight row's
      // loads all in flight, the input row from shared memory.
      const int e = item * MOE1_NW + warp;
      float wv[MOE1_MAX_K / 32];
      if (e < nexperts) {
        const float* wr = W + (size_t)e * K;
#pragma unroll
        for (int u = 0; u < MOE1_MAX_K / 32; u++)
          if (32 * u < K) wv[u] = wr[lane + 32 * u];
      }
      for (int k = tid * 4; k < K; k += MOE1_THREADS * 4) *(float4*)&sm.u.x[k] = *(const float4*)(xf + k);
      __syncthreads();
      if (e < nexperts) {
        float acc = 0.f;
#pragma unroll
        for (int u = 0; u < MOE1_MAX_K / 32; u++)
          if (32 * u < K) acc += wv[u] * sm.u.x[lane + 32 * u];
        acc = warp_sum(acc);
        if (lane == 0) logits[e] = acc;
      }
      moe1_signal(&ctl[MOE1_ROUTED]);
    } else if (kind == 1) {
      // Gate/up: warp w takes R/2 rows of this item's of both matrices.
      const int cb = MOE1_GU_ROWS * (K / 2), sb = MOE1_GU_ROWS * GKx, rw = warp * (MOE1_R / 2);
      // Rows r < R/2 from gate, the others from up: two calls of R/2 rows
      // would change nothing in the order, one call keeps the loads together.
      float og[MOE1_R / 2], ou[MOE1_R / 2];
      moe1_dot<MOE1_R / 2, false>(b + rw * (K / 2), K / 2, b + MOE1_CODES + rw * GKx, GKx, Cx, gshift, xq, xs, og);
      moe1_dot<MOE1_R / 2, false>(b + cb + rw * (K / 2), K / 2, b + MOE1_CODES + sb + rw * GKx, GKx, Cx, gshift, xq, xs, ou);
      const float* rs = (const float*)(b + MOE1_CODES + MOE1_SCALES);
#pragma unroll
      for (int r = 0; r < MOE1_R / 2; r++) {
        if (lane == r) {
          const int n = sub * MOE1_GU_ROWS + rw + r;
          const float g = og[r] * (rs[rw + r] * 0.5f);
          const float u = ou[r] * (rs[MOE1_GU_ROWS + rw + r] * 0.5f);
          h[(size_t)slot * I + n] = silu(g) * u;
        }
      }
      // The routing for the caller, once (the first routed gate/up item).
      if (W && slot == 0 && sub == 0 && tid < topk) {
        ids[tid] = sm.ids[tid];
        wts[tid] = sm.wts[tid];
      }
      moe1_signal(&ctl[MOE1_HDONE(slot)]);
    } else {
      // Down: warp w takes R rows of this item's, after the slot's h is
      // complete and quantized into shared memory.
      const int bi = sub - ngu, rw = warp * MOE1_R;
      moe1_wait(&ctl[MOE1_HDONE(slot)], (u32)ngu);
      // The slot's h to int8 in groups of G, as moe_down_q: warp w takes
      // groups w, w + NW, ..., the first MOE1_QG of them with every load
      // issued before the first use.
      const float* hr = h + (size_t)slot * I;
      const int Eg = G >> 5;
      auto quant_group = [&](int g, const float(&v)[4]) {
        float amax = 0.f;
#pragma unroll
        for (int e = 0; e < 4; e++)
          if (e < Eg) amax = fmaxf(amax, fabsf(v[e]));
        amax = warp_max(amax);
        const float scale = amax / 127.f;
        const int k0 = g * G + lane * Eg;
#pragma unroll
        for (int e = 0; e < 4; e++)
          if (e < Eg) sm.u.d.hq[k0 + e] = (i8)quant8(v[e], amax, scale);
        if (lane == 0) sm.u.d.hs[g] = amax == 0.f ? 0.f : scale;
      };
      {
        float v[MOE1_QG][4];
#pragma unroll
        for (int j = 0; j < MOE1_QG; j++) {
          const int g = warp + MOE1_NW * j;
#pragma unroll
          for (int e = 0; e < 4; e++)
            if (g < GKh && e < Eg) v[j][e] = __ldcg(hr + g * G + lane * Eg + e);
        }
#pragma unroll
        for (int j = 0; j < MOE1_QG; j++)
          if (warp + MOE1_NW * j < GKh) quant_group(warp + MOE1_NW * j, v[j]);
      }
      for (int g = warp + MOE1_NW * MOE1_QG; g < GKh; g += MOE1_NW) {
        float v[4];
#pragma unroll
        for (int e = 0; e < 4; e++)
          if (e < Eg) v[e] = __ldcg(hr + g * G + lane * Eg + e);
        quant_group(g, v);
      }
      __syncthreads();
      float out[MOE1_R];
      moe1_dot<MOE1_R, true>(b + rw * (I / 2), I / 2, b + MOE1_CODES + rw * GKh, GKh, Ch, gshift, sm.u.d.hq,
                             sm.u.d.hs, out);
      const float* rs = (const float*)(b + MOE1_CODES + MOE1_SCALES);
#pragma unroll
      for (int r = 0; r < MOE1_R; r++)
        if (lane == r) partial[(size_t)slot * K + bi * MOE1_DN_ROWS + rw + r] = out[r] * (rs[rw + r] * 0.5f);
      // The last of the S items of this row block sums the slots in
      // order (moe_down_sum).
      __syncthreads();
      if (tid == 0) {
        __threadfence();
        sm.last = atomicAdd(&ctl[MOE1_CTL + bi], 1u) == (u32)(S - 1);
      }
      __syncthreads();
      if (sm.last) {
        if (!sm.routed) {
          moe1_wait(&ctl[MOE1_ROUTED], (u32)nr);
          route();
        }
        __threadfence();
        const int n = bi * MOE1_DN_ROWS + tid;
        if (tid < MOE1_DN_ROWS) {
          float t = 0.f;
          for (int q = 0; q < S; q++) {
            const float wq = q < topk ? sm.wts[q] : 1.f;
            t += wq * __ldcg(partial + (size_t)q * K + n);
          }
          y[n] = accumulate ? y[n] + t : t;
        }
        if (tid == 0) ctl[MOE1_CTL + bi] = 0;
      }
    }
    // The ticket for this stage, three items on; and whether the router
    // is done, for the loads of routed items ahead.
    issued--;
    __syncthreads();
    if (tid == 0) {
      sm.tk[cur] = (int)next;
      if (!sm.router_done) sm.router_done = ld_acquire(&ctl[MOE1_ROUTED]) >= (u32)nr;
    }
    __syncthreads();
  }
  asm volatile("cp.async.wait_all;" ::: "memory");
  // The last block to leave resets the counters for the next launch.
  if (tid == 0) {
    __threadfence();
    if (atomicAdd(&ctl[MOE1_LEFT], 1u) == gridDim.x - 1) {
      ctl[MOE1_TICKETS] = 0;
      ctl[MOE1_ROUTED] = 0;
      ctl[MOE1_LEFT] = 0;
      for (int q = 0; q < S; q++) ctl[MOE1_HDONE(q)] = 0;
      __threadfence();
    }
  }
}

