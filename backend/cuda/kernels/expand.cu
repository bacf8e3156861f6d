// Prefill attention in the expanded form (DESIGN.md section 3: prefill may
// decompress and run ordinary attention), for long prompts. Per head h the
// keys are k_j = [W_UK[h] c_j | k_pe_j] (dn + dr = 256 values) and the
// values v_j = W_UV[h] c_j (dv = 256), over the cached latent rows c_j;
// then causal flash attention over them. A pair of positions costs 512
// multiply-adds a head against the latent form's 1,088 (flash.cu), for the
// expansion's positions x heads x (dn + dv) x rank once a step.
//
// Steps (expanded.go): cache_gather_bf16 (ops.cu) writes the sequence's
// cached rows as dense bf16; expand_weights writes W_UK, then W_UV, as
// bf16; expand_gemm multiplies them into the keys and the values;
// expand_flash runs each split of the keys; expand_merge adds the splits.
//
// Rounding: the latent as cached (bf16: exact), each weight's E2M1 code
// times its E4M3 group scale (at most six significant bits: exact in
// bf16) with its row scale applied to the fp32 products; keys, values,
// queries and softmax weights rounded to bf16 (2^-9 relative; bf16 keeps
// fp32's range, f16 would not), fp32 accumulators.

#define EX_DN 192
#define EX_DR 64
#define EX_DK 256  // EX_DN + EX_DR: a key's values
#define EX_DV 256
#define EX_KEYS 64  // keys a tile
#define EX_LD 264  // query, key and value rows in shared memory (bf16): 528 bytes, ldmatrix free of conflicts

// W [N, K] as bf16 rows: an MMFP4 matrix's E2M1 code times its E4M3 group
// scale (exact in bf16; the row scale is expand_gemm's), or dense fp32
// weights rounded (codes == 0). Two columns a thread.
extern "C" __global__ void __launch_bounds__(256)
    expand_weights(unsigned short* out, const u8* __restrict__ codes, const u8* __restrict__ scales,
                   const float* __restrict__ dense, int N, int K, int G) {
  PDL_LAUNCH();
  PDL_WAIT();
  const int i = 2 * (blockIdx.x * 256 + threadIdx.x);  // N * K < 2^31 (expanded.go)
  if (i >= N * K) return;
  float a, b;
  if (codes) {
    const int n = i / K, k = i - n * K;
    const float s = e4m3(scales[n * (K / G) + k / G]);
    const u32 c = codes[i / 2];
    a = s * e2m1_value(c & 15u);
    b = s * e2m1_value(c >> 4);
  } else {
    a = dense[i];
    b = dense[i + 1];
  }
  ((u32*)out)[i / 2] = bf16x2_rn(a, b);
}

#define EG_BM 128
#define EG_BN 128
#define EG_STAGES 3

