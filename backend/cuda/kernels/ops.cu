// The small ops of the backend.Backend implementation (backend.go): simple,
// correct kernels that evaluate each op as backend/cpu does. Matrices are
// row-major float32 with a row stride (ld) in floats, so column views work.

#define OPS_THREADS 256

// Dense product y[t][n] = W[n] . x[t], W fp32 [N][K]; one warp per output
// row n, grid (ceil(N/8), T).
extern "C" __global__ void __launch_bounds__(OPS_THREADS)
    dense_matmul(const float* __restrict__ W, int N, int K, const float* __restrict__ x, int ldx,
                 float* __restrict__ y, int ldy) {
  PDL_LAUNCH();
  PDL_WAIT();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n = blockIdx.x * (OPS_THREADS / 32) + warp, t = blockIdx.y;
  if (n >= N) return;
  const float* w = W + (size_t)n * K;
  const float* xr = x + (size_t)t * ldx;
  float acc = 0.f;
#pragma unroll 8
  for (int k = lane; k < K; k += 32) acc += w[k] * xr[k];
  acc = warp_sum(acc);
  if (lane == 0) y[(size_t)t * ldy + n] = acc;
}

// dst = a + b, one block per row.
extern "C" __global__ void __launch_bounds__(OPS_THREADS)
    add_rows(float* d, int ldd, const float* a, int lda, const float* b, int ldb, int cols) {
  PDL_LAUNCH();
  PDL_WAIT();
  const int t = blockIdx.x;
  for (int i = threadIdx.x; i < cols; i += OPS_THREADS)
    d[(size_t)t * ldd + i] = a[(size_t)t * lda + i] + b[(size_t)t * ldb + i];
}

// dst = silu(gate) * up; blockIdx.y is the row, blockIdx.x a slice of
// SWIGLU_COLS columns (one block for a 10240-wide row took 24 us: each
// thread's 40 exponentials, then in double, ran one after another).
#define SWIGLU_COLS 1024
extern "C" __global__ void __launch_bounds__(OPS_THREADS)
    swiglu_rows(float* d, int ldd, const float* g, int ldg, const float* u, int ldu, int cols) {
  PDL_LAUNCH();
  PDL_WAIT();
  const int t = blockIdx.y;
  const int end = min(cols, ((int)blockIdx.x + 1) * SWIGLU_COLS);
  for (int i = blockIdx.x * SWIGLU_COLS + threadIdx.x; i < end; i += OPS_THREADS)
    d[(size_t)t * ldd + i] = __fmul_rn(silu(g[(size_t)t * ldg + i]), u[(size_t)t * ldu + i]);
}

extern "C" __global__ void __launch_bounds__(OPS_THREADS)
    rope_rows(float* x, int ldx, int heads, int head_stride, int offset, int dim, int interleaved,
              const float* __restrict__ cs, int T) {
  PDL_LAUNCH();
  PDL_WAIT();
  rope_row(x, ldx, heads, head_stride, offset, dim, interleaved, cs, T, blockIdx.x);
}

// dst row i = src row rows[i].
extern "C" __global__ void __launch_bounds__(OPS_THREADS)
    gather_rows(float* d, int ldd, const float* s, int lds, const i32* __restrict__ rows, int cols) {
  PDL_LAUNCH();
  PDL_WAIT();
  const int i = blockIdx.x;
  const float* src = s + (size_t)rows[i] * lds;
  for (int k = threadIdx.x; k < cols; k += OPS_THREADS) d[(size_t)i * ldd + k] = src[k];
}

DEVICE float bf16_to_f32(unsigned short h) { return __uint_as_float((u32)h << 16); }

// An fp4 slot's element j (cache_load's dtype 3). Not inlined: inline in
// latent_attention_heads' loop over cache_load, it made NVRTC 12.4 and 13.0
// spill 4 bytes there (11.8 did not).
__device__ __noinline__ float cache_load_fp4(const void* layer, size_t slot, int width, int rank, int j) {
  const int rope = width - rank;
  const u8* rec = (const u8*)layer + slot * fp4_slot_bytes(rank, rope);
  const float* sc = (const float*)(rec + fp4_scale_offset(rank, rope));
  if (j >= rank) return e4m3(rec[rank / 2 + j - rank]) * sc[1];
  const float d = __fmul_rn(e4m3(rec[rank / 2 + rope + j / 32]), sc[0]);
  return __fmul_rn(d, e2m1_value(rec[j >> 1] >> (4 * (j & 1))));
}

// Cache element j of slot: f32 (dtype 1), bf16 (dtype 0), fp8 (dtype 2:
// each slot is width E4M3 codes then two float scales, for c and k_pe) or
// fp4 (dtype 3, above: a latent value is (e4m3(group scale) * scale) *
// e2m1(code), as the CPU pool's decodeFP4).
DEVICE float cache_load(const void* layer, int dtype, size_t slot, int width, int rank, int j) {
  if (dtype == 1) return ((const float*)layer)[slot * width + j];
  if (dtype == 2) {
    const u8* rec = (const u8*)layer + slot * (width + 8);
    const float* sc = (const float*)(rec + width);
    return e4m3(rec[j]) * sc[j < rank ? 0 : 1];
  }
  if (dtype == 3) return cache_load_fp4(layer, slot, width, rank, j);
  return bf16_to_f32(((const unsigned short*)layer)[slot * width + j]);
}

