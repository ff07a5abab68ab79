// rotary_attention: one decode step of attention over the static KV cache in a single launch: the new token's
// rotary embedding (q and k), its k and v written into the cache, attention of each query head over its row's
// valid slots, and the merge of the partial results. It replaces three dependent launches per layer (the rotary
// kernel, the Triton split-K attention kernel and its merge kernel). Measured on H100 (docs/benchmarks.md, eighth
// session): 4,912 vs 4,626 tok/s at batch 16 and 432.5 vs 426.9 at batch 1 (INT4 Llama-3-8B shape).
//
// Grid (row, kv head, part): the `parts` blocks of one (row, kv head) form a thread block cluster and share the
// keys; each warp takes 16-key steps in turn and keeps an online softmax. Both products run on the tensor cores
// (mma.sync m16n8k16, float32 accumulation):
// - scores S = Q K^T with the group's query heads as M (rows 0..group-1 of the 16) and keys as N: lane (g, t) holds,
//   for the MMA's k index, 16 bytes of key g's row that it loaded itself (the k index is mapped onto head_dim so
//   that lane t reads features [8t + 32j, 8t + 32j + 8)); q is mapped the same way. The score fragment of lane
//   (g, t) (head g, keys 2t, 2t + 1 of each 8-key half) is then exactly the B fragment of the second product.
// - O^T = V^T P^T with features as M, heads as N and keys as the k index: lane (g, t) loads keys 2t, 2t + 1,
//   2t + 8, 2t + 9 (8 features each, at 8g and, for head_dim 128, 64 + 8g) and pairs two keys' values of one
//   feature per register with a byte permute.
// The warps' partial results are merged in shared memory; with parts > 1 every block then sends its merged part
// into block 0's shared memory and arrives on the cluster barrier, and block 0 alone waits and merges the parts.
// The new token's key and value come from shared memory (every block rotates them; block 0 writes them into the
// cache), so no block waits for another's write. Rounding: q and k are rotated exactly as rotary_kernel does
// (rotate_pair); the probabilities enter the second product in the storage type, as in the Triton kernel.
#include "common.cuh"

#include <cooperative_groups.h>

namespace flux {
namespace {

namespace cg = cooperative_groups;

constexpr int kKeys = 16;        // keys per warp step
constexpr int kMaxGroup = 8;     // query heads per kv head (the MMA's M rows 0..7)
constexpr int kMaxParts = 8;     // blocks per cluster (the portable limit)
constexpr float kLog2e = 1.4426950408889634f;

// Merge weights of `count` partial softmaxes per head: partial i's maxima (log2 units) are m[i * stride + head] and
// its sums l[i * stride + head]; w[i * group + head] gets its weight 2^(m_i - max) (0 for a partial without keys;
// w may be m itself when stride == group: each head's thread reads its column before writing it), head_ml[head]
// the head's max and head_ml[group + head] its weighted sum. One thread per head.
__device__ __forceinline__ void merge_weights(const float* m, const float* l, int stride, float* w, float* head_ml,
                                              int count, int group, int head) {
  if (head >= group) return;
  float top = -INFINITY;
  for (int i = 0; i < count; ++i) top = fmaxf(top, m[i * stride + head]);
  float sum = 0.f;
  for (int i = 0; i < count; ++i) {
    const float weight = top == -INFINITY ? 0.f : exp2f(m[i * stride + head] - top);
    sum += weight * l[i * stride + head];
    w[i * group + head] = weight;
  }
  head_ml[head] = top, head_ml[group + head] = sum;
}

// Element e (of head e / D) of the merged output, unnormalized: the partials' outputs o[i * stride + e] weighted by
// merge_weights' w.
__device__ __forceinline__ float weighted_sum(const float* w, const float* o, int stride, int count, int group, int e,
                                              int D) {
  const int head = e / D;
  float sum = 0.f;
  for (int i = 0; i < count; ++i) sum += w[i * group + head] * o[i * stride + e];
  return sum;
}

// 16-bit element e of a 16-byte vector, two keys' elements packed as one register (the lower key in the low half)
__device__ __forceinline__ uint32_t pair_of(const uint4& lo_key, const uint4& hi_key, int e) {
  const uint32_t a = reinterpret_cast<const uint32_t*>(&lo_key)[e >> 1];
  const uint32_t b = reinterpret_cast<const uint32_t*>(&hi_key)[e >> 1];
  return __byte_perm(a, b, (e & 1) ? 0x7632 : 0x5410);
}

// The thread block cluster's barrier in its two halves: arrive (release: this thread's earlier writes, shared
// memory of other blocks included, become visible to those that wait) and wait (for every non-exited thread of
// the cluster to arrive), and block 0's shared memory. Clusters exist from Hopper on; before it the launcher runs
// one block per (row, kv head) and none of these is reached.
__device__ __forceinline__ void cluster_arrive(bool release) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (release) asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
  else asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ float* block0_shared(float* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cg::this_cluster().map_shared_rank(p, 0);
#else
  return p;
#endif
}

template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<at::BFloat16>(float lo, float hi) {
  __nv_bfloat162 r = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&r);
}
template <> __device__ __forceinline__ uint32_t pack2<at::Half>(float lo, float hi) {
  __half2 r = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&r);
}

