// MMFP4 products of few token rows (decode batches), groups of 128 only:
// the batched MoE (after moeb_group below has sorted the (token, slot)
// pairs by expert into tiles of at most 8 pairs) and dense products of up
// to 64 rows. Each warp streams its weight rows straight from global memory into
// registers (16-byte loads, several 128-column groups in flight, no block
// barrier in the loop) and multiplies them on the tensor cores with the
// token rows staged in shared memory, so that the weights are read once at
// nearly the copy bandwidth, where the tiled GEMM (gemm.cu) spent its time
// filling a 128 x 16 tile through a block-wide pipeline.
//
// The arithmetic is the GEMM's: codes widened exactly to int8 (2*e2m1),
// mma.sync.m16n8k32.s8.s8.s32 per 128-column group into int32, then
// acc += int * (weight scale * activation scale) group by group in fp32,
// the row scale / 2 last; so the products equal the GEMM's bit for bit
// (a dense product with K split over blocks adds its partial sums in
// another order).
//
// Inside a group the order of k does not matter as long as A and B agree.
// Thread (g = lane/4, t = lane%4) loads bytes [16t, 16t+16) of the group's
// 64 bytes of codes of rows g and g+8 (columns 32t..32t+31), and the 32
// activations of token g at the same columns; mma j (0..3) takes word j of
// its codes (columns 32t+8j..32t+8j+7: the low half as k-slots 4t..4t+3,
// the high half as 16+4t..16+4t+3) against activation bytes 8j..8j+7.

#define MB_WARPS 8
#define MB_TT 8  // tokens of a tile: one mma n-tile

// Layout of ExpertTable entries (gate, up, down).
struct BMat {
  const u8* codes;
  const u8* scales;
  const float* row_scale;
};
struct BExpert {
  BMat gate, up, down;
};

// A tile as moeb_group_x leaves it: its expert's matrices and its pairs'
// rows [s0, s0+n), so that the products find their weights in one round
// trip to memory instead of three dependent ones (the tile, then the
// expert's entry, then the weights).
// done: the gate/up blocks of the tile that have finished (FLAG kernels).
struct MbTile {
  BExpert ex;
  i32 s0, n;
  u32 done, pad;
  i32 tok[MB_TT];  // the tile's tokens, list[s0..s0+n), where its rows are MB_TT at most
};

DEVICE u32 mb_smem_addr(const void* p) {
  u32 r;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
  return r;
}

DEVICE void mb_cp16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(mb_smem_addr(dst)), "l"(src) : "memory");
}

DEVICE void mb_cp4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(mb_smem_addr(dst)), "l"(src) : "memory");
}

DEVICE void mb_cp_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// Doubled E2M1 values of four codes as signed int8 bytes.
DEVICE u32 mb_e2m1x4(u32 sel) { return e2m1x4_biased(sel) ^ 0x80808080u; }

DEVICE void mb_mma(i32 (&d)[4], u32 w0, u32 w1, u32 b0, u32 b1) {
  const u32 a0 = mb_e2m1x4(w0), a1 = mb_e2m1x4(w1), a2 = mb_e2m1x4(w0 >> 16), a3 = mb_e2m1x4(w1 >> 16);
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The same product with the codes' positive and negative magnitudes in
// separate mmas (p, n): four codes take 2 prmt (and eight codes one xor),
// against mb_e2m1x4's 2 prmt, 2 xor and an add, for an mma more; the
// caller subtracts n from p (exact: the same integer sums).
DEVICE void mb_mma_split(i32 (&p)[4], i32 (&n)[4], u32 w0, u32 w1, u32 b0, u32 b1) {
  const u32 n0 = w0 ^ 0x88888888u, n1 = w1 ^ 0x88888888u;
  const u32 p0 = prmt(E2M1_LO, E2M1_HI, w0), p1 = prmt(E2M1_LO, E2M1_HI, w1);
  const u32 p2 = prmt(E2M1_LO, E2M1_HI, w0 >> 16), p3 = prmt(E2M1_LO, E2M1_HI, w1 >> 16);
  const u32 m0 = prmt(E2M1_LO, E2M1_HI, n0), m1 = prmt(E2M1_LO, E2M1_HI, n1);
  const u32 m2 = prmt(E2M1_LO, E2M1_HI, n0 >> 16), m3 = prmt(E2M1_LO, E2M1_HI, n1 >> 16);
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+r"(p[0]), "+r"(p[1]), "+r"(p[2]), "+r"(p[3])
      : "r"(p0), "r"(p1), "r"(p2), "r"(p3), "r"(b0), "r"(b1));
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+r"(n[0]), "+r"(n[1]), "+r"(n[2]), "+r"(n[3])
      : "r"(m0), "r"(m1), "r"(m2), "r"(m3), "r"(b0), "r"(b1));
}

// Stages R token rows into shared memory: row r is columns [c0, c0+C) of
// row src(r) of xq [.][K] int8, with its scales from xs [.][K/128] (C and
// c0 multiples of 128). Shared layout: xsh [R][C+16] bytes (the padding
// keeps the warp's 16-byte reads conflict-free), then xss [R][C/128+1]
// floats. cp.async: mb_core waits for it.
template <typename Src>
DEVICE void mb_stage(u8* smem, int R, const i8* __restrict__ xq, const float* __restrict__ xs, int K, int c0,
                     int C, Src src) {
  const int ldx = C + 16, GC = C >> 7, ldxs = GC + 1, GK = K >> 7, g0 = c0 >> 7;
  float* xss = (float*)(smem + R * ldx);
  const int per = C >> 4;  // 16-byte pieces a row
  for (int idx = threadIdx.x; idx < R * per; idx += blockDim.x) {
    const int r = idx / per, c = idx - r * per;
    mb_cp16(smem + r * ldx + 16 * c, xq + (size_t)src(r) * K + c0 + 16 * c);
  }
  for (int idx = threadIdx.x; idx < R * GC; idx += blockDim.x) {
    const int r = idx / GC, c = idx - r * GC;
    mb_cp4(xss + r * ldxs + c, xs + (size_t)src(r) * GK + g0 + c);
  }
  asm volatile("cp.async.commit_group;" ::: "memory");
}

// A row's D scale bytes (D groups from an aligned group) as one load.
template <int D>
DEVICE u32 mb_scales(const u8* p) {
  if (D == 4) return __ldg((const u32*)p);
  if (D == 2) return __ldg((const unsigned short*)p);
  return __ldg(p);
}

// One batch of D groups of MR m-tiles (weights and scales) into registers.
template <int MR, int D, bool TM = false>
DEVICE void mb_load(uint4 (&w)[D][MR][2], u32 (&sc)[MR][2], const u8* const (&rc)[MR], const u8* const (&rs)[MR],
                    int gs, int GK, size_t half8, int t) {
#pragma unroll
  for (int m = 0; m < MR; m++) {
    sc[m][0] = mb_scales<D>(rs[m] + gs);
    sc[m][1] = mb_scales<D>(rs[m] + 8 * GK + gs);
  }
#pragma unroll
  for (int d = 0; d < D; d++)
#pragma unroll
    for (int m = 0; m < MR; m++) {
      // TM: rc[m] is row g of an m-tile (code_row), row g + 8 512 bytes on.
      const u8* p = rc[m] + (TM ? (gs + d) * 1024 : (gs + d) * 64) + 16 * t;
      w[d][m][0] = load_stream16(p);
      w[d][m][1] = load_stream16(p + (TM ? (size_t)512 : half8));
    }
}

// Two E4M3 scale bytes (the low two of x) as floats through the hardware
// conversion (sm_89 and later): exact, as e4m3() (every E4M3 value is an
// fp16 value), in 4 instructions for the two instead of about 14.
DEVICE void mb_e4m3x2(u32 x, float& f0, float& f1) {
  asm("{ .reg .b16 x, l, h; .reg .b32 r; cvt.u16.u32 x, %2; cvt.rn.f16x2.e4m3x2 r, x; mov.b32 {l, h}, r;"
      " cvt.f32.f16 %0, l; cvt.f32.f16 %1, h; }"
      : "=f"(f0), "=f"(f1)
      : "r"(x));
}