// Stores row t's latent (rank values) and k_pe (rope values) at its slot of
// one layer of the pool.
extern "C" __global__ void __launch_bounds__(OPS_THREADS)
    cache_write(void* layer, int dtype, const i32* __restrict__ slots, const float* lat, int ldl,
                const float* kpe, int ldk, int rank, int rope) {
  PDL_LAUNCH();
  PDL_WAIT();
  const int t = blockIdx.x, width = rank + rope;
  const size_t slot = (size_t)slots[t];
  for (int j = threadIdx.x; j < width; j += OPS_THREADS) {
    const float v = j < rank ? lat[(size_t)t * ldl + j] : kpe[(size_t)t * ldk + j - rank];
    if (dtype == 1)
      ((float*)layer)[slot * width + j] = v;
    else
      ((unsigned short*)layer)[slot * width + j] = f32_to_bf16(v);
  }
}

// The cached rows [c | k_pe] of positions [0, n) of sequence seq (block
// table blocks + seq_blocks[seq]) as dense bf16 rows of rank + rope values,
// from a cache of any precision: the expanded prefill attention's input
// (expand.cu). Exact for the bf16 cache; one block a position.
extern "C" __global__ void __launch_bounds__(OPS_THREADS)
    cache_gather_bf16(unsigned short* out, const void* layer, int dtype, const i32* __restrict__ seq_blocks,
                      const i32* __restrict__ blocks, int seq, int block_size, int rank, int rope) {
  PDL_LAUNCH();
  PDL_WAIT();
  const int j = blockIdx.x, width = rank + rope;
  const i32* table = blocks + seq_blocks[seq];
  const size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
  for (int k = threadIdx.x; k < width; k += OPS_THREADS)
    out[(size_t)j * width + k] = f32_to_bf16(cache_load(layer, dtype, slot, width, rank, k));
}

// Two RoPEs of the same table (the queries' heads in q, the shared key in
// kpe) and the cache write of the latent and the rotated key, for row t,
// in one launch: rope_rows twice, then cache_write, cache_write_fp8 or
// cache_write_fp4 (rope2_cache_write_row, rope.cuh).
extern "C" __global__ void __launch_bounds__(OPS_THREADS)
    rope2_cache_write(float* q, int ldq, int qheads, int qstride, int qoffset, float* kpe, int ldk,
                      int kheads, int kstride, int koffset, int dim, int interleaved,
                      const float* __restrict__ cs, int T, void* layer, int dtype,
                      const i32* __restrict__ slots, const float* lat, int ldl, int rank,
                      int rope) {
  PDL_LAUNCH();
  rope2_cache_write_row(q, ldq, qheads, qstride, qoffset, kpe, ldk, kheads, kstride, koffset, dim, interleaved, cs, T,
                        layer, dtype, slots, lat, ldl, rank, rope, blockIdx.x, true);
}

