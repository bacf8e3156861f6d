// Small utility kernels.

// spin keeps the GPU busy for about the given number of clock cycles. A
// benchmark queues it first so that the host can queue the launches it
// times before the GPU reaches them: the events then measure device time
// alone, as a graph replay would, not the host's launch rate.
extern "C" __global__ void spin(long long cycles) {
  PDL_WAIT();  // a kernel in a programmatic chain waits, so that the chain stays ordered
  const long long start = clock64();
  while (clock64() - start < cycles) {
  }
}

// ---------------------------------------------------------------------------
// Hand-over probes (BenchmarkHandover): what a stage costs when every block
// needs the whole vector that every block of the stage before wrote, as a
// decode layer's norms and products do. A stage: each block reads the n
// inputs into shared memory, sums them (a block reduction in a fixed
// order) and writes its n / gridDim.x outputs y[i] = x[i] / 2 + total /
// (4 n). The stages are one launch each (handover_stage, chained by
// programmatic dependent launch), or all in one launch of one block a
// multiprocessor whose blocks meet at a count in memory (handover_count) or
// poll the values themselves, each carrying its stage's tag in the high
// half of a 64-bit word (handover_tag: no fence, no count, one round trip
// from the last store to the reader). n <= 256 * HO_PER, 256 threads.
#define HO_PER 9

// ho_sync is the chain's block barrier: with NAMED, barrier 1 of the
// block's first 256 threads alone (handover_tag_stream's other warps
// stream and never meet it).
template <bool NAMED>
DEVICE void ho_sync() {
  if (NAMED)
    asm volatile("bar.sync 1, 256;" ::: "memory");
  else
    __syncthreads();
}

template <bool NAMED = false>
DEVICE float handover_total(const float* xs, int n, float* red) {
  float v = 0.f;
  for (int i = threadIdx.x; i < n; i += 256) v += xs[i];
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  ho_sync<NAMED>();
  float t = 0.f;
#pragma unroll
  for (int w = 0; w < 8; w++) t += red[w];
  return t;
}

// A stage's output, one rounding (x / 2 is exact).
DEVICE float handover_out(float x, float t, int n) { return __fmaf_rn(t, 0.25f / (float)n, 0.5f * x); }

// One stage over floats: x read through L2 into shared memory, the
// block's outputs into y.
DEVICE void handover_float_stage(const float* x, float* y, int n, float* xs, float* red) {
  float v[HO_PER];
#pragma unroll
  for (int k = 0; k < HO_PER; k++) {
    const int i = threadIdx.x + 256 * k;
    v[k] = i < n ? __ldcg(x + i) : 0.f;
  }
#pragma unroll
  for (int k = 0; k < HO_PER; k++)
    if (threadIdx.x + 256 * k < n) xs[threadIdx.x + 256 * k] = v[k];
  __syncthreads();
  const float t = handover_total(xs, n, red);
  const int per = n / gridDim.x;
  for (int j = threadIdx.x; j < per; j += 256) {
    const int i = blockIdx.x * per + j;
    y[i] = handover_out(xs[i], t, n);
  }
}

extern "C" __global__ void __launch_bounds__(256) handover_stage(const float* x, float* y, int n) {
  __shared__ float xs[256 * HO_PER], red[8];
  PDL_LAUNCH();
  PDL_WAIT();
  handover_float_stage(x, y, n, xs, red);
}

// handover_stage as a cluster launch of CL blocks (gridDim.x a multiple of
// CL): whether a cluster launch's wait returns later after the launch
// before it ends (BenchmarkHandoverCluster).
#define HO_CLUSTER_STAGE(CL)                                                                                   \
  extern "C" __global__ void __cluster_dims__(CL, 1, 1) __launch_bounds__(256)                               \
      handover_stage_c##CL(const float* x, float* y, int n) {                                                 \
    __shared__ float xs[256 * HO_PER], red[8];                                                                \
    PDL_LAUNCH();                                                                                             \
    PDL_WAIT();                                                                                               \
    handover_float_stage(x, y, n, xs, red);                                                                   \
  }
HO_CLUSTER_STAGE(2)
HO_CLUSTER_STAGE(8)

