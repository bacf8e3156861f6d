// Single-launch latent attention for decode (one or a few rows).
//
// Block (s, p, t) of the grid (splits, ceil(heads/2), rows) takes the
// positions [s*chunk, (s+1)*chunk) of row t, chunk = ceil(n/splits) for
// its n = pos[t]+1 positions, for the two heads 2p and 2p+1. It copies its
// positions' cache rows into shared memory with cp.async, ch rows a stage
// and two stages, so that all of a stage's loads are in flight at once
// and the next stage's arrive while the current one is summed. AD_PG
// position groups each take positions g + AD_PG*i of a stage, AD_U at a
// step, with an online softmax: a group is one warp holding both heads
// (HPW = 2) or two warps holding one head each (HPW = 1: fewer registers,
// twice the warps). Lane l holds the latent dims 128g + 4l + {0..3}
// (g < rank/128) and the rope dims 2l, 2l+1 (l < rope/2) of its queries,
// and the same dims of the running value sums, so each position's values
// are converted once a warp and used for its heads' scores and value
// sums; a step's HPW*AD_U dot products are summed over the warp by one
// transposing reduction. The groups' partial softmax states are combined
// in shared memory; with one split the block writes olat, otherwise its
// partial state (max, sum, unnormalised values), and the last block of
// the row and head pair to finish (an atomic ticket per (t, p), which it
// resets) merges the splits: one launch in all. Each pair of heads reads
// the cache once (ten times for twenty heads, from L2).
//
// Rounding: scores are scale * (sum of products), exp is expf, sums are
// float32; the CPU reference differs only by rounding (the tests bound it).

#define AD_PG 8  // position groups of a block (warps, or pairs of warps)
#define AD_MAXS 256

// A lane's raw share of one cached position: dtype 0 bf16, 1 f32, 2 fp8
// (codes, then the float scales of the latent and the rope part), 3 fp4
// (the latent's four E2M1 codes of each column group and their group's
// E4M3 scale, two E4M3 codes of k_pe, the two float scales; the slot
// layout is cache_load's in ops.cu).
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
template <>
struct ADRaw<3> {
  u32 g[4], gs[4];
  u32 pe;
  float2 sc;
};

// A lane's share of one cache row staged in shared memory.
DEVICE void ad_load(ADRaw<0>& r, const u8* row, int rank, int ng, int dr, int lane) {
  const unsigned short* v = (const unsigned short*)row;
#pragma unroll
  for (int g = 0; g < 4; g++)
    if (g < ng) r.g[g] = *(const uint2*)(v + 128 * g + 4 * lane);
  r.pe = 2 * lane < dr ? *(const u32*)(v + rank + 2 * lane) : 0u;
}

DEVICE void ad_load(ADRaw<1>& r, const u8* row, int rank, int ng, int dr, int lane) {
  const float* v = (const float*)row;
#pragma unroll
  for (int g = 0; g < 4; g++)
    if (g < ng) r.g[g] = *(const float4*)(v + 128 * g + 4 * lane);
  r.pe = 2 * lane < dr ? *(const float2*)(v + rank + 2 * lane) : make_float2(0.f, 0.f);
}

DEVICE void ad_load(ADRaw<2>& r, const u8* row, int rank, int ng, int dr, int lane) {
#pragma unroll
  for (int g = 0; g < 4; g++)
    if (g < ng) r.g[g] = *(const u32*)(row + 128 * g + 4 * lane);
  r.pe = 2 * lane < dr ? (u32) * (const unsigned short*)(row + rank + 2 * lane) : 0u;
  r.sc = *(const float2*)(row + rank + dr);
}

// fp4: the latent dims 128g + 4*lane + {0..3} are the two code bytes at
// 64g + 2*lane, in the scale group 4g + lane/8.
DEVICE void ad_load(ADRaw<3>& r, const u8* row, int rank, int ng, int dr, int lane) {
  const u8* gsc = row + rank / 2 + dr;
#pragma unroll
  for (int g = 0; g < 4; g++) {
    if (g < ng) {
      r.g[g] = *(const unsigned short*)(row + 64 * g + 2 * lane);
      r.gs[g] = gsc[4 * g + (lane >> 3)];
    }
  }
  r.pe = 2 * lane < dr ? (u32) * (const unsigned short*)(row + rank / 2 + 2 * lane) : 0u;
  r.sc = *(const float2*)(row + fp4_scale_offset(rank, dr));
}

