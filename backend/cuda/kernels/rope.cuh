// RoPE and the latent cache write, shared by the small-ops module (ops.cu)
// and the absorbed query's (absorb.cu), which can run them in a block of
// its own launch. ROPE_THREADS is the block size they are written for.

#define ROPE_THREADS 256

// Float32 to bfloat16, round half to even, NaN kept quiet (as
// safetensors.Float32ToBF16).
DEVICE unsigned short f32_to_bf16(float f) {
  u32 b = __float_as_uint(f);
  if (f != f) return (unsigned short)((b >> 16) | 0x0040);
  b += 0x7FFFu + ((b >> 16) & 1u);
  return (unsigned short)(b >> 16);
}

// Float to FP8 E4M3FN, round to nearest even, saturating finite values to
// +-448, NaN to 0x7F, the sign kept (as format.E4M3Encode).
DEVICE u32 e4m3_encode(float x) {
  if (x != x) return 0x7Fu;
  const u32 sign = (__float_as_uint(x) >> 24) & 0x80u;
  const float a = fabsf(x);
  if (a >= 448.f) return sign | 0x7Eu;
  if (a < 0.015625f) return sign | (u32)rintf(a * 512.f);  // subnormal: steps of 2^-9
  u32 u = __float_as_uint(a);
  u += 0x7FFFFu + ((u >> 20) & 1u);  // round the mantissa to 3 bits, carry into the exponent
  return sign | ((((u >> 23) - 120u) << 3) | ((u >> 20) & 7u));
}

// The block-wide scales of a row's two parts, amax|x[0, rank)| / d0 and
// amax|k[0, rope)| / d1, stored at rec + off (the record's) and in the
// shared memory it returns; a whole block of ROPE_THREADS threads calls it.
DEVICE const float* cache_row_scales(const float* x, const float* k, int rank, int rope, float d0, float d1, u8* rec,
                                     int off) {
  __shared__ float part[2][ROPE_THREADS / 32];
  __shared__ float scales[2];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float m0 = 0.f, m1 = 0.f;
  for (int j = threadIdx.x; j < rank + rope; j += ROPE_THREADS) {
    if (j < rank)
      m0 = fmaxf(m0, fabsf(x[j]));
    else
      m1 = fmaxf(m1, fabsf(k[j - rank]));
  }
  m0 = warp_max(m0);
  m1 = warp_max(m1);
  if (lane == 0) {
    part[0][warp] = m0;
    part[1][warp] = m1;
  }
  __syncthreads();
  if (threadIdx.x < 2) {
    float m = 0.f;
    for (int w = 0; w < ROPE_THREADS / 32; w++) m = fmaxf(m, part[threadIdx.x][w]);
    const float s = __fdiv_rn(m, threadIdx.x == 0 ? d0 : d1);
    scales[threadIdx.x] = s;
    ((float*)(rec + off))[threadIdx.x] = s;
  }
  __syncthreads();
  return scales;
}

// The fp8 record of row (x, k) at slot of a cache layer (cache_load's
// dtype 2), by a whole block of ROPE_THREADS threads: each part (c: rank
// values, k_pe: rope values) gets scale amax/448 and codes
// e4m3(v * (1/scale)), all zero when the scale is 0 or NaN (as the CPU
// pool's encodeFP8).
DEVICE void cache_write_fp8_row(void* layer, size_t slot, const float* x, const float* k, int rank, int rope) {
  const int width = rank + rope;
  u8* rec = (u8*)layer + slot * (width + 8);
  const float* scales = cache_row_scales(x, k, rank, rope, 448.f, 448.f, rec, width);
  for (int j = threadIdx.x; j < width; j += ROPE_THREADS) {
    const float sc = scales[j < rank ? 0 : 1];
    u32 code = 0;
    if (sc != 0.f && sc == sc) {
      const float v = j < rank ? x[j] : k[j - rank];
      code = e4m3_encode(__fmul_rn(v, 1.f / sc));
    }
    rec[j] = (u8)code;
  }
}