// stages stages over buf[0..n) and buf[n..2n) in turn, from buf[0..n);
// count starts at 0. sync = 0 leaves the count out (each block reads
// whatever is there: the stage's cost inside a block alone).
extern "C" __global__ void __launch_bounds__(256) handover_count(float* buf, u32* count, int n, int stages, int sync) {
  __shared__ float xs[256 * HO_PER], red[8];
  PDL_WAIT();
  for (int s = 0; s < stages; s++) {
    handover_float_stage(buf + (s & 1) * n, buf + ((s + 1) & 1) * n, n, xs, red);
    __syncthreads();
    if (sync && threadIdx.x == 0) {
      __threadfence();
      atomicAdd(count, 1u);
      const u32 want = (u32)(s + 1) * gridDim.x;
      while (ld_acquire(count) < want) {
      }
    }
    __syncthreads();
  }
}

DEVICE unsigned long long ld_relaxed_u64(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

DEVICE void st_relaxed_u64(unsigned long long* p, unsigned long long v) {
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// One stage over tagged words: the words tagged want (the ones not yet
// there re-read, all in one round), the outputs tagged want + 1.
template <bool LAUNCH, bool NAMED = false>
DEVICE void handover_tag_stage(const unsigned long long* x, unsigned long long* y, int n, u32 want, float* xs,
                               float* red, int out = 1) {
  const int per = n / gridDim.x;
  unsigned long long w[HO_PER];
#pragma unroll
  for (int k = 0; k < HO_PER; k++) {
    const int i = threadIdx.x + 256 * k;
    w[k] = i < n ? ld_relaxed_u64(x + i) : (unsigned long long)want << 32;
  }
  for (;;) {
    bool all = true;
#pragma unroll
    for (int k = 0; k < HO_PER; k++) all &= (u32)(w[k] >> 32) == want;
    if (all) break;
#pragma unroll
    for (int k = 0; k < HO_PER; k++)
      if ((u32)(w[k] >> 32) != want) w[k] = ld_relaxed_u64(x + threadIdx.x + 256 * k);
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // The inputs are here: the next launch may start (as PDL_WAIT lets it
  // once the wait has returned).
  if (LAUNCH) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
#pragma unroll
  for (int k = 0; k < HO_PER; k++)
    if (threadIdx.x + 256 * k < n) xs[threadIdx.x + 256 * k] = __uint_as_float((u32)w[k]);
  ho_sync<NAMED>();
  if (!out) return;
  const float t = handover_total<NAMED>(xs, n, red);
  for (int j = threadIdx.x; j < per; j += 256) {
    const int i = blockIdx.x * per + j;
    st_relaxed_u64(y + i, (unsigned long long)(want + 1) << 32 | __float_as_uint(handover_out(xs[i], t, n)));
  }
}

// handover_count's stages over tagged words: stage s reads words tagged
// tag0 + s and writes tag0 + s + 1.
extern "C" __global__ void __launch_bounds__(256) handover_tag(unsigned long long* buf, int n, int stages, u32 tag0) {
  __shared__ float xs[256 * HO_PER], red[8];
  PDL_WAIT();
  for (int s = 0; s < stages; s++) {
    handover_tag_stage<false>(buf + (s & 1) * n, buf + ((s + 1) & 1) * n, n, tag0 + (u32)s, xs, red);
    __syncthreads();  // xs and red are rewritten by the next stage
  }
}

// One tagged stage a launch: the launch after it starts once every block
// of this one has its inputs (programmatic dependent launch) and, instead
// of waiting for this one to finish, polls the words it needs.
extern "C" __global__ void __launch_bounds__(256) handover_stage_tag(const unsigned long long* x, unsigned long long* y,
                                                                      int n, u32 want) {
  __shared__ float xs[256 * HO_PER], red[8];
  handover_tag_stage<true>(x, y, n, want, xs, red);
}

// mbarrier helpers of the probes below (no-ops where the compiler lacks
// PTX 8.0; their tests then skip the forms that need them).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && __CUDACC_VER_MAJOR__ >= 12
#define PROBE_BULK 1
#else
#define PROBE_BULK 0
#endif

DEVICE u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }

DEVICE void mbar_init(unsigned long long* bar, u32 count) {
#if PROBE_BULK
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count));
#endif
}

// mbar_inited makes the mbarrier_init's above visible to the copies.
DEVICE void mbar_inited() {
#if PROBE_BULK
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}

DEVICE void mbar_arrive(unsigned long long* bar) {
#if PROBE_BULK
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
#endif
}

// mbar_wait waits for the completion of bar's phase of the given parity.
DEVICE void mbar_wait(unsigned long long* bar, u32 parity) {
#if PROBE_BULK
  u32 ok = 0;
  while (!ok)
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                 : "=r"(ok)
                 : "r"(smem_u32(bar)), "r"(parity)
                 : "memory");