// The products of one loaded batch (staged groups s0..s0+D-1) into acc.
// CVT: the scales through mb_e4m3x2 (the same values).
template <int MR, int WT, int D, bool SPLIT, bool CVT = false>
DEVICE void mb_apply(const uint4 (&w)[D][MR][2], const u32 (&sc)[MR][2], int s0, const u8* xrow, const float* xss,
                     int ldx, int ldxs, int t, float (&acc)[MR][WT][4]) {
#pragma unroll
  for (int d = 0; d < D; d++) {
    const int s = s0 + d;
#pragma unroll
    for (int n = 0; n < WT; n++) {
      const u8* xr = xrow + 8 * n * ldx + 128 * s;
      const uint4 xa = *(const uint4*)xr, xb = *(const uint4*)(xr + 16);
      const float x0 = xss[(8 * n + 2 * t) * ldxs + s], x1 = xss[(8 * n + 2 * t + 1) * ldxs + s];
#pragma unroll
      for (int m = 0; m < MR; m++) {
        const uint4 wa = w[d][m][0], wb = w[d][m][1];
        i32 q[4] = {0, 0, 0, 0};
        if (SPLIT) {
          i32 qn[4] = {0, 0, 0, 0};
          mb_mma_split(q, qn, wa.x, wb.x, xa.x, xa.y);
          mb_mma_split(q, qn, wa.y, wb.y, xa.z, xa.w);
          mb_mma_split(q, qn, wa.z, wb.z, xb.x, xb.y);
          mb_mma_split(q, qn, wa.w, wb.w, xb.z, xb.w);
#pragma unroll
          for (int e = 0; e < 4; e++) q[e] -= qn[e];
        } else {
          mb_mma(q, wa.x, wb.x, xa.x, xa.y);
          mb_mma(q, wa.y, wb.y, xa.z, xa.w);
          mb_mma(q, wa.z, wb.z, xb.x, xb.y);
          mb_mma(q, wa.w, wb.w, xb.z, xb.w);
        }
        float s0f, s1f;
        if (CVT) {
          mb_e4m3x2(prmt(sc[m][0], sc[m][1], d | ((4 + d) << 4)), s0f, s1f);
        } else {
          s0f = e4m3((sc[m][0] >> (8 * d)) & 0xFFu);
          s1f = e4m3((sc[m][1] >> (8 * d)) & 0xFFu);
        }
        acc[m][n][0] += (float)q[0] * (s0f * x0);
        acc[m][n][1] += (float)q[1] * (s0f * x1);
        acc[m][n][2] += (float)q[2] * (s1f * x0);
        acc[m][n][3] += (float)q[3] * (s1f * x1);
      }
    }
  }
}

// The warp's product of MR m-tiles of 16 weight rows with WT n-tiles of 8
// staged token rows, over the ng groups of 128 columns from group g0 (ng a
// multiple of D, and g0 too, so that a row's D scales are one aligned
// load). m-tile m: codes of row g (of the m-tile's 16) at rc[m], row g+8 at
// rc[m] + 8*K/2; scale rows rs[m], rs[m] + 8*(K/128). The staged rows hold
// the ng groups (mb_stage with C = 128*ng). acc[m][n][e]: e = 0, 1: row
// g, tokens 8n+2t, 8n+2t+1; e = 2, 3: row g+8. The first batch of weight
// loads is issued before the staged rows are awaited (a block barrier:
// every warp of the block calls this with the same ng); pre() runs between
// the two (the dense product waits for the kernel before and stages its
// rows there, after its first weight loads).
// SPLIT: mb_mma_split's widening (the same sums). WIDE: mb_apply_w's
// products, for the first nt of the WT n-tiles. TM: tile-major codes
// (code_row), rc[m] row g's, row g+8 at rc[m] + 512.
template <int MR, int WT, int D>
DEVICE void mb_apply_w(const uint4 (&w)[D][MR][2], const u32 (&sc)[MR][2], int s0, const u8* xrow, const float* xss,
                       int ldx, int ldxs, int t, int nt, float (&acc)[MR][WT][4]);
template <int MR, int WT, int D, bool SPLIT = false, bool CVT = false, bool WIDE = false, bool TM = false,
          typename Pre>
DEVICE void mb_core(const u8* const (&rc)[MR], const u8* const (&rs)[MR], int K, int g0, int ng, const u8* smem,
                    float (&acc)[MR][WT][4], Pre pre, int nt = WT) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  // (WIDE: the whole row, ng = K/128, so 128 * ng = K.)
  const int ldx = (WIDE ? K : 128 * ng) + 16, ldxs = ng + 1, GK = K >> 7;
  const size_t half8 = (size_t)8 * (K / 2);
  const u8* xrow = smem + g * ldx + 32 * t;
  const float* xss = (const float*)(smem + 8 * WT * ldx);
#pragma unroll
  for (int m = 0; m < MR; m++)
#pragma unroll
    for (int n = 0; n < WT; n++)
#pragma unroll
      for (int e = 0; e < 4; e++) acc[m][n][e] = 0.f;
  for (int s0 = 0; s0 < ng; s0 += D) {
    uint4 w[D][MR][2];
    u32 sc[MR][2];
    mb_load<MR, D, TM>(w, sc, rc, rs, g0 + s0, GK, half8, t);
    if (s0 == 0) {
      pre();
      mb_cp_wait_all();
      __syncthreads();
    }
    if constexpr (WIDE)
      mb_apply_w<MR, WT, D>(w, sc, s0, xrow, xss, ldx, ldxs, t, nt, acc);
    else
      mb_apply<MR, WT, D, SPLIT, CVT>(w, sc, s0, xrow, xss, ldx, ldxs, t, acc);
  }
}

// The largest magnitude of each token over a block's rows, for the int8
// form of a product's 128 output columns: a thread's values v are mma
// fragments (n-tile n, tokens 8n+2t and 8n+2t+1 in e & 1), of which the
// first nt n-tiles count (warp, g = lane/4, t = lane%4: the thread's).
// mb_warp_amax leaves each warp's maxima in wmax and waits at a block
// barrier; mb_block_amax then reads n-tile n's two tokens' maxima over the
// warps.
template <int WT>
DEVICE void mb_warp_amax(const float (&v)[WT][4], int nt, float (*wmax)[8 * WT], int warp, int g, int t) {
#pragma unroll
  for (int n = 0; n < WT; n++) {
    if (n >= nt) break;
    float m0 = fmaxf(fabsf(v[n][0]), fabsf(v[n][2])), m1 = fmaxf(fabsf(v[n][1]), fabsf(v[n][3]));
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) {
      m0 = fmaxf(m0, __shfl_xor_sync(0xffffffffu, m0, o));
      m1 = fmaxf(m1, __shfl_xor_sync(0xffffffffu, m1, o));
    }
    if (g == 0) {
      wmax[warp][8 * n + 2 * t] = m0;
      wmax[warp][8 * n + 2 * t + 1] = m1;
    }
  }
  __syncthreads();
}

template <int WT>
DEVICE void mb_block_amax(const float (*wmax)[8 * WT], int n, int t, float (&amax)[2]) {
  amax[0] = 0.f;
  amax[1] = 0.f;
#pragma unroll
  for (int w = 0; w < MB_WARPS; w++) {
    amax[0] = fmaxf(amax[0], wmax[w][8 * n + 2 * t]);
    amax[1] = fmaxf(amax[1], wmax[w][8 * n + 2 * t + 1]);
  }
}