DEVICE u32 ad_smem(const void* p) {
  u32 r;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
  return r;
}

// One piece of a cache row into shared memory: 16 bytes (bf16, f32 and
// fp4 rows are multiples of 16) or 8 (fp8 rows, width + 8 bytes).
template <int BYTES>
DEVICE void ad_copy(u32 dst, const void* src) {
  if (BYTES == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(dst), "l"(src) : "memory");
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

// A latent value is (e4m3(group scale) * scale) * e2m1(code), the CPU
// pool's product.
DEVICE void ad_convert(const ADRaw<3>& r, float (&c)[16], float (&pe)[2], int ng) {
#pragma unroll
  for (int g = 0; g < 4; g++) {
    const float d = g < ng ? __fmul_rn(e4m3(r.gs[g]), r.sc.x) : 0.f;
#pragma unroll
    for (int i = 0; i < 4; i++) c[4 * g + i] = g < ng ? __fmul_rn(d, e2m1_value(r.g[g] >> (4 * i))) : 0.f;
  }
  pe[0] = e4m3(r.pe & 0xffu) * r.sc.y;
  pe[1] = e4m3((r.pe >> 8) & 0xffu) * r.sc.y;
}

// Sums NV values (a power of two, at most 32) over the warp at once: at
// each step the lanes with the step's bit set keep the upper half of the
// values and the others the lower half, each adding its partner's copy.
// Lane l ends with the full sum of value l / (32/NV) (whole for NV = 32;
// the last steps are ordinary butterfly adds), in the same bits on every
// lane that holds it.
template <int NV>
DEVICE float ad_transpose_sum(float (&v)[NV], int lane) {
#pragma unroll
  for (int w = NV / 2, bit = 16; w >= 1; w /= 2, bit /= 2) {
    const bool up = lane & bit;
#pragma unroll
    for (int i = 0; i < w; i++) {
      const float send = up ? v[i] : v[i + w];
      const float keep = up ? v[i + w] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, bit);
    }
  }
#pragma unroll
  for (int bit = 16 / NV; bit >= 1; bit /= 2) v[0] += __shfl_xor_sync(0xffffffffu, v[0], bit);
  return v[0];
}

// stamps, when not null, gets each block's %globaltimer (ns) at six points
// (entry, row metadata and queries read, first stage arrived, positions
// summed, ticket taken, done), for BenchmarkAttention's breakdown.