// C[p, n] = bf16(rowscale[n] * sum_k A[p, k] W[n, k]) for rows p < P: the
// keys' or the values' expansion (A the gathered latent rows, lda values
// apart; W expand_weights' N rows; rowscale 0 for ones). Tiles of 128 x
// 128 in k steps of 64, three stages of copies, two blocks a
// multiprocessor (128 registers); warps of 32 x 64. N even, K a multiple
// of 64, lda of 8. (Measured slower on an H200: k steps of 32, 2-3%; tiles
// of 128 x 256 in warps of 64 x 64, four stages, one block a
// multiprocessor, 14%.)
extern "C" __global__ void __launch_bounds__(256, 2)
    expand_gemm(unsigned short* __restrict__ C, int ldc, const unsigned short* __restrict__ A, int lda,
                const unsigned short* __restrict__ W, const float* __restrict__ rowscale, int P, int N, int K) {
  constexpr int BK = 64, LD = BK + 8, CH = BK / 8;  // shared rows (bf16; ldmatrix free of conflicts), 16-byte chunks a row
  extern __shared__ __align__(16) unsigned short eg_sm[];
  unsigned short* As = eg_sm;                          // [stage][EG_BM][LD]
  unsigned short* Bs = eg_sm + EG_STAGES * EG_BM * LD;  // [stage][EG_BN][LD]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int m0 = blockIdx.x * EG_BM, n0 = blockIdx.y * EG_BN;
  const int wm = (warp & 3) * 32, wn = (warp >> 2) * 64;
  PDL_LAUNCH();
  PDL_WAIT();
  auto issue = [&](int stage, int k0) {
    for (int c = tid; c < EG_BM * CH; c += 256) {
      const int r = c / CH, q = c % CH, p = m0 + r;
      cp_async16(smem_addr(As + (stage * EG_BM + r) * LD + q * 8), A + (size_t)(p < P ? p : 0) * lda + k0 + q * 8,
                 p < P);
    }
    for (int c = tid; c < EG_BN * CH; c += 256) {
      const int r = c / CH, q = c % CH, n = n0 + r;
      cp_async16(smem_addr(Bs + (stage * EG_BN + r) * LD + q * 8), W + (size_t)(n < N ? n : 0) * K + k0 + q * 8,
                 n < N);
    }
  };
  float acc[2][8][4];
#pragma unroll
  for (int i = 0; i < 2; i++)
#pragma unroll
    for (int j = 0; j < 8; j++) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;
  const int nk = K / BK;
#pragma unroll
  for (int s = 0; s < EG_STAGES - 1; s++) {
    if (s < nk) issue(s, s * BK);
    asm volatile("cp.async.commit_group;" ::: "memory");
  }
  for (int it = 0; it < nk; it++) {
    asm volatile("cp.async.wait_group %0;" ::"n"(EG_STAGES - 2) : "memory");
    __syncthreads();  // step it has landed; every warp is done with step it - 1's stage
    if (it + EG_STAGES - 1 < nk) issue((it + EG_STAGES - 1) % EG_STAGES, (it + EG_STAGES - 1) * BK);
    asm volatile("cp.async.commit_group;" ::: "memory");
    const unsigned short* as = As + (it % EG_STAGES) * EG_BM * LD;
    const unsigned short* bs = Bs + (it % EG_STAGES) * EG_BN * LD;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      u32 a[2][4];
#pragma unroll
      for (int mi = 0; mi < 2; mi++)
        ldsm_x4(smem_addr(as + (wm + mi * 16 + (lane & 15)) * LD + kk + (lane >> 4) * 8), a[mi][0], a[mi][1], a[mi][2],
                a[mi][3]);
#pragma unroll
      for (int nj = 0; nj < 4; nj++) {
        u32 b0, b1, b2, b3;
        ldsm_x4(smem_addr(bs + (wn + nj * 16 + (lane & 7) + ((lane >> 4) << 3)) * LD + kk + ((lane >> 3) & 1) * 8), b0,
                b1, b2, b3);
#pragma unroll
        for (int mi = 0; mi < 2; mi++) {
          mma_bf16(acc[mi][2 * nj], a[mi], b0, b1);
          mma_bf16(acc[mi][2 * nj + 1], a[mi], b2, b3);
        }
      }
    }
  }
  const int g = lane >> 2, c2 = (lane & 3) * 2;
#pragma unroll
  for (int ni = 0; ni < 8; ni++) {
    const int n = n0 + wn + ni * 8 + c2;
    if (n >= N) continue;
    const float s0 = rowscale ? rowscale[n] : 1.f, s1 = rowscale ? rowscale[n + 1] : 1.f;
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
      for (int hf = 0; hf < 2; hf++) {
        const int p = m0 + wm + mi * 16 + g + 8 * hf;
        if (p < P) *(u32*)(C + (size_t)p * ldc + n) = bf16x2_rn(acc[mi][ni][2 * hf] * s0, acc[mi][ni][2 * hf + 1] * s1);
      }
  }
}

// expand_gemm on the asynchronous warpgroup products (wgmma, sm_90a only):
// the same tiles of 128 x 128 in k steps of 64 and three stages of copies,
// each stage's rows laid out as wgmma reads them (128-byte rows, 16-byte
// chunk c of row r at chunk c ^ (r & 7), 1024-byte aligned groups of 8
// rows), and two warpgroups of 64 rows, each one m64n128k16 product a k
// step of 16 read straight from shared memory (no ldmatrix). The fp32 sums
// come in another order than expand_gemm's.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Eight accumulator operands d[i..i+7] of a wgmma's inline asm.
#define WG_F8(i) \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])

// A shared-memory matrix descriptor: K-major rows of 128 bytes with the
// 128-byte swizzle, groups of 8 rows 1024 bytes apart.
DEVICE unsigned long long wg_desc(u32 addr) {
  return (unsigned long long)((addr & 0x3FFFFu) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}

// d (64 floats a thread) += A (64 x 16) B (16 x 128), bf16 operands.
DEVICE void wg_m64n128k16(float (&d)[64], unsigned long long a, unsigned long long b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1, 0, 0;\n}\n"
      : WG_F8(0), WG_F8(8), WG_F8(16), WG_F8(24), WG_F8(32), WG_F8(40), WG_F8(48), WG_F8(56)
      : "l"(a), "l"(b)
      : "memory");
}

// d (32 floats a thread) += A (64 x 16) B (16 x 64), both from shared memory.
DEVICE void wg_m64n64k16(float (&d)[32], unsigned long long a, unsigned long long b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, p, 1, 1, 0, 0;\n}\n"
      : WG_F8(0), WG_F8(8), WG_F8(16), WG_F8(24)
      : "l"(a), "l"(b)
      : "memory");
}