// Gate and up products of each tile with the SiLU product, quantized to
// int8 in groups of 128 as rmsnorm_quant without a gain does:
// hq[row][n], hs[row][n/128] for the tile's rows (row = tile_s + token).
// Grid (I/128, max tiles), 256 threads: warp w takes rows 16w.. of the
// block's 128 rows (one h group) of gate and of up. I a multiple of 128,
// K of 128 * D.
// rec (moeb_group_x's tiles, or null): the tile from there instead of
// tile_e, tile_s, tile_n and experts. CVT: mb_apply's; RS: the row scales
// read with the first weights instead of after the products, and the
// token rows staged after the first weight loads.
// FLAG (with rec): each block counts itself done in its tile's record
// once its h rows are written, for moeb_down's FLAG.
template <int D, bool SPLIT = false, bool CVT = false, bool RS = false, bool FLAG = false>
DEVICE void moeb_gate_up(const BExpert* __restrict__ experts, const i32* __restrict__ tile_e,
                         const i32* __restrict__ tile_s, const i32* __restrict__ tile_n,
                         const i32* __restrict__ ntiles, const i32* __restrict__ list, int I, int K,
                         const i8* __restrict__ xq, const float* __restrict__ xs, i8* __restrict__ hq,
                         float* __restrict__ hs, const MbTile* __restrict__ rec) {
  extern __shared__ __align__(16) u8 mb_smem[];
  __shared__ float wmax[MB_WARPS][MB_TT];
  PDL_WAIT();
  const int tile = blockIdx.y;
  int s0, ntok;
  BMat gate, up;
  if (rec) {
    const int nt = ntiles[0];
    s0 = rec[tile].s0;
    ntok = rec[tile].n;
    gate = rec[tile].ex.gate;
    up = rec[tile].ex.up;
    if (tile >= nt) return;
  } else {
    if (tile >= ntiles[0]) return;
    s0 = tile_s[tile];
    ntok = tile_n[tile];
    const BExpert* ex = experts + tile_e[tile];
    gate = ex->gate;
    up = ex->up;
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * 128 + warp * 16, GK = K >> 7;
  // With rec, the token rows' indices come from the tile's record, read
  // with it, instead of from list a round trip later: one L2 round trip
  // less before the block's first products (BenchmarkMoEStream on an
  // H200: 84.6 -> 82.4 us at 32 tokens, the same bits; docs/perf.md,
  // 2026-11-30 (28)).
  const auto stage = [&] {
    mb_stage(mb_smem, MB_TT, xq, xs, K, 0, K,
             [&](int r) { return rec ? rec[tile].tok[min(r, ntok - 1)] : list[s0 + min(r, ntok - 1)]; });
  };
  if (!RS) stage();
  const size_t row = n0 + g;
  const u8* rc[2] = {code_row<true>(gate.codes, row, K), code_row<true>(up.codes, row, K)};
  const u8* rs[2] = {gate.scales + row * GK, up.scales + row * GK};
  float rsc[2][2];
  if (RS) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
      rsc[0][h] = __ldg(gate.row_scale + row + 8 * h);
      rsc[1][h] = __ldg(up.row_scale + row + 8 * h);
    }
  }
  // RS: the token rows are staged after the first weight loads are issued
  // (their addresses wait for a round trip, the list).
  float acc[2][1][4];
  mb_core<2, 1, D, SPLIT, CVT, false, true>(rc, rs, K, 0, GK, mb_smem, acc, [&] {
    if (RS) stage();
  });
  float hv[1][4];
#pragma unroll
  for (int e = 0; e < 4; e++) {
    const int n = n0 + g + 8 * (e >> 1);
    const float rg = RS ? rsc[0][e >> 1] : gate.row_scale[n], ru = RS ? rsc[1][e >> 1] : up.row_scale[n];
    const float gv = acc[0][0][e] * (rg * 0.5f);
    const float uv = acc[1][0][e] * (ru * 0.5f);
    hv[0][e] = silu(gv) * uv;
  }
  mb_warp_amax<1>(hv, 1, wmax, warp, g, t);  // each token's largest magnitude over the block's 128 rows
  float amax[2];
  mb_block_amax<1>(wmax, 0, t, amax);
#pragma unroll
  for (int e = 0; e < 4; e++) {
    const int tok = 2 * t + (e & 1), n = n0 + g + 8 * (e >> 1);
    if (tok < ntok) {
      const float a = amax[e & 1];
      hq[(size_t)(s0 + tok) * I + n] = (i8)quant8(hv[0][e], a, a / 127.f);
    }
  }
  if (warp == 0 && g == 0) {
#pragma unroll
    for (int e = 0; e < 2; e++) {
      const int tok = 2 * t + e;
      if (tok < ntok) hs[(size_t)(s0 + tok) * (I >> 7) + blockIdx.x] = amax[e] == 0.f ? 0.f : amax[e] / 127.f;
    }
  }
  if (FLAG && rec) {
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) atomicAdd((u32*)&rec[tile].done, 1u);
  }
}

// A down block's wait for its own tile's I/128 gate/up blocks (their
// count in the tile's record, moeb_gate_up's FLAG), after which the next
// launch may start.
DEVICE void mb_wait_tile_gate_up(const MbTile* rec, int tile, int I) {
  if (threadIdx.x == 0) {
    while (ld_acquire(&rec[tile].done) < (u32)(I >> 7)) asm volatile("nanosleep.u32 64;");
    __threadfence();
  }
  __syncthreads();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Down products of each tile: part[row][n] = down_e,n . hq[row] for the
// tile's rows. Grid (ceil(N/(128*MR)), max tiles), 256 threads: warp w
// takes rows 16*MR*w.. of the block's 128*MR (MR m-tiles; m-tiles past N
// are clamped and dropped). N a multiple of 16, I of 128 * D.
// The tiles come from moeb_group, two launches back: the gate/up grid
// waited for it before letting this grid start, so the tiles are read and
// the first weights loaded before waiting for the gate/up products (the
// staged hq rows), which overlaps the gate/up grid's last blocks.
// rec, CVT, RS: as moeb_gate_up's. FLAG (with rec): instead of waiting for
// the whole gate/up grid (PDL_WAIT), wait for the I/128 gate/up blocks of
// this tile (their count in the tile's record), so that the down blocks
// fill the gate/up grid's last wave; the wait for the whole grid comes at
// the end (it has finished by then), so that the launches after still
// find every kernel two launches back finished. No deadlock: this grid
// starts only once every gate/up block has started.
template <int MR, int D, bool SPLIT = false, bool CVT = false, bool RS = false, bool FLAG = false>
DEVICE void moeb_down(const BExpert* __restrict__ experts, const i32* __restrict__ tile_e,
                      const i32* __restrict__ tile_s, const i32* __restrict__ tile_n,
                      const i32* __restrict__ ntiles, int N, int I, const i8* __restrict__ hq,
                      const float* __restrict__ hs, float* __restrict__ part, const MbTile* __restrict__ rec) {
  extern __shared__ __align__(16) u8 mb_smem[];
  const int tile = blockIdx.y;
  int s0, ntok;
  BMat dn;
  if (rec) {
    const int nt = ntiles[0];
    s0 = rec[tile].s0;
    ntok = rec[tile].n;
    dn = rec[tile].ex.down;
    if (tile >= nt) return;
  } else {
    if (tile >= ntiles[0]) return;
    s0 = tile_s[tile];
    ntok = tile_n[tile];
    dn = experts[tile_e[tile]].down;
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * (128 * MR) + warp * (16 * MR), GK = I >> 7;
  // N a multiple of 16: a clamped m-tile starts at N - 16.
  const u8* rc[MR];
  const u8* rs[MR];
#pragma unroll
  for (int m = 0; m < MR; m++) {
    const size_t row = min(n0 + 16 * m, N - 16) + g;
    rc[m] = code_row<true>(dn.codes, row, I);
    rs[m] = dn.scales + row * GK;
  }
  float rsc[MR][2];
  if (RS) {
#pragma unroll
    for (int m = 0; m < MR; m++)
#pragma unroll
      for (int h = 0; h < 2; h++) rsc[m][h] = __ldg(dn.row_scale + min(n0 + 16 * m, N - 16) + g + 8 * h);
  }
  float acc[MR][1][4];
  mb_core<MR, 1, D, SPLIT, CVT, false, true>(rc, rs, I, 0, GK, mb_smem, acc, [&] {
    if (FLAG && rec) {
      mb_wait_tile_gate_up(rec, tile, I);
    } else {
      PDL_WAIT();
    }
    mb_stage(mb_smem, MB_TT, hq, hs, I, 0, I, [&](int r) { return s0 + min(r, ntok - 1); });
  });
#pragma unroll
  for (int m = 0; m < MR; m++)
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const int tok = 2 * t + (e & 1), n = n0 + 16 * m + g + 8 * (e >> 1);
      const float r = RS ? rsc[m][e >> 1] : dn.row_scale[n];
      if (tok < ntok && n < N) part[(size_t)(s0 + tok) * N + n] = acc[m][0][e] * (r * 0.5f);
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (FLAG && rec) asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// The pair: mb_mma_split's widening (about a quarter fewer instructions a
// code than mb_mma's), down products 128 rows a block (one m-tile a warp,
// four groups in flight), the scales through the hardware conversion, the
// row scales read early, tile records and down blocks that wait for their
// own tile only; gate/up at three blocks a multiprocessor and down at four
// (MINB, MINBD: 80 and 64 registers, a few bytes spilled), 24 and 32
// warps where two blocks had 16: the warps wait on their loads about half
// the time, and more of them cover the waits better. On an H200
// (BenchmarkMoEStream, a full-size layer) 52.9 / 90.6 / 109.0 us at 8 /
// 32 / 64 tokens against 57.1 / 99.4 / 118.0 at two blocks
// (docs/perf.md, 2026-11-29 (8)).
#define MOEB_S_KERNELS(SUFFIX, CVT, RS, FLAG, MINB, MINBD)                                                           \
  extern "C" __global__ void __launch_bounds__(256, MINB) moeb_gate_up_##SUFFIX(                                   \
      const BExpert* __restrict__ experts, const i32* __restrict__ tile_e, const i32* __restrict__ tile_s,      \
      const i32* __restrict__ tile_n, const i32* __restrict__ ntiles, const i32* __restrict__ list, int I,       \
      int K, const i8* __restrict__ xq, const float* __restrict__ xs, i8* __restrict__ hq,                       \
      float* __restrict__ hs, const MbTile* __restrict__ rec) {                                                 \
    moeb_gate_up<2, true, CVT, RS, FLAG>(experts, tile_e, tile_s, tile_n, ntiles, list, I, K, xq, xs, hq, hs, rec);  \
  }                                                                                                             \
  extern "C" __global__ void __launch_bounds__(256, MINBD) moeb_down_##SUFFIX(                                  \
      const BExpert* __restrict__ experts, const i32* __restrict__ tile_e, const i32* __restrict__ tile_s,      \
      const i32* __restrict__ tile_n, const i32* __restrict__ ntiles, int N, int I, const i8* __restrict__ hq,  \
      const float* __restrict__ hs, float* __restrict__ part, const MbTile* __restrict__ rec) {                 \
    moeb_down<1, 4, true, CVT, RS, FLAG>(experts, tile_e, tile_s, tile_n, ntiles, N, I, hq, hs, part, rec);           \
  }

MOEB_S_KERNELS(s2f34, true, true, true, 3, 4)

// ---------------------------------------------------------------------------
// moe_group (gemm.cu) with the tiles made in parallel: one block of 1024
// threads; the pairs' counts by expert (shared atomics), a block-wide
// prefix sum of the counts and of the tiles (ceil(count/BT) an expert),
// then each expert's thread writes its tiles. Same outputs as moe_group
// but for the order of the pairs inside an expert's segment (atomic order
// in both), which no result depends on.
DEVICE int mb_block_scan(int v, int* warp_sums) {
  // Inclusive prefix sum over the block's 1024 threads.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int u = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += u;
  }
  if (lane == 31) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int w = warp_sums[lane];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int u = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += u;
    }
    warp_sums[lane] = w;
  }
  __syncthreads();
  const int r = v + (warp > 0 ? warp_sums[warp - 1] : 0);
  __syncthreads();
  return r;
}