// Feature of row g (h = 0) or g + 8 (h = 1) of feature tile i in the second product, as (16-byte piece, element)
// of what lane g loaded per key: head_dim 128 pairs piece 0 and piece 1 (features 8g + i and 64 + 8g + i), head_dim
// 64 two neighbours of its one piece (8g + 2i and 8g + 2i + 1).
template <int D> __device__ __forceinline__ int piece_of(int h) { return D == 128 ? h : 0; }
template <int D> __device__ __forceinline__ int element_of(int i, int h) { return D == 128 ? i : 2 * i + h; }
template <int D> __device__ __forceinline__ int feature_of(int i, int h, int g) {
  return 64 * piece_of<D>(h) + 8 * g + element_of<D>(i, h);
}

template <typename T, int D>
__global__ void __launch_bounds__(256) rotary_attention_kernel(
    T* __restrict__ out, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    T* __restrict__ k_cache, T* __restrict__ v_cache, const float* __restrict__ cos, const float* __restrict__ sin,
    const int64_t* __restrict__ positions, const int64_t* __restrict__ slots, const int* __restrict__ kv_start,
    const int* __restrict__ kv_end, int group, int rot, int64_t q_row, int64_t q_head, int64_t k_row,
    int64_t k_head, int64_t v_row, int64_t v_head, int64_t cache_row, int64_t cache_head, float scale_log2,
    int window, bool early) {
  constexpr int KP = D / 32;  // 16-byte pieces of a key row per lane (scores)
  constexpr int VP = D / 64;  // per key (values)
  constexpr int FT = D / 16;  // feature tiles of the second product
  pdl_wait();  // q, k, v come from the previous kernel, the cache and the metadata from earlier ones
  if (early) pdl_trigger();
  const int row = blockIdx.x, kvh = blockIdx.y, part = blockIdx.z, parts = gridDim.z;
  const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;

  extern __shared__ __align__(16) unsigned char shared[];
  T* q_s = reinterpret_cast<T*>(shared);  // [group][D] rotated queries
  T* k_s = q_s + group * D;               // [D] the new key, rotated
  T* v_s = k_s + D;                       // [D] the new value
  float* warp_m = reinterpret_cast<float*>(v_s + D);  // [warps][group] running max (log2 units)
  float* warp_l = warp_m + warps * group;             // [warps][group] running sum
  float* warp_o = warp_l + warps * group;             // [warps][group][D] unnormalized output
  float* inbox = warp_o + warps * group * D;          // block 0: [parts][group * (D + 2)] the blocks' merged parts
  float* head_ml = inbox + (parts > 1 ? parts * group * (D + 2) : 0);  // [group] max, [group] sum
  float* part_w = head_ml + 2 * group;                // block 0: [parts][group] the parts' weights
  if (parts > 1) cluster_arrive(false);               // (waited for before the first send, see below)

  // this step's metadata (written by earlier kernels: coherent loads, kept after the wait), then the new token's
  // inputs, which do not depend on it, so that both are in flight together
  const int64_t slot = load_coherent(slots), position = load_coherent(positions + row);
  const int start = load_coherent(kv_start + row), end = load_coherent(kv_end + row);
  const int half = rot / 2, per_head = half / 4, tail = (D - rot) / 8;
  const int rotations = (group + 1) * per_head, copies = (group + 1) * tail, items = rotations + copies + D / 8;
  const auto source = [&](int head) {  // head < group: query head kvh * group + head; group: the key
    return head < group ? q + row * q_row + (kvh * group + head) * q_head : k + row * k_row + kvh * k_head;
  };
  // item p < rotations: 4 pairs of features (i, i + rot / 2) of one head; then 8 unrotated features of a head
  // past the rotary ones; then 8 features of the value
  const auto fetch = [&](int p) {
    uint4 r = make_uint4(0, 0, 0, 0);
    if (p < rotations) {
      const int head = p / per_head, i = (p - head * per_head) * 4;
      const uint2 a = load_activation8(source(head) + i), b = load_activation8(source(head) + i + half);
      r = make_uint4(a.x, a.y, b.x, b.y);
    } else if (p < rotations + copies) {
      const int e = p - rotations, head = e / tail;
      r = load_activation(source(head) + rot + (e - head * tail) * 8);
    } else if (p < items) {
      r = load_activation(v + row * v_row + kvh * v_head + (p - rotations - copies) * 8);
    }
    return r;
  };
  const uint4 mine = fetch(threadIdx.x);
  const int lo = window > 0 ? max(start, end - window) : start;
  const int first = lo / kKeys, steps = end > lo ? (end - 1) / kKeys - first + 1 : 0;
  const int walker = part * warps + warp, walkers = parts * warps;
  const T* k_rows = k_cache + row * cache_row + kvh * cache_head;
  const T* v_rows = v_cache + row * cache_row + kvh * cache_head;

  uint4 kr[2][KP], vr[4][VP];  // this step's keys (8g + n of the block) and values (keys 2t, 2t+1, 2t+8, 2t+9)
  const auto key_of_v = [&](int c) { return 2 * t + (c & 1) + 8 * (c >> 1); };
  const auto load_step = [&](int step) {
    const int base = (first + step) * kKeys;
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      const int key = base + 8 * n + g;
      const bool valid = key >= lo && key < end;
#pragma unroll
      for (int j = 0; j < KP; ++j)
        kr[n][j] = valid ? load_activation(k_rows + static_cast<int64_t>(key) * D + 8 * t + 32 * j)
                         : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int key = base + key_of_v(c);
      const bool valid = key >= lo && key < end;
#pragma unroll
      for (int j = 0; j < VP; ++j)
        vr[c][j] = valid ? load_activation(v_rows + static_cast<int64_t>(key) * D + 8 * g + 64 * j)
                         : make_uint4(0, 0, 0, 0);
    }
  };
  if (walker < steps) load_step(walker);  // in flight while the new token is rotated

  // the new token: group query heads and the key rotated into shared memory, the value copied
  const float* c_row = cos + position * rot;
  const float* s_row = sin + position * rot;
  const auto finish = [&](int p, const uint4& raw) {
    if (p < rotations) {
      const int head = p / per_head, i = (p - head * per_head) * 4;
      T* dst = q_s + head * D;  // head == group: k_s
      const float4 cs[2] = {__ldg(reinterpret_cast<const float4*>(c_row + i)),
                            __ldg(reinterpret_cast<const float4*>(c_row + i + half))};
      const float4 ss[2] = {__ldg(reinterpret_cast<const float4*>(s_row + i)),
                            __ldg(reinterpret_cast<const float4*>(s_row + i + half))};
      const float* c4 = reinterpret_cast<const float*>(cs);  // cos[i .. i + 3], then cos[i + half ..]
      const float* s4 = reinterpret_cast<const float*>(ss);
      const T* x = reinterpret_cast<const T*>(&raw);  // x[0..3] at i, x[4..7] at i + half
      uint2 ya, yb;
      T* y1 = reinterpret_cast<T*>(&ya);
      T* y2 = reinterpret_cast<T*>(&yb);
#pragma unroll
      for (int j = 0; j < 4; ++j)
        rotate_pair<T>(to_float(x[j]), to_float(x[4 + j]), c4[j], c4[4 + j], s4[j], s4[4 + j], y1[j], y2[j]);
      *reinterpret_cast<uint2*>(dst + i) = ya;
      *reinterpret_cast<uint2*>(dst + i + half) = yb;
    } else if (p < rotations + copies) {
      const int e = p - rotations, head = e / tail;
      *reinterpret_cast<uint4*>(q_s + head * D + rot + (e - head * tail) * 8) = raw;
    } else if (p < items) {
      *reinterpret_cast<uint4*>(v_s + (p - rotations - copies) * 8) = raw;
    }
  };
  finish(threadIdx.x, mine);
  for (int p = threadIdx.x + blockDim.x; p < items; p += blockDim.x) finish(p, fetch(p));
  __syncthreads();
  if (part == 0) {  // the cache holds the new key and value from now on (this launch reads them from k_s / v_s)
    for (int i = threadIdx.x * 8; i < 2 * D; i += blockDim.x * 8) {
      T* dst = (i < D ? k_cache : v_cache) + row * cache_row + kvh * cache_head + slot * D + (i % D);
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>((i < D ? k_s : v_s) + (i % D));
    }
  }

  uint4 qf[KP];  // head g's rotated query in the scores' k order (zero for rows past the group)
