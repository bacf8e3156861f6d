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
// on, or all with on false, only take part in the block's barriers.
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
  for (int j = tid; j < width; j += ROPE_THREADS) {
    const float v = j < rank ? lat[(size_t)t * ldl + j] : kpe[(size_t)t * ldk + j - rank];
    if (dtype == 1)
      ((float*)layer)[slot * width + j] = v;
    else
      ((unsigned short*)layer)[slot * width + j] = f32_to_bf16(v);
  }
}