// rec and experts (or null): each tile's record (MbTile) too, with its
// token ids where tiles hold MB_TT rows at most.
DEVICE void mb_group(const i32* __restrict__ ids, int T, int topk, int S, int E, int BT, i32* __restrict__ pos,
                     i32* __restrict__ list, i32* __restrict__ tile_e, i32* __restrict__ tile_s,
                     i32* __restrict__ tile_n, i32* __restrict__ ntiles, const BExpert* __restrict__ experts,
                     MbTile* __restrict__ rec) {
  __shared__ int cnt[1024], off[1024], tbase[1024], sums[32];
  const int slots = topk + S, P = T * slots, NE = E + S, e = threadIdx.x;
  cnt[e] = 0;
  BExpert mine;
  if (rec && e < NE) mine = experts[e];  // the table does not change: read before the wait
  PDL_WAIT();
  __syncthreads();
  for (int p = threadIdx.x; p < P; p += blockDim.x) {
    const int t = p / slots, k = p - t * slots;
    const int x = k < topk ? ids[t * topk + k] : E + (k - topk);
    pos[p] = (x >= 0 && x < NE) ? atomicAdd(&cnt[x], 1) : -1;
  }
  __syncthreads();
  const int c = e < NE ? cnt[e] : 0, nt = (c + BT - 1) / BT;
  const int rows_incl = mb_block_scan(c, sums);
  const int tiles_incl = mb_block_scan(nt, sums);
  off[e] = rows_incl - c;
  tbase[e] = tiles_incl - nt;
  for (int j = 0; j < nt; j++) {
    const int i = tiles_incl - nt + j;
    tile_e[i] = e;
    tile_s[i] = rows_incl - c + j * BT;
    tile_n[i] = min(BT, c - j * BT);
    if (rec) {
      rec[i].ex = mine;
      rec[i].s0 = rows_incl - c + j * BT;
      rec[i].n = min(BT, c - j * BT);
      rec[i].done = 0;
    }
  }
  if (e == blockDim.x - 1) ntiles[0] = tiles_incl;
  __syncthreads();
  for (int p = threadIdx.x; p < P; p += blockDim.x) {
    const int t = p / slots, k = p - t * slots;
    const int x = k < topk ? ids[t * topk + k] : E + (k - topk);
    if (pos[p] < 0) continue;
    const int row = off[x] + pos[p];
    if (rec && BT <= MB_TT) rec[tbase[x] + pos[p] / BT].tok[pos[p] % BT] = t;
    pos[p] = row;
    list[row] = t;
  }
}

extern "C" __global__ void __launch_bounds__(1024)
    moeb_group(const i32* __restrict__ ids, int T, int topk, int S, int E, int BT, i32* __restrict__ pos,
               i32* __restrict__ list, i32* __restrict__ tile_e, i32* __restrict__ tile_s,
               i32* __restrict__ tile_n, i32* __restrict__ ntiles) {
  mb_group(ids, T, topk, S, E, BT, pos, list, tile_e, tile_s, tile_n, ntiles, nullptr, nullptr);
}

// moeb_group that also leaves each tile's record in rec (experts: the
// table of BExpert entries).
extern "C" __global__ void __launch_bounds__(1024)
    moeb_group_x(const i32* __restrict__ ids, int T, int topk, int S, int E, int BT, i32* __restrict__ pos,
                 i32* __restrict__ list, i32* __restrict__ tile_e, i32* __restrict__ tile_s,
                 i32* __restrict__ tile_n, i32* __restrict__ ntiles, const BExpert* __restrict__ experts,
                 MbTile* __restrict__ rec) {
  mb_group(ids, T, topk, S, E, BT, pos, list, tile_e, tile_s, tile_n, ntiles, experts, rec);
}

// moe_combine (gemm.cu) spread wider: y[t] (+)= sum over token t's slots,
// in slot order, of weight * part[pos] (routed slots with their weights,
// shared ones with 1). Grid (T, ceil(N/512)), 128 threads of 4 columns
// each (N a multiple of 4).
extern "C" __global__ void __launch_bounds__(128)
    moeb_combine(const float* __restrict__ part, const i32* __restrict__ pos, const float* __restrict__ wts,
                 int topk, int slots, int N, float* __restrict__ y, int ldy, int accumulate) {
  PDL_LAUNCH();
  PDL_WAIT();
  const int t = blockIdx.x, n = (blockIdx.y * 128 + threadIdx.x) * 4;
  if (n >= N) return;
  float4 total = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int k = 0; k < slots; k++) {
    const int p = pos[t * slots + k];
    if (p < 0) continue;
    const float w = k < topk ? wts[t * topk + k] : 1.f;
    const float4 v = __ldcg((const float4*)(part + (size_t)p * N + n));
    total.x += w * v.x;
    total.y += w * v.y;
    total.z += w * v.z;
    total.w += w * v.w;
  }
  float* o = y + (size_t)t * ldy + n;
  if (accumulate) {
    o[0] += total.x;
    o[1] += total.y;
    o[2] += total.z;
    o[3] += total.w;
  } else {
    o[0] = total.x;
    o[1] = total.y;
    o[2] = total.z;
    o[3] = total.w;
  }
}

