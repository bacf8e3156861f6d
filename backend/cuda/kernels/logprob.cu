// Log-probabilities on the device: one block per logits row computes the
// row's log-sum-exp and its k most likely tokens (k <= LP_MAX_K), so that a
// step reporting logprobs copies back a few words per row instead of the
// row. The reference is the engine's host logprobs: a float64 log-sum-exp,
// and the top k in rank order (higher logit first, lower id first among
// equal logits; +0 and -0 are equal).
//
// One pass over the row, LP_UNROLL 16-byte loads in flight per thread
// (with one, the pass waited on memory latency: 27 us a row on an H200).
// Each thread keeps a running maximum m of its entries and the sum of
// exp(v - m) in double, rescaled (in double) when m rises; the terms are
// float expf of the float difference (a correctly rounded difference, and
// expf within 2 ulp), four at a time summed in float before joining the
// double sum. The sum is thus within about 1e-7 relative of the exact one,
// and a log-probability within about 1e-7 absolute of the host's float64
// value, before its rounding to float. The threads' sums are combined in a
// fixed tree: the result does not depend on timing.
//
// The top k: each warp keeps its best k tokens so far as a sorted list, one
// per lane; a ballot over each group of 32 candidates finds those that
// rank before the k-th, and they are inserted one at a time. The largest
// k-th logit of the warps' full lists so far is a bound shared in the
// block: k tokens are at least that large, so no token below it is in the
// row's top k, and no warp offers one (without the bound each warp filled
// its own list, about 130 insertions a warp on a 154,880 row, which cost
// more than the rest of the pass). Warp 0 then merges the warps' lists the
// same way. Rank order is a total order, and the bound only leaves out
// tokens outside the top k, so the result does not depend on the order of
// insertion or on the warps' timing.
//
// -Inf entries weigh 0 (log-probability -Inf). A row with a NaN or +Inf, or
// with no finite entry, is reported bad (count -1), as the sampler reports
// it: the host then reads the row's logits and reports the error.

#define LP_THREADS 1024
#define LP_WARPS (LP_THREADS / 32)
#define LP_MAX_K 20
#define LP_RECORD (2 + 2 * LP_MAX_K)
#define LP_FULL 0xffffffffu
#define LP_NO_ID 0x7fffffff
#define LP_UNROLL 4