// d (128 floats a thread) += A (64 x 16, bf16 pairs in registers, each
// warp's 16 rows as mma.sync's A fragment) B (16 x 256, shared memory).
DEVICE void wg_m64n256k16_ra(float (&d)[128], const u32 (&a)[4], unsigned long long b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "{%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"
      : WG_F8(0), WG_F8(8), WG_F8(16), WG_F8(24), WG_F8(32), WG_F8(40), WG_F8(48), WG_F8(56), WG_F8(64), WG_F8(72),
        WG_F8(80), WG_F8(88), WG_F8(96), WG_F8(104), WG_F8(112), WG_F8(120)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b)
      : "memory");
}
#endif

// C[m, n] = bf16(scale * sum_k A[m, k] B[n, k]) for m < M, n < Nst, where
// scale is scale[m] (scale_rows) or scale[n] (0: ones), rows of A past M and
// of B past N read as zeros (so columns [N, Nst) are zeros). The keys' and
// values' product is A = the gathered rows, B = W; the values transposed
// (expand_flash_wg's, positions contiguous) are A = W, B = the rows.
extern "C" __global__ void __launch_bounds__(256, 2)
    expand_gemm_wg(unsigned short* __restrict__ C, int ldc, const unsigned short* __restrict__ A, int lda, int M,
                   const unsigned short* __restrict__ B, int ldb, int N, int Nst, const float* __restrict__ scale,
                   int scale_rows, int K) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int BK = 64, STAGES = 3, TILE = 128 * 128;  // a stage's tile: 128 rows of 128 bytes
  extern __shared__ __align__(1024) unsigned char wg_sm[];
  // The stages 1024-byte aligned (the swizzle's period) whatever the
  // dynamic area's start.
  unsigned char* base = wg_sm + ((1024 - (smem_addr(wg_sm) & 1023)) & 1023);
  unsigned char* As = base;                  // [stage][128 rows][128 bytes]
  unsigned char* Bs = base + STAGES * TILE;  // [stage][128 rows][128 bytes]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2;
  const int m0 = blockIdx.x * 128, n0 = blockIdx.y * 128;
  PDL_LAUNCH();
  PDL_WAIT();
  auto issue = [&](int stage, int k0) {
    for (int c = tid; c < 128 * 8; c += 256) {
      const int r = c >> 3, q = c & 7, m = m0 + r, n = n0 + r;
      const u32 off = r * 128 + ((q ^ (r & 7)) << 4);
      cp_async16(smem_addr(As + stage * TILE + off), A + (size_t)(m < M ? m : 0) * lda + k0 + q * 8, m < M);
      cp_async16(smem_addr(Bs + stage * TILE + off), B + (size_t)(n < N ? n : 0) * ldb + k0 + q * 8, n < N);
    }
  };
  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; i++) acc[i] = 0.f;
  const int nk = K / BK;
#pragma unroll
  for (int s = 0; s < STAGES - 1; s++) {
    if (s < nk) issue(s, s * BK);
    asm volatile("cp.async.commit_group;" ::: "memory");
  }
  for (int it = 0; it < nk; it++) {
    asm volatile("cp.async.wait_group %0;" ::"n"(STAGES - 2) : "memory");
    // The copies were written through the generic proxy; wgmma reads
    // through the async one.
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncthreads();  // step it has landed; every warpgroup is done with step it - 1's stage
    if (it + STAGES - 1 < nk) issue((it + STAGES - 1) % STAGES, (it + STAGES - 1) * BK);
    asm volatile("cp.async.commit_group;" ::: "memory");
    const u32 a0 = smem_addr(As + (it % STAGES) * TILE + wg * 64 * 128), b0 = smem_addr(Bs + (it % STAGES) * TILE);
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
    for (int kk = 0; kk < BK / 16; kk++) wg_m64n128k16(acc, wg_desc(a0 + 32 * kk), wg_desc(b0 + 32 * kk));
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
  }
  // Accumulator j of a thread: row 16 (warp % 4) + lane / 4 (+ 8 for the
  // odd pairs), column 8 (j / 4) + 2 (lane % 4) + j % 2.
  const int r0 = m0 + wg * 64 + (warp & 3) * 16 + (lane >> 2), c2 = (lane & 3) * 2;
