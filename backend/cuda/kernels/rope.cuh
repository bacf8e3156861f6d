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
// cache write of the latent and the rotated key. Threads from ROPE_THREADS
// on, or all with on false, only take part in the block's barriers. With
// nx (one row, t = 0), the latent is first the RMSNorm of nx's rank values
// with ngain and neps, written to nout (lat's row), in rmsnorm_quant8's
// order (rank a multiple of 256; its int8 form is not made).
DEVICE void rope2_cache_write_row(float* q, int ldq, int qheads, int qstride, int qoffset, float* kpe,
                                  int ldk, int kheads, int kstride, int koffset, int dim,
                                  int interleaved, const float* __restrict__ cs, int T, void* layer,
                                  int dtype, const i32* __restrict__ slots, const float* lat, int ldl,
                                  int rank, int rope, int t, bool on, const float* nx,
                                  const float* __restrict__ ngain, float neps, float* nout) {
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
  if (nx) {
    // Thread j*ROPE_THREADS + tid of rmsnorm_quant8 holds values 8i..8i+7.
    __shared__ double npart[32];
    __shared__ float ninv;
    const int warp = tid >> 5, lane = tid & 31, V = rank >> 3;
    if (on) {
      for (int j = 0; j * ROPE_THREADS + warp * 32 < V; j++) {
        const int k0 = (j * ROPE_THREADS + tid) * 8;
        const float4 x0 = *(const float4*)(nx + k0), x1 = *(const float4*)(nx + k0 + 4);
        const float v[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
        double ss = 0;
#pragma unroll
        for (int e = 0; e < 8; e++) ss += (double)v[e] * (double)v[e];
        ss = warp_sum_d(ss);
        if (lane == 0) npart[j * (ROPE_THREADS / 32) + warp] = ss;
      }
    }
    __syncthreads();
    if (on && tid == 0) {
      double total = 0;
      for (int w = 0; w < (rank >> 8); w++) total += npart[w];
      ninv = (float)(1.0 / sqrt(total / rank + (double)neps));
    }
    __syncthreads();
    if (on) {
      const float inv = ninv;
      for (int k = tid; k < rank; k += ROPE_THREADS) nout[k] = ngain[k] * (nx[k] * inv);
    }
  }
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
  for (int j = tid; j < width; j += ROPE_THREADS) {
    const float v = j < rank ? lat[(size_t)t * ldl + j] : kpe[(size_t)t * ldk + j - rank];
    if (dtype == 1)
      ((float*)layer)[slot * width + j] = v;
    else
      ((unsigned short*)layer)[slot * width + j] = f32_to_bf16(v);
  }
}
