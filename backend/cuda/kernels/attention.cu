// Single-launch latent attention for decode (one or a few rows).
//
// Block (s, p, t) of the grid (splits, ceil(heads/2), rows) takes the
// positions [s*chunk, (s+1)*chunk) of row t, chunk = ceil(n/splits) for
// its n = pos[t]+1 positions, for the two heads 2p and 2p+1. Each of its
// AD_WARPS warps walks positions s*chunk + warp + AD_WARPS*i with an
// online softmax, AD_U positions per step (template arguments: AD_U, and
// PF, whether the next step's cache loads are in flight while the current
// one is summed). Lane l holds the latent dims
// 128g + 4l + {0..3} (g < rank/128) and the rope dims 2l, 2l+1 (l <
// rope/2) of the two queries, and the same dims of the running value sum,
// so each cached position is read once, with coalesced 4-value loads, and
// used for both heads' scores and value sums. The warps' partial softmax
// states are combined in shared memory; with one split the block writes
// olat, otherwise its partial state (max, sum, unnormalised values), and
// the last block of the row and head pair to finish (an atomic ticket per
// (t, p), which it resets) merges the splits: one launch in all. Each
// pair of heads reads the cache once (ten times for twenty heads, from L2).
//
// Rounding: scores are scale * (sum of products), exp is expf, sums are
// float32; the CPU reference differs only by rounding (the tests bound it).

#define AD_WARPS 8
#define AD_THREADS (32 * AD_WARPS)
#define AD_MAXS 256

// A lane's raw share of one cached position: dtype 0 bf16, 1 f32, 2 fp8
// (codes, then the float scales of the latent and the rope part).
template <int DT>
struct ADRaw;
template <>
struct ADRaw<0> {
  uint2 g[4];
  u32 pe;
};
template <>
struct ADRaw<1> {
  float4 g[4];
  float2 pe;
};
template <>
struct ADRaw<2> {
  u32 g[4];
  u32 pe;
  float2 sc;
};

DEVICE void ad_load(ADRaw<0>& r, const void* layer, long long slot, int width, int rank, int ng, int dr, int lane) {
  const unsigned short* row = (const unsigned short*)layer + (size_t)slot * width;
#pragma unroll
  for (int g = 0; g < 4; g++)
    if (g < ng) r.g[g] = __ldg((const uint2*)(row + 128 * g + 4 * lane));
  r.pe = 2 * lane < dr ? __ldg((const u32*)(row + rank + 2 * lane)) : 0u;
}

DEVICE void ad_load(ADRaw<1>& r, const void* layer, long long slot, int width, int rank, int ng, int dr, int lane) {
  const float* row = (const float*)layer + (size_t)slot * width;
#pragma unroll
  for (int g = 0; g < 4; g++)
    if (g < ng) r.g[g] = __ldg((const float4*)(row + 128 * g + 4 * lane));
  r.pe = 2 * lane < dr ? __ldg((const float2*)(row + rank + 2 * lane)) : make_float2(0.f, 0.f);
}

DEVICE void ad_load(ADRaw<2>& r, const void* layer, long long slot, int width, int rank, int ng, int dr, int lane) {
  const u8* row = (const u8*)layer + (size_t)slot * (width + 8);
#pragma unroll
  for (int g = 0; g < 4; g++)
    if (g < ng) r.g[g] = __ldg((const u32*)(row + 128 * g + 4 * lane));
  r.pe = 2 * lane < dr ? (u32)__ldg((const unsigned short*)(row + rank + 2 * lane)) : 0u;
  r.sc = __ldg((const float2*)(row + width));
}

DEVICE float ad_bf16(u32 w, int hi) { return __uint_as_float(hi ? (w & 0xffff0000u) : (w << 16)); }

// c[4g+i] = latent dim 128g + 4*lane + i, pe[i] = rope dim 2*lane + i.
DEVICE void ad_convert(const ADRaw<0>& r, float (&c)[16], float (&pe)[2], int ng) {
#pragma unroll
  for (int g = 0; g < 4; g++) {
    if (g < ng) {
      c[4 * g + 0] = ad_bf16(r.g[g].x, 0);
      c[4 * g + 1] = ad_bf16(r.g[g].x, 1);
      c[4 * g + 2] = ad_bf16(r.g[g].y, 0);
      c[4 * g + 3] = ad_bf16(r.g[g].y, 1);
    } else {
      c[4 * g + 0] = c[4 * g + 1] = c[4 * g + 2] = c[4 * g + 3] = 0.f;
    }
  }
  pe[0] = ad_bf16(r.pe, 0);
  pe[1] = ad_bf16(r.pe, 1);
}