#endif
}

// bulk_copy asks for bytes (a multiple of 16) from src into shared dst by
// the tensor memory accelerator, completing a phase of bar.
DEVICE void bulk_copy(void* dst, const void* src, u32 bytes, unsigned long long* bar) {
#if PROBE_BULK
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_u32(dst)),
               "l"(src), "r"(bytes), "r"(smem_u32(bar))
               : "memory");
#endif
}

// handover_tag's stages under a read from DRAM that runs beside them in
// the same blocks, as a persistent decode kernel would stream the next
// stages' weights while its chain waits: does the chain's latency hold
// while the memory system is busy, and at what bandwidth? Threads 0-255
// run the chain (barrier 1 alone); the warps after them read src, block b
// its slice [b*slice, (b+1)*slice) (slice a power of two, far larger than
// L2 together) round and round until the chain is done:
//   - mode 0: each warp U loads of 16 bytes a lane at once, used before
//     the next U (U * 512 bytes a warp in flight);
//   - mode 1: thread 256 alone, U bulk copies of HO_CHUNK bytes in flight
//     into shared memory (one mbarrier a buffer), each replaced as it
//     lands (a no-op where the compiler lacks PTX 8.0).
// bytes gets the bytes read, sink what keeps the loads.
#define HO_RING 8
#define HO_CHUNK 4096
extern "C" __global__ void __launch_bounds__(512)
    handover_tag_stream(unsigned long long* buf, int n, int stages, u32 tag0, const u8* __restrict__ src, u32 slice,
                        int mode, int U, u32* sink, unsigned long long* bytes) {
  __shared__ float xs[256 * HO_PER], red[8];
  __shared__ __align__(128) u8 ring[HO_RING * HO_CHUNK];
  __shared__ __align__(8) unsigned long long bar[HO_RING];
  __shared__ int done;  // set and read by shared-memory atomics
  const int tid = threadIdx.x;
  if (tid == 0) {
    done = 0;
    for (int s = 0; s < HO_RING; s++) mbar_init(&bar[s], 1);
    mbar_inited();
  }
  __syncthreads();
  PDL_WAIT();
  if (tid < 256) {
    for (int s = 0; s < stages; s++) {
      handover_tag_stage<false, true>(buf + (s & 1) * n, buf + ((s + 1) & 1) * n, n, tag0 + (u32)s, xs, red);
      ho_sync<true>();
    }
    if (tid == 0) atomicExch(&done, 1);
    return;
  }
  const u8* base = src + (size_t)blockIdx.x * slice;
  u32 acc = 0;
  unsigned long long got = 0;
  if (mode == 0) {
    const u32 S = (blockDim.x >> 5) - 8, step = S * (u32)U * 512;
    u32 off = (((tid >> 5) - 8) * (u32)U * 32 + (tid & 31)) * 16;
    while (!atomicOr(&done, 0)) {
      uint4 v[8];
#pragma unroll
      for (int u = 0; u < 8; u++)
        if (u < U) v[u] = load_stream16(base + ((off + u * 512) & (slice - 1)));
#pragma unroll
      for (int u = 0; u < 8; u++)
        if (u < U) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
      off += step;
      got += (u32)U * 16;
    }
  }
  if (PROBE_BULK && mode == 1 && tid == 256) {
    // Copy c goes to buffer c mod U, on that buffer's (c / U)-th use.
    u32 c = 0;
    while (!atomicOr(&done, 0) || c < (u32)U) {
      if (c >= (u32)U) mbar_wait(&bar[c % U], ((c - U) / U) & 1);
      bulk_copy(ring + (size_t)(c % U) * HO_CHUNK, base + (((size_t)c * HO_CHUNK) & (slice - 1)), HO_CHUNK, &bar[c % U]);
      c++;
      got += HO_CHUNK;
    }
    for (u32 k = c - U; k < c; k++) mbar_wait(&bar[k % U], (k / U) & 1);  // none in flight at the end
    acc = ((const u32*)ring)[tid & 31];
  }
  sink[blockIdx.x * 256 + (tid - 256)] = acc;
  if (got) atomicAdd(bytes, got);
}

