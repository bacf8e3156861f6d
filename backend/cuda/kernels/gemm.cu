// MMFP4 GEMM on the tensor cores for many tokens (prefill, batched MoE):
//
//   y[t*ldy + n] = row_scale[n]/2 * sum_g e4m3(s[n,g]) * xs[t,g] * acc[t,n,g]
//   acc[t,n,g]   = sum_{k in g} 2*e2m1(q[n,k]) * xq[t,k]     (exact int32)
//
// the math of the GEMV kernels (matvec.cuh) and of the CPU reference. The
// codes are widened exactly to int8 (2*e2m1 is an integer in [-12, 12]) and
// multiplied with the int8 activations by mma.sync.m16n8k32.s8.s8.s32, one
// scale group at a time into int32; each group's sum is then scaled in fp32
// into fp32 accumulators, and the row scale comes last.
//
// A block computes 128 weight rows x BT tokens (BT = 8*WT*WN) with 8/MT x WN
// warps, each taking MT m-tiles of 16 rows and WT n-tiles of 8 tokens (see
// gemm_tile: the 16-token tile has two m-tiles a warp, the 64-token tile
// one m-tile and eight n-tiles, so that each widened code feeds 8 mma). K
// goes in stages of 128 columns
// through a GEMM_STAGES-deep cp.async pipeline in shared memory: codes
// [128 rows][64 bytes] (rows padded to 80 bytes: conflict-free word reads),
// activations [BT][128 bytes] (16-byte granules swizzled by token) and
// their scales [4 groups][BT floats] (a thread's two tokens' scales are one
// 8-byte read); the block's weight scales for all of K are
// loaded once, before the pipeline ([128][K/G] bytes after the stages and
// a 256-entry table of E4M3 values), so that no global load waits inside
// the loop.
//
// Inside a 32-column chunk the order of k does not matter as long as A and B
// agree: thread (g = lane/4, i = lane%4) takes word i of the chunk's 16
// bytes of codes (columns 8i..8i+7; low half as k-slots 4i..4i+3, high half
// as 16+4i..16+4i+3) and the same 8 columns of its token's activations (one
// 8-byte read), so no shuffling is needed. Each mma stays inside one chunk,
// and so inside one scale group (G = 32, 64 or 128).
//
// Modes: GEMM_PLAIN writes the products (a dense product, or the down
// products of a MoE's token segments); GEMM_GATE_UP takes shared rows 0..63
// from a gate matrix and 64..127 from the same rows of an up matrix, so that
// each thread holds gate and up of the same (row, token) and writes
// silu(gate) * up.

#define GEMM_ROWS 128
#define GEMM_BK 128
#define GEMM_STAGES 4
#define GEMM_ASTRIDE 80  // bytes per shared row of codes (64 + 16 padding)
#define GEMM_PLAIN 0
#define GEMM_GATE_UP 1
#define GEMM_PLAIN_Q 2  // GEMM_PLAIN, and the int8 form of the output (gemm_quant_out)

struct GQMat {
  const u8* codes;
  const u8* scales;
  const float* row_scale;
};

// A MoE layer's expert (the layout of ExpertTable: gate, up, down).
struct GExpert {
  GQMat gate, up, down;
};

DEVICE void cp_async16(u32 dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}

// Doubled E2M1 values of four codes as signed int8 bytes: the +128 offset
// form of e2m1x4_biased with the offset taken off bytewise (x ^ 0x80 is
// x - 128 for the bytes 116..140 it holds).
DEVICE u32 e2m1x4_signed(u32 sel) { return e2m1x4_biased(sel) ^ 0x80808080u; }

