// Token sampling on the device: one block per logits row chooses the token
// that package sample's Sampler.SampleWith chooses from the same row with
// the same settings and the same uniform number u, so that only one id per
// row comes back to the host. The reference is package sample itself.
//
// Every row: one pass for finiteness (a NaN or infinity gives id -1) and
// the argmax (lowest id among ties). Greedy rows stop there. Otherwise the
// candidates are filtered as the host filters them, in this order:
//   - top-k: the k best in rank order (higher logit first, lower id first
//     among equal logits) by a radix select over an order-preserving key,
//     then the lowest ids among the tied logits of the k-th;
//   - top-p: the smallest rank-order prefix of the top-k set whose weight
//     reaches top_p times the set's weight;
//   - min-p: weight >= min_p, the weight being w = exp((l - l_max) / T)
//     computed in double as exp(((double)l - l_max) * (1 / (double)T)).
// Survivors are a rank-order prefix, and u picks one of them by inverse
// transform in token id order: the first id whose running weight sum
// exceeds u times the survivors' sum (the last survivor of non-zero weight
// if rounding leaves none).
//
// Arithmetic: weights are doubles, as on the host, but CUDA's exp may
// differ from Go's math.Exp in the last bit, and sums are taken in a fixed
// tree or chunk order rather than the host's sequential one. So the chosen
// token can differ from the host's only where u times the sum, or the top-p
// target, lies within a few units in the last place (times the row's
// length) of a running sum, or a weight equals min_p to that precision:
// never for the test inputs, which are not built to sit on such a boundary.
// The results do not depend on thread timing: no float is summed by
// atomics.
//
// Small candidate sets (the common case: a top-k of up to SAMPLE_CAP, or a
// top-p or min-p bound that leaves that few) are gathered into shared
// memory and sorted there. Larger ones (flat distributions without a small
// top-k) are handled in passes over the row: the top-p cutoff by bisection
// over the key, a pass per step.

#define SAMPLE_THREADS 1024
#define SAMPLE_WARPS (SAMPLE_THREADS / 32)
#define SAMPLE_CAP 2048
#define SAMPLE_UNROLL 4
#define SAMPLE_BUCKETS 64
#define SAMPLE_FULL 0xffffffffu
#define SAMPLE_NO_ID 0x7fffffff

// One row's settings, as the host writes them (24 bytes).
struct SampleParams {
  float temperature;  // 0: argmax
  int top_k;          // 0: off
  float top_p;        // 0 or 1: off
  float min_p;        // 0: off
  double u;           // in [0, 1)
};