// rope2_cache_write for one row with the latent's RMSNorm first: out =
// gain * (x * inv) over the rank values of x, in the order of the
// standalone norm kernel (layout8: rmsnorm_quant8's rank/8 threads of 8
// values; else rmsnorm_quant's stride of 256), written to out, then cached.
extern "C" __global__ void __launch_bounds__(OPS_THREADS)
    rope2_norm_cache_write(float* q, int ldq, int qheads, int qstride, int qoffset, float* kpe,
                           int ldk, int kheads, int kstride, int koffset, int dim, int interleaved,
                           const float* __restrict__ cs, void* layer, int dtype,
                           const i32* __restrict__ slots, const float* x,
                           const float* __restrict__ gain, float eps, int layout8, float* out,
                           int rank, int rope) {
  PDL_LAUNCH();
  PDL_WAIT();
  __shared__ float partial[32];
  __shared__ float inv_s;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, width = rank + rope;
  if (layout8) {
    const int V = rank >> 3;  // a multiple of 32
    for (int j = 0; j * OPS_THREADS + warp * 32 < V; j++) {
      const int k0 = (j * OPS_THREADS + tid) * 8;
      const float4 x0 = *(const float4*)(x + k0), x1 = *(const float4*)(x + k0 + 4);
      const float v[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
      sumsq8_partial(v, lane, warp, partial + j * (OPS_THREADS / 32));
    }
  } else {
    float s = 0;
    for (int k = tid; k < rank; k += 256) s += x[k] * x[k];
    s = warp_sum(s);
    if (lane == 0) partial[warp] = s;
  }
  __syncthreads();
  if (tid == 0) {
    inv_s = norm_inv(partial, layout8 ? rank >> 8 : 8, rank, eps);
  }
  __syncthreads();
  const float inv = inv_s;
  for (int k = tid; k < rank; k += OPS_THREADS) out[k] = gain[k] * (x[k] * inv);
  rope_row(q, ldq, qheads, qstride, qoffset, dim, interleaved, cs, 1, 0);
  rope_row(kpe, ldk, kheads, kstride, koffset, dim, interleaved, cs, 1, 0);
  __syncthreads();
  const size_t slot = (size_t)slots[0];
  if (dtype >= 2) {  // every thread is here: the writer's barriers are met
    cache_write_q_row(dtype, layer, slot, out, kpe, rank, rope);
    return;
  }
  for (int j = tid; j < width; j += OPS_THREADS) {
    const float v = j < rank ? out[j] : kpe[j - rank];
    if (dtype == 1)
      ((float*)layer)[slot * width + j] = v;
    else
      ((unsigned short*)layer)[slot * width + j] = f32_to_bf16(v);
  }
}

// The fp8 and fp4 cache writes (cache_write_fp8_row, cache_write_fp4_row
// in rope.cuh, which the fused writes share), one block per row t.
static_assert(OPS_THREADS == ROPE_THREADS, "the cache writers are written for blocks of ROPE_THREADS");
extern "C" __global__ void __launch_bounds__(OPS_THREADS)
    cache_write_fp8(void* layer, const i32* __restrict__ slots, const float* lat, int ldl,
                    const float* kpe, int ldk, int rank, int rope) {
  PDL_LAUNCH();
  PDL_WAIT();
  const int t = blockIdx.x;
  cache_write_fp8_row(layer, (size_t)slots[t], lat + (size_t)t * ldl, kpe + (size_t)t * ldk, rank, rope);
}

extern "C" __global__ void __launch_bounds__(OPS_THREADS)
    cache_write_fp4(void* layer, const i32* __restrict__ slots, const float* lat, int ldl,
                    const float* kpe, int ldk, int rank, int rope) {
  PDL_LAUNCH();
  PDL_WAIT();
  const int t = blockIdx.x;
  cache_write_fp4_row(layer, (size_t)slots[t], lat + (size_t)t * ldl, kpe + (size_t)t * ldk, rank, rope);
}

// Causal latent attention, one block per (row t, head h):
//   score_j = scale * (qlat[t,h] . c_j + q_pe[t,h] . kpe_j), j = 0..pos[t]
//   olat[t,h] = sum_j softmax(score)_j c_j
// Scores go to scratch (maxn per (t,h)); each warp scores positions j in
// turn; the softmax follows the CPU (exp in double of score - max, float64
// sum); then each warp sums p_j c_j over its positions (dynamic shared
// memory: one rank-sized row per warp) and the warps' rows are added.
extern "C" __global__ void __launch_bounds__(OPS_THREADS)
    latent_attention(float* olat, int ldo, const float* qlat, int ldql, const float* q, int ldq,
                     const void* layer, int dtype, const i32* __restrict__ pos,
                     const i32* __restrict__ row_seq, const i32* __restrict__ seq_blocks,
                     const i32* __restrict__ blocks, int block_size, int heads, int rank, int dn,
                     int dr, float scale, float* scratch, int maxn) {
  PDL_LAUNCH();
  PDL_WAIT();
  __shared__ double dpart[OPS_THREADS / 32];
  __shared__ float fpart[OPS_THREADS / 32];
  __shared__ float smax;
  __shared__ double ssum;
  const int t = blockIdx.x, h = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, width = rank + dr;
  const int n = pos[t] + 1;
  const i32* table = blocks + seq_blocks[row_seq[t]];
  const float* qv = qlat + (size_t)t * ldql + (size_t)h * rank;
  const float* qpe = q + (size_t)t * ldq + (size_t)h * (dn + dr) + dn;
  float* sc = scratch + ((size_t)t * heads + h) * maxn;

  for (int j = warp; j < n; j += OPS_THREADS / 32) {
    const size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
    float a = 0.f, b = 0.f;
    for (int k = lane; k < rank; k += 32) a += qv[k] * cache_load(layer, dtype, slot, width, rank, k);
    for (int k = lane; k < dr; k += 32) b += qpe[k] * cache_load(layer, dtype, slot, width, rank, rank + k);
    a = warp_sum(a);
    b = warp_sum(b);
    if (lane == 0) sc[j] = scale * (a + b);
  }
  __syncthreads();

  float m = __int_as_float(0xff800000);
  for (int j = threadIdx.x; j < n; j += OPS_THREADS) m = fmaxf(m, sc[j]);
  m = warp_max(m);
  if (lane == 0) fpart[warp] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    float mm = fpart[0];
    for (int w = 1; w < OPS_THREADS / 32; w++) mm = fmaxf(mm, fpart[w]);
    smax = mm;
  }
  __syncthreads();
  m = smax;
  double s = 0;
  for (int j = threadIdx.x; j < n; j += OPS_THREADS) {
    const float e = (float)exp((double)(sc[j] - m));
    sc[j] = e;
    s += (double)e;
  }
  s = warp_sum_d(s);
  if (lane == 0) dpart[warp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double tot = 0;
    for (int w = 0; w < OPS_THREADS / 32; w++) tot += dpart[w];
    ssum = tot;
  }
  __syncthreads();
  const float inv = (float)(1.0 / ssum);
  // Each warp sums p_j c_j over its positions into its own row of acc;
  // then the rows are added in warp order.
  extern __shared__ float acc[];
  float* mine = acc + (size_t)warp * rank;
  for (int k = lane; k < rank; k += 32) mine[k] = 0.f;
  for (int j = warp; j < n; j += OPS_THREADS / 32) {
    const size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
    const float pj = sc[j] * inv;
    for (int k = lane; k < rank; k += 32) mine[k] += pj * cache_load(layer, dtype, slot, width, rank, k);
  }
  __syncthreads();
  for (int k = threadIdx.x; k < rank; k += OPS_THREADS) {
    float sum = 0.f;
    for (int w = 0; w < OPS_THREADS / 32; w++) sum += acc[(size_t)w * rank + k];
    olat[(size_t)t * ldo + (size_t)h * rank + k] = sum;
  }
}