// moeb_combine with its loads in flight together: the slots' rows, the
// weights and the output it adds to are read before the wait for the down
// kernel (they come from kernels two or more launches back), then every
// slot's partial row at once, instead of a chain of two dependent reads a
// slot. The same sums in the same order. At most MB_MAXS slots (8: with
// 16, NVRTC 13 spilled 4 bytes for sm_90; GLM-4.7-Flash has 5, and more
// slots take moeb_combine).
#define MB_MAXS 8
extern "C" __global__ void __launch_bounds__(128)
    moeb_combine_w(const float* __restrict__ part, const i32* __restrict__ pos, const float* __restrict__ wts,
                   int topk, int slots, int N, float* __restrict__ y, int ldy, int accumulate) {
  const int t = blockIdx.x, n = (blockIdx.y * 128 + threadIdx.x) * 4;
  const bool on = n < N;
  int p[MB_MAXS];
  float w[MB_MAXS];
#pragma unroll
  for (int k = 0; k < MB_MAXS; k++) {
    p[k] = k < slots ? pos[t * slots + k] : -1;
    w[k] = k < topk ? wts[t * topk + k] : 1.f;
  }
  float* o = y + (size_t)t * ldy + n;
  float4 prev = make_float4(0.f, 0.f, 0.f, 0.f);
  if (on && accumulate) prev = make_float4(o[0], o[1], o[2], o[3]);
  PDL_WAIT();
  if (!on) return;
  float4 v[MB_MAXS];
#pragma unroll
  for (int k = 0; k < MB_MAXS; k++)
    if (p[k] >= 0) v[k] = __ldcg((const float4*)(part + (size_t)p[k] * N + n));
  float4 total = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int k = 0; k < MB_MAXS; k++) {
    if (p[k] < 0) continue;
    total.x += w[k] * v[k].x;
    total.y += w[k] * v[k].y;
    total.z += w[k] * v[k].z;
    total.w += w[k] * v[k].w;
  }
  if (accumulate) {
    o[0] = prev.x + total.x;
    o[1] = prev.y + total.y;
    o[2] = prev.z + total.z;
    o[3] = prev.w + total.w;
  } else {
    o[0] = total.x;
    o[1] = total.y;
    o[2] = total.z;
    o[3] = total.w;
  }
}

// ---------------------------------------------------------------------------
// The int8 form of a streaming product's output, written by the product
// (mmsq_* kernels, the value expansion of a serving step, for o_proj): with
// K unsplit and N a multiple of 128, a block's 128 output columns of each
// token are one group of 128 of the output row (OK columns, the block's
// first at col0), so the block quantizes them as rmsnorm_quant without a
// gain quantizes the row: oq[tok][.] int8, os[tok][col0/128] the scale,
// osum[tok][c] the sums of the 32-column chunks. v: the thread's outputs
// (tokens 8n+2t+(e&1), rows 16*warp+g+8*(e>>1) of the block).
template <int WT>
DEVICE void mms_quant_out(const float (&v)[WT][4], int T, int col0, int OK, i8* __restrict__ oq,
                          float* __restrict__ os, i32* __restrict__ osum) {
  __shared__ float wmax[MB_WARPS][8 * WT];
  __shared__ i32 wsum[MB_WARPS][8 * WT];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  mb_warp_amax<WT>(v, WT, wmax, warp, g, t);
#pragma unroll
  for (int n = 0; n < WT; n++) {
    float amax[2];
    mb_block_amax<WT>(wmax, n, t, amax);
    i32 s[2] = {0, 0};
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const int tok = 8 * n + 2 * t + (e & 1), c = col0 + 16 * warp + g + 8 * (e >> 1);
      const float a = amax[e & 1];
      const i32 q = quant8(v[n][e], a, a / 127.f);
      s[e & 1] += q;
      if (tok < T) oq[(size_t)tok * OK + c] = (i8)q;
    }
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) {
      s[0] += __shfl_xor_sync(0xffffffffu, s[0], o);
      s[1] += __shfl_xor_sync(0xffffffffu, s[1], o);
    }
    if (g == 0) {
      wsum[warp][8 * n + 2 * t] = s[0];
      wsum[warp][8 * n + 2 * t + 1] = s[1];
    }
  }
  __syncthreads();
  // Chunk c of 32 columns is warps 2c and 2c+1.
  for (int i = threadIdx.x; i < 4 * 8 * WT; i += blockDim.x) {
    const int c = i / (8 * WT), tok = i - c * (8 * WT);
    if (tok < T) osum[(size_t)tok * (OK / 32) + col0 / 32 + c] = wsum[2 * c][tok] + wsum[2 * c + 1][tok];
  }
  for (int tok = threadIdx.x; tok < min(T, 8 * WT); tok += blockDim.x) {
    float a = 0.f;
#pragma unroll
    for (int w = 0; w < MB_WARPS; w++) a = fmaxf(a, wmax[w][tok]);
    os[(size_t)tok * (OK / 128) + col0 / 128] = a == 0.f ? 0.f : a / 127.f;
  }
}

// mb_core for one m-tile with every batch of the warp's weights (NB
// batches of D groups, the block's ng groups if ng <= NB*D) loaded before
// pre(), that is before the dense product waits for the kernel before:
// the weights' round trips to memory overlap that kernel instead of
// following the wait one batch after another. Groups past NB*D go as
// mb_core's. The same products in the same order as mb_core's.
#define MMSP_GROUPS 6  // the groups mmsp_* kernels load before their wait
template <int WT, int D, int NB, typename Pre>
DEVICE void mbp_core(const u8* const (&rc)[1], const u8* const (&rs)[1], int K, int g0, int ng, const u8* smem,
                     float (&acc)[1][WT][4], Pre pre) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int ldx = 128 * ng + 16, ldxs = ng + 1, GK = K >> 7;
  const size_t half8 = (size_t)8 * (K / 2);
  const u8* xrow = smem + g * ldx + 32 * t;
  const float* xss = (const float*)(smem + 8 * WT * ldx);
#pragma unroll
  for (int n = 0; n < WT; n++)
#pragma unroll
    for (int e = 0; e < 4; e++) acc[0][n][e] = 0.f;
  uint4 w[NB][D][1][2];
  u32 sc[NB][1][2];
#pragma unroll
  for (int b = 0; b < NB; b++)
    if (b * D < ng) mb_load<1, D>(w[b], sc[b], rc, rs, g0 + b * D, GK, half8, t);
  pre();
  mb_cp_wait_all();
  __syncthreads();
#pragma unroll
  for (int b = 0; b < NB; b++)
    if (b * D < ng) mb_apply<1, WT, D, false, false>(w[b], sc[b], b * D, xrow, xss, ldx, ldxs, t, acc);
  for (int s0 = NB * D; s0 < ng; s0 += D) {
    uint4 v[D][1][2];
    u32 c[1][2];
    mb_load<1, D>(v, c, rc, rs, g0 + s0, GK, half8, t);
    mb_apply<1, WT, D, false, false>(v, c, s0, xrow, xss, ldx, ldxs, t, acc);
  }
}

// ---------------------------------------------------------------------------
// Dense product of T <= 8*WT token rows:
//   y[t*ldy + n] = row_scale[n]/2 * sum_g e4m3(s[n,g]) * xs[t,g] * acc[t,n,g]
// (the GEMM's terms). Grid (ceil(N/128), KS, heads), 256 threads: warp w
// takes the m-tile of rows 128*bx + 16w (N a multiple of 16; m-tiles past
// N are clamped and dropped); block z takes the D-group chunks
// [z*NC/KS, (z+1)*NC/KS) of K's NC = K/(128*D). With KS = 1 it writes y;
// else each block leaves its sums in partial[z][t][n] and the last block
// of a row block to finish (counters[bx], which it resets) adds the KS
// partial sums in order, so the result does not depend on the blocks'
// timing. Grid z > 1: per-head products (as gemm_dense), head h taking
// weight rows [h*N, (h+1)*N), activation columns [h*K, (h+1)*K) of rows
// heads*K long, output columns [h*N, (h+1)*N), its own partial sums and
// counters. Dynamic shared memory: mb_stage's for 8*WT rows of the
// largest chunk range. A pair (one head): row blocks from rb1 on are those
// of a second product of the same rows (codes2 ... partial2, N2 rows,
// output y2), so that two matrices of one input (q_a and kv_a) take one
// launch; each output's sums are those of its own launch.
// The four floats at p (this block's shared memory) in the shared memory
// of the cluster's block rank.
DEVICE float4 mbc_ld4(const float* p, u32 rank) {
  u32 a = (u32)__cvta_generic_to_shared(p), d;
  float4 v;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(rank));
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(d)
               : "memory");
  return v;
}