// rank_key maps a finite float to an unsigned key with the same order;
// -0 maps as +0, as float comparison treats them.
DEVICE u32 rank_key(float f) {
  u32 b = __float_as_uint(f == 0.0f ? 0.0f : f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// key_value inverts rank_key.
DEVICE float key_value(u32 k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// ranks_before: token (la, ia) ranks before (lb, ib).
DEVICE bool ranks_before(float la, int ia, float lb, int ib) {
  return la > lb || (la == lb && ia < ib);
}

// Block-wide sum in a fixed order (every thread gets it).
DEVICE double sample_block_sum(double v) {
  __shared__ double red[SAMPLE_WARPS + 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum_d(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    double x = warp_sum_d(lane < SAMPLE_WARPS ? red[lane] : 0.0);
    if (lane == 0) red[SAMPLE_WARPS] = x;
  }
  __syncthreads();
  double r = red[SAMPLE_WARPS];
  __syncthreads();
  return r;
}

// Inclusive scan over a warp (Hillis-Steele, fixed order).
DEVICE double warp_scan_d(double v, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    double y = __shfl_up_sync(SAMPLE_FULL, v, o);
    if (lane >= o) v += y;
  }
  return v;
}

// Block-wide exclusive scan in thread order; *total gets the sum.
DEVICE double sample_block_scan(double v, double* total) {
  __shared__ double part[SAMPLE_WARPS + 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  double incl = warp_scan_d(v, lane);
  double ex = __shfl_up_sync(SAMPLE_FULL, incl, 1);
  if (lane == 0) ex = 0;
  if (lane == 31) part[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    double p = lane < SAMPLE_WARPS ? part[lane] : 0.0;
    double pi = warp_scan_d(p, lane);
    double pe = __shfl_up_sync(SAMPLE_FULL, pi, 1);
    if (lane == 0) pe = 0;
    double all = __shfl_sync(SAMPLE_FULL, pi, 31);
    if (lane < SAMPLE_WARPS) part[lane] = pe;
    if (lane == 0) part[SAMPLE_WARPS] = all;
  }
  __syncthreads();
  double r = part[warp] + ex;
  *total = part[SAMPLE_WARPS];
  __syncthreads();
  return r;
}

// Block-wide minimum and maximum of ints.
DEVICE int sample_block_min(int v) {
  __shared__ int m;
  if (threadIdx.x == 0) m = 0x7fffffff;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(SAMPLE_FULL, v, o));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) atomicMin(&m, v);
  __syncthreads();
  int r = m;
  __syncthreads();
  return r;
}

DEVICE int sample_block_max(int v) {
  __shared__ int m;
  if (threadIdx.x == 0) m = -0x7fffffff - 1;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(SAMPLE_FULL, v, o));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) atomicMax(&m, v);
  __syncthreads();
  int r = m;
  __syncthreads();
  return r;
}

// The r-th largest key of the row (1-based, r <= n) by radix select on
// 8-bit digits; *left gets r less the count of larger keys, the rank of the
// wanted token among those of that key.
DEVICE u32 select_key(const float* row, int n, int r, int* left) {
  __shared__ u32 hist[256];
  __shared__ u32 s_prefix;
  __shared__ int s_r;
  const int tid = threadIdx.x, lane = tid & 31;
  u32 prefix = 0, mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    if (tid < 256) hist[tid] = 0;
    __syncthreads();
    // Four loads in flight per thread, then their counts.
    for (int base = 0; base < n; base += SAMPLE_UNROLL * SAMPLE_THREADS) {
      u32 keys[SAMPLE_UNROLL];
#pragma unroll
      for (int u = 0; u < SAMPLE_UNROLL; u++) {
        int i = base + u * SAMPLE_THREADS + tid;
        keys[u] = i < n ? rank_key(row[i]) : 0;
      }
#pragma unroll
      for (int u = 0; u < SAMPLE_UNROLL; u++) {
        bool in = base + u * SAMPLE_THREADS + tid < n && (keys[u] & mask) == prefix;
        u32 act = __ballot_sync(SAMPLE_FULL, in);
        if (in) {
          // Lanes of one warp with the same digit add once: the top
          // digit of similar logits is shared by most of the row.
          u32 bin = (keys[u] >> shift) & 255u;
          u32 peers = __match_any_sync(act, bin);
          if (lane == __ffs(peers) - 1) atomicAdd(&hist[bin], (u32)__popc(peers));
        }
      }
    }
    __syncthreads();
    if (tid == 0) {
      int b = 255;
      for (; b > 0; b--) {
        int c = (int)hist[b];
        if (r <= c) break;
        r -= c;
      }
      s_prefix = prefix | ((u32)b << shift);
      s_r = r;
    }
    __syncthreads();
    prefix = s_prefix;
    r = s_r;
    mask |= 255u << shift;
  }
  __syncthreads();
  *left = r;
  return prefix;
}

