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
      const float s = sigmoid(acc);
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
    rc[r] = code_row<true>(ex.gate.codes, n, K);
    rs[r] = ex.gate.scales + (size_t)n * GK;
    rc[4 + r] = code_row<true>(ex.up.codes, n, K);
    rs[4 + r] = ex.up.scales + (size_t)n * GK;
  }
  // Lane r < 4: gate row r's sum, and up row r's from lane 4 + r.
  const float og = gemv_dot<1, 8, true, false, false, true>(rc, rs, K, gshift, xq, xs, xsum);
  const float ou = __shfl_down_sync(0xffffffffu, og, 4);
  const int n = row0 + lane;
  if (lane < 4 && n < I) {
    const float g = og * (ex.gate.row_scale[n] * 0.5f);
    const float u = ou * (ex.up.row_scale[n] * 0.5f);
    h[(size_t)slot * I + n] = silu(g) * u;
  }
}

// A warp's 4 down-product rows from row0 of one slot (v: row r's in lane
// r, before the row scale) into partial[slot][n], one lane each.
DEVICE void moe_down_store(float v, const float* __restrict__ row_scale, int row0, int N, int slot,
                           float* __restrict__ partial) {
  const int lane = threadIdx.x & 31, n = row0 + lane;
  if (lane < 4 && n < N) partial[(size_t)slot * N + n] = v * (row_scale[n] * 0.5f);
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
      rc[r] = code_row<true>(ex.down.codes, n, I);
      rs[r] = ex.down.scales + (size_t)n * GK;
    }
    const float v = gemv_dot<1, 4, true, false, false, true>(rc, rs, I, gshift, hq + (size_t)slot * I,
                                                             hs + (size_t)slot * GK, hsum + (size_t)slot * (I / 32));
    moe_down_store(v, ex.down.row_scale, row0, N, slot, partial);
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
  const int G = 32 << gshift, GK = I >> (5 + gshift), E = G >> 5;
  PDL_WAIT();
  // This block's rows of the slot's down matrix go to L2 while h is
  // quantized below.
  const Expert& ex = experts[slot_expert(ids, slot, topk, nexperts)];
  const u8* rc[4];
  const u8* rs[4];
#pragma unroll
  for (int r = 0; r < 4; r++) {
    const int n = min(row0 + r, N - 1);
    rc[r] = code_row<true>(ex.down.codes, n, I);
    rs[r] = ex.down.scales + (size_t)n * GK;
  }
  if (row0 < N) {
    const int pieces = I / 128;  // a row's 64-byte pieces (tile-major: 1 KB apart)
#pragma unroll
    for (int r = 0; r < 4; r++)
      for (int i = lane; i < pieces; i += 32) asm volatile("prefetch.global.L2 [%0];" ::"l"(rc[r] + code_off<true>(i * 64)));
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
    const float v = gemv_dot<1, 4, true, true, false, true>(rc, rs, I, gshift, sq, ss, nullptr);
    moe_down_store(v, ex.down.row_scale, row0, N, slot, partial);
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
      const float sg = sigmoid(acc);
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

// The router's input row (rxs, K floats) in int8 groups of G for the MoE
// kernels (xq [T][K], xs, xsum as rmsnorm_quant without a gain, the same
// bits): this warp takes groups g0, g0 + gstep, ... of token t.
DEVICE void router_quant_groups(const float* rxs, int K, int G, int t, int g0, int gstep, int lane,
                                i8* __restrict__ xq, float* __restrict__ xs, i32* __restrict__ xsum) {
  const int Eg = G >> 5, ng = K >> log2_pow2(G);  // K / G
  for (int g = g0; g < ng; g += gstep) {
    const int k0 = g * G + lane * Eg;
    float v[4];
#pragma unroll
    for (int u = 0; u < 4; u++)
      if (u < Eg) v[u] = rxs[k0 + u];
    quant_group_warp(v, Eg, lane, xq + (size_t)t * K + k0, xsum + (size_t)t * (K / 32) + k0 / 32,
                     xs + (size_t)t * ng + g);
  }
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
  __shared__ float partial[32];
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
#pragma unroll
      for (int e = 0; e < 8; e++) raw[k0 + e] = v[e];
      sumsq8_partial(v, lane, warp, partial + j * 8);
    }
  } else {
    float s = 0;
    for (int k = tid; k < K; k += 256) {
      const float v = mode == 2 ? a[k] + c[k] : x[k];
      raw[k] = v;
      s += v * v;
    }
    s = warp_sum(s);
    if (lane == 0) partial[warp] = s;
  }
  __syncthreads();
  if (tid == 0) {
    inv_s = norm_inv(partial, layout8 ? K >> 8 : 8, K, eps);
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
  router_quant_groups(xn, K, G, 0, warp, 8, lane, xq, xs, xsum);
  if (tid == 0) counters[0] = 0;
}

// The choice of token t's experts from its E logits (lg, thread tid's
// logit for tid < E), every thread of the block taking part: the sigmoid
// scores with the bias, ranked one thread per expert (ties to the lower
// index), the topk winners written in rank order with their weights
// normalised in that order: route_warp's result.
DEVICE void router_choose(int tid, int E, float lg, const float* __restrict__ bias, int topk, int norm,
                          float scaling, int t, i32* __restrict__ ids, float* __restrict__ wts,
                          float* score, float* choice, float* pick) {
  if (tid < E) {
    const float sg = sigmoid(lg);
    score[tid] = sg;
    choice[tid] = sg + bias[tid];
  }
  __syncthreads();
  if (tid < E) {
    // choice (16-byte aligned) four at a time, eight reads in flight: the
    // rank is a count, so the order of its terms does not matter.
    const float c = choice[tid];
    int rank = 0, j = 0;
#pragma unroll 8
    for (; j + 4 <= E; j += 4) {
      const float4 o = *(const float4*)&choice[j];
      rank += (o.x > c || (o.x == c && j < tid)) + (o.y > c || (o.y == c && j + 1 < tid)) +
              (o.z > c || (o.z == c && j + 2 < tid)) + (o.w > c || (o.w == c && j + 3 < tid));
    }
    for (; j < E; j++) {
      const float o = choice[j];
      rank += o > c || (o == c && j < tid);
    }
    if (rank < topk) {
      ids[(size_t)t * topk + rank] = tid;
      pick[rank] = score[tid];
    }
  }
  __syncthreads();
  if (tid < topk) wts[(size_t)t * topk + tid] = route_weight(pick, topk, tid, norm, scaling);
}

// moe_router_route with one round of loads and a parallel choice: blocks
// of 4 warps, warp w of block b computing logit e = 4b + w of token t in
// moe_router_route's order, its whole weight row (K <= 2048) requested at
// once and the input row from shared memory (rxs, K floats); the last of
// the nb blocks of a token to finish (counters[t], which it resets) ranks
// the E <= 128 choices, one thread per expert (ties to the lower index),
// and writes the topk winners in rank order with their weights normalised
// in that order: route_warp's result. With xq, the blocks also write the
// input row's int8 form in groups of G (xq [T][K], xs, xsum as
// rmsnorm_quant without a gain, the same bits), warp w of block b taking
// groups b + w*nb, ...: the MoE kernels' input without a launch of its own.
#define ROUTER_FAST_MAX_K 2048

// Expert e's router weights a warp holds: lane + 32u of the row, u < K/32
// (the slots past K/32 hold a copy of the last, which no dot reads). The
// loads carry no condition: each under its own, ptxas placed them after
// the kernels' griddepcontrol.wait, so that they were asked for only once
// the launch before had finished.
DEVICE void router_row(const float* W, int K, int e, int lane, float (&wv)[ROUTER_FAST_MAX_K / 32]) {
  const float* w = W + (size_t)e * K + lane;
#pragma unroll
  for (int u = 0; u < ROUTER_FAST_MAX_K / 32; u++) wv[u] = __ldg(w + min(32 * u, K - 32));
}
// router_row with a condition a load, for the serving rows' form, where the
// loads without them spilled 4 bytes (moe_router_cluster_norm_rows2, NVRTC
// 12.4).
DEVICE void router_row_guarded(const float* W, int K, int e, int lane, float (&wv)[ROUTER_FAST_MAX_K / 32]) {
  const float* w = W + (size_t)e * K;
#pragma unroll
  for (int u = 0; u < ROUTER_FAST_MAX_K / 32; u++)
    if (32 * u < K) wv[u] = w[lane + 32 * u];
}