template <int DT, int NG, int HPW>
DEVICE void attention_decode_body(float* olat, int ldo, const float* qlat, int ldql, const float* q, int ldq,
                                  const void* layer, const i32* __restrict__ pos,
                                  const i32* __restrict__ row_seq, const i32* __restrict__ seq_blocks,
                                  const i32* __restrict__ blocks, int block_size, int heads, int rank,
                                  int dn, int dr, float scale, int ch, float* part_ml, float* part_acc,
                                  u32* counters, unsigned long long* stamps) {
  PDL_LAUNCH();
  PDL_WAIT();
  unsigned long long* stamp =
      stamps ? stamps + 6 * (((size_t)blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x) : nullptr;
#define AD_STAMP(k) \
  if (stamp && threadIdx.x == 0) stamp[k] = globaltimer()
  AD_STAMP(0);
  extern __shared__ float4 ad_sm4[];
  float* wacc = (float*)ad_sm4;  // [AD_PG][2][rank], after the stages are done with
  // HPW heads a warp: 2, eight warps (one a position group); or 1,
  // sixteen warps (two a group, one per head), fewer registers each.
  // AD_U positions a step: 4, or 2 with one head a warp (128 registers).
  constexpr int AD_NW = AD_PG * (2 / HPW), AD_NT = 32 * AD_NW, AD_U = HPW == 2 ? 4 : 2;
  __shared__ float wm[AD_PG][2], wl[AD_PG][2], wscale[AD_PG][2], fin[2][2];
  __shared__ float mw[2][AD_MAXS];
  __shared__ int last_s;
  const int s = blockIdx.x, p = blockIdx.y, t = blockIdx.z, splits = gridDim.x, pairs = gridDim.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int pg = HPW == 2 ? warp : warp >> 1, hw = HPW == 2 ? 0 : warp & 1;  // group, first head in the pair
  const int h0 = 2 * p, nh = min(2, heads - h0), width = rank + dr, ng = NG;  // rank = 128*NG
  const int n = pos[t] + 1;
  const i32* table = blocks + seq_blocks[row_seq[t]];
  const int chunk = (n + splits - 1) / splits;
  const int j0 = s * chunk, nb = max(0, min(n, j0 + chunk) - j0);
  if (stamp && threadIdx.x == 0) stamp[1] = globaltimer_after(nb + table[0]);

  // The warp's heads' queries in the lanes' dims (zero for an absent head).
  float qa[HPW][16], qp[HPW][2];
#pragma unroll
  for (int u = 0; u < HPW; u++) {
    const bool has = hw + u < nh;
    const float* ql = qlat + (size_t)t * ldql + (size_t)(h0 + hw + u) * rank;
    const float* qr = q + (size_t)t * ldq + (size_t)(h0 + hw + u) * (dn + dr) + dn;
#pragma unroll
    for (int g = 0; g < 4; g++) {
      float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
      if (has && g < ng) v = *(const float4*)(ql + 128 * g + 4 * lane);
      qa[u][4 * g + 0] = v.x;
      qa[u][4 * g + 1] = v.y;
      qa[u][4 * g + 2] = v.z;
      qa[u][4 * g + 3] = v.w;
    }
    const bool pe = has && 2 * lane < dr;
    qp[u][0] = pe ? qr[2 * lane] : 0.f;
    qp[u][1] = pe ? qr[2 * lane + 1] : 0.f;
  }

  float m[HPW], l[HPW], acc[HPW][16];
#pragma unroll
  for (int u = 0; u < HPW; u++) {
    m[u] = __int_as_float(0xff800000);
    l[u] = 0.f;
#pragma unroll
    for (int e = 0; e < 16; e++) acc[u][e] = 0.f;
  }

  // Stage k holds positions j0 + k*ch + [0, ch): warp w copies rows w,
  // w + AD_NW, ..., its lanes the row's pieces.
  constexpr int PIECE = DT == 2 ? 8 : 16;
  const int row_bytes = DT == 0   ? 2 * width
                        : DT == 1 ? 4 * width
                        : DT == 2 ? width + 8
                                  : fp4_slot_bytes(rank, dr);
  const int pieces = row_bytes / PIECE;
  u8* stage_mem = (u8*)ad_sm4;
  const u32 stage_base = ad_smem(stage_mem);
  const int nch = (nb + ch - 1) / ch;
  auto issue = [&](int k) {
    u8* dst = stage_mem + (size_t)(k & 1) * ch * row_bytes;
    const int r0 = k * ch, cnt = min(ch, nb - r0);
    // Lane r looks up the slot of the warp's row r (ch <= 32*AD_NW), so
    // the table loads are in flight together.
    long long mine = 0;
    if (warp + AD_NW * lane < cnt) {
      const int j = j0 + r0 + warp + AD_NW * lane;
      mine = (long long)table[j / block_size] * block_size + j % block_size;
    }
    for (int i = warp, r = 0; i < cnt; i += AD_NW, r++) {
      const long long slot = __shfl_sync(0xffffffffu, mine, r);
      const u8* src = (const u8*)layer + slot * row_bytes;
      const u32 d = stage_base + (u32)((dst - stage_mem) + (size_t)i * row_bytes);
      for (int q = lane; q < pieces; q += 32) ad_copy<PIECE>(d + q * PIECE, src + q * PIECE);
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
  };
  if (nch > 0) issue(0);
  for (int k = 0; k < nch; k++) {
    if (k + 1 < nch) {
      issue(k + 1);
      asm volatile("cp.async.wait_group 1;" ::: "memory");
    } else {
      asm volatile("cp.async.wait_group 0;" ::: "memory");
    }
    __syncthreads();
    if (k == 0) AD_STAMP(2);
    const u8* rows = stage_mem + (size_t)(k & 1) * ch * row_bytes;
    const int cnt = min(ch, nb - k * ch);
    for (int i0 = pg; i0 < cnt; i0 += AD_PG * AD_U) {
      // Scores: each lane's share of the HPW*AD_U dot products, then one
      // transposing reduction (ad_transpose_sum): afterwards the lanes
      // [HB*i, HB*(i+1)) hold dot product i = HPW*u + h in full.
      constexpr int NV = HPW * AD_U, HB = 32 / NV;
      float c[AD_U][16], v[NV];
#pragma unroll
      for (int u = 0; u < AD_U; u++) {
        // Past the stage's last row, a lane reads that row again; its
        // score is masked below, so it adds 0 times finite values.
        ADRaw<DT> raw;
        ad_load(raw, rows + (size_t)min(i0 + AD_PG * u, cnt - 1) * row_bytes, rank, ng, dr, lane);
        float pe[2];
        ad_convert(raw, c[u], pe, ng);
#pragma unroll
        for (int h = 0; h < HPW; h++) {
          float a = 0.f;
#pragma unroll
          for (int e = 0; e < 16; e++) a += qa[h][e] * c[u][e];
          a += qp[h][0] * pe[0] + qp[h][1] * pe[1];
          v[HPW * u + h] = a;
        }
      }
      const int idx = lane / HB, hme = idx % HPW;
      const bool valid = i0 + AD_PG * (idx / HPW) < cnt;
      const float dot = ad_transpose_sum<NV>(v, lane);
      const float sme = valid ? scale * dot : __int_as_float(0xff800000);
      // Online softmax: the step's maximum of each head reaches every
      // lane (max is exact, so the branch below is uniform over the warp).
      float mt = sme;
#pragma unroll
      for (int o = HPW * HB; o < 32; o *= 2) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, o));
      float mts[HPW];
      if (HPW == 2) {
        const float mo = __shfl_xor_sync(0xffffffffu, mt, HB);
        mts[0] = hme ? mo : mt;
        mts[HPW - 1] = hme ? mt : mo;
      } else {
        mts[0] = mt;
      }
#pragma unroll
      for (int h = 0; h < HPW; h++) {
        if (mts[h] > m[h]) {
          const float r = expf(m[h] - mts[h]);
          l[h] *= r;
#pragma unroll
          for (int e = 0; e < 16; e++) acc[h][e] *= r;
          m[h] = mts[h];
        }
      }
      // (hme ? m[1] : m[0]), not m[hme]: a run-time index would put m in
      // local memory.
      const float pme = valid ? expf(sme - (hme ? m[HPW - 1] : m[0])) : 0.f;
      float ps = pme;
#pragma unroll
      for (int o = HPW * HB; o < 32; o *= 2) ps += __shfl_xor_sync(0xffffffffu, ps, o);
      if (HPW == 2) {
        const float po = __shfl_xor_sync(0xffffffffu, ps, HB);
        l[0] += hme ? po : ps;
        l[HPW - 1] += hme ? ps : po;
      } else {
        l[0] += ps;
      }
#pragma unroll
      for (int u = 0; u < AD_U; u++) {
#pragma unroll
        for (int h = 0; h < HPW; h++) {
          const float pu = __shfl_sync(0xffffffffu, pme, (HPW * u + h) * HB);
#pragma unroll
          for (int e = 0; e < 16; e++) acc[h][e] += pu * c[u][e];
        }
      }
    }
    __syncthreads();  // the stage is read before the next issue overwrites it
  }
  AD_STAMP(3);

  // Combine the position groups: weights exp(m_g - M) over the groups
  // that saw positions, in group order.
#pragma unroll
  for (int h = 0; h < HPW; h++) {
    float* dst = wacc + ((size_t)pg * 2 + hw + h) * rank;
#pragma unroll
    for (int g = 0; g < 4; g++)
      if (g < ng) *(float4*)(dst + 128 * g + 4 * lane) = make_float4(acc[h][4 * g], acc[h][4 * g + 1], acc[h][4 * g + 2], acc[h][4 * g + 3]);
    if (lane == 0) {
      wm[pg][hw + h] = m[h];
      wl[pg][hw + h] = l[h];
    }
  }
  __syncthreads();
  if (threadIdx.x < 2) {
    const int h = threadIdx.x;
    float M = __int_as_float(0xff800000);
    for (int w = 0; w < AD_PG; w++)
      if (wl[w][h] > 0.f) M = fmaxf(M, wm[w][h]);
    float L = 0.f;
    for (int w = 0; w < AD_PG; w++) {
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
    for (int i = threadIdx.x; i < nh * rank; i += AD_NT) {
      const int h = i / rank, k = i - h * rank;
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < AD_PG; w++) v += wscale[w][h] * wacc[((size_t)w * 2 + h) * rank + k];
      olat[(size_t)t * ldo + (size_t)(h0 + h) * rank + k] = v * (1.f / fin[h][1]);
    }
    AD_STAMP(4);
    AD_STAMP(5);
    return;
  }
  // A partial: (max, sum) per head, then the unnormalised value sums.
  float* pml = part_ml + (tp * splits + s) * 4;
  float* pacc = part_acc + (tp * splits + s) * 2 * rank;
  for (int i = threadIdx.x; i < 2 * rank; i += AD_NT) {
    const int h = i / rank, k = i - h * rank;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < AD_PG; w++) v += wscale[w][h] * wacc[((size_t)w * 2 + h) * rank + k];
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
  AD_STAMP(4);
  if (!last_s) {
    AD_STAMP(5);
    return;
  }
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
  for (int i = threadIdx.x; i < nh * rank; i += AD_NT) {
    const int h = i / rank, k = i - h * rank;
    float v = 0.f;
#pragma unroll 8
    for (int j = 0; j < splits; j++) v += mw[h][j] * __ldcg(bacc + (size_t)j * 2 * rank + i);
    olat[(size_t)t * ldo + (size_t)(h0 + h) * rank + k] = v * (1.f / fin[h][1]);
  }
  AD_STAMP(5);
#undef AD_STAMP
}