#pragma unroll
  for (int j = 0; j < KP; ++j)
    qf[j] = g < group ? *reinterpret_cast<const uint4*>(q_s + g * D + 8 * t + 32 * j) : make_uint4(0, 0, 0, 0);

  float m_run = -INFINITY, l_run = 0.f;  // head g's running max and this lane's share of its running sum
  float acc[FT][4] = {};                 // O^T: features of tile i (rows g, g + 8) x heads 2t, 2t + 1
  for (int step = walker; step < steps; step += walkers) {
    const int base = (first + step) * kKeys;
#pragma unroll
    for (int n = 0; n < 2; ++n)  // the slot this launch writes: the rotated key from shared memory
      if (base + 8 * n + g == slot)
#pragma unroll
        for (int j = 0; j < KP; ++j) kr[n][j] = *reinterpret_cast<const uint4*>(k_s + 8 * t + 32 * j);
#pragma unroll
    for (int c = 0; c < 4; ++c)
      if (base + key_of_v(c) == slot)
#pragma unroll
        for (int j = 0; j < VP; ++j) vr[c][j] = *reinterpret_cast<const uint4*>(v_s + 8 * g + 64 * j);

    float s[2][4] = {};
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int j = 0; j < KP; ++j) {
        const uint32_t a0[4] = {qf[j].x, 0u, qf[j].y, 0u}, a1[4] = {qf[j].z, 0u, qf[j].w, 0u};
        mma<T>(s[n], a0, kr[n][j].x, kr[n][j].y);
        mma<T>(s[n], a1, kr[n][j].z, kr[n][j].w);
      }
    float x[2][2], block_max = -INFINITY;
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int key = base + 8 * n + 2 * t + e;
        x[n][e] = key >= lo && key < end ? s[n][e] * scale_log2 : -INFINITY;
        block_max = fmaxf(block_max, x[n][e]);
      }
    block_max = fmaxf(block_max, __shfl_xor_sync(0xffffffffu, block_max, 1));
    block_max = fmaxf(block_max, __shfl_xor_sync(0xffffffffu, block_max, 2));
    const float m_new = fmaxf(m_run, block_max);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    const float alpha = exp2f(m_run - m_use);
    float p[2][2];
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) p[n][e] = exp2f(x[n][e] - m_use);
    l_run = l_run * alpha + (p[0][0] + p[0][1]) + (p[1][0] + p[1][1]);
    m_run = m_new;
    const float alpha0 = __shfl_sync(0xffffffffu, alpha, 8 * t), alpha1 = __shfl_sync(0xffffffffu, alpha, 8 * t + 4);
    const uint32_t b0 = pack2<T>(p[0][0], p[0][1]), b1 = pack2<T>(p[1][0], p[1][1]);