// router_dot: the dot of a warp's router row wv with the row xs in shared
// memory, this lane's terms u < K/32 in order (one fma chain), before the
// warp's sum. The loads go in batches of 16 under one condition: with one
// condition a term, ptxas kept two loads in flight, so that the chain
// waited for shared memory every other term. The same bits; on an H200
// 0.3 us a layer less (BenchmarkDecodeLayerMoE's router+moe).
DEVICE float router_dot(const float* wv, const float* xs, int K, int lane) {
  float acc = 0.f;
#pragma unroll
  for (int g = 0; g < ROUTER_FAST_MAX_K / 512; g++) {
    if (512 * g + 512 <= K) {
      float x[16];
#pragma unroll
      for (int i = 0; i < 16; i++) x[i] = xs[lane + 32 * (16 * g + i)];
#pragma unroll
      for (int i = 0; i < 16; i++) acc += wv[16 * g + i] * x[i];
    } else {
#pragma unroll
      for (int i = 0; i < 16; i++)
        if (32 * (16 * g + i) < K) acc += wv[16 * g + i] * xs[lane + 32 * (16 * g + i)];
    }
  }
  return acc;
}
DEVICE void router_fast_block(int b, int nb, int t, float* rxs, const float* __restrict__ W, int E,
                              int K, const float* __restrict__ x, int ldx, float* logits, int ldl,
                              const float* __restrict__ bias, int topk, int norm, float scaling,
                              i32* __restrict__ ids, float* __restrict__ wts,
                              u32* __restrict__ counters, i8* __restrict__ xq,
                              float* __restrict__ xs, i32* __restrict__ xsum, int G) {
  __shared__ float score[128], pick[32];
  __shared__ __align__(16) float choice[128];
  __shared__ bool last;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int e = b * 4 + warp;
  float wv[ROUTER_FAST_MAX_K / 32];
  if (e < E) router_row(W, K, e, lane, wv);
  PDL_WAIT();
  const float* xr = x + (size_t)t * ldx;
  for (int k = tid * 4; k < K; k += 512) *(float4*)&rxs[k] = *(const float4*)(xr + k);
  __syncthreads();
  if (e < E) {
    const float acc = warp_sum(router_dot(wv, rxs, K, lane));
    if (lane == 0) logits[(size_t)t * ldl + e] = acc;
  }
  if (xq) router_quant_groups(rxs, K, G, t, warp * nb + b, 4 * nb, lane, xq, xs, xsum);
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    last = atomicAdd(&counters[t], 1u) == (u32)(nb - 1);
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  const float lg = tid < E ? __ldcg(logits + (size_t)t * ldl + tid) : 0.f;
  router_choose(tid, E, lg, bias, topk, norm, scaling, t, ids, wts, score, choice, pick);
  if (tid == 0) counters[t] = 0;
}

// The router launch: grid (ceil(E/4), T) blocks of router_fast_block;
// dynamic shared memory K floats.
extern "C" __global__ void __launch_bounds__(128)
    moe_router_fast(const float* __restrict__ W, int E, int K, const float* __restrict__ x, int ldx,
                    float* logits, int ldl, const float* __restrict__ bias, int topk, int norm,
                    float scaling, i32* __restrict__ ids, float* __restrict__ wts,
                    u32* __restrict__ counters, i8* __restrict__ xq, float* __restrict__ xs,
                    i32* __restrict__ xsum, int G) {
  PDL_LAUNCH();
  extern __shared__ __align__(16) float rxs[];  // [K] the input row
  router_fast_block(blockIdx.x, gridDim.x, blockIdx.y, rxs, W, E, K, x, ldx, logits, ldl, bias, topk,
                    norm, scaling, ids, wts, counters, xq, xs, xsum, G);
}

// The router launch for E = 64 as one cluster of 8 blocks of 8 warps a
// token (grid (8, T)): warp w of block b computes logit 8b + w as
// router_fast_block's warps do, and stores it, besides logits, into the
// shared memory of the cluster's first block, which after a cluster
// barrier ranks the 64 choices as router_fast_block's last block does
// (the same bits): no counter, no fences, no reload of the logits from
// memory. The blocks also write the input row's int8 form (xq, xs, xsum),
// warp w of block b taking groups b + 8w, .... Dynamic shared memory K
// floats.
#define ROUTER_CLUSTER 8

extern "C" __global__ void __cluster_dims__(ROUTER_CLUSTER, 1, 1) __launch_bounds__(256)
    moe_router_cluster(const float* __restrict__ W, int K, const float* __restrict__ x, int ldx,
                       float* logits, int ldl, const float* __restrict__ bias, int topk, int norm,
                       float scaling, i32* __restrict__ ids, float* __restrict__ wts,
                       i8* __restrict__ xq, float* __restrict__ xs, i32* __restrict__ xsum, int G) {
  PDL_LAUNCH();
  extern __shared__ __align__(16) float rxs[];  // [K] the input row
  __shared__ float clog[64], score[64], pick[32];
  __shared__ __align__(16) float choice[64];
  const int E = 64, nb = ROUTER_CLUSTER, b = blockIdx.x, t = blockIdx.y;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int e = b * 8 + warp;
  // Every block of the cluster has started before any writes into the
  // first one's shared memory (the wait below, before the stores).
  cluster_arrive();
  float wv[ROUTER_FAST_MAX_K / 32];
  router_row(W, K, e, lane, wv);
  PDL_WAIT();
  const float* xr = x + (size_t)t * ldx;
  for (int k = tid * 4; k < K; k += 1024) *(float4*)&rxs[k] = *(const float4*)(xr + k);
  __syncthreads();
  const float acc = warp_sum(router_dot(wv, rxs, K, lane));
  if (lane == 0) logits[(size_t)t * ldl + e] = acc;
  if (xq) router_quant_groups(rxs, K, G, t, warp * nb + b, 8 * nb, lane, xq, xs, xsum);
  cluster_wait();
  if (lane == 0) st_cluster(&clog[e], 0, acc);
  // The release of this arrive and the acquire of the wait order every
  // block's stores into clog before the first block reads them.
  cluster_arrive();
  cluster_wait();
  if (cluster_rank() != 0) return;
  router_choose(tid, E, tid < E ? clog[tid] : 0.f, bias, topk, norm, scaling, t, ids, wts, score, choice,
                pick);
}

// The routers' residual add: v = a + c for this thread's 8 values at k0
// (on: k0 < K), and this warp's sum of their squares in
// partial[warp].
DEVICE void router_add_row(const float* a, const float* c, int k0, bool on, int lane, int warp, float* v,
                           float* partial) {
  if (on) {
    const float4 a0 = *(const float4*)(a + k0), a1 = *(const float4*)(a + k0 + 4);
    const float4 c0 = *(const float4*)(c + k0), c1 = *(const float4*)(c + k0 + 4);
    v[0] = a0.x + c0.x; v[1] = a0.y + c0.y; v[2] = a0.z + c0.z; v[3] = a0.w + c0.w;
    v[4] = a1.x + c1.x; v[5] = a1.y + c1.y; v[6] = a1.z + c1.z; v[7] = a1.w + c1.w;
    sumsq8_partial(v, lane, warp, partial);
  }
}

// The routers' norm and logit, after router_add_row (every thread of the
// block): every thread sums the warps' partials in order (norm_inv8, as
// the single-row norms do: no second barrier, no loop); n = gain *
// norm(v) for this thread's values, the row in rxs; returns this warp's
// logit, the dot of its expert's row wv with rxs.
DEVICE float router_norm_logit(const float* wv, const float* gv, const float* v, bool on, int lane, int k0,
                               int K, float eps, const float* partial, float* rxs, float* n) {
  __syncthreads();
  if (on) {
    const float inv = norm_inv8(partial, K >> 8, K, eps);
#pragma unroll
    for (int i = 0; i < 8; i++) n[i] = gv[i] * (v[i] * inv);
    *(float4*)&rxs[k0] = make_float4(n[0], n[1], n[2], n[3]);
    *(float4*)&rxs[k0 + 4] = make_float4(n[4], n[5], n[6], n[7]);
  }
  __syncthreads();
  return warp_sum(router_dot(wv, rxs, K, lane));
}