#pragma unroll
  for (int hf = 0; hf < 2; hf++) {
    const int m = r0 + 8 * hf;
    if (m >= M) continue;
    const float sm = scale && scale_rows ? scale[m] : 1.f;
#pragma unroll
    for (int j = 0; j < 16; j++) {
      const int n = n0 + 8 * j + c2;
      if (n >= Nst) continue;
      float s0 = sm, s1 = sm;
      if (scale && !scale_rows) s0 = n < N ? scale[n] : 0.f, s1 = n + 1 < N ? scale[n + 1] : 0.f;
      *(u32*)(C + (size_t)m * ldc + n) = bf16x2_rn(acc[4 * j + 2 * hf] * s0, acc[4 * j + 2 * hf + 1] * s1);
    }
  }
#else
  __trap();  // built only for sm_90a (expanded.go asks for it there alone)
#endif
}

// The online softmax of one key tile's scores for the thread's two rows
// (pa, pb its rows' positions; the mma layout: element 4n + e of s is key
// kb + 8n + c2 + (e & 1) of row e >> 1): into base 2, keys past a row's
// position out where edge, the running maxima m and sums l updated, and p
// the weights (p may be s). corr is what o's sums are to be scaled by.
DEVICE void ex_softmax(const float (&s)[32], float (&p)[32], int kb, bool edge, int c2, int pa, int pb,
                       float scale_log2, float (&m)[2], float (&l)[2], float (&corr)[2]) {
  const float ninf = __int_as_float(0xff800000);
  float mx[2] = {ninf, ninf};
#pragma unroll
  for (int n = 0; n < 8; n++)
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const int j = kb + n * 8 + c2 + (e & 1);
      float x = s[4 * n + e] * scale_log2;
      if (edge && j > (e < 2 ? pa : pb)) x = ninf;
      p[4 * n + e] = x;
      mx[e >> 1] = fmaxf(mx[e >> 1], x);
    }
  float base[2];
#pragma unroll
  for (int r = 0; r < 2; r++) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    const float mn = fmaxf(m[r], mx[r]);
    base[r] = mn == ninf ? 0.f : mn;  // a row with no key yet stays at zero
    corr[r] = fa_ex2(m[r] - base[r]);
    m[r] = mn;
    l[r] *= corr[r];
  }
#pragma unroll
  for (int n = 0; n < 32; n++) {
    p[n] = fa_ex2(p[n] - base[(n >> 1) & 1]);
    l[(n >> 1) & 1] += p[n];
  }
}

// o (the mma layout: element 4n + e is column 8n + c2 + (e & 1) of row
// e >> 1) scaled by corr, row by row.
DEVICE void ex_rescale(float (&o)[128], const float (&corr)[2]) {
#pragma unroll
  for (int n = 0; n < 32; n++) {
    o[4 * n] *= corr[0];
    o[4 * n + 1] *= corr[0];
    o[4 * n + 2] *= corr[1];
    o[4 * n + 3] *= corr[1];
  }
}

// The end of a block of expand_flash: the thread's rows r0 and r0 + 8 of
// the query tile at t0 (nt rows), their sums l completed across the quad;
// with one split the output itself, else the split's sums and its maxima
// and weights' sums for expand_merge.
DEVICE void ex_store(const float (&o)[128], const float (&m)[2], float (&l)[2], float* __restrict__ out, int ldo,
                     float* __restrict__ po, float* __restrict__ pml, int T, int heads, int splits, int sp, int h,
                     int t0, int nt, int r0, int c2, int lane) {
#pragma unroll
  for (int r = 0; r < 2; r++) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
#pragma unroll
  for (int hf = 0; hf < 2; hf++) {
    const int row = r0 + 8 * hf;
    if (row >= nt) continue;
    if (splits == 1) {  // the output itself (every row has key 0: l > 0)
      const float inv = 1.f / l[hf];
      float* dst = out + (size_t)(t0 + row) * ldo + h * EX_DV;
#pragma unroll
      for (int n = 0; n < 32; n++)
        *(float2*)(dst + n * 8 + c2) = make_float2(o[4 * n + 2 * hf] * inv, o[4 * n + 2 * hf + 1] * inv);
      continue;
    }
    const size_t at = ((size_t)sp * T + t0 + row) * heads + h;
    float* dst = po + at * EX_DV;
#pragma unroll
    for (int n = 0; n < 32; n++) *(float2*)(dst + n * 8 + c2) = make_float2(o[4 * n + 2 * hf], o[4 * n + 2 * hf + 1]);
    if ((lane & 3) == 0) *(float2*)(pml + 2 * at) = make_float2(m[hf], l[hf]);
  }
}