DEVICE void ad_convert(const ADRaw<1>& r, float (&c)[16], float (&pe)[2], int ng) {
#pragma unroll
  for (int g = 0; g < 4; g++) {
    if (g < ng) {
      c[4 * g + 0] = r.g[g].x;
      c[4 * g + 1] = r.g[g].y;
      c[4 * g + 2] = r.g[g].z;
      c[4 * g + 3] = r.g[g].w;
    } else {
      c[4 * g + 0] = c[4 * g + 1] = c[4 * g + 2] = c[4 * g + 3] = 0.f;
    }
  }
  pe[0] = r.pe.x;
  pe[1] = r.pe.y;
}

DEVICE void ad_convert(const ADRaw<2>& r, float (&c)[16], float (&pe)[2], int ng) {
#pragma unroll
  for (int g = 0; g < 4; g++) {
#pragma unroll
    for (int i = 0; i < 4; i++) c[4 * g + i] = g < ng ? e4m3((r.g[g] >> (8 * i)) & 0xffu) * r.sc.x : 0.f;
  }
  pe[0] = e4m3(r.pe & 0xffu) * r.sc.y;
  pe[1] = e4m3((r.pe >> 8) & 0xffu) * r.sc.y;
}

template <int DT, int AD_U, bool PF>
DEVICE void attention_decode_body(float* olat, int ldo, const float* qlat, int ldql, const float* q, int ldq,
                                  const void* layer, const i32* __restrict__ pos,
                                  const i32* __restrict__ row_seq, const i32* __restrict__ seq_blocks,
                                  const i32* __restrict__ blocks, int block_size, int heads, int rank,
                                  int dn, int dr, float scale, float* part_ml, float* part_acc,
                                  u32* counters) {
  PDL_LAUNCH();
  PDL_WAIT();
  extern __shared__ float4 ad_sm4[];
  float* wacc = (float*)ad_sm4;  // [AD_WARPS][2][rank]
  __shared__ float wm[AD_WARPS][2], wl[AD_WARPS][2], wscale[AD_WARPS][2], fin[2][2];
  __shared__ float mw[2][AD_MAXS];
  __shared__ int last_s;
  const int s = blockIdx.x, p = blockIdx.y, t = blockIdx.z, splits = gridDim.x, pairs = gridDim.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int h0 = 2 * p, nh = min(2, heads - h0), width = rank + dr, ng = rank >> 7;
  const int n = pos[t] + 1;
  const i32* table = blocks + seq_blocks[row_seq[t]];
  const int chunk = (n + splits - 1) / splits;
  const int j0 = s * chunk, nb = max(0, min(n, j0 + chunk) - j0);

  // The two heads' queries in the lanes' dims (head 2p+1 zero if absent).
  float qa[2][16], qp[2][2];
#pragma unroll
  for (int u = 0; u < 2; u++) {
    const float* ql = qlat + (size_t)t * ldql + (size_t)(h0 + u) * rank;
    const float* qr = q + (size_t)t * ldq + (size_t)(h0 + u) * (dn + dr) + dn;
#pragma unroll
    for (int g = 0; g < 4; g++) {
      float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
      if (u < nh && g < ng) v = *(const float4*)(ql + 128 * g + 4 * lane);
      qa[u][4 * g + 0] = v.x;
      qa[u][4 * g + 1] = v.y;
      qa[u][4 * g + 2] = v.z;
      qa[u][4 * g + 3] = v.w;
    }
    const bool pe = u < nh && 2 * lane < dr;
    qp[u][0] = pe ? qr[2 * lane] : 0.f;
    qp[u][1] = pe ? qr[2 * lane + 1] : 0.f;
  }

  float m[2] = {__int_as_float(0xff800000), __int_as_float(0xff800000)}, l[2] = {0.f, 0.f};
  float acc[2][16];
#pragma unroll
  for (int u = 0; u < 2; u++)
#pragma unroll
    for (int e = 0; e < 16; e++) acc[u][e] = 0.f;

  // Step i covers this warp's positions i, i + AD_WARPS, ... (AD_U of them).
  const int stride = AD_WARPS * AD_U;
  ADRaw<DT> cur[AD_U], nxt[AD_U];
  auto issue = [&](ADRaw<DT>(&r)[AD_U], int i0) {
    long long sl = 0;
    const int ii = i0 + AD_WARPS * lane;
    if (lane < AD_U && ii < nb) {
      const int j = j0 + ii;
      sl = (long long)table[j / block_size] * block_size + j % block_size;
    }
#pragma unroll
    for (int u = 0; u < AD_U; u++) {
      const long long slot = __shfl_sync(0xffffffffu, sl, u);
      if (i0 + AD_WARPS * u < nb)
        ad_load(r[u], layer, slot, width, rank, ng, dr, lane);
      else
        r[u] = ADRaw<DT>{};  // zeros: an absent position adds 0 * c, never NaN
    }
  };
  if (PF && warp < nb) issue(cur, warp);
  for (int i0 = warp; i0 < nb; i0 += stride) {
    if (!PF)
      issue(cur, i0);
    else if (i0 + stride < nb)
      issue(nxt, i0 + stride);
    // The raw values are converted where used, for the scores and again
    // for the sums: registers, not conversions, bound the step.
    float sc[AD_U][2];
#pragma unroll
    for (int u = 0; u < AD_U; u++) {
      float c[16], pe[2];
      ad_convert(cur[u], c, pe, ng);
#pragma unroll
      for (int h = 0; h < 2; h++) {
        float a = 0.f;
#pragma unroll
        for (int e = 0; e < 16; e++) a += qa[h][e] * c[e];
        a += qp[h][0] * pe[0] + qp[h][1] * pe[1];
        sc[u][h] = a;
      }
    }
#pragma unroll
    for (int u = 0; u < AD_U; u++) {
      const bool valid = i0 + AD_WARPS * u < nb;
#pragma unroll
      for (int h = 0; h < 2; h++) sc[u][h] = valid ? scale * warp_sum(sc[u][h]) : __int_as_float(0xff800000);
    }
    // Online softmax (every lane holds the same scores: the branch is
    // uniform over the warp).
#pragma unroll
    for (int h = 0; h < 2; h++) {
      float mt = sc[0][h];
#pragma unroll
      for (int u = 1; u < AD_U; u++) mt = fmaxf(mt, sc[u][h]);
      if (mt > m[h]) {
        const float r = expf(m[h] - mt);
        l[h] *= r;
#pragma unroll
        for (int e = 0; e < 16; e++) acc[h][e] *= r;
        m[h] = mt;
      }
#pragma unroll
      for (int u = 0; u < AD_U; u++) {
        const float pu = i0 + AD_WARPS * u < nb ? expf(sc[u][h] - m[h]) : 0.f;
        sc[u][h] = pu;
        l[h] += pu;
      }
    }
#pragma unroll
    for (int u = 0; u < AD_U; u++) {
      float c[16], pe[2];
      ad_convert(cur[u], c, pe, ng);
#pragma unroll
      for (int e = 0; e < 16; e++) {
        acc[0][e] += sc[u][0] * c[e];
        acc[1][e] += sc[u][1] * c[e];
      }
    }
    if (PF) {
#pragma unroll
      for (int u = 0; u < AD_U; u++) cur[u] = nxt[u];
    }
  }

  // Combine the warps: weights exp(m_w - M) over the warps that saw
  // positions, in warp order.
#pragma unroll
  for (int h = 0; h < 2; h++) {
    float* dst = wacc + ((size_t)warp * 2 + h) * rank;
#pragma unroll
    for (int g = 0; g < 4; g++)
      if (g < ng) *(float4*)(dst + 128 * g + 4 * lane) = make_float4(acc[h][4 * g], acc[h][4 * g + 1], acc[h][4 * g + 2], acc[h][4 * g + 3]);
  }
  if (lane == 0) {
    wm[warp][0] = m[0];
    wm[warp][1] = m[1];
    wl[warp][0] = l[0];
    wl[warp][1] = l[1];
  }
  __syncthreads();
  if (threadIdx.x < 2) {
    const int h = threadIdx.x;
    float M = __int_as_float(0xff800000);
    for (int w = 0; w < AD_WARPS; w++)
      if (wl[w][h] > 0.f) M = fmaxf(M, wm[w][h]);
    float L = 0.f;
    for (int w = 0; w < AD_WARPS; w++) {
      const float e = wl[w][h] > 0.f ? expf(wm[w][h] - M) : 0.f;
      wscale[w][h] = e;
      L += e * wl[w][h];
    }
    fin[h][0] = M;
    fin[h][1] = L;
  }
  __syncthreads();
  const size_t tp = (size_t)t * pairs + p;
  if (splits == 1) {
    for (int i = threadIdx.x; i < nh * rank; i += AD_THREADS) {
      const int h = i / rank, k = i - h * rank;
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < AD_WARPS; w++) v += wscale[w][h] * wacc[((size_t)w * 2 + h) * rank + k];
      olat[(size_t)t * ldo + (size_t)(h0 + h) * rank + k] = v * (1.f / fin[h][1]);
    }
    return;
  }
  // A partial: (max, sum) per head, then the unnormalised value sums.
  float* pml = part_ml + (tp * splits + s) * 4;
  float* pacc = part_acc + (tp * splits + s) * 2 * rank;
  for (int i = threadIdx.x; i < 2 * rank; i += AD_THREADS) {
    const int h = i / rank, k = i - h * rank;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < AD_WARPS; w++) v += wscale[w][h] * wacc[((size_t)w * 2 + h) * rank + k];
    pacc[i] = v;
  }
  if (threadIdx.x < 2) {
    pml[2 * threadIdx.x] = fin[threadIdx.x][0];
    pml[2 * threadIdx.x + 1] = fin[threadIdx.x][1];
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last_s = atomicAdd(&counters[tp], 1u) == (u32)(splits - 1);
  __syncthreads();
  if (!last_s) return;
  __threadfence();
  if (threadIdx.x == 0) counters[tp] = 0;  // ready for the next launch

  // The last block merges the splits of (t, p).
  const float* bml = part_ml + tp * splits * 4;
  if (warp < 2) {
    const int h = warp;
    float M = __int_as_float(0xff800000);
    for (int i = lane; i < splits; i += 32) {
      const float li = __ldcg(bml + 4 * i + 2 * h + 1);
      if (li > 0.f) M = fmaxf(M, __ldcg(bml + 4 * i + 2 * h));
    }
    M = warp_max(M);
    float L = 0.f;
    for (int i = lane; i < splits; i += 32) {
      const float li = __ldcg(bml + 4 * i + 2 * h + 1);
      const float e = li > 0.f ? expf(__ldcg(bml + 4 * i + 2 * h) - M) : 0.f;
      mw[h][i] = e;
      L += e * li;
    }
    L = warp_sum(L);
    if (lane == 0) fin[h][1] = L;
  }
  __syncthreads();
  const float* bacc = part_acc + tp * splits * 2 * rank;
  for (int i = threadIdx.x; i < nh * rank; i += AD_THREADS) {
    const int h = i / rank, k = i - h * rank;
    float v = 0.f;
#pragma unroll 8
    for (int j = 0; j < splits; j++) v += mw[h][j] * __ldcg(bacc + (size_t)j * 2 * rank + i);
    olat[(size_t)t * ldo + (size_t)(h0 + h) * rank + k] = v * (1.f / fin[h][1]);
  }
}