// a += b, component by component.
DEVICE void f4_add(float4& a, const float4& b) {
  a.x += b.x;
  a.y += b.y;
  a.z += b.z;
  a.w += b.w;
}

// Four output columns from their summed products: o[i] = tot_i * rs[i] / 2.
DEVICE void mms_out4(float* o, float4 tot, const float* __restrict__ rs) {
  o[0] = tot.x * (rs[0] * 0.5f);
  o[1] = tot.y * (rs[1] * 0.5f);
  o[2] = tot.z * (rs[2] * 0.5f);
  o[3] = tot.w * (rs[3] * 0.5f);
}

// CL: KS = 8 blocks of a row block form a cluster (grid y, MMSC kernels),
// which adds their partial sums through distributed shared memory instead
// of global partial sums and a counter: each block leaves its sums in its
// own shared memory (over the staged rows, after a barrier), and after a
// cluster barrier block z adds, for every z-th quad of outputs, the KS
// blocks' sums in order, as the last block does otherwise (the same
// values); a second cluster barrier keeps every block's shared memory
// until all have read it. Dynamic shared memory at least 4*128*8*WT bytes.
template <int WT, int D, bool QO = false, bool PRE = false, bool CL = false>
DEVICE void mms_dense(const u8* __restrict__ codes, const u8* __restrict__ scales,
                      const float* __restrict__ row_scale, int N, int K, const i8* __restrict__ xq,
                      const float* __restrict__ xs, int T, float* __restrict__ y, int ldy, int KS,
                      float* __restrict__ partial, u32* __restrict__ counters, int rb1,
                      const u8* __restrict__ codes2, const u8* __restrict__ scales2,
                      const float* __restrict__ row_scale2, int N2, float* __restrict__ y2, int ldy2,
                      float* __restrict__ partial2, i8* __restrict__ oq = nullptr, float* __restrict__ os = nullptr,
                      i32* __restrict__ osum = nullptr) {
  extern __shared__ __align__(16) u8 mb_smem[];
  __shared__ bool last;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int cx = blockIdx.x, z = blockIdx.y, GK = K >> 7, NC = GK / D;
  int bx = cx;
  if (bx >= rb1) {
    codes = codes2;
    scales = scales2;
    row_scale = row_scale2;
    N = N2;
    y = y2;
    ldy = ldy2;
    partial = partial2;
    bx -= rb1;
  }
  const size_t h = blockIdx.z;  // the pointers are offset where used: fewer live registers
  const int c_lo = z * NC / KS, c_hi = (z + 1) * NC / KS;
  const int g0 = c_lo * D, ng = (c_hi - c_lo) * D;
  const int n0 = bx * 128 + warp * 16;
  const size_t row = min(n0, N - 16) + g;
  const u8* rc[1] = {codes + (h * N + row) * (K / 2)};
  const u8* rs[1] = {scales + (h * N + row) * GK};
  float acc[1][WT][4];
  const auto pre = [&] {
    PDL_WAIT();
    mb_stage(mb_smem, 8 * WT, xq + h * K, xs + h * GK, (int)gridDim.z * K, 128 * g0, 128 * ng,
             [&](int r) { return min(r, T - 1); });
  };
  if (PRE) {
    mbp_core<WT, D, MMSP_GROUPS / D>(rc, rs, K, g0, ng, mb_smem, acc, pre);
  } else {
    mb_core<1, WT, D>(rc, rs, K, g0, ng, mb_smem, acc, pre);
  }
  row_scale += h * N;
  y += h * N;
  if (QO) {
    // KS = 1 and N a multiple of 128 (no clamped m-tiles).
    float v[WT][4];
#pragma unroll
    for (int n = 0; n < WT; n++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int tok = 8 * n + 2 * t + (e & 1), r = n0 + g + 8 * (e >> 1);
        v[n][e] = acc[0][n][e] * (row_scale[r] * 0.5f);
        if (tok < T) y[(size_t)tok * ldy + r] = v[n][e];
      }
    mms_quant_out<WT>(v, T, (int)h * N + bx * 128, (int)gridDim.z * N, oq, os, osum);
    return;
  }
  if (KS == 1) {
#pragma unroll
    for (int n = 0; n < WT; n++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int tok = 8 * n + 2 * t + (e & 1), r = n0 + g + 8 * (e >> 1);
        if (tok < T && n0 < N) y[(size_t)tok * ldy + r] = acc[0][n][e] * (row_scale[r] * 0.5f);
      }
    return;
  }
  if (CL) {
    float* red = (float*)mb_smem;  // [8*WT][128] this block's sums
    __syncthreads();               // every warp has read its staged rows
#pragma unroll
    for (int n = 0; n < WT; n++)
#pragma unroll
      for (int e = 0; e < 4; e++) red[(8 * n + 2 * t + (e & 1)) * 128 + warp * 16 + g + 8 * (e >> 1)] = acc[0][n][e];
    cluster_arrive();
    cluster_wait();
    const int quads = min(128, N - bx * 128) >> 2;
    for (int idx = z * blockDim.x + threadIdx.x; idx < T * 32; idx += KS * blockDim.x) {
      const int tok = idx >> 5, c = idx & 31;
      if (c >= quads) continue;
      const int n = bx * 128 + 4 * c;
      float4 v[8];
#pragma unroll
      for (int j = 0; j < 8; j++) v[j] = mbc_ld4(red + tok * 128 + 4 * c, j);
      float4 tot = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int j = 0; j < 8; j++) f4_add(tot, v[j]);
      mms_out4(y + (size_t)tok * ldy + n, tot, row_scale + n);
    }
    cluster_arrive();
    cluster_wait();
    return;
  }
  partial += h * KS * T * N;
  counters += h * gridDim.x;
  float* part = partial + (size_t)z * T * N;
#pragma unroll
  for (int n = 0; n < WT; n++)
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const int tok = 8 * n + 2 * t + (e & 1), r = n0 + g + 8 * (e >> 1);
      if (tok < T && n0 < N) part[(size_t)tok * N + r] = acc[0][n][e];
    }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&counters[cx], 1u) == (u32)(KS - 1);
  __syncthreads();
  if (!last) return;
  __threadfence();
  // Four columns a thread, up to 8 partial sums in flight, added in order.
  const int quads = min(128, N - bx * 128) >> 2;
  for (int idx = threadIdx.x; idx < T * 32; idx += blockDim.x) {
    const int tok = idx >> 5, c = idx & 31;
    if (c >= quads) continue;
    const int n = bx * 128 + 4 * c;
    float4 tot = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int k0 = 0; k0 < KS; k0 += 8) {
      float4 v[8];
#pragma unroll
      for (int j = 0; j < 8; j++)
        if (k0 + j < KS) v[j] = __ldcg((const float4*)(partial + ((size_t)(k0 + j) * T + tok) * N + n));
#pragma unroll
      for (int j = 0; j < 8; j++)
        if (k0 + j < KS) f4_add(tot, v[j]);
    }
    mms_out4(y + (size_t)tok * ldy + n, tot, row_scale + n);
  }
  if (threadIdx.x == 0) counters[cx] = 0;
}

// One macro for every dense streaming product's kernel: mms_dense<WT, D,
// false, PRE, CL>, with the launch attributes ATTR (the cluster of CL) and
// START run first (the programmatic launch of the next kernel, where it
// goes before the weights' loads). MINB: blocks a multiprocessor must hold
// (the register budget; the 64-token variants need more than 128
// registers a thread). Past 8 rows D = 4 spills: the host takes D = 2
// there.
#define MMS_DENSE_KERNEL(NAME, WT, D, MINB, PRE, CL, ATTR, START)                                   \
  extern "C" __global__ void ATTR __launch_bounds__(256, MINB) NAME(                                   \
      const u8* __restrict__ codes, const u8* __restrict__ scales, const float* __restrict__ row_scale, \
      int N, int K, const i8* __restrict__ xq, const float* __restrict__ xs, int T,                    \
      float* __restrict__ y, int ldy, int KS, float* __restrict__ partial, u32* __restrict__ counters, \
      int rb1, const u8* __restrict__ codes2, const u8* __restrict__ scales2,                          \
      const float* __restrict__ row_scale2, int N2, float* __restrict__ y2, int ldy2,                  \
      float* __restrict__ partial2) {                                                                  \
    START                                                                                              \
    mms_dense<WT, D, false, PRE, CL>(codes, scales, row_scale, N, K, xq, xs, T, y, ldy, KS, partial,   \
                                     counters, rb1, codes2, scales2, row_scale2, N2, y2, ldy2, partial2); \
  }