// The r-th (1-based) token in id order with key K and id <= max_id, or -1.
// Threads take contiguous chunks of the row.
DEVICE int nth_with_key(const float* row, int n, u32 K, int max_id, int r) {
  __shared__ int s_found;
  const int tid = threadIdx.x;
  const int C = (n + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
  const int lo = min(n, tid * C), hi = min(n, lo + C);
  if (tid == 0) s_found = -1;
  int cnt = 0;
  for (int i = lo; i < hi; i++) cnt += (i <= max_id && rank_key(row[i]) == K);
  double total;
  int before = (int)sample_block_scan((double)cnt, &total);
  if (cnt > 0 && before < r && r <= before + cnt) {
    int c = before;
    for (int i = lo; i < hi; i++) {
      if (i <= max_id && rank_key(row[i]) == K && ++c == r) {
        s_found = i;
        break;
      }
    }
  }
  __syncthreads();
  int f = s_found;
  __syncthreads();
  return f;
}

// Bitonic sort of the m <= SAMPLE_CAP gathered tokens, padded to a power
// of two M: by rank (keys and ids), or by id (ids and weights).
DEVICE void sort_gathered(float* key, int* id, double* w, int M, bool by_id) {
  for (int size = 2; size <= M; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int j = threadIdx.x; j < M / 2; j += SAMPLE_THREADS) {
        int a = 2 * j - (j & (stride - 1)), b = a + stride;
        bool up = (a & size) == 0;
        if (by_id) {
          bool swap = up ? id[b] < id[a] : id[a] < id[b];
          if (swap) {
            int ti = id[a]; id[a] = id[b]; id[b] = ti;
            double tw = w[a]; w[a] = w[b]; w[b] = tw;
          }
        } else {
          bool swap = up ? ranks_before(key[b], id[b], key[a], id[a])
                         : ranks_before(key[a], id[a], key[b], id[b]);
          if (swap) {
            float tk = key[a]; key[a] = key[b]; key[b] = tk;
            int ti = id[a]; id[a] = id[b]; id[b] = ti;
          }
        }
      }
      __syncthreads();
    }
  }
}

// Warp-level sum of w[0..m): lanes sum contiguous chunks, then a fixed
// tree (every lane gets it).
DEVICE double chunk_total(const double* w, int m, int lane) {
  const int C = (m + 31) / 32;
  const int lo = min(m, lane * C), hi = min(m, lo + C);
  double s = 0;
  for (int j = lo; j < hi; j++) s += w[j];
  return warp_sum_d(s);
}

// Warp-level: the first j < m at which the running sum of w[0..j] reaches
// x (>= x, or > x when strict), or -1. Lanes sum contiguous chunks; the
// first lane whose running sum reaches x walks on from the sum before its
// chunk (past its chunk if rounding asks for it).
DEVICE int chunk_find(const double* w, int m, double x, bool strict, int lane) {
  const int C = (m + 31) / 32;
  const int lo = min(m, lane * C), hi = min(m, lo + C);
  double s = 0;
  for (int j = lo; j < hi; j++) s += w[j];
  double incl = warp_scan_d(s, lane);
  double ex = __shfl_up_sync(SAMPLE_FULL, incl, 1);
  if (lane == 0) ex = 0;
  u32 hit = __ballot_sync(SAMPLE_FULL, strict ? incl > x : incl >= x);
  if (hit == 0) return -1;
  const int L = __ffs(hit) - 1;
  int found = -1;
  if (lane == L) {
    double c = ex;
    for (int j = lo; j < m; j++) {
      c += w[j];
      if (strict ? c > x : c >= x) {
        found = j;
        break;
      }
    }
  }
  return __shfl_sync(SAMPLE_FULL, found, L);
}

// The weight of the tokens of key >= K in the top-k set (key > kk, or
// key == kk and id <= ik), summed in a fixed order; the exp is only taken
// for those.
DEVICE double top_k_mass(const float* row, int n, u32 K, u32 kk, int ik, double lmax, double inv_t) {
  double s = 0;
  for (int i = threadIdx.x; i < n; i += SAMPLE_THREADS) {
    float v = row[i];
    u32 key = rank_key(v);
    if (key >= K && (key > kk || (key == kk && i <= ik))) s += exp(((double)v - lmax) * inv_t);
  }
  return sample_block_sum(s);
}