#define AD_KERNEL(name, DT, U, PF, MINB)                                                                                          \
  extern "C" __global__ void __launch_bounds__(AD_THREADS, MINB)                                                     \
      name(float* olat, int ldo, const float* qlat, int ldql, const float* q, int ldq, const void* layer,           \
           const i32* __restrict__ pos, const i32* __restrict__ row_seq, const i32* __restrict__ seq_blocks,         \
           const i32* __restrict__ blocks, int block_size, int heads, int rank, int dn, int dr, float scale,         \
           float* part_ml, float* part_acc, u32* counters) {                                                         \
    attention_decode_body<DT, U, PF>(olat, ldo, qlat, ldql, q, ldq, layer, pos, row_seq, seq_blocks, blocks, block_size,   \
                              heads, rank, dn, dr, scale, part_ml, part_acc, counters);                              \
  }

// Positions per step, and whether the next step's loads are issued before
// the current step is summed: as much as fits 255 registers without
// spilling (177-219 registers: one block a multiprocessor; a variant
// capped at 128 registers for two spilled at every setting tried).
AD_KERNEL(attention_decode_bf16, 0, 4, true, 1)
AD_KERNEL(attention_decode_f32, 1, 2, true, 1)
AD_KERNEL(attention_decode_fp8, 2, 4, true, 1)