// moe_router_cluster with the residual add and single-row RMSNorm that
// make its input (d = a + c, then the norm of d) in its launch: every block of the cluster normalises the row into shared
// memory as rmsnorm_quant8 does (K/8 threads of 8 values, the squares
// summed in its order, the same bits), then takes its logits from there.
// Blocks 1-7 also write the norm's int8 form in groups of NG (nq, ns,
// nsum; warp w of block b taking groups b - 1 + 7w, ...) and, with xq, the
// MoE's in groups of G, while the logits go to the first block, which
// meanwhile only waits for them; after the cluster's last barrier, when every block
// has read the inputs (d may be a or c), block b writes d and out
// for the threads tid = b mod 8. K a multiple of 256, at most 2048.
//
// router_cluster_norm_row is the body of moe_router_cluster_norm_rows
// (below; moe_router_cluster_norm, after it, is the single-row form with
// its exchange rearranged) for token row t (its a, c, d, out
// and logits at their row strides; the int8 forms and the choice at row
// t). xq, when not null, also takes the MoE's int8 form in groups of G;
// out the norm's output, where OUT or out is not null.
template <bool OUT>
DEVICE void router_cluster_norm_row(const float* __restrict__ W, int K, float* logits, int ldl,
                                    const float* __restrict__ bias, int topk, int norm, float scaling,
                                    i32* __restrict__ ids, float* __restrict__ wts, i8* __restrict__ xq,
                                    float* __restrict__ xs, i32* __restrict__ xsum, int G, float* d, int ldd,
                                    const float* a, int lda, const float* c, int ldc,
                                    const float* __restrict__ gain, float eps, float* out, int ldo,
                                    i8* __restrict__ nq, float* __restrict__ ns, i32* __restrict__ nsum, int NG,
                                    int t) {
  PDL_LAUNCH();
  extern __shared__ __align__(16) float rxs[];  // [K] the normalised row
  __shared__ float clog[64], score[64], pick[32];
  __shared__ __align__(16) float choice[64];
  __shared__ float partial[8];
  const int E = 64, nb = ROUTER_CLUSTER, b = blockIdx.x;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int e = b * 8 + warp, k0 = tid * 8;
  const bool on = k0 < K;
  cluster_arrive();
  float wv[ROUTER_FAST_MAX_K / 32];
  router_row(W, K, e, lane, wv);
  float gv[8];
  if (on) ldg8(gain + k0, gv);
  PDL_WAIT();
  float v[8];
  router_add_row(a + (size_t)t * lda, c + (size_t)t * ldc, k0, on, lane, warp, v, partial);
  float n[8];
  const float acc = router_norm_logit(wv, gv, v, on, lane, k0, K, eps, partial, rxs, n);
  if (lane == 0) logits[(size_t)t * ldl + e] = acc;
  cluster_wait();
  if (lane == 0) st_cluster(&clog[e], 0, acc);
  cluster_arrive();
  if (b > 0) {
    // The int8 forms by blocks 1-7 between the arrive and the wait, after
    // the logits' exchange instead of before it; the first block only
    // ranks the choices.
    router_quant_groups(rxs, K, NG, t, warp * (nb - 1) + b - 1, 8 * (nb - 1), lane, nq, ns, nsum);
    if (xq) router_quant_groups(rxs, K, G, t, warp * (nb - 1) + b - 1, 8 * (nb - 1), lane, xq, xs, xsum);
  }
  cluster_wait();
  if (on && (tid & (nb - 1)) == b) {
    float* dr = d + (size_t)t * ldd;
    *(float4*)(dr + k0) = make_float4(v[0], v[1], v[2], v[3]);
    *(float4*)(dr + k0 + 4) = make_float4(v[4], v[5], v[6], v[7]);
    if (OUT || out) {
      float* orow = out + (size_t)t * ldo;
      *(float4*)(orow + k0) = make_float4(n[0], n[1], n[2], n[3]);
      *(float4*)(orow + k0 + 4) = make_float4(n[4], n[5], n[6], n[7]);
    }
  }
  if (cluster_rank() != 0) return;
  router_choose(tid, E, tid < E ? clog[tid] : 0.f, bias, topk, norm, scaling, t, ids, wts, score, choice, pick);
}

// moe_router_cluster_norm: router_cluster_norm_row's work for one row
// (the add, the norm, the logits, the choice, the int8 forms; K a
// multiple of 256, at most 2048; E = 64), with the
// exchange and the choice rearranged so that no cluster barrier lies
// between the logits and the choice: each warp takes its logit's sigmoid
// and choice itself (the bias read before the wait) and stores both into
// the first block's shared memory; the first block set them to a pattern
// that no sigmoid or sum takes (0xffffffff; NaN results are the
// canonical 0x7fffffff) before the cluster's first barrier, and its first
// 64 threads each wait until their expert's two words are written, then
// rank after a barrier of those two warps (router_choose's ranking and
// weights). The cluster's second barrier (every block has read a and c
// before any block writes d) is arrived at right after those reads and
// waited for before the writes. Blocks 1-7 write the int8 forms after
// sending their values. The same values and operations as
// router_cluster_norm_row (the same bits). On an H200
// (BenchmarkDecodeLayerMoE) 0.5 us a layer shorter than that body with
// its barrier exchange.
DEVICE void bar_sync_64() { asm volatile("bar.sync 1, 64;" ::: "memory"); }

extern "C" __global__ void __cluster_dims__(ROUTER_CLUSTER, 1, 1) __launch_bounds__(256)
    moe_router_cluster_norm(const float* __restrict__ W, int K, float* logits, const float* __restrict__ bias,
                            int topk, int norm, float scaling, i32* __restrict__ ids, float* __restrict__ wts,
                            i8* __restrict__ xq, float* __restrict__ xs, i32* __restrict__ xsum, int G,
                            float* d, const float* a, const float* c,
                            const float* __restrict__ gain, float eps, float* out, i8* __restrict__ nq,
                            float* __restrict__ ns, i32* __restrict__ nsum, int NG) {
  PDL_LAUNCH();
  extern __shared__ __align__(16) float rxs[];  // [K] the normalised row
  __shared__ float pick[32];
  __shared__ __align__(16) float score[64];
  __shared__ __align__(16) float choice[64];
  __shared__ float partial[8];
  const int E = 64, nb = ROUTER_CLUSTER, b = blockIdx.x;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int e = b * 8 + warp, k0 = tid * 8;
  const bool on = k0 < K;
  if (b == 0 && tid < E) {
    ((volatile u32*)score)[tid] = CLUSTER_UNSET;
    ((volatile u32*)choice)[tid] = CLUSTER_UNSET;
  }
  cluster_arrive();
  float wv[ROUTER_FAST_MAX_K / 32];
  router_row(W, K, e, lane, wv);
  float gv[8];
  if (on) ldg8(gain + k0, gv);
  const float be = bias[e];
  PDL_WAIT();
  STAGE_DELAY(5);
  float v[8];
  router_add_row(a, c, k0, on, lane, warp, v, partial);
  TRACE_MARK();
  // Every block has started (the first block's pattern is in place); then
  // this block has read a and c. That arrive orders no write (the values
  // read are in registers already), so it goes without the release fence.
  cluster_wait();
  cluster_arrive_relaxed();
  float n[8];
  const float acc = router_norm_logit(wv, gv, v, on, lane, k0, K, eps, partial, rxs, n);
  if (lane == 0) {
    logits[e] = acc;
    const float sg = sigmoid(acc);
    st_cluster(&score[e], 0, sg);
    st_cluster(&choice[e], 0, sg + be);
  }
  TRACE_MARK();
  if (b > 0) {
    router_quant_groups(rxs, K, NG, 0, warp * (nb - 1) + b - 1, 8 * (nb - 1), lane, nq, ns, nsum);
    if (xq) router_quant_groups(rxs, K, G, 0, warp * (nb - 1) + b - 1, 8 * (nb - 1), lane, xq, xs, xsum);
  }
  const bool chooser = b == 0 && tid < E;
  if (chooser) {
    wait_cluster_set(&score[tid]);
    wait_cluster_set(&choice[tid]);
    bar_sync_64();
    const float cv = choice[tid];
    int rank = 0;
#pragma unroll 8
    for (int j = 0; j < E; j += 4) {
      const float4 o = *(const float4*)&choice[j];
      rank += (o.x > cv || (o.x == cv && j < tid)) + (o.y > cv || (o.y == cv && j + 1 < tid)) +
              (o.z > cv || (o.z == cv && j + 2 < tid)) + (o.w > cv || (o.w == cv && j + 3 < tid));
    }
    if (rank < topk) {
      ids[rank] = tid;
      pick[rank] = score[tid];
    }
    bar_sync_64();
    if (tid < topk) wts[tid] = route_weight(pick, topk, tid, norm, scaling);
    TRACE_MARK();
  }
  TRACE_MARK();
  cluster_wait();
  if (on && (tid & (nb - 1)) == b) {
    *(float4*)(d + k0) = make_float4(v[0], v[1], v[2], v[3]);
    *(float4*)(d + k0 + 4) = make_float4(v[4], v[5], v[6], v[7]);
    if (out) {
      *(float4*)(out + k0) = make_float4(n[0], n[1], n[2], n[3]);
      *(float4*)(out + k0 + 4) = make_float4(n[4], n[5], n[6], n[7]);
    }
  }
}

