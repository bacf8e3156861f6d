// Device helpers shared by every kernel module; prepended to each .cu file.
// NVRTC has no standard headers, so the fixed-width types are spelled out.
typedef unsigned char u8;
typedef signed char i8;
typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;

#define DEVICE __device__ __forceinline__

// A 16-byte weight load through the read-only path that does not allocate
// in L1: weights are streamed once per step and would only evict the
// activations, which every warp re-reads.
DEVICE uint4 load_stream16(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// load_stream16 and a byte's read-only load as volatile asm, which the
// PTX keeps in order with the other volatile asm (griddepcontrol.wait
// among them): weights requested before a kernel's wait stay before it
// there. ptxas may still move them within a basic block (rows_load, moe.cu,
// keeps them in one of their own).
DEVICE uint4 load_stream16_v(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
DEVICE u32 load_u8_v(const u8* p) {
  u32 v;
  asm volatile("ld.global.nc.u8 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

// Expert matrices keep their codes tile-major on the device (NewExpertTable):
// rows in m-tiles of 16, an m-tile's 128-column group one 1 KB piece with
// row r's 64 bytes at 64 r, so that a warp's loads of an m-tile's group
// read 512 contiguous bytes where row-major codes give 8 rows' pieces 1 KB
// apart (3.1 against 4.3 TB/s for the same loads on an H200;
// docs/perf.md, 2026-11-30 (27)). Byte b of row n of a matrix of K columns
// is at code_row<TM>(codes, n, K) + code_off<TM>(b), TM for tile-major;
// a 16-byte load never crosses a 64-byte piece.
template <bool TM>
DEVICE const u8* code_row(const u8* codes, size_t n, int K) {
  return TM ? codes + (n & ~(size_t)15) * (size_t)(K / 2) + (n & 15) * 64 : codes + n * (size_t)(K / 2);
}
template <bool TM>
DEVICE int code_off(int b) {
  return TM ? (b >> 6) * 1024 + (b & 63) : b;
}

// Asks L2 for up to four spans, lines[j] 128-byte lines from p[j] (null:
// none), the grid's threads taking one line each in turn: a later
// launch's weights, requested by a launch whose blocks are resident before
// that one's can be (a launch starts only when the one two before it has
// finished, and its blocks only where the one before leaves room), so
// that its own loads hit L2.
DEVICE void l2_ahead(const u8* const (&p)[4], const int (&lines)[4]) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x, n = gridDim.x * blockDim.x;
#pragma unroll
  for (int j = 0; j < 4; j++)
    if (p[j] != nullptr)
      for (int k = i; k < lines[j]; k += n) asm volatile("prefetch.global.L2 [%0];" ::"l"(p[j] + ((size_t)k << 7)));
}

// prmt.b32 in its default mode: byte i of the result is byte (sel_i & 7) of
// {b, a}, or, when bit 3 of the selector nibble sel_i is set, that byte's sign
// bit replicated (0x00 or 0xFF).
DEVICE u32 prmt(u32 a, u32 b, u32 sel) {
  u32 d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

// dp4a through inline PTX (NVRTC 11.8 does not resolve __dp4a): c plus the
// sum of the four byte products, a's bytes unsigned (_us) or signed (_ss).
DEVICE i32 dp4a_ss(u32 a, u32 b, i32 c) {
  i32 d;
  asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
DEVICE i32 dp4a_us(u32 a, u32 b, i32 c) {
  i32 d;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// The doubled E2M1 magnitudes {0,1,2,3,4,6,8,12} of codes 0..7 as two
// prmt source words.
#define E2M1_LO 0x03020100u
#define E2M1_HI 0x0C080604u

// Doubled E2M1 values of four codes (the selector's low four nibbles, in
// column order), offset by +128 so that every byte is non-negative:
// 128 + 2*e2m1(code). Positive codes copy their magnitude from the table;
// negative ones (bit 3 set) read as 0 through sign replication. The flipped
// selector gives the magnitudes of the negative codes the same way; the two
// words are disjoint, so 0x80 + pos - neg never carries across bytes.
DEVICE u32 e2m1x4_biased(u32 sel) {
  u32 pos = prmt(E2M1_LO, E2M1_HI, sel);
  u32 neg = prmt(E2M1_LO, E2M1_HI, sel ^ 0x8888u);
  return pos + 0x80808080u - neg;
}

// The value of an E2M1 code (low four bits): magnitudes {0, 0.5, 1, 1.5,
// 2, 3, 4, 6}, bit 3 the sign (code 8 is -0, as in the format's table).
DEVICE float e2m1_value(u32 code) {
  const u32 m = code & 7u;
  const float v = m < 5u ? 0.5f * (float)m : m == 5u ? 3.f : m == 6u ? 4.f : 6.f;
  return (code & 8u) ? -v : v;
}

// FP8 E4M3 scale byte to float, exactly: the 7 magnitude bits shifted into
// place form 2^(e-127)*(1+m/8) (or, for e = 0, the subnormal m*2^-129), and
// multiplying by 2^120 rebases the exponent. Needs denormals (no ftz). 0x7F
// and 0xFF are NaN, as in the format.
DEVICE float e4m3(u32 b) {
  float v = __uint_as_float((b & 0x7Fu) << 20) * 0x1p120f;
  if ((b & 0x7Fu) == 0x7Fu) v = __int_as_float(0x7fc00000);
  return (b & 0x80u) ? -v : v;
}

// The int8 code of v in an activation group whose largest magnitude is
// amax (scale = amax / 127): rounded half away from zero and clamped to
// +-127, as the CPU backend quantizes; 0 for an all-zero group.
DEVICE i32 quant8(float v, float amax, float scale) {
  if (amax == 0.f) return 0;
  float r = v / scale;
  r = r >= 0.f ? r + 0.5f : r - 0.5f;
  return max(-127, min(127, (i32)r));
}

// log2 of x, a power of two: the group sizes' divisions as shifts (a
// division by a value known only at run time is a chain of some 20
// instructions).
DEVICE int log2_pow2(int x) { return 31 - __clz(x); }

DEVICE float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The sums over the warp of R rows' partials o (R up to 32), row r's in
// lane r < R (other lanes: some row's sum). warp_sum's pairs at each
// offset (16, 8, ...), so each row's sum has warp_sum's bits, but at
// offset 16 a lane adds only the half of the rows its bit 4 picks and
// hands the other half to its partner, at 8 half of those, and so on:
// about R shuffles in all where R warp_sums take 5 R, the instructions a
// warp's chain spends after its products. Row r then sits in lanes
// r * 32 / P and up (P: R rounded up to a power of two, the rows past R
// zeros); one shuffle moves it to lane r.
template <int R>
DEVICE float warp_sum_rows(const float (&o)[R], int lane) {
  static_assert(R >= 1 && R <= 32, "warp_sum_rows: at most 32 rows");
  constexpr int P = R <= 1 ? 1 : R <= 2 ? 2 : R <= 4 ? 4 : R <= 8 ? 8 : R <= 16 ? 16 : 32;
  float v[P];
#pragma unroll
  for (int r = 0; r < P; r++) v[r] = r < R ? o[r] : 0.f;
  // Constant trip counts, so that every index of v is known and v stays in
  // registers (a halving loop bound left P >= 16 in local memory).
  constexpr int L = P == 1 ? 0 : P == 2 ? 1 : P == 4 ? 2 : P == 8 ? 3 : P == 16 ? 4 : 5;
#pragma unroll
  for (int l = 0; l < L; l++) {
    const int off = 16 >> l, half = P >> (l + 1);
    const bool hi = (lane & off) != 0;
#pragma unroll
    for (int i = 0; i < P / 2; i++)
      if (i < half) {
        const float keep = hi ? v[i + half] : v[i];
        const float send = hi ? v[i] : v[i + half];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, off);
      }
  }
#pragma unroll
  for (int l = L; l < 5; l++) v[0] += __shfl_xor_sync(0xffffffffu, v[0], 16 >> l);
  return __shfl_sync(0xffffffffu, v[0], (lane * (32 / P)) & 31);
}

// Lane r's row scale for warp_rows_out (0 past N or R). Kernels load it
// before their wait: loaded after the products, it was one more round
// trip to memory on the chain (docs/perf.md, 2026-12-01 (35)).
template <int R>
DEVICE float lane_row_scale(int lane, int row0, int N, const float* __restrict__ row_scale) {
  return lane < R && row0 + lane < N ? __ldg(row_scale + row0 + lane) : 0.f;
}

// A warp's R row sums into y: each summed over the lanes, then lane r
// stores row row0 + r (where < N) times its row scale rs (lane_row_scale)
// / 2 (the weights' codes are twice their values).
template <int R>
DEVICE void warp_rows_out(const float (&o)[R], int lane, int row0, int N, float rs, float* __restrict__ y) {
  const float t = warp_sum_rows(o, lane);
  if (lane < R && row0 + lane < N) y[row0 + lane] = t * (rs * 0.5f);
}

DEVICE float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// The int8 codes of N values of a group whose largest magnitude is amax
// (scale = amax / 127), as quant8 gives them. The N quotients v / scale
// are div.rn.f32's, through the compiler's own fast path (the reciprocal
// refined by one FMA step, each quotient corrected by another) without
// its range check and slow-path call, which kept the divisions from
// overlapping (about 100 cycles each on the single-row norms' critical
// path: docs/perf.md, 2026-11-29 (11)). Where the scale or a value lies
// outside the range in which that path is exact, the lane divides as
// quant8 does.
template <int N>
DEVICE void quant8_codes(const float (&v)[N], float amax, float scale, i32 (&q)[N]) {
  // The range test without short-circuits, which the compiler would turn
  // into a chain of branches.
  int fast = (scale >= 0x1p-60f) & (scale <= 0x1p60f);
#pragma unroll
  for (int e = 0; e < N; e++) fast &= (v[e] == 0.f) | (fabsf(v[e]) >= 0x1p-60f);
  float r[N];
  if (fast) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(scale));
    const float rd = __fmaf_rn(y, __fmaf_rn(y, -scale, 1.f), y);
#pragma unroll
    for (int e = 0; e < N; e++) {
      const float t = __fmaf_rn(v[e], rd, 0.f);
      r[e] = __fmaf_rn(rd, __fmaf_rn(t, -scale, v[e]), t);
    }
  } else {
#pragma unroll
    for (int e = 0; e < N; e++) r[e] = amax == 0.f ? 0.f : v[e] / scale;
  }
#pragma unroll
  for (int e = 0; e < N; e++) {
    const float t = r[e] >= 0.f ? r[e] + 0.5f : r[e] - 0.5f;
    q[e] = amax == 0.f ? 0 : max(-127, min(127, (i32)t));
  }
}

// The int8 form of one group of 32 * E columns (E = 1, 2 or 4) held by a
// warp, lane l holding the E consecutive values from column l * E in v:
// their codes into q[0..E), each 32 columns' code sum into *sum32 (from the
// lane that starts them) and the group's scale into *scale (from lane 0),
// the rule of rmsnorm_quant without a gain (quant8_codes). Every lane must
// call it.
DEVICE void quant_group_warp(const float (&v)[4], int E, int lane, i8* q, i32* sum32, float* scale) {
  float amax = 0.f;
#pragma unroll
  for (int e = 0; e < 4; e++)
    if (e < E) amax = fmaxf(amax, fabsf(v[e]));
  amax = warp_max(amax);
  const float s = amax / 127.f;
  float u[4];
#pragma unroll
  for (int e = 0; e < 4; e++) u[e] = e < E ? v[e] : 0.f;
  i32 c[4];
  quant8_codes(u, amax, s, c);
  i32 sum = 0;
#pragma unroll
  for (int e = 0; e < 4; e++) {
    if (e < E) {
      q[e] = (i8)c[e];
      sum += c[e];
    }
  }
  const int L = 32 >> log2_pow2(E);  // lanes a 32-column chunk: 32 / E
  for (int o = 1; o < L; o <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if ((lane & (L - 1)) == 0) *sum32 = sum;
  if (lane == 0) *scale = amax == 0.f ? 0.f : s;
}

// The int8 form of this lane's 8 consecutive values v, in groups of G =
// 8 * L lanes' values: their codes packed four to a word, their code sum
// (this lane's only) and the group's scale as returned (0 for an all-zero
// group), the rule of rmsnorm_quant (quant8_codes). Every lane of a group
// must call it.
DEVICE float quant8_lane8(const float (&v)[8], int L, u32 (&packed)[2], i32& sum) {
  float amax = 0.f;
#pragma unroll
  for (int e = 0; e < 8; e++) amax = fmaxf(amax, fabsf(v[e]));
  for (int o = 1; o < L; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const float scale = amax / 127.f;
  i32 q[8];
  quant8_codes(v, amax, scale, q);
  packed[0] = packed[1] = 0u;
  sum = 0;
#pragma unroll
  for (int e = 0; e < 8; e++) {
    packed[e >> 2] |= ((u32)q[e] & 0xFFu) << (8 * (e & 3));
    sum += q[e];
  }
  return amax == 0.f ? 0.f : scale;
}

// quant8_lane8 as it was, dividing each value (tests compare the two).
DEVICE float quant8_lane8_div(const float (&v)[8], int L, u32 (&packed)[2], i32& sum) {
  float amax = 0.f;
#pragma unroll
  for (int e = 0; e < 8; e++) amax = fmaxf(amax, fabsf(v[e]));
  for (int o = 1; o < L; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const float scale = amax / 127.f;
  packed[0] = packed[1] = 0u;
  sum = 0;
#pragma unroll
  for (int e = 0; e < 8; e++) {
    const i32 q = quant8(v[e], amax, scale);
    packed[e >> 2] |= ((u32)q & 0xFFu) << (8 * (e & 3));
    sum += q;
  }
  return amax == 0.f ? 0.f : scale;
}

// Eight floats from p (16-byte aligned) through the read-only path.
DEVICE void ldg8(const float* __restrict__ p, float (&v)[8]) {
  const float4 a = __ldg((const float4*)p), b = __ldg((const float4*)(p + 4));
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

DEVICE double warp_sum_d(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The single-row norms' scale, 1 / sqrt(mean square + eps), from the sum
// of squares total of K values. In float32 like
// the CPU backend's SIMD families (its Go reference sums in float64): a few
// ulp from either, far under the int8 form's rounding, where the float64
// sums and quotient sat on the decode chain three times a layer (docs/perf.md,
// 2026-11-30 (22): decode +0.7%, prefill +2.3% with the sigmoid and SiLU).
// The mean by __fdividef (exact for a power-of-two K): an IEEE division's
// slow path is a call, whose stack frame NVRTC 11.8 spills around.
DEVICE float norm_scale(float total, int K, float eps) { return rsqrtf(__fdividef(total, (float)K) + eps); }

// norm_scale of the partial sums of squares of nw warps, added in order.
DEVICE float norm_inv(const float* partial, int nw, int K, float eps) {
  float total = 0;
  for (int w = 0; w < nw; w++) total += partial[w];
  return norm_scale(total, K, eps);
}

// norm_inv for at most 8 warps, unrolled: no loop to run on the
// single-row norms' critical path.
DEVICE float norm_inv8(const float* partial, int nw, int K, float eps) {
  float total = 0;
#pragma unroll
  for (int q = 0; q < 8; q++)
    if (q < nw) total += partial[q];
  return norm_scale(total, K, eps);
}

// The router's score 1 / (1 + e^-x), and silu(x) = x / (1 + e^-x), in
// float32 (the CPU takes the exponential in float64: a few ulp apart).
DEVICE float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }
DEVICE float silu(float x) { return x / (1.f + expf(-x)); }

// The routing weight of the i-th of the topk chosen experts, whose scores
// are pick: its score, divided by their sum (added in order) where norm is
// set, times scaling.
DEVICE float route_weight(const float* pick, int topk, int i, int norm, float scaling) {
  float sum = 0.f;
  for (int k = 0; k < topk; k++) sum += pick[k];
  float w = pick[i];
  if (norm) w /= sum + 1e-20f;
  return w * scaling;
}

// The sum of squares of this thread's 8 values v, summed over the warp
// into partial[warp] (the single-row norms' first step; a norm sums the
// partials of its warps in order).
DEVICE void sumsq8_partial(const float* v, int lane, int warp, float* partial) {
  float ss = 0;
#pragma unroll
  for (int e = 0; e < 8; e++) ss += v[e] * v[e];
  ss = warp_sum(ss);
  if (lane == 0) partial[warp] = ss;
}

// Programmatic dependent launch (sm_90): a kernel launched with the
// programmatic-serialization attribute may start while the kernel before it
// in the stream still runs. PDL_WAIT blocks until that kernel has finished
// and its writes are visible: every kernel calls it before reading what an
// earlier kernel wrote and before its first global write (the weight
// kernels first issue their weight loads, which nothing in a step writes),
// and every kernel calls it at all: one that never waits would let the
// kernel after it pass its wait while the one before still runs. Once the
// wait has returned, PDL_WAIT lets the next kernel launch, so that its
// blocks become resident and issue their weight loads while this one
// works: one kernel ahead. (Triggering at a kernel's start instead lets
// kernels several steps down the chain launch and sit waiting; it measured
// slower.) So when a kernel starts, the kernel before it has passed its
// wait, and every kernel two or more launches back has finished: only the
// immediate predecessor's output needs the wait. PDL_LAUNCH, at kernel
// starts, is kept as a marker and does nothing. Both are no-ops for a
// plain launch.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PDL_WAIT()                                                 \
  do {                                                             \
    asm volatile("griddepcontrol.wait;" ::: "memory");             \
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); \
  } while (0)
#else
#define PDL_WAIT()
#endif
#define PDL_LAUNCH()
// TRACE_MARK: a point of a kernel that the trace (trace.go) numbers and
// times; nothing otherwise.
#define TRACE_MARK()
#define TRACE_MARK_DEP(v)

// The %globaltimer clock (ns), for kernels' timer stamps in benchmarks;
// _after reads it once dep has arrived (an operand: the read waits for it).
DEVICE unsigned long long globaltimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
DEVICE unsigned long long globaltimer_after(int dep) {
  unsigned long long t;
  asm volatile("{ .reg .u32 d; mov.u32 d, %1; mov.u64 %0, %%globaltimer; }" : "=l"(t) : "r"(dep));
  return t;
}

// Stage delays (MMFP4_CUDA_DELAY, delay.go): STAGE_DELAY(i) after the
// wait of a decode layer's stage i spins for mm_delay[i] ns in every
// thread, so that a step's time against the delay shows how much of a
// stage's own time lies on the step's path. Compiled only with MM_DELAY.
#ifdef MM_DELAY
__constant__ unsigned mm_delay[8];
DEVICE void stage_delay(int i) {
  const unsigned ns = mm_delay[i];
  if (ns == 0) return;
  const unsigned long long t0 = globaltimer();
  while (globaltimer() - t0 < ns) {
  }
}
#define STAGE_DELAY(i) stage_delay(i)
#else
#define STAGE_DELAY(i)
#endif

// Kernel tracing (MMFP4_CUDA_TRACE, trace.go): the host rewrites each
// PDL_LAUNCH, PDL_WAIT and TRACE_MARK of a module as PDL_LAUNCH_K,
// PDL_WAIT_K, TRACE_MARK_K with the site's number, and thread 0 of every
// block counts its passing of the site in a histogram of 128 ns buckets of
// %globaltimer (2^MM_TRACE_BITS buckets a site, trace.go's traceBits).
#ifdef MM_TRACE
__constant__ unsigned* mm_trace;
DEVICE void mm_trace_site(unsigned site) {
  if (threadIdx.x + threadIdx.y + threadIdx.z == 0 && mm_trace != nullptr)
    atomicAdd(&mm_trace[(site << MM_TRACE_BITS) | (unsigned)((globaltimer() >> 7) & ((1u << MM_TRACE_BITS) - 1))], 1u);
}
#define PDL_WAIT_K(k) \
  do {                \
    PDL_WAIT();       \
    mm_trace_site(k); \
  } while (0)
#define PDL_LAUNCH_K(k) mm_trace_site(k)
#define TRACE_MARK_K(k) mm_trace_site(k)
DEVICE void mm_trace_site_after(unsigned site, unsigned dep) {
  if (threadIdx.x + threadIdx.y + threadIdx.z == 0 && mm_trace != nullptr) {
    unsigned long long t;
    asm volatile("{ .reg .u32 d; mov.u32 d, %1; mov.u64 %0, %%globaltimer; }" : "=l"(t) : "r"(dep));
    atomicAdd(&mm_trace[(site << MM_TRACE_BITS) | (unsigned)((t >> 7) & ((1u << MM_TRACE_BITS) - 1))], 1u);
  }
}
#define TRACE_MARK_DEP_K(k, v) mm_trace_site_after(k, (unsigned)(v))
#endif

// An fp4 cache slot (dtype 3) of rank latent and rope k_pe values: the
// latent's E2M1 codes, two a byte, low nibble first (rank/2 bytes); k_pe's
// E4M3 codes (rope bytes); an E4M3 scale per group of 32 latent values
// (ceil(rank/32) bytes); at the next multiple of 8 the float32 scales of
// the latent and of k_pe; the slot padded to a multiple of 16 bytes (352
// for rank 512 and 64 rope dims). cachePool.slotBytes has the same sizes;
// cache_load (ops.cu) and the decode kernels (attention.cu) read it.
// constexpr: decode_mma lays out its shared memory with them.
constexpr DEVICE int fp4_scale_offset(int rank, int rope) { return (rank / 2 + rope + (rank + 31) / 32 + 7) & ~7; }
constexpr DEVICE int fp4_slot_bytes(int rank, int rope) { return (fp4_scale_offset(rank, rope) + 8 + 15) & ~15; }

// A word of global memory read with acquire semantics at GPU scope (a
// count another block adds to with a release).
DEVICE u32 ld_acquire(const u32* p) {
  u32 v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Thread-block clusters (sm_90): this block's rank in its cluster, the
// cluster barrier in two halves, and v into the float at p (this block's
// shared memory) in the shared memory of the cluster's block rank.
DEVICE u32 cluster_rank() {
  u32 r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
DEVICE void cluster_arrive() { asm volatile("barrier.cluster.arrive.aligned;" ::: "memory"); }
DEVICE void cluster_wait() { asm volatile("barrier.cluster.wait.aligned;" ::: "memory"); }
// The arrive without its release fence, for a barrier that orders no
// memory this thread wrote. (.relaxed needs PTX 8.0: NVRTC 11.8 takes the
// release form.)
DEVICE void cluster_arrive_relaxed() {
#if __CUDACC_VER_MAJOR__ >= 12
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
#else
  cluster_arrive();
#endif
}
DEVICE void st_cluster(float* p, u32 rank, float v) {
  u32 a = (u32)__cvta_generic_to_shared(p), d;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(rank));
  asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(d), "f"(v) : "memory");
}
// A float word that no arithmetic stores (NaN results are the canonical
// 0x7fffffff): a block sets the words its cluster will send it to this
// before the cluster's first barrier, and a reader spins until its words
// differ. That hand-over carries no fence, where a cluster barrier's
// release arrive compiles to a GPU-wide one (about 0.24 us on an H200, 0.4
// with a global store pending: BenchmarkClusterExchange).
#define CLUSTER_UNSET 0xffffffffu
DEVICE void wait_cluster_set(const float* p) {
  while (*(const volatile u32*)p == CLUSTER_UNSET) {
  }
}
DEVICE void st_cluster_u32(void* p, u32 rank, u32 v) {
  u32 a = (u32)__cvta_generic_to_shared(p), d;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(rank));
  asm volatile("st.shared::cluster.u32 [%0], %1;" ::"r"(d), "r"(v) : "memory");
}