// ---------------------------------------------------------------------------
// A decode layer's shape of dependent stages with their weights (layer
// probes, BenchmarkLayerProbe): ns <= LP_STAGES stages a layer, stage s
// giving each block per[s] bytes of weights (a decode layer's bytes spread
// over the blocks); stage routedStage (ns: none) stands for the routed
// experts' gate/up, whose weights a block may ask for only once it has the
// router's output (its inputs). A stage: handover_tag's
// stage (every block needs every value the stage before wrote) plus, per
// block, the int8 dot of its weights with the values' int8 form, added to
// its outputs (an integer sum: its order does not change the bits). The
// weights come through shared memory by bulk copies of at most LP_SLOT
// bytes into a ring of LP_SLOTS buffers (an mbarrier full and one empty
// each). Two forms, the same bits:
//   - layer_probe_stage: one launch a stage, chained by programmatic
//     dependent launch, as today's decode kernels are: thread 0 asks for
//     the stage's weights before the wait (the routed stage's after it);
//   - layer_probe_persistent: one launch for every layer; warp 8's first
//     thread asks for every stage's weights in order as ring buffers free
//     up (the routed stage's once the block has the router's output),
//     running ahead of the chain in threads 0-255; with l2ahead, it also
//     asks L2 for the next layer's stages before the routed one as soon as
//     the routed stage's copies are out.
// Layer l's stage s weights for block b: arena + l * layerBytes +
// G * start[s] + b * per[s] (G blocks, start the prefix sums of per).
// Both kernels are empty where the compiler lacks PTX 8.0 (the tests skip
// them there).
#define LP_STAGES 8
#define LP_SLOT 16384
#define LP_SLOTS 12

struct LpRing {
  unsigned long long full[LP_SLOTS], empty[LP_SLOTS];
  unsigned long long routed;  // a phase a layer: the block has the router's output
};

// LpShared is a block's static shared memory: the chain's values, their
// int8 form and its sums, and the ring's mbarriers.
struct LpShared {
  float xs[256 * HO_PER], red[8];
  u32 xq[256 * HO_PER / 4];
  i32 ired[8];
  LpRing r;
};

// lp_init: full is completed by its copy, empty by the arrival of all 256
// chain threads once they are done reading the buffer (each releasing its
// own reads), routed by the chain's thread 0.
DEVICE void lp_init(LpRing* r) {
  for (int s = 0; s < LP_SLOTS; s++) {
    mbar_init(&r->full[s], 1);
    mbar_init(&r->empty[s], 256);
  }
  mbar_init(&r->routed, 1);
  mbar_inited();
}

// lp_copy asks for bytes (at most LP_SLOT) from src into ring buffer slot.
DEVICE void lp_copy(u8* ring, LpRing* r, int slot, const u8* src, u32 bytes) {
  bulk_copy(ring + (size_t)slot * LP_SLOT, src, bytes, &r->full[slot]);
}

DEVICE u32 lp_chunks(u32 bytes) { return (bytes + LP_SLOT - 1) / LP_SLOT; }

// lp_chunk_bytes is the size of chunk k of per bytes.
DEVICE u32 lp_chunk_bytes(u32 per, u32 k) { return min(per - k * LP_SLOT, (u32)LP_SLOT); }