// A table word (E2M1_LO) in a register that the compiler cannot rebuild
// from its constant (it does not know that a byte permute with selector
// 0x3210 copies its first operand), so that it keeps it in one register
// instead of rebuilding the constant before every prmt (prmt takes one
// immediate operand, and E2M1_HI is it).
DEVICE u32 table_reg(u32 t) {
  u32 lane;
  asm volatile("mov.u32 %0, %%laneid;" : "=r"(lane));
  u32 v;
  asm volatile("prmt.b32 %0, %1, %2, 0x3210;" : "=r"(v) : "r"(t), "r"(lane));
  return v;
}

// dot32_split with the low half of the table in a register (lo).
DEVICE i32 dot32_split_lo(uint4 q, uint4 xa, uint4 xb, u32 lo) {
  i32 pos = 0, neg = 0;
  const u32 w[4] = {q.x, q.y, q.z, q.w};
  const u32 x[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const u32 n = w[i] ^ 0x88888888u;
    pos = dp4a_ss(prmt(lo, E2M1_HI, w[i]), x[2 * i], pos);
    pos = dp4a_ss(prmt(lo, E2M1_HI, w[i] >> 16), x[2 * i + 1], pos);
    neg = dp4a_ss(prmt(lo, E2M1_HI, n), x[2 * i], neg);
    neg = dp4a_ss(prmt(lo, E2M1_HI, n >> 16), x[2 * i + 1], neg);
  }
  return pos - neg;
}

// Two FP8 E4M3 scale bytes (bits 0-7 and 8-15 of b) as a half2 through the
// hardware conversion (sm_89 and later; rows_dot uses it only there), and
// one half of it as a float: both steps exact, so the value is e4m3's (NaN
// for 0x7F and 0xFF too).
DEVICE u32 e4m3x2_half2(u32 b) {
  u32 h2 = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm("{ .reg .b16 l; cvt.u16.u32 l, %1; cvt.rn.f16x2.e4m3x2 %0, l; }" : "=r"(h2) : "r"(b));
#endif
  return h2;
}
DEVICE float half2_lo(u32 h2) {
  float f;
  asm("{ .reg .b16 l, h; mov.b32 {l, h}, %1; cvt.f32.f16 %0, l; }" : "=f"(f) : "r"(h2));
  return f;
}
DEVICE float half2_hi(u32 h2) {
  float f;
  asm("{ .reg .b16 l, h; mov.b32 {l, h}, %1; cvt.f32.f16 %0, h; }" : "=f"(f) : "r"(h2));
  return f;
}

// atomicAdd at GPU scope with acquire and release semantics.
DEVICE u32 atom_add_acq_rel(u32* p, u32 v) {
  u32 old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}

// The scale conversion of rows_dot's FAST form for all 256 bytes, in both
// places of a pair (tests): out[2b] from byte b in bits 0-7, out[2b+1]
// from byte b in bits 8-15. One block of 256 threads.
extern "C" __global__ void moe_scale_convert(float* __restrict__ out) {
  const u32 b = threadIdx.x;
  const u32 h2 = e4m3x2_half2(b | (b << 8));
  out[2 * b] = half2_lo(h2);
  out[2 * b + 1] = half2_hi(h2);
}

// gemv_dot in two halves for rows of at most 64 chunks (2048 columns),
// so that a warp can request its weights, then do other work while they
// come: rows_load issues every load of R rows (lane l: chunks l and l+32),
// rows_dot multiplies them by int8 activations in shared memory (sq, with
// group scales ss) and sums the warp (warp_sum_rows: row r's sum in lane
// r), with gemv_dot's lanes, order and operations (the same bits).
//
// The loads are one block of straight code: a lane past a row's end
// (C < 64) loads the row's last chunk, which rows_dot leaves out. Behind a
// branch each, the second half's addresses waited on the scoreboard that
// the first half's loads share, so the halves came one L2 round trip after
// the other. The early return (never taken) keeps the block apart: as
// straight code after the pointers, ptxas moved the loads below the
// caller's griddepcontrol.wait (the volatile loads keep their order only
// in the PTX).
template <int R>
DEVICE void rows_load(const u8* const (&rc)[R], const u8* const (&rs)[R], int C, int gshift,
                      uint4 (&w)[2][R], u32 (&s)[2][R]) {
  const int lane = threadIdx.x & 31;
  if (C <= 0) return;
#pragma unroll
  for (int h = 0; h < 2; h++) {
    const int c = min(32 * h + lane, C - 1);
#pragma unroll
    for (int r = 0; r < R; r++) w[h][r] = load_stream16_v(rc[r] + code_off<true>(c * 16));
#pragma unroll
    for (int r = 0; r < R; r++) s[h][r] = load_u8_v(rs[r] + (c >> gshift));
  }
}

// GLOBAL: sq and ss are in global memory, written by an earlier kernel
// (read through the non-coherent path, as gemv_dot reads its input).
// FAST (0 the earlier form): the table's low word in a register
// (table_reg), dot32_split_lo's products, and the scales
// converted by the hardware, the two chunks' scales of a row packed into
// one register; the same integer products and float operations.
template <int R, bool GLOBAL = false, int FAST = 1>
DEVICE float rows_dot(const uint4 (&w)[2][R], const u32 (&s)[2][R], int C, int gshift,
                      const i8* sq, const float* ss) {
  const int lane = threadIdx.x & 31;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  constexpr bool fast = FAST != 0;
#else
  constexpr bool fast = false;
#endif
  u32 lo = E2M1_LO, sc2[R];
  float out[R];
#pragma unroll
  for (int r = 0; r < R; r++) out[r] = 0.f;
  // Both chunks' activations requested before the products (from global
  // memory, one round trip to L2 instead of two), and before the scales'
  // conversion, which waits for the weights' scoreboard.
  uint4 xa[2], xb[2];
  float xscale[2];
#pragma unroll
  for (int h = 0; h < 2; h++) {
    const int c = 32 * h + lane;
    if (c < C) {
      const uint4* xp = (const uint4*)(sq + c * 32);
      xa[h] = GLOBAL ? __ldg(xp) : xp[0];
      xb[h] = GLOBAL ? __ldg(xp + 1) : xp[1];
      xscale[h] = GLOBAL ? __ldg(ss + (c >> gshift)) : ss[c >> gshift];
    }
  }
  if (fast) {
    lo = table_reg(E2M1_LO);
#pragma unroll
    for (int r = 0; r < R; r++) sc2[r] = e4m3x2_half2(prmt(s[0][r], s[1][r], 0x0040));
  }
#pragma unroll
  for (int h = 0; h < 2; h++) {
    const int c = 32 * h + lane;
    if (c >= C) continue;
#pragma unroll
    for (int r = 0; r < R; r++) {
      if (fast) {
        const float ws = h == 0 ? half2_lo(sc2[r]) : half2_hi(sc2[r]);
        out[r] += (float)dot32_split_lo(w[h][r], xa[h], xb[h], lo) * (ws * xscale[h]);
      } else {
        out[r] += (float)dot32_split(w[h][r], xa[h], xb[h]) * (e4m3(s[h][r]) * xscale[h]);
      }
    }
  }
  return warp_sum_rows(out, lane);
}