#define MMS_KERNEL(NAME, WT, D, MINB) MMS_DENSE_KERNEL(NAME, WT, D, MINB, false, false, , PDL_LAUNCH();)

MMS_KERNEL(mms_t1_d1, 1, 1, 2)
MMS_KERNEL(mms_t2_d1, 2, 1, 2)
MMS_KERNEL(mms_t4_d1, 4, 1, 2)
MMS_KERNEL(mms_t8_d1, 8, 1, 1)
MMS_KERNEL(mms_t1_d2, 1, 2, 2)
MMS_KERNEL(mms_t2_d2, 2, 2, 2)
MMS_KERNEL(mms_t4_d2, 4, 2, 2)
MMS_KERNEL(mms_t8_d2, 8, 2, 1)
MMS_KERNEL(mms_t1_d4, 1, 4, 2)

// mms_dense with the int8 form of its output (mms_quant_out): K unsplit
// (KS = 1), N a multiple of 128; heads products over grid z.
#define MMSQ_DENSE_KERNEL(NAME, WT, D, MINB, PRE, START)                                            \
  extern "C" __global__ void __launch_bounds__(256, MINB) NAME(                                        \
      const u8* __restrict__ codes, const u8* __restrict__ scales, const float* __restrict__ row_scale, \
      int N, int K, const i8* __restrict__ xq, const float* __restrict__ xs, int T,                    \
      float* __restrict__ y, int ldy, i8* __restrict__ oq, float* __restrict__ os,                     \
      i32* __restrict__ osum) {                                                                        \
    START                                                                                              \
    mms_dense<WT, D, true, PRE>(codes, scales, row_scale, N, K, xq, xs, T, y, ldy, 1, nullptr, nullptr, \
                                gridDim.x, nullptr, nullptr, nullptr, 0, nullptr, 0, nullptr, oq, os, osum); \
  }
#define MMSQ_KERNEL(NAME, WT, D, MINB) MMSQ_DENSE_KERNEL(NAME, WT, D, MINB, false, PDL_LAUNCH();)

MMSQ_KERNEL(mmsq_t2_d1, 2, 1, 2)
MMSQ_KERNEL(mmsq_t4_d1, 4, 1, 2)
MMSQ_KERNEL(mmsq_t8_d1, 8, 1, 1)
MMSQ_KERNEL(mmsq_t2_d2, 2, 2, 2)
MMSQ_KERNEL(mmsq_t4_d2, 4, 2, 2)
MMSQ_KERNEL(mmsq_t8_d2, 8, 2, 1)

// ---------------------------------------------------------------------------
// Dense products of 9-32 rows with all of a block's weights loaded before
// the wait for the kernel before (mbp_core, at most MMSP_GROUPS groups a
// block: o_proj, q_b, the q_a/kv_a pair and the value expansion of a
// 32-row serving step): mms_* and mmsq_* otherwise, the same values. On an
// H200 (BenchmarkServeLayer, a 32-row layer in a graph) q_b 5.95 -> 4.70
// us alone, the value expansion 6.99 -> 6.42; at 64 rows (two n-tiles
// more a warp, one block a multiprocessor at about 200 registers) the
// layer took 5 us longer: not past 32 rows.
#define MMSP_KERNEL(NAME, WT, D, MINB) MMS_DENSE_KERNEL(NAME, WT, D, MINB, true, false, , )

MMSP_KERNEL(mmsp_t2_d2, 2, 2, 2)
MMSP_KERNEL(mmsp_t4_d2, 4, 2, 2)

#define MMSQP_KERNEL(NAME, WT, D, MINB) MMSQ_DENSE_KERNEL(NAME, WT, D, MINB, true, )

MMSQP_KERNEL(mmsqp_t2_d2, 2, 2, 2)
MMSQP_KERNEL(mmsqp_t4_d2, 4, 2, 2)

// mms_* and mmsp_* with the 8 K splits of a row block in a cluster
// (mms_dense's CL): plans of KS = 8 only. On an H200 (BenchmarkServeLayer)
// a 32-row layer 155.0 -> 149.9 us (both forms: 147.3), 64 rows 208.0 ->
// 203.7.
#define MMSC_KERNEL(NAME, WT, D, PRE, MINB) \
  MMS_DENSE_KERNEL(NAME, WT, D, MINB, PRE, true, __cluster_dims__(1, 8, 1), )

MMSC_KERNEL(mmsc_t2_d2, 2, 2, false, 2)
MMSC_KERNEL(mmsc_t4_d2, 4, 2, false, 2)
MMSC_KERNEL(mmsc_t8_d2, 8, 2, false, 1)
MMSC_KERNEL(mmspc_t2_d2, 2, 2, true, 2)
MMSC_KERNEL(mmspc_t4_d2, 4, 2, true, 2)

// ---------------------------------------------------------------------------
// The streaming MoE pair with tiles of up to 8*WT pairs (WT mma n-tiles):
// each weight fragment is widened once in registers and applied to every
// n-tile the tile fills, so an expert with more than 8 pairs (every expert
// of a prompt step of a few hundred rows) is streamed and widened once a
// tile of 8*WT instead of once every 8. In steps of 8-64 rows they lose to
// the 8-pair pair (fewer blocks a multiprocessor, mb_mma's widening), which
// keeps those; past about 640 rows the tiled MoE (gemm.cu) is faster. The
// sums are those of the 8-pair pair (moeb_*_s2f34), bit for bit: the same
// int32 group sums, added into the same float accumulators in the same
// order; only the pairs a tile covers change, and no pair's result
// depends on the other pairs of its tile.

// mb_stage for the rows of a whole row (c0 = 0, C = K) in the layout of
// RL rows (the scales after RL rows of codes), staging only the first R.
template <typename Src>
DEVICE void mb_stage_w(u8* smem, int RL, int R, const i8* __restrict__ xq, const float* __restrict__ xs, int K,
                       Src src) {
  const int ldx = K + 16, GK = K >> 7, ldxs = GK + 1, per = K >> 4;
  float* xss = (float*)(smem + RL * ldx);
  for (int idx = threadIdx.x; idx < R * per; idx += blockDim.x) {
    const int r = idx / per, c = idx - r * per;
    mb_cp16(smem + r * ldx + 16 * c, xq + (size_t)src(r) * K + 16 * c);
  }
  for (int idx = threadIdx.x; idx < R * GK; idx += blockDim.x) {
    const int r = idx / GK, c = idx - r * GK;
    mb_cp4(xss + r * ldxs + c, xs + (size_t)src(r) * GK + c);
  }
  asm volatile("cp.async.commit_group;" ::: "memory");
}