// The chain's part of a stage (threads 0-255): the inputs by their tags,
// the int8 dot of the stage's per bytes of weights, which arrive as
// chunks c0, c0 + 1, ... of the ring (buffer c mod LP_SLOTS, its
// (c / LP_SLOTS)-th use), and the tagged outputs. routed, when set, is
// arrived at once the inputs are here (r->routed).
DEVICE void lp_chain_stage(const unsigned long long* x, unsigned long long* y, int n, u32 want, u32 per, u32 c0,
                           u8* ring, LpShared* sh, bool routed, unsigned long long* stamp) {
  float *xs = sh->xs, *red = sh->red;
  u32* xq = sh->xq;
  i32* ired = sh->ired;
  LpRing* r = &sh->r;
  handover_tag_stage<false, true>(x, y, n, want, xs, red, 0);  // inputs in xs; no outputs yet
  if (stamp && threadIdx.x == 0) stamp[0] = globaltimer();
  if (routed && threadIdx.x == 0) mbar_arrive(&r->routed);
  // The values' int8 form (x in (-2, 2) here: a fixed scale).
  for (int i = threadIdx.x; i < n / 4; i += 256) {
    u32 w = 0;
#pragma unroll
    for (int k = 0; k < 4; k++) w |= (u32)(u8)(i8)__float2int_rn(fminf(fmaxf(xs[4 * i + k] * 63.f, -127.f), 127.f)) << (8 * k);
    xq[i] = w;
  }
  ho_sync<true>();
  i32 acc = 0;
  const u32 nq = (u32)n / 4, chunks = lp_chunks(per);
  for (u32 k = 0; k < chunks; k++) {
    const u32 c = c0 + k, slot = c % LP_SLOTS;
    mbar_wait(&r->full[slot], (c / LP_SLOTS) & 1);
    const u32 words = lp_chunk_bytes(per, k) / 4;
    const u32* wq = (const u32*)(ring + (size_t)slot * LP_SLOT);
    u32 j = (k * (LP_SLOT / 4) + threadIdx.x) % nq;  // nq > 256: one wrap a step at most
    for (u32 i = threadIdx.x; i < words; i += 256) {
      acc = dp4a_ss(wq[i], xq[j], acc);
      j += 256;
      if (j >= nq) j -= nq;
    }
    mbar_arrive(&r->empty[slot]);  // this thread is done with the buffer
  }
  // The block's dot, in an order that does not matter (integers).
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if ((threadIdx.x & 31) == 0) ired[threadIdx.x >> 5] = acc;
  ho_sync<true>();
  i32 dot = 0;
#pragma unroll
  for (int w = 0; w < 8; w++) dot += ired[w];
  const float t = handover_total<true>(xs, n, red);
  const int each = n / gridDim.x;
  for (int j = threadIdx.x; j < each; j += 256) {
    const int i = blockIdx.x * each + j;
    const float v = handover_out(xs[i], t, n) + (float)dot * 0x1p-36f;
    st_relaxed_u64(y + i, (unsigned long long)(want + 1) << 32 | __float_as_uint(v));
  }
  if (stamp && threadIdx.x == 0) stamp[gridDim.x] = globaltimer();
  ho_sync<true>();  // xs, xq and the reductions are rewritten by the next stage
}

// lp_stamp is stage idx's stamps of this block (stamps: 2 a stage a block,
// the inputs' arrival and the outputs' end; null: none).
DEVICE unsigned long long* lp_stamp(unsigned long long* stamps, int idx) {
  return stamps ? stamps + (size_t)2 * idx * gridDim.x + blockIdx.x : nullptr;
}

// lp_weights is layer l's stage s weights for this block (ns stages a
// layer).
DEVICE const u8* lp_weights(const u8* arena, const u32* per, int ns, int l, int s) {
  size_t layer = 0, start = 0;
  for (int k = 0; k < ns; k++) {
    layer += per[k];
    if (k < s) start += per[k];
  }
  return arena + (size_t)l * layer * gridDim.x + start * gridDim.x + (size_t)blockIdx.x * per[s];
}

// One stage a launch: layer l's stage s over buf's halves (stage index
// l * ns + s picks the half and the tag tag0 + index).
extern "C" __global__ void __launch_bounds__(256)
    layer_probe_stage(unsigned long long* buf, int n, const u8* __restrict__ arena, const u32* __restrict__ per,
                      int ns, int routedStage, int l, int s, u32 tag0, unsigned long long* stamps) {
#if PROBE_BULK
  extern __shared__ __align__(128) u8 ring[];
  __shared__ LpShared sh;
  LpRing& r = sh.r;
  PDL_LAUNCH();
  const u8* w = lp_weights(arena, per, ns, l, s);
  const u32 chunks = lp_chunks(per[s]);
  if (threadIdx.x == 0) lp_init(&r);
  __syncthreads();
  const auto copy_all = [&] {
    for (u32 k = 0; k < chunks; k++) lp_copy(ring, &r, k, w + k * LP_SLOT, lp_chunk_bytes(per[s], k));
  };
  if (threadIdx.x == 0 && s != routedStage) copy_all();
  PDL_WAIT();
  if (threadIdx.x == 0 && s == routedStage) copy_all();
  const int idx = l * ns + s;
  lp_chain_stage(buf + (idx & 1) * n, buf + ((idx + 1) & 1) * n, n, tag0 + (u32)idx, per[s], 0, ring, &sh, false,
                 lp_stamp(stamps, idx));
#endif
}