#pragma unroll
    for (int i = 0; i < FT; ++i) {
      acc[i][0] *= alpha0, acc[i][1] *= alpha1, acc[i][2] *= alpha0, acc[i][3] *= alpha1;
      const int e0 = element_of<D>(i, 0), e1 = element_of<D>(i, 1);
      const uint32_t a[4] = {pair_of(vr[0][piece_of<D>(0)], vr[1][piece_of<D>(0)], e0),
                             pair_of(vr[0][piece_of<D>(1)], vr[1][piece_of<D>(1)], e1),
                             pair_of(vr[2][piece_of<D>(0)], vr[3][piece_of<D>(0)], e0),
                             pair_of(vr[2][piece_of<D>(1)], vr[3][piece_of<D>(1)], e1)};
      mma<T>(acc[i], a, b0, b1);
    }
    if (step + walkers < steps) load_step(step + walkers);
  }

  // merge: the warps of the block, then (parts > 1) the blocks of the cluster
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 1);
  l_run += __shfl_xor_sync(0xffffffffu, l_run, 2);
  if (t == 0 && g < group) warp_m[warp * group + g] = m_run, warp_l[warp * group + g] = l_run;
#pragma unroll
  for (int i = 0; i < FT; ++i)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int head = 2 * t + (c & 1);
      if (head < group) warp_o[(warp * group + head) * D + feature_of<D>(i, c >> 1, g)] = acc[i][c];
    }
  __syncthreads();
  if (!early) pdl_trigger();
  T* out_row = out + (static_cast<int64_t>(row) * gridDim.y + kvh) * group * D;  // out [rows, heads, D]
  // parts > 1: every block sends its merged part ([group][D] output, then [group] max and [group] sum) to block 0
  float* sent = nullptr;
  if (parts > 1) {
    cluster_wait();  // every block of the cluster has started (its shared memory exists)
    sent = block0_shared(inbox) + part * group * (D + 2);
  }
  float* weights = warp_m;  // the warps' weights, in place of their maxima
  merge_weights(warp_m, warp_l, group, weights, head_ml, warps, group, threadIdx.x);
  __syncthreads();
  for (int e = threadIdx.x; e < group * D; e += blockDim.x) {
    const int head = e / D;
    const float o = weighted_sum(weights, warp_o, group * D, warps, group, e, D);
    if (parts == 1) {
      out_row[e] = from_float<T>(o / head_ml[group + head]);
    } else {
      sent[e] = o;
      if (e % D == 0) sent[group * D + head] = head_ml[head], sent[group * D + group + head] = head_ml[group + head];
    }
  }
  if (parts == 1) return;
  cluster_arrive(true);  // the sends are visible to block 0 once it has waited; the others are done
  if (part != 0) return;
  cluster_wait();
  // block 0: the same over the parts (each part's output, max and sum at stride group * (D + 2) in the inbox)
  const int part_stride = group * (D + 2);
  merge_weights(inbox + group * D, inbox + group * D + group, part_stride, part_w, head_ml, parts, group, threadIdx.x);
  __syncthreads();
  for (int e = threadIdx.x; e < group * D; e += blockDim.x)
    out_row[e] = from_float<T>(weighted_sum(part_w, inbox, part_stride, parts, group, e, D) / head_ml[group + e / D]);
}

}  // namespace
}  // namespace flux