// sample_rows: block b chooses the token of row b of logits (n columns,
// rows ld floats apart) with params[b], into ids[b].
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_rows(const float* __restrict__ logits, int ld, int n, const SampleParams* __restrict__ params,
                int* __restrict__ ids) {
  PDL_LAUNCH();
  PDL_WAIT();
  __shared__ float s_key[SAMPLE_CAP];
  __shared__ int s_id[SAMPLE_CAP];
  __shared__ double s_w[SAMPLE_CAP];
  __shared__ float s_bv[SAMPLE_WARPS];
  __shared__ int s_bi[SAMPLE_WARPS];
  __shared__ int s_int[2];
  const float* row = logits + (size_t)blockIdx.x * ld;
  const SampleParams p = params[blockIdx.x];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  // Finiteness and the argmax, lowest id among ties.
  // Each thread sees its tokens in increasing id order, so a strict
  // comparison keeps its lowest id among equal maxima. 16-byte loads where
  // the row allows them: this pass is all a greedy row costs.
  float bv = __int_as_float(0xff800000);
  int bi = n;
  bool bad = false;
#define SAMPLE_SCAN(v, i)      \
  if (!isfinite(v)) {          \
    bad = true;                \
  } else if ((v) > bv) {       \
    bv = (v);                  \
    bi = (i);                  \
  }
  const int nv = ((ld & 3) == 0 && ((size_t)row & 15) == 0) ? n >> 2 : 0;
  const float4* row4 = reinterpret_cast<const float4*>(row);
#pragma unroll 4
  for (int q = tid; q < nv; q += SAMPLE_THREADS) {
    float4 v = row4[q];
    SAMPLE_SCAN(v.x, 4 * q)
    SAMPLE_SCAN(v.y, 4 * q + 1)
    SAMPLE_SCAN(v.z, 4 * q + 2)
    SAMPLE_SCAN(v.w, 4 * q + 3)
  }
  for (int i = 4 * nv + tid; i < n; i += SAMPLE_THREADS) {
    float v = row[i];
    SAMPLE_SCAN(v, i)
  }
#undef SAMPLE_SCAN
  if (__syncthreads_or(bad)) {
    if (tid == 0) ids[blockIdx.x] = -1;
    return;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    float ov = __shfl_xor_sync(SAMPLE_FULL, bv, o);
    int oi = __shfl_xor_sync(SAMPLE_FULL, bi, o);
    if (ov > bv || (ov == bv && oi < bi)) {
      bv = ov;
      bi = oi;
    }
  }
  if (lane == 0) {
    s_bv[warp] = bv;
    s_bi[warp] = bi;
  }
  __syncthreads();
  if (warp == 0) {
    bv = lane < SAMPLE_WARPS ? s_bv[lane] : __int_as_float(0xff800000);
    bi = lane < SAMPLE_WARPS ? s_bi[lane] : n;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      float ov = __shfl_xor_sync(SAMPLE_FULL, bv, o);
      int oi = __shfl_xor_sync(SAMPLE_FULL, bi, o);
      if (ov > bv || (ov == bv && oi < bi)) {
        bv = ov;
        bi = oi;
      }
    }
    if (lane == 0) s_int[0] = bi;
  }
  __syncthreads();
  const int best = s_int[0];
  if (p.temperature == 0.0f || n == 1) {
    if (tid == 0) ids[blockIdx.x] = best;
    return;
  }
  const double lmax = (double)row[best];
  const double inv_t = 1.0 / (double)p.temperature;
  const bool top_k = p.top_k > 0 && p.top_k < n;
  const bool top_p = p.top_p > 0.0f && p.top_p < 1.0f;
  const double min_p = (double)p.min_p;
  const int k = top_k ? p.top_k : n;

  // Top-k: the k-th token in rank order is (kk, ik); the set is every
  // token ranking at or before it (all tokens when kk is 0).
  u32 kk = 0;
  int ik = n - 1;
  if (top_k) {
    int r;
    kk = select_key(row, n, k, &r);
    ik = nth_with_key(row, n, kk, n - 1, r);
  }