// Every layer in one launch: threads 0-255 the chain, thread 256 the
// copies (288 threads a block), LP_SLOTS * LP_SLOT bytes of dynamic
// shared memory.
extern "C" __global__ void __launch_bounds__(288)
    layer_probe_persistent(unsigned long long* buf, int n, const u8* __restrict__ arena, const u32* __restrict__ per,
                           int ns, int routedStage, int layers, u32 tag0, unsigned long long* stamps,
                           int l2ahead) {
#if PROBE_BULK
  extern __shared__ __align__(128) u8 ring[];
  __shared__ LpShared sh;
  LpRing& r = sh.r;
  if (threadIdx.x == 0) lp_init(&r);
  __syncthreads();
  PDL_WAIT();
  if (threadIdx.x < 256) {
    u32 c = 0;
    for (int l = 0; l < layers; l++)
      for (int s = 0; s < ns; s++) {
        const int idx = l * ns + s;
        lp_chain_stage(buf + (idx & 1) * n, buf + ((idx + 1) & 1) * n, n, tag0 + (u32)idx, per[s], c, ring, &sh,
                       s == routedStage, lp_stamp(stamps, idx));
        c += lp_chunks(per[s]);
      }
    return;
  }
  if (threadIdx.x != 256) return;
  u32 c = 0;
  for (int l = 0; l < layers; l++)
    for (int s = 0; s < ns; s++) {
      if (s == routedStage) mbar_wait(&r.routed, l & 1);
      const u8* w = lp_weights(arena, per, ns, l, s);
      for (u32 k = 0; k < lp_chunks(per[s]); k++, c++) {
        const u32 slot = c % LP_SLOTS;
        if (c >= LP_SLOTS) mbar_wait(&r.empty[slot], (c / LP_SLOTS - 1) & 1);
        lp_copy(ring, &r, slot, w + k * LP_SLOT, lp_chunk_bytes(per[s], k));
      }
      // With l2ahead, once the routed stage's copies are asked for, the
      // next layer's stages before it are asked of L2 (the ring is full
      // until the routed stages are read).
      if (l2ahead && s == routedStage && l + 1 < layers)
        for (int k = 0; k < routedStage; k++)
          asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(lp_weights(arena, per, ns, l + 1, k)),
                       "r"(per[k])
                       : "memory");
    }
#endif
}

// The tags of buf's two halves set to tag (the first) and 0, the values
// kept: the start of a replayed chain of handover_stage_tag.
extern "C" __global__ void handover_retag(unsigned long long* buf, int n, u32 tag) {
  PDL_WAIT();
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < 2 * n; i += gridDim.x * blockDim.x)
    buf[i] = (unsigned long long)(i < n ? tag : 0u) << 32 | (u32)buf[i];
}

// ---------------------------------------------------------------------------
// One-wave read probes (BenchmarkReadWave): how long one launch takes to
// read a region that is not in L2, as the routed gate/up launch reads its
// experts' weights (13.4 MB at GLM-4.7-Flash's shapes) once the router has
// chosen. Block b reads bytes [b*per, (b+1)*per) of src; stamp[2b] and
// stamp[2b+1] get thread 0's %globaltimer at the block's start and after
// the block's last read returned (its xor, in out, keeps the loads).

// wave_ld: D loads of 16 bytes a thread requested at once, then used, as
// rows_load then rows_dot do.
template <int D>
DEVICE void wave_ld(const uint4* __restrict__ src, u32 per, u32* out, unsigned long long* stamp) {
  if (threadIdx.x == 0) stamp[2 * blockIdx.x] = globaltimer();
  const uint4* p = src + (size_t)blockIdx.x * (per / 16);
  const u32 n = per / 16;
  u32 acc = 0;
  for (u32 i0 = 0; i0 < n; i0 += D * blockDim.x) {
    uint4 v[D];
#pragma unroll
    for (int d = 0; d < D; d++) {
      const u32 i = i0 + d * blockDim.x + threadIdx.x;
      v[d] = i < n ? __ldg(p + i) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int d = 0; d < D; d++) acc ^= v[d].x ^ v[d].y ^ v[d].z ^ v[d].w;
  }
  __syncthreads();
  if (threadIdx.x == 0) stamp[2 * blockIdx.x + 1] = globaltimer_after(acc);
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}
extern "C" __global__ void wave_ld16(const uint4* src, u32 per, u32* out, unsigned long long* stamp) {
  wave_ld<16>(src, per, out, stamp);
}
extern "C" __global__ void wave_ld32(const uint4* src, u32 per, u32* out, unsigned long long* stamp) {
  wave_ld<32>(src, per, out, stamp);
}