// One mma of four widened code words (a) against token words b0, b1.
DEVICE void mb_mma_a(i32 (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// mb_apply (CVT) for the first nt (warp-uniform) of WT n-tiles, each
// m-tile's codes widened once for all of them, as mb_mma does (one mma a
// word pair: mb_mma_split's widening takes fewer instructions but two
// mmas, and its two sets of fragments, 32 registers, spilled 200-350 bytes
// at WT 2 and 4).
template <int MR, int WT, int D>
DEVICE void mb_apply_w(const uint4 (&w)[D][MR][2], const u32 (&sc)[MR][2], int s0, const u8* xrow, const float* xss,
                       int ldx, int ldxs, int t, int nt, float (&acc)[MR][WT][4]) {
#pragma unroll
  for (int d = 0; d < D; d++) {
    const int s = s0 + d;
#pragma unroll
    for (int m = 0; m < MR; m++) {
      const u32 lo[4] = {w[d][m][0].x, w[d][m][0].y, w[d][m][0].z, w[d][m][0].w};
      const u32 hi[4] = {w[d][m][1].x, w[d][m][1].y, w[d][m][1].z, w[d][m][1].w};
      u32 a[4][4];
#pragma unroll
      for (int j = 0; j < 4; j++) {
        a[j][0] = mb_e2m1x4(lo[j]);
        a[j][1] = mb_e2m1x4(hi[j]);
        a[j][2] = mb_e2m1x4(lo[j] >> 16);
        a[j][3] = mb_e2m1x4(hi[j] >> 16);
      }
      float s0f, s1f;
      mb_e4m3x2(prmt(sc[m][0], sc[m][1], d | ((4 + d) << 4)), s0f, s1f);
#pragma unroll
      for (int n = 0; n < WT; n++) {
        if (n >= nt) break;
        const u8* xr = xrow + 8 * n * ldx + 128 * s;
        const uint4 xa = *(const uint4*)xr, xb = *(const uint4*)(xr + 16);
        const float x0 = xss[(8 * n + 2 * t) * ldxs + s], x1 = xss[(8 * n + 2 * t + 1) * ldxs + s];
        const u32 b[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
        i32 q[4] = {0, 0, 0, 0};
#pragma unroll
        for (int j = 0; j < 4; j++) mb_mma_a(q, a[j][0], a[j][1], a[j][2], a[j][3], b[2 * j], b[2 * j + 1]);
        acc[m][n][0] += (float)q[0] * (s0f * x0);
        acc[m][n][1] += (float)q[1] * (s0f * x1);
        acc[m][n][2] += (float)q[2] * (s1f * x0);
        acc[m][n][3] += (float)q[3] * (s1f * x1);
      }
    }
  }
}

// moeb_gate_up (CVT, RS, FLAG, tile records) for tiles of up to 8*WT
// pairs: the tile's ceil(n/8) n-tiles are staged and multiplied.
template <int WT, int D>
DEVICE void moeb_gate_up_w(const i32* __restrict__ ntiles, const i32* __restrict__ list, int I, int K,
                           const i8* __restrict__ xq, const float* __restrict__ xs, i8* __restrict__ hq,
                           float* __restrict__ hs, MbTile* __restrict__ rec) {
  extern __shared__ __align__(16) u8 mb_smem[];
  __shared__ float wmax[MB_WARPS][8 * WT];
  PDL_WAIT();
  const int tile = blockIdx.y;
  const int nall = ntiles[0];
  const int s0 = rec[tile].s0, ntok = rec[tile].n;
  const BMat gate = rec[tile].ex.gate, up = rec[tile].ex.up;
  if (tile >= nall) return;
  const int nt = (ntok + 7) >> 3;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * 128 + warp * 16, GK = K >> 7;
  const size_t row = n0 + g;
  const u8* rc[2] = {code_row<true>(gate.codes, row, K), code_row<true>(up.codes, row, K)};
  const u8* rs[2] = {gate.scales + row * GK, up.scales + row * GK};
  float rsc[2][2];
#pragma unroll
  for (int h = 0; h < 2; h++) {
    rsc[0][h] = __ldg(gate.row_scale + row + 8 * h);
    rsc[1][h] = __ldg(up.row_scale + row + 8 * h);
  }
  float acc[2][WT][4];
  mb_core<2, WT, D, false, true, true, true>(rc, rs, K, 0, K >> 7, mb_smem, acc, [&] {
    mb_stage_w(mb_smem, 8 * WT, 8 * nt, xq, xs, K, [&](int r) { return list[s0 + min(r, ntok - 1)]; });
  }, nt);
  float hv[WT][4];
#pragma unroll
  for (int n = 0; n < WT; n++)
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const float gv = acc[0][n][e] * (rsc[0][e >> 1] * 0.5f);
      const float uv = acc[1][n][e] * (rsc[1][e >> 1] * 0.5f);
      hv[n][e] = silu(gv) * uv;
    }
  mb_warp_amax<WT>(hv, nt, wmax, warp, g, t);  // each token's largest magnitude over the block's 128 rows
#pragma unroll
  for (int n = 0; n < WT; n++) {
    if (n >= nt) break;
    float amax[2];
    mb_block_amax<WT>(wmax, n, t, amax);
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const int tok = 8 * n + 2 * t + (e & 1), r = n0 + g + 8 * (e >> 1);
      if (tok < ntok) {
        const float a = amax[e & 1];
        hq[(size_t)(s0 + tok) * I + r] = (i8)quant8(hv[n][e], a, a / 127.f);
      }
    }
    if (warp == 0 && g == 0) {
#pragma unroll
      for (int e = 0; e < 2; e++) {
        const int tok = 8 * n + 2 * t + e;
        if (tok < ntok) hs[(size_t)(s0 + tok) * (I >> 7) + blockIdx.x] = amax[e] == 0.f ? 0.f : amax[e] / 127.f;
      }
    }
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd((u32*)&rec[tile].done, 1u);
}

// moeb_down (MR = 1, CVT, RS, FLAG, tile records) for tiles of up to 8*WT
// pairs.
template <int WT, int D>
DEVICE void moeb_down_w(const i32* __restrict__ ntiles, int N, int I, const i8* __restrict__ hq,
                        const float* __restrict__ hs, float* __restrict__ part, MbTile* __restrict__ rec) {
  extern __shared__ __align__(16) u8 mb_smem[];
  const int tile = blockIdx.y;
  const int nall = ntiles[0];
  const int s0 = rec[tile].s0, ntok = rec[tile].n;
  const BMat dn = rec[tile].ex.down;
  if (tile >= nall) return;
  const int nt = (ntok + 7) >> 3;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * 128 + warp * 16, GK = I >> 7;
  // N a multiple of 16: a clamped m-tile starts at N - 16.
  const size_t row = min(n0, N - 16) + g;
  const u8* rc[1] = {code_row<true>(dn.codes, row, I)};
  const u8* rs[1] = {dn.scales + row * GK};
  float rsc[2];
#pragma unroll
  for (int h = 0; h < 2; h++) rsc[h] = __ldg(dn.row_scale + row + 8 * h);
  float acc[1][WT][4];
  mb_core<1, WT, D, false, true, true, true>(rc, rs, I, 0, I >> 7, mb_smem, acc, [&] {
    mb_wait_tile_gate_up(rec, tile, I);
    mb_stage_w(mb_smem, 8 * WT, 8 * nt, hq, hs, I, [&](int r) { return s0 + min(r, ntok - 1); });
  }, nt);
#pragma unroll
  for (int n = 0; n < WT; n++) {
    if (n >= nt) break;
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const int tok = 8 * n + 2 * t + (e & 1), r = n0 + g + 8 * (e >> 1);
      if (tok < ntok && r < N) part[(size_t)(s0 + tok) * N + r] = acc[0][n][e] * (rsc[e >> 1] * 0.5f);
    }
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// The pair for tiles of up to 8*WT pairs: gate/up D groups a batch at MINB
// blocks a multiprocessor, down DD groups at MINBD. Grid (I/128 or N/128,
// tiles), 256 threads; dynamic shared memory 8*WT rows of the row length +
// 16 bytes, then 8*WT rows of length/128 + 1 floats. On an H200
// (BenchmarkMoEStream, BenchmarkMoEBatched: a full-size layer, uniform
// random routing) w2u 164.8 us at 192 tokens against the 8-pair pair's
// 189.9 and the tiled MoE's 193.4; w4u 193.3 / 229.7 / 299.8 us at 256 /
// 384 / 512 tokens against the tiled MoE's best 243.5 / 310.3 / 338.9, but
// 410.3 against 382.5 at 768 (docs/perf.md, 2026-11-29 (9)). Both spill a
// few bytes (NVRTC 11.8: gate/up 12 and 0, down 44 and 4): w4u's down at
// four blocks without spilling (two groups a batch) was 1-5% slower.
#define MOEB_W_KERNELS(SUFFIX, WT, D, MINB, DD, MINBD)                                                            \
  extern "C" __global__ void __launch_bounds__(256, MINB) moeb_gate_up_##SUFFIX(                                  \
      const i32* __restrict__ ntiles, const i32* __restrict__ list, int I, int K, const i8* __restrict__ xq,    \
      const float* __restrict__ xs, i8* __restrict__ hq, float* __restrict__ hs, MbTile* __restrict__ rec) {    \
    moeb_gate_up_w<WT, D>(ntiles, list, I, K, xq, xs, hq, hs, rec);                                             \
  }                                                                                                             \
  extern "C" __global__ void __launch_bounds__(256, MINBD) moeb_down_##SUFFIX(                                   \
      const i32* __restrict__ ntiles, int N, int I, const i8* __restrict__ hq, const float* __restrict__ hs,     \
      float* __restrict__ part, MbTile* __restrict__ rec) {                                                     \
    moeb_down_w<WT, DD>(ntiles, N, I, hq, hs, part, rec);                                                       \
  }

MOEB_W_KERNELS(w2u, 2, 2, 3, 4, 4)
MOEB_W_KERNELS(w4u, 4, 2, 2, 4, 3)