#define IN_TOP_K(key, i) ((key) > kk || ((key) == kk && (i) <= ik))
#define SCALED(v) (((double)(v)-lmax) * inv_t)

  // The candidates worth gathering: the top-k set, less tokens with
  // scaled logits t below lo. Min-p keeps w >= min_p, so none below
  // log(min_p) (less a margin for rounding). Top-p over a large set keeps
  // a rank prefix of weight top_p * z, so any set of the lowest tokens
  // that weighs less than (1 - top_p) z / 2 lies outside it, with a margin
  // that rounding cannot eat: every token of weight below
  // (1 - top_p) z / 2n, and the tokens of t below the bucket bound, from a
  // histogram of the weight over t in steps of 1/4 (in fixed point, each
  // token rounded up, so that it overstates the weight below). A small
  // top-k set is gathered whole, as top-p needs its total weight.
  double z = 0;  // weight of the top-k set, for top-p
  double lo = -1e300;
  if (!(top_p && k <= SAMPLE_CAP)) {
    if (top_p) {
      // s_w is free until the gathering: per-warp histograms of 64 buckets
      // (integer atomics: the counts do not depend on timing).
      unsigned long long* hist = reinterpret_cast<unsigned long long*>(s_w);
      for (int j = tid; j < SAMPLE_WARPS * SAMPLE_BUCKETS; j += SAMPLE_THREADS) hist[j] = 0;
      __syncthreads();
      double s = 0;
      unsigned long long tail = 0;  // the last bucket, most of a peaked row
      for (int i = tid; i < n; i += SAMPLE_THREADS) {
        float v = row[i];
        u32 key = rank_key(v);
        if (IN_TOP_K(key, i)) {
          double t = SCALED(v);
          double w = exp(t);
          s += w;
          unsigned long long fixed = (unsigned long long)(w * 0x1p40) + 1ull;
          int b = -t < SAMPLE_BUCKETS / 4.0 ? min((int)(-t * 4.0), SAMPLE_BUCKETS - 1) : SAMPLE_BUCKETS - 1;
          if (b == SAMPLE_BUCKETS - 1) {
            tail += fixed;
          } else {
            atomicAdd(&hist[warp * SAMPLE_BUCKETS + b], fixed);
          }
        }
      }
      if (tail != 0) atomicAdd(&hist[warp * SAMPLE_BUCKETS + SAMPLE_BUCKETS - 1], tail);
      z = sample_block_sum(s);  // its syncs order the histogram too
      if (tid < SAMPLE_BUCKETS) {
        unsigned long long c = 0;
        for (int w = 0; w < SAMPLE_WARPS; w++) c += hist[w * SAMPLE_BUCKETS + tid];
        hist[tid] = c;  // column tid is this thread's alone
      }
      __syncthreads();
      lo = log((1.0 - (double)p.top_p) * z) - log(2.0 * n) - 1e-6;
      // Drop the buckets from the last up while they weigh less than the
      // budget: tokens with t < -b/4 are in buckets b and above.
      const unsigned long long budget = (unsigned long long)((1.0 - (double)p.top_p) * z * 0.5 * 0x1p40);
      unsigned long long below = 0;
      int cut = SAMPLE_BUCKETS;
      while (cut > 1 && below + hist[cut - 1] < budget) below += hist[--cut];
      if (cut < SAMPLE_BUCKETS) lo = fmax(lo, -cut / 4.0 - 1e-6);
      __syncthreads();  // the histogram is read before s_w is reused
    }
    if (min_p > 0) lo = fmax(lo, log(min_p) - 1e-6);
  }

  // Without a bound the candidates are the k > SAMPLE_CAP of the top-k
  // set: no gathering (kmin is only used by top-p, which sets a bound).
  const bool bounded = k <= SAMPLE_CAP || lo > -1e300;
  if (tid == 0) s_int[1] = bounded ? 0 : k;
  __syncthreads();
  u32 kmin = 0xffffffffu;  // the least key gathered
  for (int base = 0; bounded && base < n; base += SAMPLE_UNROLL * SAMPLE_THREADS) {
    float vs[SAMPLE_UNROLL];
#pragma unroll
    for (int u = 0; u < SAMPLE_UNROLL; u++) {
      int i = base + u * SAMPLE_THREADS + tid;
      vs[u] = i < n ? row[i] : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < SAMPLE_UNROLL; u++) {
      int i = base + u * SAMPLE_THREADS + tid;
      float v = vs[u];
      u32 key = rank_key(v);
      bool take = i < n && IN_TOP_K(key, i) && SCALED(v) >= lo;
      if (take) kmin = min(kmin, key);
      u32 mask = __ballot_sync(SAMPLE_FULL, take);
      int off = 0;
      if (lane == 0 && mask != 0) off = atomicAdd(&s_int[1], __popc(mask));
      off = __shfl_sync(SAMPLE_FULL, off, 0);
      int j = off + __popc(mask & ((1u << lane) - 1u));
      if (take && j < SAMPLE_CAP) {
        s_key[j] = v;
        s_id[j] = i;
      }
    }
  }
  __syncthreads();
  const int m = s_int[1];

  if (m <= SAMPLE_CAP) {
    // Sort the gathered tokens by rank (m >= 1: the argmax is one).
    int M = 1;
    while (M < m) M <<= 1;
    for (int j = m + tid; j < M; j += SAMPLE_THREADS) {
      s_key[j] = __int_as_float(0xff800000);
      s_id[j] = SAMPLE_NO_ID;
    }
    __syncthreads();
    sort_gathered(s_key, s_id, s_w, M, false);
    for (int j = tid; j < M; j += SAMPLE_THREADS) s_w[j] = j < m ? exp(SCALED(s_key[j])) : 0.0;
    __syncthreads();
    if (warp == 0) {
      int cut = m;
      if (top_p) {
        if (k <= SAMPLE_CAP) z = chunk_total(s_w, m, lane);
        int j = chunk_find(s_w, m, (double)p.top_p * z, false, lane);
        if (j >= 0) cut = j + 1;
      }
      for (int j = lane; j < m; j += 32) {
        if (j >= cut || (min_p > 0 && !(s_w[j] >= min_p))) {
          s_id[j] = SAMPLE_NO_ID;
          s_w[j] = 0;
        }
      }
    }
    __syncthreads();
    // The survivors in id order, then the inverse transform of u.
    sort_gathered(s_key, s_id, s_w, M, true);
    if (warp == 0) {
      int s = 0;
      for (int j = lane; j < m; j += 32) s += s_id[j] != SAMPLE_NO_ID;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(SAMPLE_FULL, s, o);
      double zs = chunk_total(s_w, s, lane);
      int j = chunk_find(s_w, s, p.u * zs, true, lane);
      if (j < 0) {  // rounding: the last survivor of non-zero weight
        int last = -1;
        for (int q = lane; q < s; q += 32)
          if (s_w[q] != 0) last = q;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) last = max(last, __shfl_xor_sync(SAMPLE_FULL, last, o));
        j = last;
      }
      if (lane == 0) ids[blockIdx.x] = s_id[j];
    }
    return;
  }

  // A large candidate set: passes over the row.
  // Top-p: the cutoff (kp, ip) is the last token of the smallest rank
  // prefix whose weight reaches the target. kp is the largest key K with
  // mass(K) >= target, mass(K) being the weight of the top-k tokens of
  // key >= K, found by bisection; then the lowest ids among that key's
  // tokens, which all weigh the same, as many as it takes.
  u32 kp = 0;
  int ip = n - 1;
  if (top_p) {
    const double target = (double)p.top_p * z;
    // The search starts at the least gathered key: the tokens below it,
    // outside the bound lo, are outside the nucleus, and their exp is
    // never taken again. Rounding cannot break mass(a) >= target there
    // (the bound leaves a margin of (1 - top_p) z / 2), but it is checked.
    u32 a = (u32)sample_block_min((int)(kmin ^ 0x80000000u)) ^ 0x80000000u;
    if (!(top_k_mass(row, n, a, kk, ik, lmax, inv_t) >= target)) a = 0;  // mass(0) = z
    u32 b = rank_key(row[best]) + 1;  // mass(b) = 0 < target
    double mass_b = 0;
    while (b - a > 1) {
      u32 mid = a + (b - a) / 2;
      double s = top_k_mass(row, n, mid, kk, ik, lmax, inv_t);
      if (s >= target) {
        a = mid;
      } else {
        b = mid;
        mass_b = s;
      }
    }
    kp = a;
    // mass_b is mass(kp + 1) (0 if b never moved, which it then is).
    int ties = 0;
    for (int i = tid; i < n; i += SAMPLE_THREADS) {
      u32 key = rank_key(row[i]);
      ties += key == kp && IN_TOP_K(key, i);
    }
    ties = (int)sample_block_sum((double)ties);
    if (tid == 0) {
      const double w = exp(SCALED(key_value(kp)));
      int j = ties;
      if (w > 0) {
        // Start a little before the count that the product says (found by
        // bisection: a double division here costs the kernel its
        // registers), then add one weight at a time as the host's running
        // sum does.
        int qa = 0, qb = ties;  // mass_b + qb * w >= target, roughly
        while (qb - qa > 1) {
          int mid = qa + (qb - qa) / 2;
          if (mass_b + (double)mid * w >= target) {
            qb = mid;
          } else {
            qa = mid;
          }
        }
        int j0 = max(1, qb - 2);
        double acc = mass_b + (double)(j0 - 1) * w;
        for (j = j0; j < ties; j++) {
          acc += w;
          if (acc >= target) break;
        }
      }
      s_int[0] = max(1, min(j, ties));
    }
    __syncthreads();
    int r = s_int[0];
    __syncthreads();
    ip = nth_with_key(row, n, kp, kp == kk ? ik : n - 1, r);
  }
  // A survivor ranks at or before both cutoffs, and passes min-p.