// wave_tma: thread 0 requests the block's bytes in chunks of chunk bytes
// by bulk copies into a ring of WAVE_STAGES shared buffers (the tensor
// memory accelerator, an mbarrier a buffer); every thread reads each chunk
// from shared memory once it has arrived. Dynamic shared memory:
// WAVE_STAGES * chunk bytes. A no-op where the compiler lacks PTX 8.0
// (the test skips it).
#define WAVE_STAGES 4
extern "C" __global__ void wave_tma(const u8* __restrict__ src, u32 per, u32 chunk, u32* out,
                                    unsigned long long* stamp) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && __CUDACC_VER_MAJOR__ >= 12
  extern __shared__ __align__(128) u8 ring[];
  __shared__ __align__(8) unsigned long long bar[WAVE_STAGES];
  const int tid = threadIdx.x;
  if (tid == 0) stamp[2 * blockIdx.x] = globaltimer();
  const u8* p = src + (size_t)blockIdx.x * per;
  const u32 chunks = per / chunk;
  if (tid == 0) {
    for (int s = 0; s < WAVE_STAGES; s++) mbar_init(&bar[s], 1);
    mbar_inited();
  }
  __syncthreads();
  // request chunk c into its buffer
  auto request = [&](u32 c) {
    const int s = c % WAVE_STAGES;
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    bulk_copy(ring + (size_t)s * chunk, p + (size_t)c * chunk, chunk, &bar[s]);
  };
  if (tid == 0)
    for (u32 c = 0; c < chunks && c < WAVE_STAGES; c++) request(c);
  u32 acc = 0;
  for (u32 c = 0; c < chunks; c++) {
    const int s = c % WAVE_STAGES;
    mbar_wait(&bar[s], (c / WAVE_STAGES) & 1);
    const uint4* q = (const uint4*)(ring + (size_t)s * chunk);
    for (u32 i = tid; i < chunk / 16; i += blockDim.x) {
      const uint4 v = q[i];
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    __syncthreads();  // every thread is done with buffer s before it is refilled
    if (tid == 0 && c + WAVE_STAGES < chunks) request(c + WAVE_STAGES);
  }
  if (tid == 0) stamp[2 * blockIdx.x + 1] = globaltimer_after(acc);
  out[blockIdx.x * blockDim.x + tid] = acc;
#endif
}

// The batched MoE's weight reads alone (BenchmarkMoEReadPattern): grid (12,
// tiles), 8 warps; block (x, y) reads 128 rows of two 1536 x 2048-code
// matrices at region y (3 MB of codes), warp w rows x*128 + 16w.., two
// 128-column groups a batch, as moeb_gate_up_s2f34 does. mode 0: row-major
// codes (row r at r * 1024 bytes: 16 rows' 64-byte pieces 1 KB apart);
// mode 1: the same bytes tile-major (code_row: 16 rows x 64 bytes in one
// 1 KB piece), the experts' layout on the device; mode 2: mode 0 with the
// L2 asked for 256 bytes a load.
extern "C" __global__ void __launch_bounds__(256, 3) moe_read_pattern(const u8* __restrict__ src, int mode, u32* sink) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const u8* base = src + (size_t)blockIdx.y * (2u * 1536 * 1024);
  const int tileRow = blockIdx.x * 128 + warp * 16;
  u32 acc = 0;
  for (int gs = 0; gs < 16; gs += 2) {
    uint4 v[2][2][2];
#pragma unroll
    for (int d = 0; d < 2; d++)
#pragma unroll
      for (int m = 0; m < 2; m++) {
        const u8* mat = base + (size_t)m * 1536 * 1024;
        if (mode == 1) {
          const u8* p = mat + (size_t)tileRow * 1024 + (gs + d) * 1024 + g * 64 + 16 * t;
          v[d][m][0] = load_stream16(p);
          v[d][m][1] = load_stream16(p + 512);
        } else if (mode == 0) {
          const u8* p = mat + (size_t)(tileRow + g) * 1024 + (gs + d) * 64 + 16 * t;
          v[d][m][0] = load_stream16(p);
          v[d][m][1] = load_stream16(p + 8 * 1024);
        } else {
          const u8* p = mat + (size_t)(tileRow + g) * 1024 + (gs + d) * 64 + 16 * t;
          asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
              : "=r"(v[d][m][0].x), "=r"(v[d][m][0].y), "=r"(v[d][m][0].z), "=r"(v[d][m][0].w)
              : "l"(p));
          asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
              : "=r"(v[d][m][1].x), "=r"(v[d][m][1].y), "=r"(v[d][m][1].z), "=r"(v[d][m][1].w)
              : "l"(p + 8 * 1024));
        }
      }