// rows_load with the second half of each row's chunks (32 + lane) copied
// by cp.async to wh (R x 32 chunks, row-major), the first into w; both
// halves' scale bytes into s.
template <int R>
DEVICE void rows_load_halves(const u8* const (&rc)[R], const u8* const (&rs)[R], int C, int gshift,
                             uint4 (&w)[R], u32 (&s)[2][R], uint4* wh) {
  const int lane = threadIdx.x & 31;
  if (C <= 0) return;
  const int c0 = min(lane, C - 1), c1 = min(32 + lane, C - 1);
#pragma unroll
  for (int r = 0; r < R; r++) w[r] = load_stream16_v(rc[r] + code_off<true>(c0 * 16));
#pragma unroll
  for (int r = 0; r < R; r++) cp_async16(smem_addr(wh + 32 * r + lane), rc[r] + code_off<true>(c1 * 16), true);
#pragma unroll
  for (int r = 0; r < R; r++) s[0][r] = load_u8_v(rs[r] + (c0 >> gshift));
#pragma unroll
  for (int r = 0; r < R; r++) s[1][r] = load_u8_v(rs[r] + (c1 >> gshift));
}

// rows_dot's FAST products of one half h (chunk 32h + lane of each row),
// added to out: called for h = 0 then 1, the same operations in the same
// order as rows_dot (the same bits); the caller sums the warp.
template <int R>
DEVICE void rows_dot_half(const uint4 (&w)[R], const u32 (&s)[R], int h, int C, int gshift, const i8* sq,
                          const float* ss, float (&out)[R]) {
  const int lane = threadIdx.x & 31, c = 32 * h + lane;
  if (c >= C) return;
  const uint4* xp = (const uint4*)(sq + c * 32);
  const uint4 xa = xp[0], xb = xp[1];
  const float xscale = ss[c >> gshift];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  const u32 lo = table_reg(E2M1_LO);
#pragma unroll
  for (int r = 0; r < R; r++) {
    const float ws = half2_lo(e4m3x2_half2(s[r]));
    out[r] += (float)dot32_split_lo(w[r], xa, xb, lo) * (ws * xscale);
  }
#else
#pragma unroll
  for (int r = 0; r < R; r++) out[r] += (float)dot32_split(w[r], xa, xb) * (e4m3(s[r]) * xscale);
#endif
}

// Groups g0, g0+step, ... (< K/G) of a row of K floats (src, global or
// shared) quantized by one warp into sq, ss (shared memory), as
// rmsnorm_quant without a gain: the same codes and scales. Four groups'
// loads are in flight at a time.
DEVICE void quant_groups(const float* src, bool global, int K, int G, int g0, int step, i8* sq,
                         float* ss) {
  const int lane = threadIdx.x & 31, E = G >> 5, GK = K >> log2_pow2(G);  // K / G
  for (int g = g0; g < GK; g += 4 * step) {
    float v[4][4];
#pragma unroll
    for (int u = 0; u < 4; u++) {
      const int k0 = (g + u * step) * G + lane * E;
#pragma unroll
      for (int e = 0; e < 4; e++)
        if (g + u * step < GK && e < E) v[u][e] = global ? __ldcg(src + k0 + e) : src[k0 + e];
    }
#pragma unroll
    for (int u = 0; u < 4; u++) {
      const int gu = g + u * step;
      if (gu >= GK) break;
      const int k0 = gu * G + lane * E;
      float amax = 0.f;
#pragma unroll
      for (int e = 0; e < 4; e++)
        if (e < E) amax = fmaxf(amax, fabsf(v[u][e]));
      amax = warp_max(amax);
      const float scale = amax / 127.f;
      float x[4];
#pragma unroll
      for (int e = 0; e < 4; e++) x[e] = e < E ? v[u][e] : 0.f;
      i32 q[4];
      quant8_codes(x, amax, scale, q);
#pragma unroll
      for (int e = 0; e < 4; e++)
        if (e < E) sq[k0 + e] = (i8)q[e];
      if (lane == 0) ss[gu] = amax == 0.f ? 0.f : scale;
    }
  }
}


// A token's int8 activations (K) and group scales (GK) into shared memory
// by cp.async: completion is awaited by cp_async_wait_all alone, not by
// the scoreboard of weight loads issued after them.
DEVICE void stage_x_async(const i8* xq, const float* xs, int K, int GK, i8* sx, float* sxs, int tid, int nthreads) {
  for (int i = tid * 16; i < K; i += nthreads * 16) cp_async16(smem_addr(sx + i), xq + i, true);
  for (int i = tid; i < GK; i += nthreads) cp_async_small(smem_addr(sxs + i), xs + i, 4);
}

// The gate and up pointers of an expert.
struct GateUp {
  const u8 *gc, *gs, *uc, *us;
  const float *gr, *ur;
};
DEVICE GateUp gate_up_of(const Expert& e) {
  return GateUp{e.gate.codes, e.gate.scales, e.up.codes, e.up.scales, e.gate.row_scale, e.up.row_scale};
}
// The most routed experts whose pointers gate_up_q holds in shared memory.
#define MOE_TABLE_SMEM 128

// A gate/up block's expert. With stab the routed experts' gate and up
// pointers go into shared memory (tab) while the router runs, so that
// after the wait only the routing is read from memory before the weights
// are requested; else the expert table, written once at load, needs
// nothing from the kernels before (a shared slot does not wait).
DEVICE int gate_up_expert(const Expert* __restrict__ experts, const i32* __restrict__ ids, int slot, int topk,
                          int nexperts, bool stab, GateUp* tab, int tid) {
  if (stab) {
    for (int e = tid; e < nexperts; e += blockDim.x) tab[e] = gate_up_of(experts[e]);
    __syncthreads();
    PDL_WAIT();
    STAGE_DELAY(6);
    return ids[slot];
  }
  if (slot < topk) {
    PDL_WAIT();
    STAGE_DELAY(6);
  }
  return slot_expert(ids, slot, topk, nexperts);
}

// The pointers of a gate/up block's rows of expert ex: gate rows
// row0..row0+3 (at most nmax) in rc/rs[0..3], up rows in rc/rs[4..7].
DEVICE void gate_up_row_ptrs(const GateUp& ex, int row0, int nmax, int K, int GK, const u8* (&rc)[8],
                             const u8* (&rs)[8]) {
#pragma unroll
  for (int r = 0; r < 4; r++) {
    const int n = min(row0 + r, nmax);
    rc[r] = code_row<true>(ex.gc, n, K);
    rs[r] = ex.gs + (size_t)n * GK;
    rc[4 + r] = code_row<true>(ex.uc, n, K);
    rs[4 + r] = ex.us + (size_t)n * GK;
  }
}