// Weight element W[n][k] of a dense fp32 (codes == 0) or MMFP4 matrix:
// row_scale * e4m3(scale) * e2m1(code), via the doubled code / 2.
DEVICE float weight_at(const float* dense, const u8* codes, const u8* scales, const float* row_scale,
                       int K, int G, int n, int k) {
  if (!codes) return dense[(size_t)n * K + k];
  const u8 byte = codes[(size_t)n * (K / 2) + k / 2];
  const int c = (k & 1) ? byte >> 4 : byte & 15;
  const int m = c & 7;
  float v = m < 5 ? (float)m : m == 5 ? 6.f : m == 6 ? 8.f : 12.f;
  if (c & 8) v = -v;
  return row_scale[n] * 0.5f * e4m3(scales[(size_t)n * (K / G) + k / G]) * v;
}

// qlat[t,h,r] = sum_i q_nope[t,h,i] W_UK[h*dn+i][r], grid (T, H,
// ceil(rank/64)) of 64 threads, one column r each (more blocks than heads
// keep the SMs busy at one token).
extern "C" __global__ void __launch_bounds__(64)
    absorb_query(float* qlat, int ldql, const float* q, int ldq, const float* dense, const u8* codes,
                 const u8* scales, const float* row_scale, int G, int rank, int dn, int dr) {
  PDL_LAUNCH();
  PDL_WAIT();
  const int t = blockIdx.x, h = blockIdx.y;
  const float* qn = q + (size_t)t * ldq + (size_t)h * (dn + dr);
  const int r = blockIdx.z * 64 + threadIdx.x;
  if (r < rank) {
    float acc = 0.f;
    for (int i = 0; i < dn; i++) acc += qn[i] * weight_at(dense, codes, scales, row_scale, rank, G, h * dn + i, r);
    qlat[(size_t)t * ldql + (size_t)h * rank + r] = acc;
  }
}

// d row rows[i] += w[i] * src row i (each target row once per launch).
extern "C" __global__ void __launch_bounds__(OPS_THREADS)
    scatter_axpy(float* d, int ldd, const float* s, int lds, const i32* __restrict__ rows,
                 const float* __restrict__ w, int cols) {
  PDL_LAUNCH();
  PDL_WAIT();
  const int i = blockIdx.x;
  float* dst = d + (size_t)rows[i] * ldd;
  const float a = w[i];
  for (int k = threadIdx.x; k < cols; k += OPS_THREADS)
    dst[k] = __fadd_rn(dst[k], __fmul_rn(a, s[(size_t)i * lds + k]));
}

// Split latent attention for few rows: block (t, h, s) takes positions
// [s*SPLIT_POS, (s+1)*SPLIT_POS) of row t and writes its partial softmax:
// the local max m, sum of e_j = exp(score_j - m) and sum of e_j c_j;
// attention_merge rescales the splits to the common max and divides.
#define SPLIT_POS 64

extern "C" __global__ void __launch_bounds__(OPS_THREADS)
    latent_attention_split(const float* qlat, int ldql, const float* q, int ldq, const void* layer,
                           int dtype, const i32* __restrict__ pos, const i32* __restrict__ row_seq,
                           const i32* __restrict__ seq_blocks, const i32* __restrict__ blocks,
                           int block_size, int heads, int rank, int dn, int dr, float scale,
                           int splits, float* part_m, float* part_s, float* part_acc) {
  PDL_LAUNCH();
  PDL_WAIT();
  __shared__ float sc[SPLIT_POS];
  __shared__ float smax;
  extern __shared__ float acc[];
  const int t = blockIdx.x, h = blockIdx.y, s = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, width = rank + dr;
  const int n = pos[t] + 1, j0 = s * SPLIT_POS, j1 = min(n, j0 + SPLIT_POS);
  const size_t part = ((size_t)t * heads + h) * splits + s;
  if (j0 >= j1) {
    if (threadIdx.x == 0) {
      part_m[part] = __int_as_float(0xff800000);
      part_s[part] = 0.f;
    }
    return;
  }
  const i32* table = blocks + seq_blocks[row_seq[t]];
  const float* qv = qlat + (size_t)t * ldql + (size_t)h * rank;
  const float* qpe = q + (size_t)t * ldq + (size_t)h * (dn + dr) + dn;
  for (int j = j0 + warp; j < j1; j += OPS_THREADS / 32) {
    const size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
    float a = 0.f, b = 0.f;
    for (int k = lane; k < rank; k += 32) a += qv[k] * cache_load(layer, dtype, slot, width, rank, k);
    for (int k = lane; k < dr; k += 32) b += qpe[k] * cache_load(layer, dtype, slot, width, rank, rank + k);
    a = warp_sum(a);
    b = warp_sum(b);
    if (lane == 0) sc[j - j0] = scale * (a + b);
  }
  __syncthreads();
  if (warp == 0) {
    float m = __int_as_float(0xff800000);
    for (int j = lane; j < j1 - j0; j += 32) m = fmaxf(m, sc[j]);
    m = warp_max(m);
    if (lane == 0) smax = m;
  }
  __syncthreads();
  const float m = smax;
  if (warp == 0) {
    float sum = 0.f;
    for (int j = lane; j < j1 - j0; j += 32) {
      const float e = (float)exp((double)(sc[j] - m));
      sc[j] = e;
      sum += e;
    }
    sum = warp_sum(sum);
    if (lane == 0) {
      part_m[part] = m;
      part_s[part] = sum;
    }
  }
  __syncthreads();
  float* mine = acc + (size_t)warp * rank;
  for (int k = lane; k < rank; k += 32) mine[k] = 0.f;
  for (int j = j0 + warp; j < j1; j += OPS_THREADS / 32) {
    const size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
    const float e = sc[j - j0];
    for (int k = lane; k < rank; k += 32) mine[k] += e * cache_load(layer, dtype, slot, width, rank, k);
  }
  __syncthreads();
  for (int k = threadIdx.x; k < rank; k += OPS_THREADS) {
    float sum = 0.f;
    for (int w = 0; w < OPS_THREADS / 32; w++) sum += acc[(size_t)w * rank + k];
    part_acc[part * rank + k] = sum;
  }
}