// lp_key maps a float to an unsigned key of the same order (-0 as +0);
// lp_value inverts it.
DEVICE u32 lp_key(float f) {
  u32 b = __float_as_uint(f == 0.0f ? 0.0f : f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
DEVICE float lp_value(u32 k) { return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k); }

// lp_before: token (va, ia) ranks before (vb, ib).
DEVICE bool lp_before(float va, int ia, float vb, int ib) { return va > vb || (va == vb && ia < ib); }

// lp_offer: the warp's list (lane j < k holds its j-th best token (lv, li);
// (tv, ti) is the k-th, the same in every lane) takes each lane's candidate
// (v, i) that ranks before the k-th and is not below the block's bound thr.
// When the list is full, its k-th raises the bound *bound (a key). Every
// lane of the warp calls it.
DEVICE void lp_offer(float v, int i, float& lv, int& li, float& tv, int& ti, int k, int lane, float thr,
                     u32* bound) {
  u32 want = __ballot_sync(LP_FULL, v >= thr && lp_before(v, i, tv, ti));
  if (want == 0) return;
  do {
    const int L = __ffs(want) - 1;
    want &= want - 1;
    const float nv = __shfl_sync(LP_FULL, v, L);
    const int ni = __shfl_sync(LP_FULL, i, L);
    if (!lp_before(nv, ni, tv, ti)) continue;  // the k-th has moved past it
    const int pos = __popc(__ballot_sync(LP_FULL, lane < k && lp_before(lv, li, nv, ni)));
    const float uv = __shfl_up_sync(LP_FULL, lv, 1);
    const int ui = __shfl_up_sync(LP_FULL, li, 1);
    if (lane > pos) {
      lv = uv;
      li = ui;
    } else if (lane == pos) {
      lv = nv;
      li = ni;
    }
    tv = __shfl_sync(LP_FULL, lv, k - 1);
    ti = __shfl_sync(LP_FULL, li, k - 1);
  } while (want);
  if (bound != nullptr && lane == 0 && ti != LP_NO_ID) atomicMax(bound, lp_key(tv));
}

// LP_SUM: entries into the thread's running maximum m and sum s (in
// double; the terms of one call summed in float), and the row's bad flag.
#define LP_SUM(qm, terms, finite)                                          \
  {                                                                        \
    bad |= !(finite);                                                      \
    if ((qm) > m) {                                                        \
      s *= exp((double)m - (double)(qm));                                  \
      m = (qm);                                                            \
    }                                                                      \
    if (m > NEG_INF) s += (double)(terms);                                 \
  }
// NaN and +Inf are bad; finite values and -Inf are not.
#define LP_OK(x) ((x) < __int_as_float(0x7f800000))

// logprob_rows: block r handles row r of logits (n columns, rows ld floats
// apart) when want[r] >= 0, its number of top tokens (at most LP_MAX_K).
// ids[r] is the row's chosen token (from the sampler; -1 for a bad row).
// rec + r * LP_RECORD gets: [0] the number of top tokens, or -1 for a bad
// row; [1] the chosen token's log-probability (float bits); then the top
// tokens' (id, log-probability) pairs in rank order.
extern "C" __global__ void __launch_bounds__(LP_THREADS)
    logprob_rows(const float* __restrict__ logits, int ld, int n, const int* __restrict__ want,
                 const int* __restrict__ ids, int* __restrict__ rec) {
  PDL_LAUNCH();
  PDL_WAIT();
  __shared__ float s_v[LP_WARPS * LP_MAX_K];
  __shared__ int s_i[LP_WARPS * LP_MAX_K];
  __shared__ u32 s_bound;
  __shared__ float s_m[LP_WARPS];
  __shared__ double s_s[LP_WARPS];
  const int r = blockIdx.x;
  const int k = min(want[r], LP_MAX_K);
  if (k < 0) return;
  const int id = ids[r];
  int* out = rec + (size_t)r * LP_RECORD;
  if (id < 0 || id >= n) {
    if (threadIdx.x == 0) out[0] = -1;
    return;
  }
  const float* row = logits + (size_t)r * ld;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const float NEG_INF = __int_as_float(0xff800000);

  float m = NEG_INF;
  double s = 0;
  bool bad = false;
  float lv = NEG_INF, tv = NEG_INF;
  int li = LP_NO_ID, ti = LP_NO_ID;
  if (tid == 0) s_bound = lp_key(NEG_INF);
  __syncthreads();
  volatile u32* vbound = &s_bound;  // read as it rises (a stale value is a valid bound)
  // 16-byte loads where the row allows them. The loops run the same number
  // of times in every lane of a warp (lp_offer's ballots need all 32).
  const int nv = ((ld & 3) == 0 && ((size_t)row & 15) == 0) ? n >> 2 : 0;
  const float4* row4 = reinterpret_cast<const float4*>(row);
  for (int base = 0; base < nv; base += LP_UNROLL * LP_THREADS) {
    float4 xs[LP_UNROLL];
#pragma unroll
    for (int u = 0; u < LP_UNROLL; u++) {
      const int q = base + u * LP_THREADS + tid;
      xs[u] = q < nv ? row4[q] : make_float4(NEG_INF, NEG_INF, NEG_INF, NEG_INF);
    }
#pragma unroll
    for (int u = 0; u < LP_UNROLL; u++) {
      const float4 x = xs[u];
      const int q = base + u * LP_THREADS + tid;
      LP_SUM(fmaxf(fmaxf(x.x, x.y), fmaxf(x.z, x.w)),
             (expf(x.x - m) + expf(x.y - m)) + (expf(x.z - m) + expf(x.w - m)),
             LP_OK(x.x) && LP_OK(x.y) && LP_OK(x.z) && LP_OK(x.w))
      if (k > 0) {
        // Past the row: -Inf with LP_NO_ID, which ranks before nothing.
        const bool in = q < nv;
        const float thr = lp_value(*vbound);
        lp_offer(x.x, in ? 4 * q : LP_NO_ID, lv, li, tv, ti, k, lane, thr, &s_bound);
        lp_offer(x.y, in ? 4 * q + 1 : LP_NO_ID, lv, li, tv, ti, k, lane, thr, &s_bound);
        lp_offer(x.z, in ? 4 * q + 2 : LP_NO_ID, lv, li, tv, ti, k, lane, thr, &s_bound);
        lp_offer(x.w, in ? 4 * q + 3 : LP_NO_ID, lv, li, tv, ti, k, lane, thr, &s_bound);
      }
    }
  }
  for (int base = 4 * nv; base < n; base += LP_THREADS) {
    const int i = base + tid;
    const float x = i < n ? row[i] : NEG_INF;
    LP_SUM(x, expf(x - m), LP_OK(x))
    if (k > 0) lp_offer(x, i < n ? i : LP_NO_ID, lv, li, tv, ti, k, lane, lp_value(*vbound), &s_bound);
  }
  if (__syncthreads_or(bad)) {
    if (tid == 0) out[0] = -1;
    return;
  }

  // The row's maximum, then each thread's sum rescaled to it, in a fixed
  // tree.
  const float wm = warp_max(m);
  if (lane == 0) s_m[warp] = wm;
  if (k > 0 && lane < k) {
    s_v[warp * k + lane] = lv;
    s_i[warp * k + lane] = li;
  }
  __syncthreads();
  float M = NEG_INF;
#pragma unroll 8
  for (int w = 0; w < LP_WARPS; w++) M = fmaxf(M, s_m[w]);
  if (M == NEG_INF) {  // no finite entry
    if (tid == 0) out[0] = -1;
    return;
  }
  s = m > NEG_INF ? s * exp((double)m - (double)M) : 0.0;
  s = warp_sum_d(s);
  if (lane == 0) s_s[warp] = s;
  __syncthreads();
  if (warp != 0) return;
  double S = warp_sum_d(lane < LP_WARPS ? s_s[lane] : 0.0);
  const double lse = (double)M + log(S);

  // Warp 0 merges the warps' lists.
  int cnt = 0;
  if (k > 0) {
    lv = tv = NEG_INF;
    li = ti = LP_NO_ID;
    for (int base = 0; base < LP_WARPS * k; base += 32) {
      const int j = base + lane;
      lp_offer(j < LP_WARPS * k ? s_v[j] : NEG_INF, j < LP_WARPS * k ? s_i[j] : LP_NO_ID, lv, li, tv, ti, k, lane,
               NEG_INF, nullptr);
    }
    cnt = __popc(__ballot_sync(LP_FULL, lane < k && li != LP_NO_ID));
    if (lane < cnt) {
      out[2 + 2 * lane] = li;
      out[3 + 2 * lane] = __float_as_int((float)((double)lv - lse));
    }
  }
  if (lane == 0) {
    out[0] = cnt;
    out[1] = __float_as_int((float)((double)row[id] - lse));
  }
}
#undef LP_OK
#undef LP_SUM