// Gate and up products of every slot with the SiLU product, as moe_gate_up
// (the same grid, rows and bits), for K <= 2048: a warp requests its 8
// rows' weights at once (rows_load), the block copies the int8 input to
// shared memory meanwhile, and the products read it from there. Then h
// is quantized for the down products once, not in each of their blocks:
// the last of the G/16 blocks that make a group of G rows of h (counted
// in gcount[slot][group], which it resets) quantizes that group into
// hq, hs (nslots rows of I, as rmsnorm_quant without a gain).
// FAST: rows_dot's FAST products, the routed experts' pointers in shared
// memory before the wait, and the group count by one acquire-release
// atomic.
template <int FAST>
DEVICE void gate_up_q(const Expert* __restrict__ experts, const i32* __restrict__ ids, int topk,
                      int nexperts, int I, int K, int gshift, const i8* __restrict__ xq,
                      const float* __restrict__ xs, float* __restrict__ h, i8* __restrict__ hq,
                      float* __restrict__ hs, u32* __restrict__ gcount) {
  __shared__ __align__(16) i8 sx[ROUTER_FAST_MAX_K];
  __shared__ float sxs[ROUTER_FAST_MAX_K / 32];
  __shared__ GateUp tab[MOE_TABLE_SMEM];
  __shared__ bool last;
  const int slot = blockIdx.y, lane = threadIdx.x & 31, tid = threadIdx.x;
  const int row0 = (blockIdx.x * 4 + (tid >> 5)) * 4;
  const int G = 32 << gshift, GK = K >> (5 + gshift), C = K >> 5;
  const bool stab = FAST && slot < topk && nexperts <= MOE_TABLE_SMEM;
  const int eid = gate_up_expert(experts, ids, slot, topk, nexperts, stab, tab, tid);
  const GateUp ex = stab ? tab[eid] : gate_up_of(experts[eid]);
  const u8* rc[8];
  const u8* rs[8];
  gate_up_row_ptrs(ex, row0, I - 1, K, GK, rc, rs);
  uint4 w[2][8];
  u32 s[2][8];
  rows_load<8>(rc, rs, C, gshift, w, s);
  PDL_WAIT();
  for (int i = tid * 16; i < K; i += 128 * 16) *(uint4*)(sx + i) = __ldg((const uint4*)(xq + i));
  for (int i = tid; i < GK; i += 128) sxs[i] = __ldg(xs + i);
  __syncthreads();
  // Lane r < 4: gate row r's sum, and up row r's from lane 4 + r.
  const float og = rows_dot<8, false, FAST>(w, s, C, gshift, sx, sxs);
  const float ou = __shfl_down_sync(0xffffffffu, og, 4);
  const int n = row0 + lane;
  if (lane < 4 && n < I) {
    const GateUp e = stab ? tab[eid] : gate_up_of(experts[eid]);
    const float g = og * (e.gr[n] * 0.5f);
    const float u = ou * (e.ur[n] * 0.5f);
    h[(size_t)slot * I + n] = silu(g) * u;
  }
  // A block's 16 rows lie in one group of G (16 divides G, and I is a
  // multiple of G).
  const int IG = I >> (5 + gshift), grp = (blockIdx.x * 16) >> (5 + gshift);
  __syncthreads();
  if (FAST) {
    // One acquire-release atomic instead of two full fences around a
    // relaxed one: the barrier before orders the block's stores of h
    // before thread 0's release, and the barrier after orders its acquire
    // before the other threads' loads.
    if (tid == 0) last = atom_add_acq_rel(&gcount[slot * IG + grp], 1u) == (u32)(G / 16 - 1);
    __syncthreads();
    if (!last) return;
  } else {
    if (tid == 0) {
      __threadfence();
      last = atomicAdd(&gcount[slot * IG + grp], 1u) == (u32)(G / 16 - 1);
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
  }
  if (tid < 32) {
    quant_groups(h + (size_t)slot * I, true, I, G, grp, IG, hq + (size_t)slot * I, hs + (size_t)slot * IG);
    if (tid == 0) gcount[slot * IG + grp] = 0;
  }
}

extern "C" __global__ void __launch_bounds__(128, 4)
    moe_gate_up_q(const Expert* __restrict__ experts, const i32* __restrict__ ids, int topk,
                  int nexperts, int I, int K, int gshift, const i8* __restrict__ xq,
                  const float* __restrict__ xs, float* __restrict__ h, i8* __restrict__ hq,
                  float* __restrict__ hs, u32* __restrict__ gcount) {
  PDL_LAUNCH();
  gate_up_q<1>(experts, ids, topk, nexperts, I, K, gshift, xq, xs, h, hq, hs, gcount);
}

// Down products of every slot for 4 output rows a block, summed over the
// slots in the block, from h quantized by moe_gate_up_q: grid ceil(N/4)
// blocks of nslots warps, warp s taking slot s's 4 rows (rows_load, then
// rows_dot with hq, hs from global memory: moe_down_q's products, bit for
// bit); the block sums the slots in slot order with their weights
// (moe_down_sum's order and operations) in shared memory: no partial
// products through memory, no counters. I <= 2048.
//
// The routing (ids, wts) is read before the wait, so that every slot's
// weights are requested before it, not only the shared slots'. Right
// because the routing was written two or more launches back: this kernel
// follows moe_gate_up_q, which reads the same ids after its own wait
// (prelude.cuh: every kernel two or more launches back has finished when
// a kernel starts).
//
// Before its wait a block also asks L2 for up to four spans (ahead[j],
// lines[j] lines of 128 bytes; l2_ahead): the weights of the launch after
// it, whose blocks become resident only as these leave, so that theirs
// are in L2 when they start.
#define DOWN_SLOTS_MAX 8
template <int FAST>
DEVICE void down_hq(const Expert* __restrict__ experts, const i32* __restrict__ ids,
                    const float* __restrict__ wts, int topk, int nexperts, int N, int I, int gshift,
                    const i8* __restrict__ hq, const float* __restrict__ hs, float* __restrict__ y,
                    int accumulate, const u8* const (&ahead)[4], const int (&lines)[4]) {
  __shared__ float part[DOWN_SLOTS_MAX][4], wsm[DOWN_SLOTS_MAX];
  const int slot = threadIdx.x >> 5, lane = threadIdx.x & 31, nslots = blockDim.x >> 5;
  const int row0 = blockIdx.x * 4;
  const int G = 32 << gshift, GK = I >> (5 + gshift), C = I >> 5;
  const Expert& ex = experts[slot_expert(ids, slot, topk, nexperts)];
  const u8* rc[4];
  const u8* rs[4];
#pragma unroll
  for (int r = 0; r < 4; r++) {
    const int n = min(row0 + r, N - 1);
    rc[r] = code_row<true>(ex.down.codes, n, I);
    rs[r] = ex.down.scales + (size_t)n * GK;
  }
  uint4 w[2][4];
  u32 s[2][4];
  // Lane r < 4's row scale by cp.async, as gate/up's: in a register, the
  // product by 0.5 was moved up to the wait and held it for every weight.
  __shared__ float rsm[DOWN_SLOTS_MAX][4];
  if (lane < 4) cp_async_small(smem_addr(&rsm[slot][lane]), ex.down.row_scale + min(row0 + lane, N - 1), 4);
  rows_load<4>(rc, rs, C, gshift, w, s);
  l2_ahead(ahead, lines);
  PDL_WAIT();
  STAGE_DELAY(7);
  TRACE_MARK_DEP(w[0][0].x ^ w[1][3].w);
  if (lane == 0) wsm[slot] = slot < topk ? wts[slot] : 1.f;
  // The row that the sum adds to, requested before the products (after
  // them it was a round trip on the way to the layer's end) by cp.async:
  // loaded into a register, ptxas issued it after the products.
  const int n = row0 + threadIdx.x;
  __shared__ float ysm[4];
  if (accumulate && threadIdx.x < 4 && n < N) cp_async_small(smem_addr(&ysm[threadIdx.x]), y + n, 4);
  const float t = rows_dot<4, true, FAST>(w, s, C, gshift, hq + (size_t)slot * I, hs + (size_t)slot * GK);
  TRACE_MARK();
  cp_async_wait_all();
  const float rsc = lane < 4 ? rsm[slot][lane] : 0.f;
  const float y0 = accumulate && threadIdx.x < 4 && n < N ? ysm[threadIdx.x] : 0.f;
  if (lane < 4) part[slot][lane] = t * (rsc * 0.5f);
  __syncthreads();
  if (threadIdx.x < 4 && n < N) {
    float total = 0.f;
    for (int k = 0; k < nslots; k++) total += wsm[k] * part[k][threadIdx.x];
    y[n] = accumulate ? y0 + total : total;
  }
  TRACE_MARK();
}

extern "C" __global__ void __launch_bounds__(32 * DOWN_SLOTS_MAX)
    moe_down_hq(const Expert* __restrict__ experts, const i32* __restrict__ ids,
                const float* __restrict__ wts, int topk, int nexperts, int N, int I, int gshift,
                const i8* __restrict__ hq, const float* __restrict__ hs, float* __restrict__ y,
                int accumulate, const u8* a0, int n0, const u8* a1, int n1, const u8* a2, int n2, const u8* a3,
                int n3) {
  PDL_LAUNCH();
  const u8* ahead[4] = {a0, a1, a2, a3};
  const int lines[4] = {n0, n1, n2, n3};
  down_hq<1>(experts, ids, wts, topk, nexperts, N, I, gshift, hq, hs, y, accumulate, ahead, lines);
}

// ---------------------------------------------------------------------------
// moe_router_cluster_norm for the 2-64 rows of a serving step: the cluster
// of grid row t takes token row t (d, a, c, out and the logits at their
// row strides; the int8 forms and the choice at row t), each row as the
// single-row kernel takes its one: d = a + c, the norm of d (rmsnorm_quant8's
// order, the same bits) into shared memory, the logits, the choice, and
// after the cluster's last barrier (every block of the row has read a and
// c, which d may be) d and out written by the blocks in turn.
extern "C" __global__ void __cluster_dims__(ROUTER_CLUSTER, 1, 1) __launch_bounds__(256)
    moe_router_cluster_norm_rows(const float* __restrict__ W, int K, float* logits, int ldl,
                                 const float* __restrict__ bias, int topk, int norm, float scaling,
                                 i32* __restrict__ ids, float* __restrict__ wts, float* d, int ldd, const float* a,
                                 int lda, const float* c, int ldc, const float* __restrict__ gain, float eps,
                                 float* out, int ldo, i8* __restrict__ nq, float* __restrict__ ns,
                                 i32* __restrict__ nsum, int NG) {
  router_cluster_norm_row<true>(W, K, logits, ldl, bias, topk, norm, scaling, ids, wts, nullptr, nullptr, nullptr, 0,
                                d, ldd, a, lda, c, ldc, gain, eps, out, ldo, nq, ns, nsum, NG, blockIdx.y);
}

// ---------------------------------------------------------------------------
// moe_router_cluster_norm_rows with R token rows a cluster (grid y =
// ceil(T/R)), so that each block's 8 experts' weights (64 KB at K = 2048,
// read before the wait) serve R rows instead of one: at 32 rows the
// clusters read the router's weights 32/R times instead of 32. On an H200
// (BenchmarkServeLayer) R = 2 took a 32-row layer 0.7 us shorter, R = 4
// 2.5 us longer (a block of four rows at 158 registers). Each row
// as moe_router_cluster_norm_rows takes it, the same bits: d = a + c and
// its norm (rmsnorm_quant8's order) in shared memory (rv, rxs: R rows of
// K), the logits, the choice of row r by block r after the logits'
// exchange, the norm's int8 form by blocks R..7, and after the cluster's
// last barrier d and out written by the blocks in turn. Dynamic shared
// memory 8*R*K bytes.
template <int R>
DEVICE void router_cluster_norm_rows_r(const float* __restrict__ W, int K, float* logits, int ldl,
                                       const float* __restrict__ bias, int topk, int norm, float scaling,
                                       i32* __restrict__ ids, float* __restrict__ wts, float* d, int ldd,
                                       const float* a, int lda, const float* c, int ldc,
                                       const float* __restrict__ gain, float eps, float* out, int ldo,
                                       i8* __restrict__ nq, float* __restrict__ ns, i32* __restrict__ nsum, int NG,
                                       int T) {
  extern __shared__ __align__(16) float rsh[];
  float* rxs = rsh;         // [R][K] the normalised rows
  float* rv = rsh + R * K;  // [R][K] the sums d
  __shared__ float clog[R][64], score[64], pick[32];
  __shared__ __align__(16) float choice[64];
  __shared__ float partial[R][8];
  __shared__ float inv_s[R];
  const int E = 64, nb = ROUTER_CLUSTER, b = blockIdx.x, t0 = R * blockIdx.y;
  const int nr = min(R, T - t0);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int e = b * 8 + warp, k0 = tid * 8;
  const bool on = k0 < K;
  cluster_arrive();
  float wv[ROUTER_FAST_MAX_K / 32];
  router_row_guarded(W, K, e, lane, wv);
  float gv[8];
  if (on) ldg8(gain + k0, gv);
  PDL_WAIT();
  if (on) {
    float4 a0[R], a1[R], c0[R], c1[R];
#pragma unroll
    for (int r = 0; r < R; r++)
      if (r < nr) {
        const float* ar = a + (size_t)(t0 + r) * lda + k0;
        const float* cr = c + (size_t)(t0 + r) * ldc + k0;
        a0[r] = *(const float4*)ar;
        a1[r] = *(const float4*)(ar + 4);
        c0[r] = *(const float4*)cr;
        c1[r] = *(const float4*)(cr + 4);
      }
#pragma unroll
    for (int r = 0; r < R; r++)
      if (r < nr) {
        float v[8];
        v[0] = a0[r].x + c0[r].x; v[1] = a0[r].y + c0[r].y; v[2] = a0[r].z + c0[r].z; v[3] = a0[r].w + c0[r].w;
        v[4] = a1[r].x + c1[r].x; v[5] = a1[r].y + c1[r].y; v[6] = a1[r].z + c1[r].z; v[7] = a1[r].w + c1[r].w;
        *(float4*)&rv[r * K + k0] = make_float4(v[0], v[1], v[2], v[3]);
        *(float4*)&rv[r * K + k0 + 4] = make_float4(v[4], v[5], v[6], v[7]);
        sumsq8_partial(v, lane, warp, partial[r]);
      }
  }
  __syncthreads();
  if (tid < nr) inv_s[tid] = norm_inv(partial[tid], K >> 8, K, eps);
  __syncthreads();
  if (on) {
#pragma unroll
    for (int r = 0; r < R; r++)
      if (r < nr) {
        const float inv = inv_s[r];
        const float4 v0 = *(const float4*)&rv[r * K + k0], v1 = *(const float4*)&rv[r * K + k0 + 4];
        const float v[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
        float n[8];
#pragma unroll
        for (int i = 0; i < 8; i++) n[i] = gv[i] * (v[i] * inv);
        *(float4*)&rxs[r * K + k0] = make_float4(n[0], n[1], n[2], n[3]);
        *(float4*)&rxs[r * K + k0 + 4] = make_float4(n[4], n[5], n[6], n[7]);
      }
  }
  __syncthreads();
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; r++) {
    acc[r] = 0.f;
    if (r < nr) {
      // Not router_dot: with it, the two-row form spilled 4 bytes under
      // NVRTC 13.0.
#pragma unroll
      for (int u = 0; u < ROUTER_FAST_MAX_K / 32; u++)
        if (32 * u < K) acc[r] += wv[u] * rxs[r * K + lane + 32 * u];
      acc[r] = warp_sum(acc[r]);
      if (lane == 0) logits[(size_t)(t0 + r) * ldl + e] = acc[r];
    }
  }
  cluster_wait();
#pragma unroll
  for (int r = 0; r < R; r++)
    if (r < nr && lane == 0) st_cluster(&clog[r][e], r, acc[r]);
  cluster_arrive();
  if (b >= R) {
#pragma unroll
    for (int r = 0; r < R; r++)
      if (r < nr)
        router_quant_groups(rxs + r * K, K, NG, t0 + r, warp * (nb - R) + b - R, 8 * (nb - R), lane, nq, ns, nsum);
  }
  cluster_wait();
  if (on && (tid & (nb - 1)) == b) {
#pragma unroll
    for (int r = 0; r < R; r++)
      if (r < nr) {
        float* dr = d + (size_t)(t0 + r) * ldd;
        *(float4*)(dr + k0) = *(const float4*)&rv[r * K + k0];
        *(float4*)(dr + k0 + 4) = *(const float4*)&rv[r * K + k0 + 4];
        float* orow = out + (size_t)(t0 + r) * ldo;
        *(float4*)(orow + k0) = *(const float4*)&rxs[r * K + k0];
        *(float4*)(orow + k0 + 4) = *(const float4*)&rxs[r * K + k0 + 4];
      }
  }
  if (b >= nr) return;
  router_choose(tid, E, tid < E ? clog[b][tid] : 0.f, bias, topk, norm, scaling, t0 + b, ids, wts, score, choice,
                pick);
}

#define ROUTER_ROWS_R(R)                                                                                          \
  extern "C" __global__ void __cluster_dims__(ROUTER_CLUSTER, 1, 1) __launch_bounds__(256)                    \
      moe_router_cluster_norm_rows##R(                                                                         \
          const float* __restrict__ W, int K, float* logits, int ldl, const float* __restrict__ bias, int topk, \
          int norm, float scaling, i32* __restrict__ ids, float* __restrict__ wts, float* d, int ldd,          \
          const float* a, int lda, const float* c, int ldc, const float* __restrict__ gain, float eps,         \
          float* out, int ldo, i8* __restrict__ nq, float* __restrict__ ns, i32* __restrict__ nsum, int NG,    \
          int T) {                                                                                             \
    router_cluster_norm_rows_r<R>(W, K, logits, ldl, bias, topk, norm, scaling, ids, wts, d, ldd, a, lda, c,   \
                                  ldc, gain, eps, out, ldo, nq, ns, nsum, NG, T);                              \
  }