// olat[t,h] = sum_s w_s acc_s / sum_s w_s s_s with w_s = exp(m_s - max m).
// Grid (T, H, ceil(rank/MERGE_COLS)), a thread per column. The splits that
// hold positions are a prefix (their sums are at least 1); their weights
// are staged in shared memory, and each column's sum over them is a chain
// of independent loads. The values are those of a sequential evaluation:
// weights rounded to float once, the denominator summed in float64 in
// split order.
#define MERGE_MAX_SPLITS 2048
#define MERGE_COLS 128

extern "C" __global__ void __launch_bounds__(MERGE_COLS)
    attention_merge(float* olat, int ldo, int heads, int rank, int splits, const float* part_m,
                    const float* part_s, const float* part_acc) {
  PDL_LAUNCH();
  PDL_WAIT();
  __shared__ float w[MERGE_MAX_SPLITS];
  __shared__ double term[MERGE_MAX_SPLITS];
  __shared__ float fpart[MERGE_COLS / 32];
  __shared__ float inv_s;
  __shared__ int used_s;
  const int t = blockIdx.x, h = blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const size_t base = ((size_t)t * heads + h) * splits;
  float m = __int_as_float(0xff800000);
  for (int s = threadIdx.x; s < splits; s += MERGE_COLS) {
    w[s] = part_m[base + s];
    term[s] = (double)part_s[base + s];
    m = fmaxf(m, w[s]);
  }
  m = warp_max(m);
  if (lane == 0) fpart[warp] = m;
  __syncthreads();
  float M = fpart[0];
  for (int i = 1; i < MERGE_COLS / 32; i++) M = fmaxf(M, fpart[i]);
  for (int s = threadIdx.x; s < splits; s += MERGE_COLS) {
    const double e = exp((double)(w[s] - M));
    const bool valid = term[s] > 0.0;
    w[s] = valid ? (float)e : 0.f;
    term[s] = valid ? term[s] * e : -1.0;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0;
    int used = 0;
    for (int s = 0; s < splits; s++) {
      if (term[s] >= 0.0) {
        total += term[s];
        used = s + 1;
      }
    }
    inv_s = (float)(1.0 / total);
    used_s = used;
  }
  __syncthreads();
  const int k = blockIdx.z * MERGE_COLS + threadIdx.x;
  if (k >= rank) return;
  const float inv = inv_s;
  const int used = used_s;
  const float* pa = part_acc + base * rank + k;
  float sum = 0.f;
#pragma unroll 16
  for (int s = 0; s < used; s++) sum += w[s] * pa[(size_t)s * rank];
  olat[(size_t)t * ldo + (size_t)h * rank + k] = sum * inv;
}

// Split latent attention for few rows, several heads per block: block
// (t, s, g) stages positions [s*ATT_P, (s+1)*ATT_P) of row t as floats
// (rows ATT_LD = rank+dr+4 apart: 16-byte aligned, and float4 reads by
// consecutive positions hit distinct banks) and the queries of heads
// [g*hb, (g+1)*hb) (hb <= ATT_HB). Scores: lane j takes position j, warp w
// the column chunks w, w+8, ... of every head of the block (each chunk of
// the position read once for all heads); the warps' partial dots are added
// in warp order. Then a thread per column pair sums e_j c_j for every head.
// The partials are attention_merge's. rank and dr are multiples of 4.
// Dynamic shared memory: 4 * (ATT_P*(rank+dr+4) + hb*(rank+dr)
// + 2*8*hb*ATT_P + hb*ATT_P) bytes.
#define ATT_P 32
#define ATT_U 8
#define ATT_HB 8