// q [rows, heads, D], k and v [rows, kv_heads, D] (this step's token of each row; head_dim contiguous, 16-byte
// aligned rows), caches [>= rows, kv_heads, slots, D] contiguous in the last two dims, cos/sin [positions, rot]
// float32, positions [rows] and slots [1] int64, kv_start/kv_end [rows] int32. Returns out [rows, heads, D]; k and
// v are written into the caches at slots[0]; q and k are left as they are. parts / warps: blocks per (row, kv head)
// and warps per block (0: chosen).
torch::Tensor rotary_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos,
                               torch::Tensor sin, torch::Tensor positions, torch::Tensor k_cache,
                               torch::Tensor v_cache, torch::Tensor slots, torch::Tensor kv_start,
                               torch::Tensor kv_end, double scale, int64_t window, int64_t parts, int64_t warps) {
  using flux::aligned16;
  flux::check_cuda(q, "q");
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = k.size(1);
  const auto rows_fit = [&](const torch::Tensor& x) {
    return x.dim() == 3 && x.size(0) == rows && x.size(2) == dim && x.stride(2) == 1 && aligned16(x) &&
           x.stride(0) % 8 == 0 && x.stride(1) % 8 == 0 && x.scalar_type() == q.scalar_type();
  };
  TORCH_CHECK((q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf) && rows_fit(q) && rows_fit(k) &&
                  rows_fit(v) && v.size(1) == kv_heads,
              "rotary_attention: bf16/fp16 q [rows, heads, D], k and v [rows, kv_heads, D], 16-byte aligned rows");
  TORCH_CHECK((dim == 64 || dim == 128) && heads % kv_heads == 0 && heads / kv_heads <= flux::kMaxGroup,
              "rotary_attention: head_dim 64 or 128 and at most 8 query heads per kv head");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides() &&
                  k_cache.size(0) >= rows && k_cache.size(1) == kv_heads && k_cache.size(3) == dim &&
                  k_cache.stride(3) == 1 && k_cache.stride(2) == dim && k_cache.stride(1) % 8 == 0 &&
                  k_cache.stride(0) % 8 == 0 && aligned16(k_cache) && aligned16(v_cache) &&
                  k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "rotary_attention: caches [rows, kv_heads, slots, D] with contiguous slots, in q's dtype");
  const int64_t rot = cos.size(1);
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.sizes() == sin.sizes() && aligned16(cos) && aligned16(sin) && rot % 16 == 0 && rot <= dim,
              "rotary_attention: contiguous float32 cos/sin tables, rotary dim a multiple of 16 up to head_dim");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.numel() == rows &&
                  slots.scalar_type() == at::kLong && slots.numel() == 1 && kv_start.scalar_type() == at::kInt &&
                  kv_end.scalar_type() == at::kInt && kv_start.numel() == rows && kv_end.numel() == rows &&
                  kv_start.is_contiguous() && kv_end.is_contiguous(),
              "rotary_attention: int64 positions [rows] and slots [1], int32 kv_start/kv_end [rows]");
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = torch::empty({rows, heads, dim}, q.options());
  if (rows == 0) return out;
  const int group = static_cast<int>(heads / kv_heads), slots_total = static_cast<int>(k_cache.size(2));
  // Measured (benchmarks/decode_attention.py --sweep): 8 warps per block, and as many blocks per (row, kv head)
  // as give every warp one 16-key step of the cache, while the grid fits the SMs once
  const int w = warps > 0 ? static_cast<int>(warps) : 8;
  const bool clusters = flux::compute_major(q.get_device()) >= 9;  // thread block clusters: Hopper and later
  int p = static_cast<int>(parts);
  TORCH_CHECK(p <= 1 || clusters, "rotary_attention: more than one block per (row, kv head) needs a Hopper GPU");
  if (p <= 0 && !clusters) p = 1;
  if (p <= 0) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.get_device()));
    const int per_block = w * flux::kKeys;
    p = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({flux::kMaxParts, sms / (rows * kv_heads),
                                                                    (slots_total + per_block - 1) / per_block})));
  }
  TORCH_CHECK(p >= 1 && p <= flux::kMaxParts && w >= 1 && w <= 8,
              "rotary_attention: 1..8 blocks per (row, kv head) and 1..8 warps per block");
  const size_t smem = static_cast<size_t>(group + 2) * dim * q.element_size() +
                      sizeof(float) * (2 * w * group + w * group * dim + (p > 1 ? p * group * (dim + 3) : 0) +
                                       2 * group);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const float scale_log2 = static_cast<float>(scale) * flux::kLog2e;
  AT_DISPATCH_REDUCED_FLOATING_TYPES(q.scalar_type(), "rotary_attention", [&] {
    auto run = [&](auto kernel) {
      if (smem > 48 * 1024)
        C10_CUDA_CHECK(
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      flux::launch_clustered(kernel, dim3(rows, kv_heads, p), w * 32, smem, stream, p, out.data_ptr<scalar_t>(),
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(),
          v_cache.data_ptr<scalar_t>(), cos.data_ptr<float>(), sin.data_ptr<float>(), positions.data_ptr<int64_t>(),
          slots.data_ptr<int64_t>(), kv_start.data_ptr<int>(), kv_end.data_ptr<int>(), group, static_cast<int>(rot),
          q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(0),
          k_cache.stride(1), scale_log2, static_cast<int>(window), flux::trigger_early(rows));
    };
    if (dim == 128) run(flux::rotary_attention_kernel<scalar_t, 128>);
    else run(flux::rotary_attention_kernel<scalar_t, 64>);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