ROUTER_ROWS_R(2)

// ---------------------------------------------------------------------------
// moe_gate_up_q with each group of 128 rows of h quantized inside a
// cluster. moe_gate_up_q quantizes a group in the last of the 8 blocks
// that wrote it: every block counts itself in with an atomic (a round trip
// to L2) and the last one reads the group's h back from L2 (another).
// Here the 8 blocks (moe_gate_up_q's blocks of 4 warps, grid I/16 x
// slots) of a group are a cluster: each block stores its 16 rows of h
// (besides h in memory) into the shared memory of the cluster's first
// block and leaves at once (the cluster barrier's wait is for the
// cluster's non-exited threads), so that the down launch's blocks can take
// its place; only the first block waits and quantizes the group from
// there. Rows, lanes, products and quantization are moe_gate_up_q's (the
// same bits). I a multiple of 128, K <= 2048. On an H200
// (BenchmarkDecodeLayerMoE) 0.3-0.35 us a layer shorter than
// moe_gate_up_q; clusters of 4 blocks of 8 warps were 0.25 us longer,
// and the (earlier) form whose blocks all waited for the slowest of the
// cluster about even.
#define GUC_ROWS 128
#define GUC_WARPS 4
extern "C" __global__ void __cluster_dims__(GUC_ROWS / (4 * GUC_WARPS), 1, 1) __launch_bounds__(32 * GUC_WARPS, 4)
    moe_gate_up_c(const Expert* __restrict__ experts, const i32* __restrict__ ids, int topk, int nexperts,
                  int I, int K, int gshift, const i8* __restrict__ xq, const float* __restrict__ xs,
                  float* __restrict__ h, i8* __restrict__ hq, float* __restrict__ hs) {
  PDL_LAUNCH();
  constexpr int NW = GUC_WARPS, CL = GUC_ROWS / (4 * NW);  // warps a block, blocks a cluster
  __shared__ __align__(16) i8 sx[ROUTER_FAST_MAX_K];
  __shared__ float sxs[ROUTER_FAST_MAX_K / 32];
  __shared__ GateUp tab[MOE_TABLE_SMEM];
  __shared__ __align__(16) float hsm[GUC_ROWS];
  const int slot = blockIdx.y, lane = threadIdx.x & 31, tid = threadIdx.x, warp = tid >> 5;
  const int row0 = (blockIdx.x * NW + warp) * 4;
  const int G = 32 << gshift, GK = K >> (5 + gshift), C = K >> 5;
  const bool stab = slot < topk && nexperts <= MOE_TABLE_SMEM;
  // Every block of the cluster has started before any stores into the
  // first one's shared memory (the wait before them); that block's words
  // are unset before.
  if (blockIdx.x % CL == 0)
    for (int i = tid; i < GUC_ROWS; i += 32 * NW) ((volatile u32*)hsm)[i] = CLUSTER_UNSET;
  cluster_arrive();
  const int eid = gate_up_expert(experts, ids, slot, topk, nexperts, stab, tab, tid);
  TRACE_MARK_DEP(eid);
  // A routed slot has waited for the router, so its activations are
  // written: they are requested ahead of the weights. (Copied after the
  // weight loads through registers, they waited for every weight to land,
  // the loads sharing one scoreboard: an L2 round trip after the weights.)
  const bool routed = slot < topk;
  if (routed) stage_x_async(xq, xs, K, GK, sx, sxs, tid, 32 * NW);
  const GateUp ex = stab ? tab[eid] : gate_up_of(experts[eid]);
  const u8* rc[8];
  const u8* rs[8];
  gate_up_row_ptrs(ex, row0, 0x7fffffff, K, GK, rc, rs);
  uint4 w[2][8];
  u32 s[2][8];
  // The warp's gate (lanes 0-3) and up (4-7) row scales, requested ahead
  // of the weights by cp.async: loaded into registers they share the
  // weights' scoreboard, and ptxas then waited for one before the other.
  __shared__ float rsc[NW][8];
  if (lane < 8) cp_async_small(smem_addr(&rsc[warp][lane]), (lane < 4 ? ex.gr : ex.ur) + row0 + (lane & 3), 4);
  // The first half of each row's chunks comes into registers, the second
  // by cp.async into shared memory: the first half's products run while
  // the second half is on its way (all in registers, every product waited
  // for the last weight). Groups: the activations (a routed slot's) and
  // the row scales, then the second halves.
  __shared__ __align__(16) uint4 wh1[NW][8][32];
  cp_async_commit();
  rows_load_halves<8>(rc, rs, C, gshift, w[0], s, &wh1[warp][0][0]);
  cp_async_commit();
  PDL_WAIT();
  if (!routed) {
    stage_x_async(xq, xs, K, GK, sx, sxs, tid, 32 * NW);
    cp_async_wait_all();
  } else {
    cp_async_wait<1>();
  }
  __syncthreads();
  TRACE_MARK();
  float out[8];
#pragma unroll
  for (int r = 0; r < 8; r++) out[r] = 0.f;
  rows_dot_half<8>(w[0], s[0], 0, C, gshift, sx, sxs, out);
  cp_async_wait_all();  // a lane reads only the chunks it copied
#pragma unroll
  for (int r = 0; r < 8; r++) w[1][r] = wh1[warp][r][lane];
  rows_dot_half<8>(w[1], s[1], 1, C, gshift, sx, sxs, out);
  // Lane r < 4: gate row r's sum, and up row r's from lane 4 + r.
  const float og = warp_sum_rows(out, lane);
  const float ou = __shfl_down_sync(0xffffffffu, og, 4);
  TRACE_MARK();
  const u32 rank = cluster_rank();
  cluster_wait();
  if (lane < 4) {
    const int n = row0 + lane;
    const float g = og * (rsc[warp][lane] * 0.5f);
    const float u = ou * (rsc[warp][4 + lane] * 0.5f);
    const float hv = silu(g) * u;
    h[(size_t)slot * I + n] = hv;
    st_cluster(&hsm[rank * (4 * NW) + warp * 4 + lane], 0, hv);
  }
  // The other blocks leave at once; the first block's warp 0 waits until
  // every word of hsm is set (no cluster barrier: its release fence cost
  // more than the exchange).
  if (rank != 0 || warp != 0) return;
#pragma unroll
  for (int i = 0; i < GUC_ROWS / 32; i++) wait_cluster_set(&hsm[32 * i + lane]);
  __syncwarp();
  const int base = (blockIdx.x / CL) * GUC_ROWS, IG = I >> (5 + gshift);
  quant_groups(hsm, false, GUC_ROWS, G, 0, 1, hq + (size_t)slot * I + base, hs + (size_t)slot * IG + (base >> (5 + gshift)));
  TRACE_MARK();
}