// Causal attention of one sequence's T rows (positions pos[t], ascending)
// over keys [0, pos[t]] in the expanded form. Block (x, h), x = split *
// nq + i, takes query rows [128 i, +128) of head h and split `split` of
// their key tiles. With one split it writes the output itself (out, head
// h at h * dv); else the split's output before the softmax's division
// (po: [split][t][head][256]) and its running maximum (base 2) and sum
// (pml: [split][t][head][2]), which expand_merge adds up. kn holds the
// keys' first dn values (ldk apart, head h at h * dn), rows the gathered
// cache rows (k_pe at column rank), v the values (head h at h * dv).
// The query tiles with the most keys start first; consecutive blocks take
// the same keys for other rows, which then come from L2. Eight warps of
// 16 rows (each key tile read once for 128 rows: blocks of four warps
// measured 3-22% slower end to end on an H200), two stages of key and
// value tiles.
extern "C" __global__ void __launch_bounds__(256, 1)
    expand_flash(float* __restrict__ out, int ldo, float* __restrict__ po, float* __restrict__ pml,
                 const float* __restrict__ q, int ldq, const unsigned short* __restrict__ kn, int ldk,
                 const unsigned short* __restrict__ rows, int ldr, int rank, const unsigned short* __restrict__ v,
                 int ldv, const i32* __restrict__ pos, int T, int heads, int splits, float scale_log2) {
  constexpr int BR = 128, NT = 256;  // query rows and threads a block
  extern __shared__ __align__(16) unsigned short ex_sm[];
  unsigned short* Qs = ex_sm;                       // [BR][EX_LD]
  unsigned short* Ks = Qs + BR * EX_LD;       // [2][EX_KEYS][EX_LD]
  unsigned short* Vs = Ks + 2 * EX_KEYS * EX_LD;   // [2][EX_KEYS][EX_LD]
  const int nq = (T + BR - 1) / BR;
  const int qi = nq - 1 - blockIdx.x % nq, sp = blockIdx.x / nq, h = blockIdx.y;  // most keys first
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int t0 = qi * BR, nt = min(BR, T - t0);
  PDL_LAUNCH();
  PDL_WAIT();
  const int nkeys = pos[t0 + nt - 1] + 1;
  const int ntiles = (nkeys + EX_KEYS - 1) / EX_KEYS, per = (ntiles + splits - 1) / splits;
  const int tb = sp * per, te = min(ntiles, tb + per);

  auto issue = [&](int stage, int kb) {
    unsigned short* ks = Ks + stage * EX_KEYS * EX_LD;
    unsigned short* vs = Vs + stage * EX_KEYS * EX_LD;
    for (int c = tid; c < EX_KEYS * 32; c += NT) {  // 24 chunks of k_nope, 8 of k_pe a key
      const int r = c >> 5, f = c & 31, j = kb + r, jj = j < nkeys ? j : 0;
      const unsigned short* src =
          f < 24 ? kn + (size_t)jj * ldk + h * EX_DN + 8 * f : rows + (size_t)jj * ldr + rank + 8 * (f - 24);
      cp_async16(smem_addr(ks + r * EX_LD + 8 * f), src, j < nkeys);
    }
    for (int c = tid; c < EX_KEYS * 32; c += NT) {  // zeros past nkeys: their weights are 0, not NaN
      const int r = c >> 5, f = c & 31, j = kb + r;
      cp_async16(smem_addr(vs + r * EX_LD + 8 * f), v + (size_t)(j < nkeys ? j : 0) * ldv + h * EX_DV + 8 * f,
                 j < nkeys);
    }
  };
  if (tb < te) issue(0, tb * EX_KEYS);
  asm volatile("cp.async.commit_group;" ::: "memory");

  // The queries as bf16 (zeros past T), while the first tile's copies fly.
  for (int c = tid; c < BR * (EX_DK / 4); c += NT) {
    const int r = c / (EX_DK / 4), f = c - r * (EX_DK / 4);
    float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
    if (r < nt) x = *(const float4*)(q + (size_t)(t0 + r) * ldq + h * EX_DK + 4 * f);
    *(uint2*)(Qs + r * EX_LD + 4 * f) = make_uint2(bf16x2_rn(x.x, x.y), bf16x2_rn(x.z, x.w));
  }

  const int g = lane >> 2, c2 = (lane & 3) * 2, r0 = warp * 16 + g;
  const int pa = r0 < nt ? pos[t0 + r0] : -1, pb = r0 + 8 < nt ? pos[t0 + r0 + 8] : -1;
  const int wlast = min(nt, warp * 16 + 16) - 1;
  const int wmax = warp * 16 < nt ? pos[t0 + wlast] : -1;  // the warp's last key
  const int wmin = warp * 16 < nt ? pos[t0 + warp * 16] : -1;
  const float ninf = __int_as_float(0xff800000);
  float o[32][4];
#pragma unroll
  for (int n = 0; n < 32; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float(&of)[128] = reinterpret_cast<float(&)[128]>(o);  // the helpers' flat view
  float m[2] = {ninf, ninf}, l[2] = {0.f, 0.f};

  for (int it = tb; it < te; it++) {
    const int st = (it - tb) & 1, kb = it * EX_KEYS;
    if (it + 1 < te) issue(st ^ 1, kb + EX_KEYS);
    asm volatile("cp.async.commit_group;" ::: "memory");
    asm volatile("cp.async.wait_group 1;" ::: "memory");
    __syncthreads();
    const unsigned short* ks = Ks + st * EX_KEYS * EX_LD;
    const unsigned short* vs = Vs + st * EX_KEYS * EX_LD;
    if (kb <= wmax) {
      float s[8][4];
#pragma unroll
      for (int n = 0; n < 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < EX_DK / 16; kk++) {
        u32 a[4];
        ldsm_x4(smem_addr(Qs + (warp * 16 + (lane & 15)) * EX_LD + kk * 16 + (lane >> 4) * 8), a[0], a[1], a[2], a[3]);
#pragma unroll
        for (int np = 0; np < 4; np++) {
          u32 b0, b1, b2, b3;
          ldsm_x4(smem_addr(ks + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * EX_LD + kk * 16 + ((lane >> 3) & 1) * 8),
                  b0, b1, b2, b3);
          mma_bf16(s[2 * np], a, b0, b1);
          mma_bf16(s[2 * np + 1], a, b2, b3);
        }
      }
      // Scale into base 2; keys past a row's position out (only on the
      // tiles that reach past the warp's first row).
      float(&sf)[32] = reinterpret_cast<float(&)[32]>(s);
      float corr[2];
      ex_softmax(sf, sf, kb, kb + EX_KEYS - 1 > wmin, c2, pa, pb, scale_log2, m, l, corr);
      ex_rescale(of, corr);
#pragma unroll
      for (int kk = 0; kk < EX_KEYS / 16; kk++) {
        const u32 a[4] = {bf16x2_rn(s[2 * kk][0], s[2 * kk][1]), bf16x2_rn(s[2 * kk][2], s[2 * kk][3]),
                          bf16x2_rn(s[2 * kk + 1][0], s[2 * kk + 1][1]), bf16x2_rn(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int dp = 0; dp < EX_DV / 16; dp++) {
          u32 b0, b1, b2, b3;
          ldsm_x4_t(smem_addr(vs + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * EX_LD + dp * 16 + (lane >> 4) * 8),
                    b0, b1, b2, b3);
          mma_bf16(o[2 * dp], a, b0, b1);
          mma_bf16(o[2 * dp + 1], a, b2, b3);
        }
      }
    }
    __syncthreads();  // this stage is refilled by the next step's copies
  }
  cp_async_wait_all();
  ex_store(of, m, l, out, ldo, po, pml, T, heads, splits, sp, h, t0, nt, r0, c2, lane);
}

// expand_flash on wgmma (sm_90a only): the same blocks, splits and
// softmax, the products asynchronous and read straight from shared memory.
// Each warpgroup (4 warps, 64 query rows) takes the scores as 16
// m64n64k16 products (queries and keys from shared memory) and the values'
// sum as 4 m64n256k16 products (the weights in registers, as the scores'
// accumulators lie, the values from shared memory). The values come
// transposed (vt: row h * dv + d holds dimension d of head h's values at
// every position, ldvt apart, zeros past the sequence to a multiple of 64)
// so that both products read K-major tiles. Shared memory, each tile's rows
// of 128 bytes with the 128-byte swizzle: the queries [4 k-blocks][128
// rows], two stages of keys [4][64] and of values [256 dimensions][64
// positions].
//
// Each tile's values' product is issued after the next tile's scores and
// left running through that tile's softmax (the keys' and the values'
// stages a tile apart): on an H200 4% less device time than waiting for
// it, with the same products and sums in the same order.
extern "C" __global__ void __launch_bounds__(256, 1)
    expand_flash_wg(float* __restrict__ out, int ldo, float* __restrict__ po, float* __restrict__ pml,
                    const float* __restrict__ q, int ldq, const unsigned short* __restrict__ kn, int ldk,
                    const unsigned short* __restrict__ rows, int ldr, int rank, const unsigned short* __restrict__ vt,
                    int ldvt, const i32* __restrict__ pos, int T, int heads, int splits, float scale_log2) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int BR = 128, QB = BR * 128, KB = EX_KEYS * 128, KT = 4 * KB, VT = EX_DV * 128;
  extern __shared__ __align__(1024) unsigned char fw_sm[];
  unsigned char* base = fw_sm + ((1024 - (smem_addr(fw_sm) & 1023)) & 1023);
  unsigned char* Qs = base;                // [4 k-blocks][128 rows][128 bytes]
  unsigned char* Ks = Qs + 4 * QB;         // [2 stages][4 k-blocks][64 keys][128 bytes]
  unsigned char* Vs = Ks + 2 * KT;         // [2 stages][256 dimensions][128 bytes]
  const int nq = (T + BR - 1) / BR;
  const int qi = nq - 1 - blockIdx.x % nq, sp = blockIdx.x / nq, h = blockIdx.y;  // most keys first
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2;
  const int t0 = qi * BR, nt = min(BR, T - t0);
  PDL_LAUNCH();
  PDL_WAIT();
  const int nkeys = pos[t0 + nt - 1] + 1;
  const int ntiles = (nkeys + EX_KEYS - 1) / EX_KEYS, per = (ntiles + splits - 1) / splits;
  const int tb = sp * per, te = min(ntiles, tb + per);

  auto issueK = [&](int stage, int kb) {
    unsigned char* ks = Ks + stage * KT;
    for (int c = tid; c < EX_KEYS * 32; c += 256) {  // 24 chunks of k_nope, 8 of k_pe a key
      const int r = c >> 5, f = c & 31, j = kb + r, jj = j < nkeys ? j : 0;
      const unsigned short* src =
          f < 24 ? kn + (size_t)jj * ldk + h * EX_DN + 8 * f : rows + (size_t)jj * ldr + rank + 8 * (f - 24);
      cp_async16(smem_addr(ks + (f >> 3) * KB + r * 128 + (((f & 7) ^ (r & 7)) << 4)), src, j < nkeys);
    }
  };
  auto issueV = [&](int stage, int kb) {
    unsigned char* vs = Vs + stage * VT;
    for (int c = tid; c < EX_DV * 8; c += 256) {  // the values' columns kb..kb+63 (zeros past the sequence)
      const int d = c >> 3, f = c & 7;
      cp_async16(smem_addr(vs + d * 128 + ((f ^ (d & 7)) << 4)), vt + (size_t)(h * EX_DV + d) * ldvt + kb + 8 * f, true);
    }
  };
  if (tb < te) issueK(0, tb * EX_KEYS);
  asm volatile("cp.async.commit_group;" ::: "memory");

  // The queries as bf16 (zeros past T), swizzled as the tiles.
  for (int c = tid; c < BR * (EX_DK / 4); c += 256) {
    const int r = c / (EX_DK / 4), f = c - r * (EX_DK / 4);
    float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
    if (r < nt) x = *(const float4*)(q + (size_t)(t0 + r) * ldq + h * EX_DK + 4 * f);
    const int ch = (f >> 1) & 7;  // the 16-byte chunk of dims 8 (f / 2) .. within its k-block (f / 16)
    *(uint2*)(Qs + (f >> 4) * QB + r * 128 + ((ch ^ (r & 7)) << 4) + (f & 1) * 8) =
        make_uint2(bf16x2_rn(x.x, x.y), bf16x2_rn(x.z, x.w));
  }
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");

  const int g = lane >> 2, c2 = (lane & 3) * 2, r0 = warp * 16 + g;
  const int pa = r0 < nt ? pos[t0 + r0] : -1, pb = r0 + 8 < nt ? pos[t0 + r0 + 8] : -1;
  const int wmin = warp * 16 < nt ? pos[t0 + warp * 16] : -1;
  const int glast = min(nt, wg * 64 + 64) - 1;
  const int gmax = wg * 64 < nt ? pos[t0 + glast] : -1;  // the warpgroup's last key
  const float ninf = __int_as_float(0xff800000);
  float o[128];
#pragma unroll
  for (int n = 0; n < 128; n++) o[n] = 0.f;
  float m[2] = {ninf, ninf}, l[2] = {0.f, 0.f};
  const u32 qa = smem_addr(Qs) + wg * 64 * 128;

  float ps[32];            // the last tile's softmax weights, until their values' product
  float corr[2] = {1.f, 1.f};  // o's rescaling before that product
  bool pend = false;       // warpgroup-uniform: ps holds a tile whose product is not yet issued
  u32 p[4][4];             // ps as bf16, read by the product until its wait
  float s[32];
  // Each product's register operands are pinned around it (empty asm
  // statements), so that the compiler moves no access to them into the
  // product's flight: ptxas would serialize every product of the kernel.
  auto scores = [&](u32 ka) {
#pragma unroll
    for (int n = 0; n < 32; n++) {
      s[n] = 0.f;
      asm volatile("" : "+f"(s[n])::"memory");
    }
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
    for (int kk = 0; kk < EX_DK / 16; kk++)
      wg_m64n64k16(s, wg_desc(qa + (kk >> 2) * QB + (kk & 3) * 32), wg_desc(ka + (kk >> 2) * KB + (kk & 3) * 32));
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
  };
  auto values = [&](u32 va) {
    ex_rescale(o, corr);
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
      p[kk][0] = bf16x2_rn(ps[8 * kk], ps[8 * kk + 1]);
      p[kk][1] = bf16x2_rn(ps[8 * kk + 2], ps[8 * kk + 3]);
      p[kk][2] = bf16x2_rn(ps[8 * kk + 4], ps[8 * kk + 5]);
      p[kk][3] = bf16x2_rn(ps[8 * kk + 6], ps[8 * kk + 7]);
    }
#pragma unroll
    for (int kk = 0; kk < 4; kk++)
#pragma unroll
      for (int e = 0; e < 4; e++) asm volatile("" : "+r"(p[kk][e])::"memory");
#pragma unroll
    for (int n = 0; n < 128; n++) asm volatile("" : "+f"(o[n])::"memory");
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
    for (int kk = 0; kk < 4; kk++) wg_m64n256k16_ra(o, p[kk], wg_desc(va + kk * 32));
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
  };
  auto settled = [&]() {  // after the values' product's wait
#pragma unroll
    for (int n = 0; n < 128; n++) asm volatile("" : "+f"(o[n])::"memory");
#pragma unroll
    for (int kk = 0; kk < 4; kk++)
#pragma unroll
      for (int e = 0; e < 4; e++) asm volatile("" : "+r"(p[kk][e])::"memory");
  };
  // The softmax of tile kb's scores (s, after their wait) into ps, corr, m, l.
  auto softmax = [&](int kb) {
#pragma unroll
    for (int n = 0; n < 32; n++) asm volatile("" : "+f"(s[n])::"memory");
    // Scale into base 2; keys past a row's position out (only on the
    // tiles that reach past the warp's first row).
    ex_softmax(s, ps, kb, kb + EX_KEYS - 1 > wmin, c2, pa, pb, scale_log2, m, l, corr);
  };
  for (int it = tb; it <= te; it++) {
    // Tile it's keys and tile it - 1's values were asked for a step ago;
    // after the barrier every warpgroup is done with tile it - 1's keys and
    // tile it - 2's values, whose stages take tile it + 1's keys and tile
    // it's values.
    const int i = it - tb, kb = it * EX_KEYS;
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncthreads();
    if (it + 1 < te) issueK((i + 1) & 1, kb + EX_KEYS);
    if (it < te) issueV(i & 1, kb);
    asm volatile("cp.async.commit_group;" ::: "memory");
    const bool score = it < te && kb <= gmax;  // warpgroup-uniform: wgmma is collective
    const u32 ka = smem_addr(Ks + (i & 1) * KT), va = smem_addr(Vs + ((i - 1) & 1) * VT);
    if (score && pend) {  // the last tile's values' product beside this tile's softmax
      scores(ka);
      values(va);
      asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
      softmax(kb);
      asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
      settled();
    } else if (score) {  // the first tile
      scores(ka);
      asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
      softmax(kb);
      pend = true;
    } else if (pend) {  // the last tile's values' product
      values(va);
      asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
      settled();
      pend = false;
    }
  }
  ex_store(o, m, l, out, ldo, po, pml, T, heads, splits, sp, h, t0, nt, r0, c2, lane);
#else
  __trap();  // built only for sm_90a (expanded.go asks for it there alone)
#endif
}