// Float to FP4 E2M1, as format.E2M1Encode: the magnitude code counts the
// midpoints between neighbouring magnitudes below |x| (ties to the even
// code), the sign bit only on a nonzero code, NaN to 0.
DEVICE u32 e2m1_encode(float x) {
  const float a = fabsf(x);
  const u32 m = (u32)(a > 0.25f) + (u32)(a >= 0.75f) + (u32)(a > 1.25f) + (u32)(a >= 1.75f) + (u32)(a > 2.5f) +
                (u32)(a >= 3.5f) + (u32)(a > 5.f);
  return m | (x < 0.f && m != 0u ? 8u : 0u);
}

// The fp4 record of row (x, k) at slot (cache_load's dtype 3, the layout
// of fp4_slot_bytes), by a whole block of ROPE_THREADS threads, as the CPU
// pool's encodeFP4 and encodeFP8, rounding for rounding: the latent's
// scale ts = amax/(6*448); each group of 32 gets the E4M3 scale s of
// amax_g/6/ts, raised while e4m3(s)*ts*6 < amax_g (below 0x7E), and codes
// e2m1(v * (1/(e4m3(s)*ts))) (zero where that product is 0); k_pe gets
// scale amax/448 and codes e4m3(v * (1/scale)). All codes and group scales
// are zero where a scale is 0 or NaN. A warp takes a group, its lanes one
// value each.
DEVICE void cache_write_fp4_row(void* layer, size_t slot, const float* x, const float* k, int rank, int rope) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int ng = (rank + 31) / 32, so = fp4_scale_offset(rank, rope);
  u8* rec = (u8*)layer + slot * fp4_slot_bytes(rank, rope);
  const float* scales = cache_row_scales(x, k, rank, rope, 2688.f, 448.f, rec, so);
  const float ts = scales[0], ks = scales[1];
  const bool cok = ts != 0.f && ts == ts, kok = ks != 0.f && ks == ks;
  for (int g = warp; g < ng; g += ROPE_THREADS / 32) {
    const int j = 32 * g + lane;
    const float v = j < rank ? x[j] : 0.f;
    u32 s = 0u, code = 0u;
    if (cok) {
      const float amax = warp_max(fabsf(v));
      s = e4m3_encode(__fdiv_rn(__fdiv_rn(amax, 6.f), ts));
      while (s < 0x7Eu && __fmul_rn(__fmul_rn(e4m3(s), ts), 6.f) < amax) s++;
      const float d = __fmul_rn(e4m3(s), ts);
      if (d != 0.f) code = e2m1_encode(__fmul_rn(v, __fdiv_rn(1.f, d)));
    }
    const u32 hi = __shfl_down_sync(0xffffffffu, code, 1);
    if (j < rank && (lane & 1) == 0) rec[j >> 1] = (u8)(code | (hi << 4));
    if (lane == 0) rec[rank / 2 + rope + g] = (u8)s;
  }
  for (int j = threadIdx.x; j < rope; j += ROPE_THREADS)
    rec[rank / 2 + j] = kok ? (u8)e4m3_encode(__fmul_rn(k[j], __fdiv_rn(1.f, ks))) : (u8)0;
}

// The fp8 (dtype 2) or fp4 (dtype 3) record of row (x, k) for the fused
// writes (rope2_cache_write_row, rope2_norm_cache_write): a call, not
// inlined, so that the fused kernels' bf16 and f32 code stays as it was
// (inlined, the writers grew each kernel by some 20 KB of code).
__device__ __noinline__ void cache_write_q_row(int dtype, void* layer, size_t slot, const float* x, const float* k,
                                               int rank, int rope) {
  if (dtype == 2)
    cache_write_fp8_row(layer, slot, x, k, rank, rope);
  else
    cache_write_fp4_row(layer, slot, x, k, rank, rope);
}