#define IN_CUT(key, i) (IN_TOP_K(key, i) && ((key) > kp || ((key) == kp && (i) <= ip)))
#define MIN_P_OK(w) (!(min_p > 0 && !((w) >= min_p)))

  // The inverse transform in id order: threads take contiguous chunks.
  const int C = (n + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
  const int lo_i = min(n, tid * C), hi_i = min(n, lo_i + C);
  double s = 0;
  int last = -1;
  for (int i = lo_i; i < hi_i; i++) {
    float v = row[i];
    u32 key = rank_key(v);
    if (!IN_CUT(key, i)) continue;
    double w = exp(SCALED(v));
    if (MIN_P_OK(w) && w != 0) {
      s += w;
      last = i;
    }
  }
  double zs;
  double before = sample_block_scan(s, &zs);
  const double x = p.u * zs;
  const int first = sample_block_min(before + s > x ? tid : 0x7fffffff);
  last = sample_block_max(last);
  if (first == 0x7fffffff) {
    if (tid == 0) ids[blockIdx.x] = last;
    return;
  }
  if (tid == first) {
    int pick = last;
    double c = before;
    for (int i = lo_i; i < n; i++) {
      float v = row[i];
      u32 key = rank_key(v);
      if (!IN_CUT(key, i)) continue;
      double w = exp(SCALED(v));
      if (MIN_P_OK(w)) {
        c += w;
        if (c > x) {
          pick = i;
          break;
        }
      }
    }
    ids[blockIdx.x] = pick;
  }
#undef MIN_P_OK
#undef IN_CUT
#undef SCALED
#undef IN_TOP_K
}