// out[t, h*dv + k] = the splits of expand_flash merged: their outputs
// weighted by 2^(m_split - max) and divided by the weighted sums. Block
// (t, h), a float4 a thread.
extern "C" __global__ void __launch_bounds__(EX_DV / 4)
    expand_merge(float* __restrict__ out, int ldo, const float* __restrict__ po, const float* __restrict__ pml, int T,
                 int heads, int splits) {
  PDL_LAUNCH();
  PDL_WAIT();
  const int t = blockIdx.x, h = blockIdx.y, f = threadIdx.x;
  float M = __int_as_float(0xff800000);
  for (int s = 0; s < splits; s++) M = fmaxf(M, pml[2 * (((size_t)s * T + t) * heads + h)]);
  float L = 0.f;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int s = 0; s < splits; s++) {
    const size_t at = ((size_t)s * T + t) * heads + h;
    const float2 ml = *(const float2*)(pml + 2 * at);
    if (ml.y == 0.f) continue;  // no key of this row in the split
    const float w = fa_ex2(ml.x - M);
    const float4 x = *(const float4*)(po + at * EX_DV + 4 * f);
    L += w * ml.y;
    acc.x += w * x.x;
    acc.y += w * x.y;
    acc.z += w * x.z;
    acc.w += w * x.w;
  }
  const float inv = 1.f / L;
  *(float4*)(out + (size_t)t * ldo + h * EX_DV + 4 * f) = make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv);
}