#define AD_KERNEL(name, DT, NG, HPW)                                                                       \
  extern "C" __global__ void __launch_bounds__(32 * AD_PG * (2 / HPW), 1)                                  \
      name(float* olat, int ldo, const float* qlat, int ldql, const float* q, int ldq, const void* layer,  \
           const i32* __restrict__ pos, const i32* __restrict__ row_seq, const i32* __restrict__ seq_blocks, \
           const i32* __restrict__ blocks, int block_size, int heads, int rank, int dn, int dr, float scale, \
           int ch, float* part_ml, float* part_acc, u32* counters, unsigned long long* stamps) {              \
    attention_decode_body<DT, NG, HPW>(olat, ldo, qlat, ldql, q, ldq, layer, pos, row_seq, seq_blocks,     \
                                       blocks, block_size, heads, rank, dn, dr, scale, ch, part_ml,        \
                                       part_acc, counters, stamps);                                         \
  }

// One kernel per cache format and rank/128 (the lanes' column groups,
// fixed at compile time); _h1: one head a warp, sixteen warps.
AD_KERNEL(attention_decode_bf16_r128, 0, 1, 2)
AD_KERNEL(attention_decode_bf16_r256, 0, 2, 2)
AD_KERNEL(attention_decode_bf16_r512, 0, 4, 2)
AD_KERNEL(attention_decode_f32_r128, 1, 1, 2)
AD_KERNEL(attention_decode_f32_r256, 1, 2, 2)
AD_KERNEL(attention_decode_f32_r512, 1, 4, 2)
AD_KERNEL(attention_decode_fp8_r128, 2, 1, 2)
AD_KERNEL(attention_decode_fp8_r256, 2, 2, 2)
AD_KERNEL(attention_decode_fp8_r512, 2, 4, 2)
AD_KERNEL(attention_decode_fp4_r128, 3, 1, 2)
AD_KERNEL(attention_decode_fp4_r256, 3, 2, 2)
AD_KERNEL(attention_decode_fp4_r512, 3, 4, 2)
AD_KERNEL(attention_decode_bf16_r128_h1, 0, 1, 1)
AD_KERNEL(attention_decode_bf16_r256_h1, 0, 2, 1)
AD_KERNEL(attention_decode_bf16_r512_h1, 0, 4, 1)
AD_KERNEL(attention_decode_f32_r128_h1, 1, 1, 1)
AD_KERNEL(attention_decode_f32_r256_h1, 1, 2, 1)
AD_KERNEL(attention_decode_f32_r512_h1, 1, 4, 1)
AD_KERNEL(attention_decode_fp8_r128_h1, 2, 1, 1)
AD_KERNEL(attention_decode_fp8_r256_h1, 2, 2, 1)
AD_KERNEL(attention_decode_fp8_r512_h1, 2, 4, 1)
AD_KERNEL(attention_decode_fp4_r128_h1, 3, 1, 1)
AD_KERNEL(attention_decode_fp4_r256_h1, 3, 2, 1)
AD_KERNEL(attention_decode_fp4_r512_h1, 3, 4, 1)