DEVICE void mma_s8(i32 (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The activation byte offset of granule c (16 bytes) of tile token r in a
// stage: granules are swizzled so that the 8-byte reads of a half warp (4
// tokens x 4 lanes) fall in distinct banks.
DEVICE int gemm_bofs(int r, int c) { return r * GEMM_BK + ((c ^ ((r & 3) << 1)) << 4); }

// One stage of a warp's products (see gemm_tile): grp0 is the stage's first
// scale group. PART checks each n-tile against ntv, the warp's n-tiles that
// hold a valid token (the short last tile of a segment), and neither
// multiplies nor scales the others (their outputs are never written); full
// tiles take the copy without the checks, so their products need no
// predicates and their first mma of a group adds to zero.
template <int MT, int WT, int WN, int SPG, bool PART>
DEVICE void gemm_stage(float (&acc)[MT][WT][4], const u8* sa, const u8* sb, const float* sxs, const float* slut,
                       const u8* sws, const int (&ra)[MT], int GK, int grp0, int spg, int wn, int g, int i,
                       int ntv) {
  constexpr int BT = 8 * WT * WN;
#pragma unroll
  for (int j0 = 0; j0 < 4; j0 += spg) {
    const int gl = j0 / spg, grp = grp0 + gl;
    float ws[MT][2], xv[WT][2];
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
      for (int h = 0; h < 2; h++) ws[m][h] = slut[sws[(ra[m] + 8 * h) * GK + grp]];
#pragma unroll
    for (int nt = 0; nt < WT; nt++) {
      const float2 v = *(const float2*)(sxs + gl * BT + wn * 8 * WT + 8 * nt + 2 * i);
      xv[nt][0] = v.x;
      xv[nt][1] = v.y;
    }
    i32 d[MT][WT][4];
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
      for (int nt = 0; nt < WT; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) d[m][nt][e] = 0;
#pragma unroll
    for (int j = j0; j < j0 + spg; j++) {
      u32 af[MT][4];
#pragma unroll
      for (int m = 0; m < MT; m++) {
        const u32 wa = *(const u32*)(sa + ra[m] * GEMM_ASTRIDE + 16 * j + 4 * i);
        const u32 wb = *(const u32*)(sa + (ra[m] + 8) * GEMM_ASTRIDE + 16 * j + 4 * i);
        af[m][0] = e2m1x4_signed(wa);
        af[m][1] = e2m1x4_signed(wb);
        af[m][2] = e2m1x4_signed(wa >> 16);
        af[m][3] = e2m1x4_signed(wb >> 16);
      }
#pragma unroll
      for (int nt = 0; nt < WT; nt++) {
        if (PART && nt >= ntv) continue;
        const int r = wn * 8 * WT + 8 * nt + g;
        const uint2 bv = *(const uint2*)(sb + gemm_bofs(r, 2 * j + (i >> 1)) + 8 * (i & 1));
#pragma unroll
        for (int m = 0; m < MT; m++) mma_s8(d[m][nt], af[m], bv.x, bv.y);
      }
    }
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
      for (int nt = 0; nt < WT; nt++) {
        if (PART && nt >= ntv) continue;
        acc[m][nt][0] += (float)d[m][nt][0] * (ws[m][0] * xv[nt][0]);
        acc[m][nt][1] += (float)d[m][nt][1] * (ws[m][0] * xv[nt][1]);
        acc[m][nt][2] += (float)d[m][nt][2] * (ws[m][1] * xv[nt][0]);
        acc[m][nt][3] += (float)d[m][nt][3] * (ws[m][1] * xv[nt][1]);
      }
  }
}

// One block's tile. Weights: matrix a (rows [row0, row0+128) of N, or for
// GATE_UP gate rows [row0, row0+64) from a and the same rows of up from b),
// K columns, group size G. Activations: tile token r is row tokrow[r]
// (shared) of xq [.][K] / xs [.][K/G]; ntok tokens are valid. Output row of
// tile token r: out + r*ldo (the caller offsets out to the tile's first
// token).
// SPG: the 32-column chunks of a scale group when known at compile time
// (4 for G = 128: the stage's loops unroll), or 0 (G/32 at run time). xq
// rows are ldx bytes apart, xs rows ldxs floats.
//
// MT: the m-tiles of a warp. MT = 2: 4 x WN warps, warp (wm, wn) taking
// shared rows 16wm.. and 64+16wm.. (for GATE_UP the gate and the up row of
// one output in the same thread). MT = 1: 8 x WN warps, warp (wm, wn)
// taking shared rows 16wm..16wm+15 only, so that each widened code feeds
// WT mma instead of WT/2 per token; for GATE_UP the up warps (wm >= 4) hand
// their products to the gate warps through shared memory at the end. With
// MT = 1 and SK = 1 a warp also skips its n-tiles that hold no valid token
// (the short last tile of an expert's segment).
// Where a GEMM_PLAIN_Q tile writes the int8 form of its output
// (gemm_quant_out, at the end).
struct GQOut {
  i8* q;      // codes of the block's first token, at its head's first column
  float* s;   // that token's group scales (groups of 128), same column
  i32* sum;   // that token's 32-column sums, same column
  int K;      // the quantized rows' length (heads x rows a head)
};
template <int MT, int WT, int WN>
DEVICE void gemm_quant_out(float (&v)[MT][WT][4], const float* __restrict__ row_scale, int N, int row0,
                           const int (&ra)[MT], float* __restrict__ out, int ldo, int ntok, GQOut qo, u8* smem);

//
// EC: the block's first stages are asked for before its weight scales are
// read, so that the scales' loads overlap the stages' instead of preceding
// them.
template <int MT, int WT, int WN, int MODE, int SPG, int SK, bool EC = false, bool TM = false>
DEVICE void gemm_tile(GQMat a, GQMat b, int N, int K, int G, int row0, const i8* __restrict__ xq, int ldx,
                      const float* __restrict__ xs, int ldxs, const int* tokrow, int ntok,
                      float* __restrict__ out, int ldo, u8* smem, GQOut qo = GQOut{}) {
  constexpr int BT = 8 * WT * WN;
  constexpr int WM = 8 / MT;  // warps along the rows
  constexpr int NT = 32 * WM * WN;
  constexpr bool SKIP = MT == 1 && SK == 1;
  constexpr int ABYTES = GEMM_ROWS * GEMM_ASTRIDE;
  constexpr int XBYTES = BT * GEMM_BK;
  constexpr int SBYTES = ABYTES + XBYTES + BT * 16;  // codes, activations, activation scales
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp % WM, wn = warp / WM, g = lane >> 2, i = lane & 3;
  const int nk = K / GEMM_BK, GK = K / G;
  const int gpb = SPG ? GEMM_BK / (32 * SPG) : GEMM_BK / G;  // groups per stage
  const int half = MODE == GEMM_GATE_UP ? 64 : 128;
  // The block's weight scales for all of K, after the stages: [128][GK].
  // Before them, the E4M3 value of every byte (a group scale is then one
  // byte read and one table read, not a conversion).
  float* slut = (float*)(smem + GEMM_STAGES * SBYTES);
  u8* sws = smem + GEMM_STAGES * SBYTES + 256 * 4;
  auto fill_scales = [&]() {
    for (int idx = tid; idx < 256; idx += NT) slut[idx] = e4m3(idx);
    for (int idx = tid; idx < GEMM_ROWS * GK; idx += NT) {
      const int r = idx / GK, gi = idx - r * GK;
      const u8* base = (MODE == GEMM_GATE_UP && r >= 64) ? b.scales : a.scales;
      sws[idx] = __ldg(base + (size_t)min(row0 + (r & (half - 1)), N - 1) * GK + gi);
    }
  };
  if (!EC) fill_scales();

  // Shared row r's codes (clamped to a valid row; its results are dropped).
  auto arow = [&](int r) -> const u8* {
    if (MODE == GEMM_GATE_UP) {
      const int n = min(row0 + (r & 63), N - 1);
      return code_row<TM>(r < 64 ? a.codes : b.codes, n, K);
    }
    return code_row<TM>(a.codes, min(row0 + r, N - 1), K);
  };
  // Each thread's cp.async sources and shared offsets for every stage,
  // computed once: the stage loads are then AIT + XIT 16-byte copies (and
  // one small one) at fixed offsets, with no per-stage loop or address
  // arithmetic beyond the column offset.
  constexpr int AIT = GEMM_ROWS * 4 / NT, XIT = BT * 8 / NT;
  static_assert(AIT * NT == GEMM_ROWS * 4 && XIT * NT == BT * 8 && XIT >= 1, "stage copies must divide evenly");
  const u8* asrc[AIT];
  const i8* xsrc[XIT];
#pragma unroll
  for (int it = 0; it < AIT; it++) asrc[it] = arow((tid >> 2) + it * (NT / 4)) + (tid & 3) * 16;
#pragma unroll
  for (int it = 0; it < XIT; it++) xsrc[it] = xq + (size_t)tokrow[(tid >> 3) + it * (NT / 8)] * ldx + (tid & 7) * 16;
  const float* ssrc = xs + (size_t)tokrow[min(tid, BT - 1)] * ldxs;
  const u32 sbase = smem_addr(smem);
  const u32 adst = (tid >> 2) * GEMM_ASTRIDE + (tid & 3) * 16;
  const u32 xdst = ABYTES + gemm_bofs(tid >> 3, tid & 7);
  auto load_stage = [&](int s, int buf) {
    const u32 base = sbase + buf * SBYTES;
    const int k0 = s * GEMM_BK;
#pragma unroll
    for (int it = 0; it < AIT; it++) cp_async16(base + adst + it * (NT / 4) * GEMM_ASTRIDE, asrc[it] + code_off<TM>(k0 / 2));
#pragma unroll
    for (int it = 0; it < XIT; it++) cp_async16(base + xdst + it * (NT / 8) * GEMM_BK, xsrc[it] + k0);
    if (tid < BT)
      for (int gl = 0; gl < gpb; gl++) cp_async_small(base + ABYTES + XBYTES + (gl * BT + tid) * 4, ssrc + s * gpb + gl, 4);
  };

  // This thread's weight rows (shared rows ra[m], ra[m] + 8) and scale rows.
  int ra[MT];
#pragma unroll
  for (int m = 0; m < MT; m++) ra[m] = 64 * m + 16 * wm + g;
  // This warp's n-tiles that hold a valid token (all of them unless SKIP).
  const int ntv = SKIP ? min(WT, max(0, (ntok - wn * 8 * WT + 7) >> 3)) : WT;

  float acc[MT][WT][4];
#pragma unroll
  for (int m = 0; m < MT; m++)
#pragma unroll
    for (int nt = 0; nt < WT; nt++)
#pragma unroll
      for (int e = 0; e < 4; e++) acc[m][nt][e] = 0.f;

#pragma unroll
  for (int s = 0; s < GEMM_STAGES - 1; s++) {
    if (s < nk) load_stage(s, s);
    cp_async_commit();
  }
  if (EC) fill_scales();  // (the loop's first barrier orders its stores)
  const int spg = SPG ? SPG : G / 32;  // 32-column chunks per group
  for (int kt = 0; kt < nk; kt++) {
    cp_async_wait<GEMM_STAGES - 2>();
    __syncthreads();
    if (kt + GEMM_STAGES - 1 < nk) load_stage(kt + GEMM_STAGES - 1, (kt + GEMM_STAGES - 1) % GEMM_STAGES);
    cp_async_commit();
    const u8* sa = smem + (kt % GEMM_STAGES) * SBYTES;
    const u8* sb = sa + ABYTES;
    const float* sxs = (const float*)(sb + XBYTES);
    if (SKIP && ntv == 0) continue;
    if (SKIP && ntv < WT) {
      gemm_stage<MT, WT, WN, SPG, true>(acc, sa, sb, sxs, slut, sws, ra, GK, kt * gpb, spg, wn, g, i, ntv);
    } else {
      gemm_stage<MT, WT, WN, SPG, false>(acc, sa, sb, sxs, slut, sws, ra, GK, kt * gpb, spg, wn, g, i, ntv);
    }
  }
  cp_async_wait<0>();

  if (MODE == GEMM_PLAIN_Q) {
    gemm_quant_out<MT, WT, WN>(acc, a.row_scale, N, row0, ra, out, ldo, ntok, qo, smem);
    return;
  }
  // C fragment: e = 0, 1: row g, tokens 2i, 2i+1; e = 2, 3: row g+8.
  if (MODE == GEMM_GATE_UP && MT == 1) {
    // The up warps leave row_scale/2 * up in shared memory (the stages are
    // free once every warp has passed the loop), [WN*WT*4][128] floats so
    // that a warp's stores and loads are conflict-free; the gate warps
    // holding the same (row, token) write silu(gate) * up.
    float* su = (float*)smem;
    const int hw = wm & 3, n0 = row0 + 16 * hw + g;
    __syncthreads();
    if (wm >= 4) {
#pragma unroll
      for (int nt = 0; nt < WT; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++)
          su[((wn * WT + nt) * 4 + e) * 128 + hw * 32 + lane] =
              acc[0][nt][e] * (b.row_scale[min(n0 + 8 * (e >> 1), N - 1)] * 0.5f);
    }
    __syncthreads();
    if (wm < 4) {
#pragma unroll
      for (int nt = 0; nt < WT; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const int tok = wn * 8 * WT + 8 * nt + 2 * i + (e & 1), n = n0 + 8 * (e >> 1);
          if (tok >= ntok || n >= N) continue;
          const float gv = acc[0][nt][e] * (a.row_scale[n] * 0.5f);
          out[(size_t)tok * ldo + n] = silu(gv) * su[((wn * WT + nt) * 4 + e) * 128 + hw * 32 + lane];
        }
    }
    return;
  }
#pragma unroll
  for (int nt = 0; nt < WT; nt++) {
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const int tok = wn * 8 * WT + 8 * nt + 2 * i + (e & 1);
      if (tok >= ntok) continue;
      float* o = out + (size_t)tok * ldo;
      if (MODE == GEMM_GATE_UP) {
        const int n = row0 + ra[0] + 8 * (e >> 1);
        if (n < N) {
          const float gv = acc[0][nt][e] * (a.row_scale[n] * 0.5f);
          const float uv = acc[MT - 1][nt][e] * (b.row_scale[n] * 0.5f);
          o[n] = silu(gv) * uv;
        }
      } else {
#pragma unroll
        for (int m = 0; m < MT; m++) {
          const int n = row0 + ra[m] + 8 * (e >> 1);
          if (n < N) o[n] = acc[m][nt][e] * (a.row_scale[n] * 0.5f);
        }
      }
    }
  }
}

// Dense product of T tokens: grid (ceil(N/128), ceil(T/BT)), 128*WN threads,
// GEMM_STAGES * (GEMM_ROWS * GEMM_ASTRIDE + BT * (GEMM_BK + 16)) + 1024 + 128 * K/G
// bytes of dynamic shared memory.
//
// Grid z > 1: per-head products, head z taking weight rows [z*N, (z+1)*N),
// activation columns [z*K, (z+1)*K) (whole groups) and output columns
// [z*N, (z+1)*N).
template <int MT, int WT, int WN, int SPG, bool EC>
DEVICE void gemm_dense(const u8* codes, const u8* scales, const float* row_scale, int N, int K, int G,
                       const i8* xq, int ldx, const float* xs, int ldxs, int T, float* y, int ldy, size_t z) {
  constexpr int BT = 8 * WT * WN;
  extern __shared__ __align__(16) u8 gemm_smem_buf[];
  __shared__ int tokrow[BT];
  const int t0 = blockIdx.y * BT, ntok = min(BT, T - t0);
  const size_t GK = K / G;
  for (int r = threadIdx.x; r < BT; r += blockDim.x) tokrow[r] = t0 + min(r, ntok - 1);
  PDL_WAIT();
  __syncthreads();
  GQMat a = {codes + z * N * (K / 2), scales + z * N * GK, row_scale + z * N};
  gemm_tile<MT, WT, WN, GEMM_PLAIN, SPG, 1, EC>(a, a, N, K, G, blockIdx.x * GEMM_ROWS, xq + z * K, ldx, xs + z * GK, ldxs,
                                     tokrow, ntok, y + (size_t)t0 * ldy + z * N, ldy, gemm_smem_buf);
}

#define GEMM_DENSE_KERNEL(NAME, MT, WT, WN, SPG, MINB, EC)                                               \
  extern "C" __global__ void __launch_bounds__(256 / MT * WN, MINB) NAME(                                 \
      const u8* __restrict__ codes, const u8* __restrict__ scales,                                \
      const float* __restrict__ row_scale, int N, int K, int G, const i8* __restrict__ xq,        \
      int ldx, const float* __restrict__ xs, int ldxs, int T, float* __restrict__ y, int ldy) {   \
    PDL_LAUNCH();                                                                                 \
    gemm_dense<MT, WT, WN, SPG, EC>(codes, scales, row_scale, N, K, G, xq, ldx, xs, ldxs, T, y, ldy, blockIdx.z); \
  }

// Two products of the same activations in one launch (q_a and kv_a of a
// prefill, each under one wave of blocks alone): grid (ceil(max(N1,
// N2)/128), ceil(T/BT), 2), z picking the matrix; a block past its
// matrix's rows exits. The same sums as two gemm launches.
#define GEMM_PAIR_KERNEL(NAME, MT, WT, WN, SPG, MINB, EC)                                                      \
  extern "C" __global__ void __launch_bounds__(256 / MT * WN, MINB) NAME(                                 \
      const u8* __restrict__ codes1, const u8* __restrict__ scales1, const float* __restrict__ rs1, int N1, \
      float* __restrict__ y1, int ldy1, const u8* __restrict__ codes2, const u8* __restrict__ scales2,     \
      const float* __restrict__ rs2, int N2, float* __restrict__ y2, int ldy2, int K, int G,               \
      const i8* __restrict__ xq, int ldx, const float* __restrict__ xs, int ldxs, int T) {                 \
    PDL_LAUNCH();                                                                                          \
    const bool two = blockIdx.z == 1;                                                                      \
    const int N = two ? N2 : N1;                                                                           \
    if ((int)blockIdx.x * GEMM_ROWS >= N) return;                                                          \
    gemm_dense<MT, WT, WN, SPG, EC>(two ? codes2 : codes1, two ? scales2 : scales1, two ? rs2 : rs1, N, K, G, xq, \
                                   ldx, xs, ldxs, T, two ? y2 : y1, two ? ldy2 : ldy1, 0);                 \
  }

GEMM_PAIR_KERNEL(gemm_pair_t16, 2, 2, 1, 0, 1, false)
GEMM_PAIR_KERNEL(gemm_pair_t16_g128, 2, 2, 1, 4, 1, false)
GEMM_PAIR_KERNEL(gemm_pair_t64, 1, 8, 1, 0, 2, false)
GEMM_PAIR_KERNEL(gemm_pair_t64_g128, 1, 8, 1, 4, 2, false)
GEMM_PAIR_KERNEL(gemm_pair_t64e_g128, 1, 8, 1, 4, 2, true)

// (MINB: blocks per SM the registers must allow.)
GEMM_DENSE_KERNEL(gemm_t16, 2, 2, 1, 0, 1, false)
GEMM_DENSE_KERNEL(gemm_t16_g128, 2, 2, 1, 4, 1, false)
GEMM_DENSE_KERNEL(gemm_t64, 1, 8, 1, 0, 2, false)
GEMM_DENSE_KERNEL(gemm_t64_g128, 1, 8, 1, 4, 2, false)
GEMM_DENSE_KERNEL(gemm_t64e_g128, 1, 8, 1, 4, 2, true)


// ---------------------------------------------------------------------------
// MoE over many tokens, on the device. A pair (t, k) is token t's slot k:
// slots 0..topk-1 are the routed experts ids[t*topk+k] (weight wts[...]),
// slots topk..topk+S-1 the shared experts (table entries E.., weight 1).
// moeb_group (stream.cu) sorts the pairs by expert: pos[p] is pair p's row
// in expert order, list[row] its token, and tiles (expert, first row, rows
// <= BT) cover every expert's rows; ntiles[0] counts them. The GEMMs run
// over (row blocks) x (tiles); blocks past ntiles exit; moeb_combine
// (stream.cu) sums each token's slots.

// A MoE block's tile words: the tile count, then its segment (first row,
// rows) and expert. early: all four asked for at once (the arrays hold
// MaxTiles entries, so a tile past the count reads a stale word, unused),
// one round trip before the expert's pointers instead of two (a tile's
// words are never negative, and it holds a pair).
DEVICE i32 ldg_issue(const i32* p) {
  i32 v;
  asm volatile("ld.global.nc.b32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}
DEVICE void moe_tile_words(bool early, const i32* ntiles, const i32* tile_e, const i32* tile_s, const i32* tile_n,
                           int tile, int& nt, int& s0, int& ntok, int& te) {
  if (early) {
    nt = ldg_issue(ntiles);
    s0 = ldg_issue(tile_s + tile);
    ntok = ldg_issue(tile_n + tile);
    te = ldg_issue(tile_e + tile);
    return;
  }
  nt = ntiles[0];
  if (tile >= nt) return;
  s0 = tile_s[tile];
  ntok = tile_n[tile];
  te = tile_e[tile];
}

// Gate and up products with the SiLU product over the tiles:
// h[row][n] = silu(gate_e,n . x[list[row]]) * (up_e,n . x[list[row]]).
// Grid (ceil(I/64), max tiles); a launch takes the tiles of nmin to nmax
// tokens (the 64-token kernels can leave a segment's short last tile to the
// 16-token ones).
template <int MT, int WT, int WN, int SPG, int SK, bool EC>
DEVICE void moe_gemm_gate_up(const GExpert* experts, const i32* tile_e, const i32* tile_s, const i32* tile_n,
                             const i32* ntiles, const i32* list, int I, int K, int G, const i8* xq,
                             const float* xs, float* h, int nmin, int nmax) {
  constexpr int BT = 8 * WT * WN;
  extern __shared__ __align__(16) u8 gemm_smem_buf[];
  __shared__ int tokrow[BT];
  PDL_WAIT();
  const int tile = blockIdx.y;
  int nt, s0, ntok, te;
  moe_tile_words(EC, ntiles, tile_e, tile_s, tile_n, tile, nt, s0, ntok, te);
  // (One test of every word keeps their loads ahead of the branch.)
  if ((EC ? min(nt - 1 - tile, s0 | te | (ntok - 1)) : nt - 1 - tile) < 0) return;
  if (ntok < nmin || ntok > nmax) return;  // another launch's tile
  const GExpert& ex = experts[te];
  for (int r = threadIdx.x; r < BT; r += blockDim.x) tokrow[r] = list[s0 + min(r, ntok - 1)];
  __syncthreads();
  gemm_tile<MT, WT, WN, GEMM_GATE_UP, SPG, SK, EC, true>(ex.gate, ex.up, I, K, G, blockIdx.x * 64, xq, K, xs, K / G,
                                                        tokrow, ntok, h + (size_t)s0 * I, I, gemm_smem_buf);
}

// Down products over the tiles: part[row][n] = down_e,n . hq[row].
// Grid (ceil(N/128), max tiles), the tiles of nmin to nmax tokens.
template <int MT, int WT, int WN, int SPG, int SK, bool EC>
DEVICE void moe_gemm_down(const GExpert* experts, const i32* tile_e, const i32* tile_s, const i32* tile_n,
                          const i32* ntiles, int N, int I, int G, const i8* hq, const float* hs, float* part,
                          int nmin, int nmax) {
  constexpr int BT = 8 * WT * WN;
  extern __shared__ __align__(16) u8 gemm_smem_buf[];
  __shared__ int tokrow[BT];
  PDL_WAIT();
  const int tile = blockIdx.y;
  int nt, s0, ntok, te;
  moe_tile_words(EC, ntiles, tile_e, tile_s, tile_n, tile, nt, s0, ntok, te);
  // (One test of every word keeps their loads ahead of the branch.)
  if ((EC ? min(nt - 1 - tile, s0 | te | (ntok - 1)) : nt - 1 - tile) < 0) return;
  if (ntok < nmin || ntok > nmax) return;  // another launch's tile
  const GExpert& ex = experts[te];
  for (int r = threadIdx.x; r < BT; r += blockDim.x) tokrow[r] = s0 + min(r, ntok - 1);
  __syncthreads();
  gemm_tile<MT, WT, WN, GEMM_PLAIN, SPG, SK, EC, true>(ex.down, ex.down, N, I, G, blockIdx.x * GEMM_ROWS, hq, I, hs,
                                                      I / G, tokrow, ntok, part + (size_t)s0 * N, N, gemm_smem_buf);
}

#define MOE_GEMM_KERNELS(SUFFIX, MT, WT, WN, SPG, MINB, SK, EC)                                                  \
  extern "C" __global__ void __launch_bounds__(256 / MT * WN, MINB) moe_gemm_gate_up_##SUFFIX(               \
      const GExpert* __restrict__ experts, const i32* __restrict__ tile_e,                        \
      const i32* __restrict__ tile_s, const i32* __restrict__ tile_n,                             \
      const i32* __restrict__ ntiles, const i32* __restrict__ list, int I, int K, int G,          \
      const i8* __restrict__ xq, const float* __restrict__ xs, float* __restrict__ h, int nmin, int nmax) { \
    PDL_LAUNCH();                                                                                 \
    moe_gemm_gate_up<MT, WT, WN, SPG, SK, EC>(experts, tile_e, tile_s, tile_n, ntiles, list, I, K, G, xq, xs, h, nmin, nmax); \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(256 / MT * WN, MINB) moe_gemm_down_##SUFFIX(                  \
      const GExpert* __restrict__ experts, const i32* __restrict__ tile_e,                        \
      const i32* __restrict__ tile_s, const i32* __restrict__ tile_n,                             \
      const i32* __restrict__ ntiles, int N, int I, int G, const i8* __restrict__ hq,             \
      const float* __restrict__ hs, float* __restrict__ part, int nmin, int nmax) {               \
    PDL_LAUNCH();                                                                                 \
    moe_gemm_down<MT, WT, WN, SPG, SK, EC>(experts, tile_e, tile_s, tile_n, ntiles, N, I, G, hq, hs, part, nmin, nmax); \
  }

MOE_GEMM_KERNELS(t16, 2, 2, 1, 0, 1, 0, false)
MOE_GEMM_KERNELS(t16_g128, 2, 2, 1, 4, 1, 0, false)
MOE_GEMM_KERNELS(t64, 1, 8, 1, 0, 2, 1, false)
MOE_GEMM_KERNELS(t64_g128, 1, 8, 1, 4, 2, 1, false)
// (EC: gemm_tile's; and the tile's words in one round trip, moe_tile_words.)
MOE_GEMM_KERNELS(t64e_g128, 1, 8, 1, 4, 2, 1, true)

// ---------------------------------------------------------------------------
// The absorbed query of many tokens, qlat[t, h*rank + k] =
// sum_i q_nope[t,h,i] * W_UK[h*dn + i, k], with W_UK in MMFP4 ([heads*dn,
// rank]): a block takes ABSORB_T tokens of one head and keeps the head's
// codes (dn x rank/2 bytes) in shared memory, so that they are read once per
// ABSORB_T tokens instead of once per token. Each weight is the doubled
// E2M1 value times coef[t][i][g] = q_nope[t,h,i] * (row_scale/2 * group
// scale), the CPU backend's terms; thread j owns columns 2j and 2j+1 (one
// byte of codes) for every token of the block. Grid (ceil(T/ABSORB_T),
// heads), 256 threads (rank <= 512); dynamic shared memory dn*rank/2 +
// 4*ABSORB_T*dn*(rank/G) bytes.
#define ABSORB_T 8

extern "C" __global__ void __launch_bounds__(256)
    absorb_query_many(float* __restrict__ qlat, int ldql, const float* __restrict__ q, int ldq,
                      const u8* __restrict__ codes, const u8* __restrict__ scales,
                      const float* __restrict__ row_scale, int G, int rank, int dn, int dr, int T) {
  PDL_LAUNCH();
  extern __shared__ __align__(16) u8 absorb_smem[];
  __shared__ float lut[16];
  const int h = blockIdx.y, t0 = blockIdx.x * ABSORB_T, tid = threadIdx.x;
  const int half = rank / 2, GK = rank / G;
  u8* sc = absorb_smem;                                // [dn][rank/2] codes
  float* coef = (float*)(absorb_smem + dn * half);    // [ABSORB_T][dn][GK]
  if (tid < 16) {
    const int m = tid & 7, e = m >> 1, f = m & 1;
    const float v = e == 0 ? (float)f : (float)((2 + f) << (e - 1));  // doubled E2M1
    lut[tid] = tid & 8 ? -v : v;
  }
  const u8* hc = codes + (size_t)h * dn * half;
  for (int c = tid; c < dn * half / 16; c += 256) ((uint4*)sc)[c] = load_stream16(hc + 16 * c);
  PDL_WAIT();
  for (int idx = tid; idx < ABSORB_T * dn * GK; idx += 256) {
    const int a = idx / (dn * GK), rem = idx - a * dn * GK, i = rem / GK, g = rem - i * GK;
    const int t = t0 + a, row = h * dn + i;
    const float qv = t < T ? q[(size_t)t * ldq + (size_t)h * (dn + dr) + i] : 0.f;
    coef[idx] = qv * (row_scale[row] * 0.5f * e4m3(scales[(size_t)row * GK + g]));
  }
  __syncthreads();
  if (2 * tid >= rank) return;
  const int g = (2 * tid) / G;
  float acc[ABSORB_T][2];
#pragma unroll
  for (int a = 0; a < ABSORB_T; a++) acc[a][0] = acc[a][1] = 0.f;
  for (int i = 0; i < dn; i++) {
    const u32 byte = sc[i * half + tid];
    const float v0 = lut[byte & 15], v1 = lut[byte >> 4];
#pragma unroll
    for (int a = 0; a < ABSORB_T; a++) {
      const float c = coef[(a * dn + i) * GK + g];
      acc[a][0] += c * v0;
      acc[a][1] += c * v1;
    }
  }
#pragma unroll
  for (int a = 0; a < ABSORB_T; a++) {
    if (t0 + a < T) {
      float* o = qlat + (size_t)(t0 + a) * ldql + (size_t)h * rank + 2 * tid;
      o[0] = acc[a][0];
      o[1] = acc[a][1];
    }
  }
}

// ---------------------------------------------------------------------------
// The router's products for many tokens (prefill): logits[t][e] = W[e] .
// x[t], as moe_router_fast computes them (the same products in the same
// order, so the same bits: lane l sums W[e][l+32u] * x[t][l+32u] over u in
// order from 0, then the warp sum), with the work of a warp blocked as 4
// tokens x 8 experts, so that a column's shared loads feed 32 FMAs; the
// experts are chosen by router_pick_rows after it. Grid
// (ceil(E/ROUTER_MANY_E), ceil(T/ROUTER_MANY_T)), 256 threads: warp w takes
// tokens 4(w%4).. and experts 8(w/4).. of the block's 16 tokens and 16
// experts (with 8 tokens a warp and 32 a block, one block of 8 warps a
// multiprocessor issued an instruction every 3.9 cycles a warp: the
// products took about 30 us at any row count). K goes through shared
// memory ROUTER_MANY_KC columns at a time (the tokens' and the experts'
// rows, cp.async, the next chunk in flight). E <= 128, K <= 2048 with K %
// 32 == 0, 16-byte aligned rows; dynamic shared memory 2 * (ROUTER_MANY_T +
// ROUTER_MANY_E) * ROUTER_MANY_KC floats.
#define ROUTER_MANY_T 16
#define ROUTER_MANY_E 16
#define ROUTER_MANY_KC 256

extern "C" __global__ void __launch_bounds__(256)
    router_many(const float* __restrict__ W, int E, int K, const float* __restrict__ x, int ldx, int T,
                float* logits, int ldl) {
  PDL_LAUNCH();
  constexpr int TT = ROUTER_MANY_T, KC = ROUTER_MANY_KC, ROWS = ROUTER_MANY_T + ROUTER_MANY_E;
  extern __shared__ __align__(16) float rt[];  // [2][ROWS][KC]: the tokens' columns, then the experts'
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int e0 = blockIdx.x * ROUTER_MANY_E, t0 = blockIdx.y * TT;
  const int nt = min(TT, T - t0);
  const int wt = (warp & 3) * 4, we = (warp >> 2) * 8;
  const int nchunks = (K + KC - 1) / KC;
  PDL_WAIT();
  auto load = [&](int c) {
    float* dst = rt + (c & 1) * ROWS * KC;
    const int k0 = c * KC, kc = min(KC, K - k0);
    for (int idx = tid * 4; idx < ROWS * KC; idx += 256 * 4) {
      const int r = idx / KC, k = idx - r * KC;
      if (k >= kc) continue;
      const float* src = r < TT ? x + (size_t)(t0 + min(r, nt - 1)) * ldx : W + (size_t)min(e0 + r - TT, E - 1) * K;
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(dst + idx)), "l"(src + k0 + k)
                   : "memory");
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
  };
  float acc[4][8];
#pragma unroll
  for (int r = 0; r < 4; r++)
#pragma unroll
    for (int j = 0; j < 8; j++) acc[r][j] = 0.f;
  load(0);
  for (int c = 0; c < nchunks; c++) {
    if (c + 1 < nchunks) {
      load(c + 1);
      asm volatile("cp.async.wait_group 1;" ::: "memory");
    } else {
      asm volatile("cp.async.wait_group 0;" ::: "memory");
    }
    __syncthreads();
    const float* cx = rt + (c & 1) * ROWS * KC;
    const float* cw = cx + TT * KC;
    const int nu = min(KC, K - c * KC) / 32;
#pragma unroll
    for (int u = 0; u < KC / 32; u++) {
      if (u < nu) {
        float xv[4], wv[8];
#pragma unroll
        for (int r = 0; r < 4; r++) xv[r] = cx[(wt + r) * KC + lane + 32 * u];
#pragma unroll
        for (int j = 0; j < 8; j++) wv[j] = cw[(we + j) * KC + lane + 32 * u];
#pragma unroll
        for (int r = 0; r < 4; r++)
#pragma unroll
          for (int j = 0; j < 8; j++) acc[r][j] += wv[j] * xv[r];
      }
    }
    __syncthreads();  // every warp is done with this buffer before it is refilled
  }
  // Lane 8 r + j: row r's logit of expert j.
  const float v = warp_sum_rows(reinterpret_cast<const float(&)[32]>(acc), lane);
  const int t = wt + (lane >> 3), e = e0 + we + (lane & 7);
  if (t < nt && e < E) logits[(size_t)(t0 + t) * ldl + e] = v;
}

// Each row's experts from its logits, as moe_router_fast's last block
// chooses them (the same sigmoid, ranks and weight sums in the same order,
// so the same bits), one warp a row (lane l takes experts l, l+32, ...; the
// ranks by shuffles). A last block of each row group choosing after the
// products, three barriers for every four rows, took 4-10 us more.
// 256 threads, ceil(T/8) blocks; E <= 128.
extern "C" __global__ void __launch_bounds__(256)
    router_pick_rows(const float* logits, int ldl, int E, int T, const float* __restrict__ bias, int topk,
                     int norm, float scaling, i32* __restrict__ ids, float* __restrict__ wts) {
  PDL_LAUNCH();
  __shared__ float pick[8][32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int t = blockIdx.x * 8 + warp;
  float bv[4];
#pragma unroll
  for (int i = 0; i < 4; i++) bv[i] = lane + 32 * i < E ? bias[lane + 32 * i] : 0.f;
  PDL_WAIT();
  if (t >= T) return;
  float sc[4], ch[4];
#pragma unroll
  for (int i = 0; i < 4; i++) {
    sc[i] = ch[i] = 0.f;
    if (lane + 32 * i < E) {
      const float acc = logits[(size_t)t * ldl + lane + 32 * i];
      const float sg = sigmoid(acc);
      sc[i] = sg;
      ch[i] = sg + bv[i];
    }
  }
  int rank[4] = {0, 0, 0, 0};
#pragma unroll
  for (int i = 0; i < 4; i++) {
    if (32 * i >= E) break;
    for (int s = 0; s < 32 && 32 * i + s < E; s++) {
      const int j = 32 * i + s;
      const float o = __shfl_sync(0xffffffffu, ch[i], s);
#pragma unroll
      for (int m = 0; m < 4; m++) rank[m] += o > ch[m] || (o == ch[m] && j < lane + 32 * m);
    }
  }
#pragma unroll
  for (int m = 0; m < 4; m++) {
    if (lane + 32 * m < E && rank[m] < topk) {
      ids[(size_t)t * topk + rank[m]] = lane + 32 * m;
      pick[warp][rank[m]] = sc[m];
    }
  }
  __syncwarp();
  if (lane < topk) wts[(size_t)t * topk + lane] = route_weight(pick[warp], topk, lane, norm, scaling);
}


// ---------------------------------------------------------------------------
// The value expansion of a prefill with the int8 form of its output (for
// o_proj) in the same launch: GEMMHeads's products, and what quant_rows
// computes from them in groups of 128 (the same values bit for bit: the
// group's largest magnitude, the scale amax/127, quant8 of each value, the
// sums of 32 columns). A block's 128 rows of one head are one group of the
// quantized row, so each token's group lies in one block: the warps' row
// maxima meet in shared memory, the codes are staged there, then stored in
// 16-byte pieces with their sums.

template <int MT, int WT, int WN>
DEVICE void gemm_quant_out(float (&v)[MT][WT][4], const float* __restrict__ row_scale, int N, int row0,
                           const int (&ra)[MT], float* __restrict__ out, int ldo, int ntok, GQOut qo, u8* smem) {
  constexpr int BT = 8 * WT * WN, WM = 8 / MT, NT = 32 * WM * WN;
  constexpr int QS = GEMM_ROWS + 16;  // bytes between two tokens' staged codes
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp % WM, wn = warp / WM, g = lane >> 2, i = lane & 3;
  float* smax = (float*)smem;   // [WM][BT] each warp row's maxima
  float* sam = smax + WM * BT;  // [BT] each token's group maximum
  float* sinv = sam + BT;       // [BT] 127 / that maximum (0: quant8's way for every value)
  u8* sq = (u8*)(sinv + BT);    // [BT][QS] codes
  const int K = qo.K;
  // The sums scaled in place into the outputs as GEMM_PLAIN writes them
  // (e = 0, 1: row g, tokens 2i, 2i+1; e = 2, 3: row g+8).
#pragma unroll
  for (int m = 0; m < MT; m++)
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const float rs = row_scale[min(row0 + ra[m] + 8 * h, N - 1)] * 0.5f;
#pragma unroll
      for (int nt = 0; nt < WT; nt++) {
        v[m][nt][2 * h] *= rs;
        v[m][nt][2 * h + 1] *= rs;
      }
    }
  __syncthreads();  // every warp is past the stages, which this reuses
#pragma unroll
  for (int nt = 0; nt < WT; nt++)
#pragma unroll
    for (int e1 = 0; e1 < 2; e1++) {
      float mx = 0.f;
#pragma unroll
      for (int m = 0; m < MT; m++) mx = fmaxf(mx, fmaxf(fabsf(v[m][nt][e1]), fabsf(v[m][nt][2 + e1])));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
      if (g == 0) smax[wm * BT + wn * 8 * WT + 8 * nt + 2 * i + e1] = mx;
    }
  __syncthreads();
  for (int t = tid; t < BT; t += NT) {
    float am = 0.f;
#pragma unroll
    for (int w = 0; w < WM; w++) am = fmaxf(am, smax[w * BT + t]);
    sam[t] = am;
    // Groups whose 127/amax is a normal number take the multiplication.
    sinv[t] = am >= 0x1p-100f && am <= 0x1p100f ? 127.f / am : 0.f;
    if (t < ntok) qo.s[(size_t)t * (K / GEMM_ROWS) + row0 / GEMM_ROWS] = am == 0.f ? 0.f : am / 127.f;
  }
  __syncthreads();
#pragma unroll
  for (int nt = 0; nt < WT; nt++)
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const int tok = wn * 8 * WT + 8 * nt + 2 * i + (e & 1);
      const float am = sam[tok], inv = sinv[tok];
#pragma unroll
      for (int m = 0; m < MT; m++) {
        const int r = ra[m] + 8 * (e >> 1);
        // quant8(v, am, am/127) without a division where that is safe:
        // v * (127/am) is within 4e-5 of v / (am/127) (|v| <= am, four
        // roundings), so unless it lies within 0.001 of a half the
        // nearest integer is quant8's rounding (half away from zero) of
        // the exact quotient, and |q| <= 127 needs no clamp; else (and
        // for NaN) quant8 itself.
        const float x = v[m][nt][e] * inv;
        i32 q = __float2int_rn(x);
        if (!(fabsf(x - (float)q) <= 0.499f) || inv == 0.f) q = quant8(v[m][nt][e], am, am / 127.f);
        sq[tok * QS + r] = (u8)q;
        if (tok < ntok && row0 + r < N) out[(size_t)tok * ldo + row0 + r] = v[m][nt][e];
      }
    }
  __syncthreads();
  for (int idx = tid; idx < BT * 8; idx += NT) {
    const int tok = idx >> 3, c = idx & 7;
    if (tok < ntok) *(uint4*)(qo.q + (size_t)tok * K + row0 + 16 * c) = *(const uint4*)(sq + tok * QS + 16 * c);
  }
  for (int idx = tid; idx < BT * 4; idx += NT) {
    const int tok = idx >> 2, c = idx & 3;
    if (tok >= ntok) continue;
    const u32* p = (const u32*)(sq + tok * QS + 32 * c);
    i32 sum = 0;
#pragma unroll
    for (int j = 0; j < 8; j++) {
      const u32 w = p[j];
      sum += (i32)(i8)(w & 0xFFu) + (i32)(i8)((w >> 8) & 0xFFu) + (i32)(i8)((w >> 16) & 0xFFu) + (i32)(i8)(w >> 24);
    }
    qo.sum[(size_t)tok * (K / 32) + row0 / 32 + c] = sum;
  }
}