// Rotates, in place, dims [offset, offset+dim) of each head of row t with
// the host-computed table cs: cos [T][dim/2] then sin [T][dim/2]. The
// products are rounded separately (no fused multiply-add), as in Go.
DEVICE void rope_row_cs(float* x, int ldx, int heads, int head_stride, int offset, int dim,
                        int interleaved, const float* c, const float* s, int t) {
  const int half = dim / 2;
  for (int j = threadIdx.x; j < heads * half; j += ROPE_THREADS) {
    const int h = j / half, i = j % half;
    float* v = x + (size_t)t * ldx + h * head_stride + offset;
    const int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
    const float x0 = v[a], x1 = v[b];
    v[a] = __fsub_rn(__fmul_rn(x0, c[i]), __fmul_rn(x1, s[i]));
    v[b] = __fadd_rn(__fmul_rn(x1, c[i]), __fmul_rn(x0, s[i]));
  }
}

DEVICE void rope_row(float* x, int ldx, int heads, int head_stride, int offset, int dim,
                     int interleaved, const float* __restrict__ cs, int T, int t) {
  const int half = dim / 2;
  rope_row_cs(x, ldx, heads, head_stride, offset, dim, interleaved, cs + (size_t)t * half,
              cs + (size_t)T * half + (size_t)t * half, t);
}

// The work of rope2_cache_write (ops.cu) on row t: both RoPEs, then the
// cache write of the latent and the rotated key (dtype as cache_load's).
// Threads from ROPE_THREADS on, or all with on false, only take part in the
// block's barriers before the write. The fp8 and fp4 writes have barriers
// of their own: there on must be the same for the whole block, of
// ROPE_THREADS threads (every caller's is: true or a test of blockIdx).
DEVICE void rope2_cache_write_row(float* q, int ldq, int qheads, int qstride, int qoffset, float* kpe,
                                  int ldk, int kheads, int kstride, int koffset, int dim,
                                  int interleaved, const float* __restrict__ cs, int T, void* layer,
                                  int dtype, const i32* __restrict__ slots, const float* lat, int ldl,
                                  int rank, int rope, int t, bool on) {
  // The table row and the slot come from uploads before the step's
  // kernels: they are loaded before waiting for the kernel before, into
  // registers (a store here would stall on the load), and staged after.
  __shared__ float tab[2 * ROPE_THREADS];
  const int width = rank + rope, half = dim / 2, tid = threadIdx.x;
  on = on && tid < ROPE_THREADS;
  const bool staged = half <= ROPE_THREADS;
  float c0 = 0.f, s0 = 0.f;
  if (on && staged && tid < half) {
    c0 = cs[(size_t)t * half + tid];
    s0 = cs[(size_t)T * half + (size_t)t * half + tid];
  }
  const size_t slot = on ? (size_t)slots[t] : 0;
  PDL_WAIT();
  if (staged) {
    if (on && tid < half) {
      tab[tid] = c0;
      tab[ROPE_THREADS + tid] = s0;
    }
    __syncthreads();
    if (on) {
      rope_row_cs(q, ldq, qheads, qstride, qoffset, dim, interleaved, tab, tab + ROPE_THREADS, t);
      rope_row_cs(kpe, ldk, kheads, kstride, koffset, dim, interleaved, tab, tab + ROPE_THREADS, t);
    }
  } else if (on) {
    rope_row(q, ldq, qheads, qstride, qoffset, dim, interleaved, cs, T, t);
    rope_row(kpe, ldk, kheads, kstride, koffset, dim, interleaved, cs, T, t);
  }
  __syncthreads();
  if (!on) return;
  if (dtype >= 2) {
    cache_write_q_row(dtype, layer, slot, lat + (size_t)t * ldl, kpe + (size_t)t * ldk, rank, rope);
    return;
  }
  for (int j = tid; j < width; j += ROPE_THREADS) {
    const float v = j < rank ? lat[(size_t)t * ldl + j] : kpe[(size_t)t * ldk + j - rank];
    if (dtype == 1)
      ((float*)layer)[slot * width + j] = v;
    else
      ((unsigned short*)layer)[slot * width + j] = f32_to_bf16(v);
  }
}