extern "C" __global__ void __launch_bounds__(OPS_THREADS)
    latent_attention_heads(const float* qlat, int ldql, const float* q, int ldq, const void* layer,
                           int dtype, const i32* __restrict__ pos, const i32* __restrict__ row_seq,
                           const i32* __restrict__ seq_blocks, const i32* __restrict__ blocks,
                           int block_size, int heads, int hb, int rank, int dn, int dr, float scale,
                           int splits, float* part_m, float* part_s, float* part_acc) {
  PDL_LAUNCH();
  PDL_WAIT();
  extern __shared__ float sm[];
  __shared__ long long sslot[ATT_P];
  const int t = blockIdx.x, s = blockIdx.y, h0 = blockIdx.z * hb;
  const int nh = min(hb, heads - h0);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int width = rank + dr, ld = width + 4;
  float* cb = sm;                      // [ATT_P][ld]
  float* qs = cb + ATT_P * ld;         // [hb][width]: qlat, then q_pe
  float* pa = qs + hb * width;         // [8][hb][ATT_P] partial qlat.c
  float* pb = pa + 8 * hb * ATT_P;     // [8][hb][ATT_P] partial q_pe.kpe
  float* es = pb + 8 * hb * ATT_P;     // [hb][ATT_P]
  const int n = pos[t] + 1, j0 = s * ATT_P, nj = min(n - j0, ATT_P);
  const size_t part = ((size_t)t * heads + h0) * splits + s;  // + u * splits
  if (nj <= 0 || nh <= 0) {
    for (int u = threadIdx.x; u < nh; u += OPS_THREADS) {
      part_m[part + (size_t)u * splits] = __int_as_float(0xff800000);
      part_s[part + (size_t)u * splits] = 0.f;
    }
    return;
  }
  const i32* table = blocks + seq_blocks[row_seq[t]];
  if (threadIdx.x < nj) {
    const int pj = j0 + threadIdx.x;
    sslot[threadIdx.x] = (long long)table[pj / block_size] * block_size + pj % block_size;
  }
  __syncthreads();
  // The positions' latents: 16-byte loads, ATT_U per thread in flight.
  if (dtype == 0 && width % 8 == 0) {
    const int cpr = width >> 3, total = nj * cpr;
    for (int c0 = threadIdx.x; c0 < total; c0 += OPS_THREADS * ATT_U) {
      uint4 v[ATT_U];
#pragma unroll
      for (int u = 0; u < ATT_U; u++) {
        const int c = c0 + u * OPS_THREADS;
        if (c < total) {
          const int j = c / cpr, kc = c - j * cpr;
          v[u] = __ldcs((const uint4*)((const unsigned short*)layer + (size_t)sslot[j] * width + kc * 8));
        }
      }
#pragma unroll
      for (int u = 0; u < ATT_U; u++) {
        const int c = c0 + u * OPS_THREADS;
        if (c < total) {
          const int j = c / cpr, kc = c - j * cpr;
          float4* dst = (float4*)(cb + j * ld + kc * 8);
          dst[0] = make_float4(__uint_as_float(v[u].x << 16), __uint_as_float(v[u].x & 0xffff0000u),
                               __uint_as_float(v[u].y << 16), __uint_as_float(v[u].y & 0xffff0000u));
          dst[1] = make_float4(__uint_as_float(v[u].z << 16), __uint_as_float(v[u].z & 0xffff0000u),
                               __uint_as_float(v[u].w << 16), __uint_as_float(v[u].w & 0xffff0000u));
        }
      }
    }
  } else if (dtype == 1) {
    const int cpr = width >> 2, total = nj * cpr;
    for (int c0 = threadIdx.x; c0 < total; c0 += OPS_THREADS * ATT_U) {
      float4 v[ATT_U];
#pragma unroll
      for (int u = 0; u < ATT_U; u++) {
        const int c = c0 + u * OPS_THREADS;
        if (c < total) {
          const int j = c / cpr, kc = c - j * cpr;
          v[u] = __ldcs((const float4*)((const float*)layer + (size_t)sslot[j] * width + kc * 4));
        }
      }
#pragma unroll
      for (int u = 0; u < ATT_U; u++) {
        const int c = c0 + u * OPS_THREADS;
        if (c < total) {
          const int j = c / cpr, kc = c - j * cpr;
          *(float4*)(cb + j * ld + kc * 4) = v[u];
        }
      }
    }
  } else {
    for (int j = warp; j < nj; j += OPS_THREADS / 32)
      for (int k = lane; k < width; k += 32) cb[j * ld + k] = cache_load(layer, dtype, (size_t)sslot[j], width, rank, k);
  }
  const float* qlr = qlat + (size_t)t * ldql + (size_t)h0 * rank;
  const float* qr = q + (size_t)t * ldq + (size_t)h0 * (dn + dr) + dn;
  for (int i = threadIdx.x; i < nh * width; i += OPS_THREADS) {
    const int u = i / width, k = i - u * width;
    qs[i] = k < rank ? qlr[(size_t)u * rank + k] : qr[(size_t)u * (dn + dr) + (k - rank)];
  }
  __syncthreads();
  {
    float a[ATT_HB], b[ATT_HB];
#pragma unroll
    for (int u = 0; u < ATT_HB; u++) a[u] = b[u] = 0.f;
    const float* cj = cb + min(lane, nj - 1) * ld;
    for (int c = warp; c < width / 4; c += OPS_THREADS / 32) {
      const float4 cv = *(const float4*)(cj + 4 * c);
      const bool lat = 4 * c < rank;
#pragma unroll
      for (int u = 0; u < ATT_HB; u++) {
        if (u < nh) {
          const float4 qv = *(const float4*)(qs + u * width + 4 * c);
          const float d = qv.x * cv.x + qv.y * cv.y + qv.z * cv.z + qv.w * cv.w;
          if (lat) a[u] += d; else b[u] += d;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < ATT_HB; u++) {
      if (u < nh) {
        pa[(warp * hb + u) * ATT_P + lane] = a[u];
        pb[(warp * hb + u) * ATT_P + lane] = b[u];
      }
    }
  }
  __syncthreads();
  for (int u = warp; u < nh; u += OPS_THREADS / 32) {
    float sc = __int_as_float(0xff800000);
    if (lane < nj) {
      float a = 0.f, b = 0.f;
      for (int w = 0; w < OPS_THREADS / 32; w++) {
        a += pa[(w * hb + u) * ATT_P + lane];
        b += pb[(w * hb + u) * ATT_P + lane];
      }
      sc = scale * (a + b);
    }
    const float m = warp_max(sc);
    const float e = lane < nj ? (float)exp((double)(sc - m)) : 0.f;
    const float sum = warp_sum(e);
    es[u * ATT_P + lane] = e;
    if (lane == 0) {
      part_m[part + (size_t)u * splits] = m;
      part_s[part + (size_t)u * splits] = sum;
    }
  }
  __syncthreads();
  for (int k2 = threadIdx.x; k2 < rank / 2; k2 += OPS_THREADS) {
    float acc[ATT_HB][2];
#pragma unroll
    for (int u = 0; u < ATT_HB; u++) acc[u][0] = acc[u][1] = 0.f;
    for (int j = 0; j < nj; j++) {
      const float2 cv = *(const float2*)(cb + j * ld + 2 * k2);
#pragma unroll
      for (int u = 0; u < ATT_HB; u++) {
        if (u < nh) {
          const float e = es[u * ATT_P + j];
          acc[u][0] += e * cv.x;
          acc[u][1] += e * cv.y;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < ATT_HB; u++) {
      if (u < nh) *(float2*)(part_acc + (part + (size_t)u * splits) * rank + 2 * k2) = make_float2(acc[u][0], acc[u][1]);
    }
  }
}

// out[i] = e4m3_encode(x[i]), for testing the encoder against the format's.
extern "C" __global__ void e4m3_encode_n(const float* x, u8* out, int n) {
  PDL_LAUNCH();
  PDL_WAIT();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = (u8)e4m3_encode(x[i]);
}

// The absorbed query on MMFP4 W_UK [H*dn][rank] (rank a multiple of 32, at
// most 512), one block of ABSORB_WARPS warps per (row t, head h):
//   qlat[t,h,c] = sum_i q_nope[t,h,i] W_UK[h*dn+i][c]
// Each half-warp takes rows i = 2*warp+half, +2*ABSORB_WARPS, ...; lane l
// of a half-warp holds columns [32l, 32l+32): one 16-byte load of codes per
// row, inside one scale group (G >= 32). The row's factor q_i *
// row_scale/2 * scale multiplies the doubled E2M1 values. The two halves of
// a warp meet by a shuffle, the warps in shared memory, in a fixed order.
// The first ABSORB_UNROLL rows of each half-warp are loaded, and the rest
// warmed in L2, before waiting for the kernel that wrote q (programmatic
// dependent launch).
#define ABSORB_WARPS 16
#define ABSORB_UNROLL 8

extern "C" __global__ void __launch_bounds__(32 * ABSORB_WARPS)
    absorb_query_q(float* qlat, int ldql, const float* q, int ldq, const u8* __restrict__ codes,
                   const u8* __restrict__ scales, const float* __restrict__ row_scale, int G,
                   int rank, int dn, int dr) {
  PDL_LAUNCH();
  __shared__ float part[ABSORB_WARPS][512];
  __shared__ float lut[16];
  const int t = blockIdx.x, h = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, half = lane >> 4, l = lane & 15;
  if (threadIdx.x < 16) {
    const int m = threadIdx.x & 7, e = m >> 1, f = m & 1;
    const float v = e == 0 ? (float)f : (float)((2 + f) << (e - 1));  // doubled E2M1
    lut[threadIdx.x] = threadIdx.x & 8 ? -v : v;
  }
  __syncthreads();
  const float* qn = q + (size_t)t * ldq + (size_t)h * (dn + dr);
  const bool active = l < rank / 32;
  const int GK = rank / G;
  const u8* hc = codes + (size_t)h * dn * (rank / 2);
  float acc[32];
#pragma unroll
  for (int e = 0; e < 32; e++) acc[e] = 0.f;
  bool waited = false;
  if (active) {
    for (int i0 = 2 * warp + half; i0 < dn; i0 += 2 * ABSORB_WARPS * ABSORB_UNROLL) {
      // Only loads before the wait: arithmetic on a loaded value would
      // stall there for it.
      uint4 w[ABSORB_UNROLL];
      float f[ABSORB_UNROLL];
      u32 sb[ABSORB_UNROLL];
#pragma unroll
      for (int u = 0; u < ABSORB_UNROLL; u++) {
        const int i = i0 + 2 * ABSORB_WARPS * u;
        f[u] = 0.f;
        sb[u] = 0u;
        if (i < dn) {
          const size_t n = (size_t)h * dn + i;
          w[u] = load_stream16(codes + n * (rank / 2) + l * 16);
          f[u] = row_scale[n];
          sb[u] = scales[n * GK + (l * 32) / G];
        }
      }
      if (!waited) {
        // Lanes at 128-byte steps of a row warm their line of the later rows.
        if ((l & 7) == 0)
          for (int i = i0 + 2 * ABSORB_WARPS * ABSORB_UNROLL; i < dn; i += 2 * ABSORB_WARPS)
            asm volatile("prefetch.global.L2 [%0];" ::"l"(hc + (size_t)i * (rank / 2) + l * 16));
        PDL_WAIT();
        waited = true;
      }
#pragma unroll
      for (int u = 0; u < ABSORB_UNROLL; u++) {
        const int i = i0 + 2 * ABSORB_WARPS * u;
        if (i < dn) f[u] = qn[i] * (f[u] * 0.5f) * e4m3(sb[u]);
      }
#pragma unroll
      for (int u = 0; u < ABSORB_UNROLL; u++) {
        if (i0 + 2 * ABSORB_WARPS * u < dn) {
          const u32 words[4] = {w[u].x, w[u].y, w[u].z, w[u].w};
#pragma unroll
          for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 8; e++) acc[8 * j + e] += f[u] * lut[(words[j] >> (4 * e)) & 15];
        }
      }
    }
  }
  if (!waited) PDL_WAIT();
#pragma unroll
  for (int e = 0; e < 32; e++) acc[e] += __shfl_xor_sync(0xffffffffu, acc[e], 16);
  if (half == 0 && active) {
#pragma unroll
    for (int e = 0; e < 32; e++) part[warp][l * 32 + e] = acc[e];
  }
  __syncthreads();
  for (int c = threadIdx.x; c < rank; c += 32 * ABSORB_WARPS) {
    float s = 0.f;
    for (int w = 0; w < ABSORB_WARPS; w++) s += part[w][c];
    qlat[(size_t)t * ldql + (size_t)h * rank + c] = s;
  }
}

// Embedding lookup on the device: row t of dst is row tokens[t] of an MMFP4
// table, dequantized in the CPU's order, (row_scale * e4m3(scale)) *
// e2m1(code), each product rounded (no contraction), so the rows are the
// host's bit for bit. One block a row; each thread widens one code byte
// (two columns) at a time. The host checks the ids before the launch.
extern "C" __global__ void __launch_bounds__(256)
    embed_rows_q(float* dst, int ld, const i32* __restrict__ tokens, const i32* __restrict__ prev,
                 const i32* __restrict__ from, const u8* __restrict__ codes, const u8* __restrict__ scales,
                 const float* __restrict__ row_scale, int K, int G, int vocab) {
  PDL_LAUNCH();
  PDL_WAIT();
  const int t = blockIdx.x;
  // from (if set): row t's token is the id the step before sampled for
  // its output from[t] (prev), where from[t] >= 0. That id is -1 where
  // the row's logits were not finite: its sequence ends when the id comes
  // back, and the row takes token 0 in vain meanwhile.
  const int k = from ? from[t] : -1;
  int v = k >= 0 ? prev[k] : tokens[t];
  if (v < 0 || v >= vocab) v = 0;
  const size_t id = (size_t)v;
  const u8* c = codes + id * (size_t)(K / 2);
  const u8* s = scales + id * (size_t)(K / G);
  const float rs = row_scale[id];
  float* out = dst + (size_t)t * ld;
  for (int i = threadIdx.x; i < K / 2; i += blockDim.x) {
    const u32 byte = c[i];
    const float d = __fmul_rn(rs, e4m3(s[(2 * i) / G]));
    const u32 lo = byte & 15u, hi = byte >> 4;
    out[2 * i] = __fmul_rn(d, e2m1_value(lo));
    out[2 * i + 1] = __fmul_rn(d, e2m1_value(hi));
  }
}

// The codes of an N x K matrix (row-major, K/2 bytes a row) into dst in
// tile-major order (code_row): m-tile i's group j is 1 KB at (i * K/128 +
// j) * 1024, its row r's 64 bytes at 64 r. N a multiple of 16, K of 128.
extern "C" __global__ void codes_tile_major(const u8* __restrict__ src, u8* __restrict__ dst, int N, int K) {
  const size_t pieces = (size_t)N * (K / 32);  // 16-byte pieces
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < pieces; i += (size_t)gridDim.x * blockDim.x) {
    const size_t row = i / (K / 32), b = (i % (K / 32)) * 16;
    *(uint4*)(code_row<true>(dst, row, K) + code_off<true>((int)b)) = *(const uint4*)(src + row * (K / 2) + b);
  }
}