// GEMMHeads (gemm_dense with grid z the head) writing the output and its
// int8 form: oq [T][OK] codes, os [T][OK/128] scales, osum [T][OK/32] sums,
// OK = heads x N; N a multiple of 128.
#define GEMM_HEADS_Q_KERNEL(NAME, MT, WT, WN, SPG, MINB, EC)                                                     \
  extern "C" __global__ void __launch_bounds__(256 / MT * WN, MINB) NAME(                                   \
      const u8* __restrict__ codes, const u8* __restrict__ scales, const float* __restrict__ row_scale,      \
      int N, int K, int G, const i8* __restrict__ xq, int ldx, const float* __restrict__ xs, int ldxs, int T, \
      float* __restrict__ y, int ldy, i8* __restrict__ oq, float* __restrict__ os, i32* __restrict__ osum,   \
      int OK) {                                                                                              \
    PDL_LAUNCH();                                                                                            \
    constexpr int BT = 8 * WT * WN;                                                                          \
    extern __shared__ __align__(16) u8 gemm_smem_buf[];                                                      \
    __shared__ int tokrow[BT];                                                                               \
    const size_t z = blockIdx.z;                                                                             \
    const int t0 = blockIdx.y * BT, ntok = min(BT, T - t0);                                                  \
    const size_t GK = K / G;                                                                                 \
    for (int r = threadIdx.x; r < BT; r += blockDim.x) tokrow[r] = t0 + min(r, ntok - 1);                   \
    PDL_WAIT();                                                                                              \
    __syncthreads();                                                                                         \
    GQMat a = {codes + z * N * (K / 2), scales + z * N * GK, row_scale + z * N};                             \
    const GQOut qo = {oq + (size_t)t0 * OK + z * N, os + (size_t)t0 * (OK / GEMM_ROWS) + z * N / GEMM_ROWS,   \
                      osum + (size_t)t0 * (OK / 32) + z * N / 32, OK};                                       \
    gemm_tile<MT, WT, WN, GEMM_PLAIN_Q, SPG, 1, EC>(a, a, N, K, G, blockIdx.x * GEMM_ROWS, xq + z * K, ldx,       \
                                                xs + z * GK, ldxs, tokrow, ntok, y + (size_t)t0 * ldy + z * N, \
                                                ldy, gemm_smem_buf, qo);                                     \
  }

GEMM_HEADS_Q_KERNEL(gemm_heads_q_t16, 2, 2, 1, 0, 1, false)
GEMM_HEADS_Q_KERNEL(gemm_heads_q_t16_g128, 2, 2, 1, 4, 1, false)
GEMM_HEADS_Q_KERNEL(gemm_heads_q_t64, 1, 8, 1, 0, 2, false)
GEMM_HEADS_Q_KERNEL(gemm_heads_q_t64_g128, 1, 8, 1, 4, 2, false)
GEMM_HEADS_Q_KERNEL(gemm_heads_q_t64e_g128, 1, 8, 1, 4, 2, true)