#pragma unroll
    for (int d = 0; d < 2; d++)
#pragma unroll
      for (int m = 0; m < 2; m++)
#pragma unroll
        for (int h = 0; h < 2; h++) acc = acc * 33u + (v[d][m][h].x ^ v[d][m][h].y ^ v[d][m][h].z ^ v[d][m][h].w);
  }
  sink[(blockIdx.y * gridDim.x + blockIdx.x) * 256 + threadIdx.x] = acc;
}

// ---------------------------------------------------------------------------
// The cluster exchange probe (TestClusterExchangeProbe,
// BenchmarkClusterExchange): what one exchange through a cluster's shared
// memory costs, as decode_combine_values exchanges values between its
// blocks (norm_qb_absorb_192 and moe_gate_up_c did, before set words took
// the barrier's place: docs/perf.md, 2026-11-30 (30)). Each round, threads
// 0-63 of each of a cluster's 4 blocks store a word into each other
// block's shared memory, the cluster meets at its barrier, and the same
// threads read the three words they received, so that the rounds chain.
// mode bit 0: the arrive relaxed (no fence before it; the words' arrival
// is then unordered, a timing only), else with its default release
// (MEMBAR.ALL.GPU before it) and the wait's acquire. mode bit 1: each
// storing thread also stores a word to global memory before the arrive,
// for the fence to wait on. stamp[2b], stamp[2b+1]: thread 0's %globaltimer
// before the first round and after the last.
// (NVRTC 11.8 takes the release form for both, and the benchmark leaves
// the relaxed modes out there.)
extern "C" __global__ void __cluster_dims__(4, 1, 1) __launch_bounds__(256)
    cluster_exchange_probe(int mode, int rounds, float* out, unsigned long long* stamp) {
  __shared__ float box[2][4][64];  // [round parity][sender][thread]
  const u32 rank = cluster_rank();
  const int tid = threadIdx.x;
  float v = (float)(tid + 64 * (int)rank);
  cluster_arrive();
  cluster_wait();
  if (tid == 0) stamp[2 * blockIdx.x] = globaltimer();
  for (int r = 0; r < rounds; r++) {
    const int p = r & 1;
    if (tid < 64) {
      for (u32 q = 0; q < 4; q++)
        if (q != rank) st_cluster(&box[p][rank][tid], q, v);
      if (mode & 2) out[(size_t)(blockIdx.x * 64 + tid) * 2 + p] = v;
    }
    if (mode & 1)
      cluster_arrive_relaxed();
    else
      cluster_arrive();
    cluster_wait();
    if (tid < 64) {
      float s = 0.f;
      for (u32 q = 0; q < 4; q++)
        if (q != rank) s += box[p][q][tid];
      v = s * 0.25f + 1.f;
    }
  }
  if (tid == 0) stamp[2 * blockIdx.x + 1] = globaltimer_after(__float_as_uint(v));
  if (tid < 64) out[(size_t)gridDim.x * 128 + blockIdx.x * 64 + tid] = v;
}

// warp_sum_rows against R warp_sums (TestWarpSumRowsMatchesWarpSum): warp w
// takes 32 R values, lane l's partial of row r at x[(32 w + l) R + r];
// got[32 w + l] is warp_sum_rows' lane l and, for l < R, want[32 w + l] is
// warp_sum of row l.
#define WARP_SUM_ROWS_CHECK(R)                                                                                  \
  extern "C" __global__ void warp_sum_rows_check_##R(const float* x, float* got, float* want) {               \
    const int lane = threadIdx.x & 31;                                                                        \
    const size_t w = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5;                                    \
    float o[R];                                                                                               \
    for (int r = 0; r < R; r++) o[r] = x[(32 * w + lane) * R + r];                                            \
    got[32 * w + lane] = warp_sum_rows(o, lane);                                                              \
    for (int r = 0; r < R; r++) {                                                                             \
      const float s = warp_sum(o[r]);                                                                         \
      if (lane == r) want[32 * w + lane] = s;                                                                 \
    }                                                                                                         \
  }
WARP_SUM_ROWS_CHECK(1)
WARP_SUM_ROWS_CHECK(2)
WARP_SUM_ROWS_CHECK(4)
WARP_SUM_ROWS_CHECK(8)
WARP_SUM_ROWS_CHECK(12)
WARP_SUM_ROWS_CHECK(32)
