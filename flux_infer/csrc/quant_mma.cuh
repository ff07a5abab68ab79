// Weight-only quantized linear layers for 1-32 rows of activations, on the tensor cores.
//
// out = x @ W.T is computed as out.T = W @ x.T with mma.sync m16n8k16: 16 output features are the MMA's M side,
// up to 8 rows of x its N side, so a decode-sized batch wastes no weight bandwidth and one instruction does
// 16 x 8 x 16 multiply-adds with a float32 accumulator. The weights stay in flux's storage layout (the one
// checkpoints hold, see flux_infer/kernels/quant.py); no repacking.
//
// Fragments. Lane (g = lane / 4, t = lane % 4) holds, per MMA, 4 codes of output feature g and 4 of feature g + 8
// (the A fragment), and the 4 matching activations of row g of x (the B fragment). A dot product does not care
// in which order its terms come, so the MMA's k index is mapped onto memory such that every lane feeds it from the
// 16 bytes of weights it loaded itself: lane t of a quad reads the t-th 16-byte slice of a 4-slice step along K
// (128 codes for INT4, 64 for INT8), for both of its features, and the activations of the same K positions.
//
// Dequantization, exact and two codes at a time (no int-to-float conversions). (word >> 4p) & 0x000F000F | magic
// is the 16-bit pair (B + q_p, B + q_{p+4}) (B = 1024 in fp16, 128 in bf16): one shift and one LOP3.
// - INT4 with groups of 128 or more (kInt4Biased): those biased codes go into the MMA as they are. One 4-slice
//   step spans 128 inputs of a single group, so the step's sums are finished in float32 once per step:
//   sum(w x) = scale * sum((B + q) x) + (min - B * scale) * sum(x). sum(x) comes from the tensor cores too: the
//   16th feature row of every tile is left without weights, its biased codes are all B, so its result is
//   B * sum(x). 15 features per 16-row tile; the dequantization costs 7 instructions per 8 weights.
// - INT4 with groups of 32 or 64 (kInt4): subtract B (exact), then one fused multiply-add per pair applies the
//   group's scale and min with a single rounding: bit for bit the reference's dequantized weight.
// - INT8 (w = q * scale[n], scale applied to the sum): byte permutes build fp16 (1024 + u) pairs, or float32
//   2^23 + u for bf16, with u = q + 128; subtracting the offset gives q exactly (every int8 is a bf16/fp16).
// Each warp walks a share of K; the warps of a block sum their partial tiles through shared memory.
//
// Epilogues around an RMSNorm (E, INT4 up to 8 rows), so that a decode step needs no norm kernel between two
// quantized layers. kAddNorm (o_proj, down: the layer before a norm): the output plus the residual is the new
// residual stream h (written to `out`), h * the norm's weight is written to `normed`, and every block writes the
// sum of squares of its outputs of h per row into its slot of `partials` [rows, slots] (the slots past the grid get
// zeros: a fixed shape, a fixed summation order, no atomics). kScaleNorm (q/k/v, gate/up, lm_head: the layer after
// it, fed with `normed`): each row's sums are multiplied by rsqrt(sum(partials[row]) * inv_k + eps) before the bias,
// which is the norm's scale moved behind the (linear) layer.
#pragma once

#include "common.cuh"

namespace flux {
namespace {

enum Format : int { kInt8 = 0, kInt4 = 1, kInt4Biased = 2 };
enum Epilogue : int { kPlain = 0, kAddNorm = 1, kScaleNorm = 2 };

// What the norm epilogues read and write (unused by kPlain)
template <typename T> struct NormArgs {
  const T* residual = nullptr;     // kAddNorm: [rows, N] (written by an earlier kernel: read after pdl_wait)
  int64_t residual_stride = 0;
  const T* norm_weight = nullptr;  // kAddNorm: [N]
  T* normed = nullptr;             // kAddNorm: [rows, N], h * norm_weight
  int64_t normed_stride = 0;
  float* partials = nullptr;       // [rows, slots]: written by kAddNorm, read by kScaleNorm
  int slots = 0;
  float inv_k = 0.f, eps = 0.f;    // kScaleNorm: 1 / (the norm's width), its epsilon
};

// packed 2 x 16-bit arithmetic on raw 32-bit registers; B is the exponent bias the INT4 magic number encodes
template <typename T> struct Pair {
  using Vec = std::conditional_t<std::is_same_v<T, at::Half>, __half2, __nv_bfloat162>;
  static constexpr bool kHalf = std::is_same_v<T, at::Half>;
  static constexpr uint32_t kInt4Magic = kHalf ? 0x64006400u : 0x43004300u;  // (1024, 1024) / (128, 128)
  static constexpr float kBias = kHalf ? 1024.f : 128.f;
  static __device__ __forceinline__ uint32_t fma(uint32_t a, uint32_t b, uint32_t c) {
    Vec r = __hfma2(*reinterpret_cast<Vec*>(&a), *reinterpret_cast<Vec*>(&b), *reinterpret_cast<Vec*>(&c));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  static __device__ __forceinline__ uint32_t sub(uint32_t a, uint32_t b) {
    Vec r = __hsub2(*reinterpret_cast<Vec*>(&a), *reinterpret_cast<Vec*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
};

// (a & b) | c in one LOP3 (written as C, the compiler spends two: the AND and the OR each take an immediate)
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(b), "r"(c));  // 0xEA = (0xF0 & 0xCC) | 0xAA
  return r;
}

// codes p and p + 4 of an INT4 word as the pair (B + q_p, B + q_{p+4}). The integer pipe is what bounds the INT4
// kernel (one shift and one LOP3 per pair: 7 integer instructions per 8 weights).
template <typename T> __device__ __forceinline__ uint32_t int4_biased(uint32_t word, int p) {
  return and_or(word >> (4 * p), 0x000F000Fu, Pair<T>::kInt4Magic);
}

// codes p and p + 4 of an INT4 word, dequantized: (q_p * s + m, q_{p+4} * s + m) with s2 = (s, s), m2 = (m, m)
template <typename T>
__device__ __forceinline__ uint32_t int4_pair(uint32_t word, int p, uint32_t s2, uint32_t m2) {
  return Pair<T>::fma(Pair<T>::sub(int4_biased<T>(word, p), Pair<T>::kInt4Magic), s2, m2);
}

template <typename T> __device__ __forceinline__ float bits_to_float(uint32_t bits);  // a 16-bit value's bits
template <> __device__ __forceinline__ float bits_to_float<at::BFloat16>(uint32_t bits) {
  return __uint_as_float(bits << 16);
}
template <> __device__ __forceinline__ float bits_to_float<at::Half>(uint32_t bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}

// bytes j and j + 1 of an INT8 word (already XORed with 0x80808080, so each byte is q + 128), as the codes q
template <typename T> __device__ __forceinline__ uint32_t int8_pair(uint32_t word, int j);
template <> __device__ __forceinline__ uint32_t int8_pair<at::Half>(uint32_t word, int j) {
  const uint32_t biased = __byte_perm(word, 0x64646464u, j == 0 ? 0x4140 : 0x4342);  // (1024 + u, 1024 + u')
  return Pair<at::Half>::sub(biased, 0x64806480u);                                    // - (1152, 1152)
}
template <> __device__ __forceinline__ uint32_t int8_pair<at::BFloat16>(uint32_t word, int j) {
  const float lo = __uint_as_float(__byte_perm(word, 0x4B000000u, 0x7440 + j)) - 8388736.f;  // 2^23 + u - 2^23 - 128
  const float hi = __uint_as_float(__byte_perm(word, 0x4B000000u, 0x7441 + j)) - 8388736.f;
  __nv_bfloat162 r = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&r);
}

// activations (x_{j}, x_{j+4}) and (x_{j+1}, x_{j+5}) of 8 consecutive ones, matching int4_pair's code order
__device__ __forceinline__ uint32_t interleave_lo(uint32_t a, uint32_t b) { return __byte_perm(a, b, 0x5410); }
__device__ __forceinline__ uint32_t interleave_hi(uint32_t a, uint32_t b) { return __byte_perm(a, b, 0x7632); }

__device__ __forceinline__ uint4 load_x(const uint4* p, bool valid) {
  return valid ? load_activation(p) : make_uint4(0, 0, 0, 0);
}

template <int F> constexpr int kFeatures = F == kInt4Biased ? 15 : 16;  // output features per 16-row tile

// Gated layers (G): the weight holds [gate; up] (n_out rows each) and the output is act(gate) * up, n_out wide.
// Tile row g (< 8) carries gate feature j and row g + 8 the matching up feature, so one lane ends up with both
// halves of its outputs and the epilogue needs no exchange: 8 outputs per tile (7 for kInt4Biased, whose row 15
// carries sum(x)).
template <int F, bool G> constexpr int kOutputs = G ? (F == kInt4Biased ? 7 : 8) : kFeatures<F>;

// The weight row that tile row g + 8 h reads, in the tile of outputs from j0; -1 for a row without one.
template <int F, bool G> __device__ __forceinline__ int tile_row(int j0, int g, int h, int n_out) {
  if constexpr (G) {
    const int j = j0 + g;
    return g < kOutputs<F, G> && j < n_out ? j + h * n_out : -1;
  }
  const int r = g + 8 * h, j = j0 + r;
  return r < kFeatures<F> && j < n_out ? j : -1;
}

// One lane's share of one 4-slice step: its two feature rows' 16-byte slices per row tile (code), their group's
// scale and min (INT4, raw 16-bit values; `s2`/`m2` hold each twice), against the activations of the same K
// positions (read here, from L1/L2).
template <typename T, int F, int MT, int RT>
__device__ __forceinline__ void mma_step(float (&acc)[RT][MT][4], const uint4 (&code)[RT][2],
                                         const uint32_t (&s2)[RT][2], const uint32_t (&m2)[RT][2],
                                         const T* __restrict__ x, int64_t x_stride, int m_rows, int g, int t, int s,
                                         bool valid) {
  constexpr int kCodes = F == kInt8 ? 16 : 32;
  const int64_t k0 = static_cast<int64_t>(s) * kCodes;
  if constexpr (F == kInt8) {
    uint4 xv[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int m = 8 * mt + g;
      const uint4* xp = reinterpret_cast<const uint4*>(x + m * x_stride + k0);
      xv[mt][0] = load_x(xp, valid && m < m_rows);
      xv[mt][1] = load_x(xp + 1, valid && m < m_rows);
    }
#pragma unroll
    for (int word = 0; word < 4; ++word) {  // codes 4 word .. 4 word + 3: one MMA
#pragma unroll
      for (int rt = 0; rt < RT; ++rt) {
        const uint32_t lo = reinterpret_cast<const uint32_t*>(&code[rt][0])[word] ^ 0x80808080u;
        const uint32_t hi = reinterpret_cast<const uint32_t*>(&code[rt][1])[word] ^ 0x80808080u;
        const uint32_t a[4] = {int8_pair<T>(lo, 0), int8_pair<T>(hi, 0), int8_pair<T>(lo, 2), int8_pair<T>(hi, 2)};
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const uint32_t* r = reinterpret_cast<const uint32_t*>(&xv[mt][0]);  // 8 registers over both loads
          mma<T>(acc[rt][mt], a, r[2 * word], r[2 * word + 1]);
        }
      }
    }
    return;
  }
  float step[RT][MT][4];  // kInt4Biased: this step's sums of biased codes x activations
  float (&sums)[RT][MT][4] = F == kInt4Biased ? step : acc;
  if constexpr (F == kInt4Biased) {
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int c = 0; c < 4; ++c) step[rt][mt][c] = 0.f;
  }
#pragma unroll
  for (int word = 0; word < 4; ++word) {
    uint4 xv[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int m = 8 * mt + g;
      xv[mt] = load_x(reinterpret_cast<const uint4*>(x + m * x_stride + k0) + word, valid && m < m_rows);
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {  // codes (2h, 2h+4) and (2h+1, 2h+5) of the word
      uint32_t b[MT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const uint32_t* r = reinterpret_cast<const uint32_t*>(&xv[mt]);
        b[mt][0] = interleave_lo(r[half], r[half + 2]);
        b[mt][1] = interleave_hi(r[half], r[half + 2]);
      }
#pragma unroll
      for (int rt = 0; rt < RT; ++rt) {
        const uint32_t lo = reinterpret_cast<const uint32_t*>(&code[rt][0])[word];
        const uint32_t hi = reinterpret_cast<const uint32_t*>(&code[rt][1])[word];
        uint32_t a[4];
        if constexpr (F == kInt4Biased) {
          a[0] = int4_biased<T>(lo, 2 * half);
          a[1] = int4_biased<T>(hi, 2 * half);
          a[2] = int4_biased<T>(lo, 2 * half + 1);
          a[3] = int4_biased<T>(hi, 2 * half + 1);
        } else {
          a[0] = int4_pair<T>(lo, 2 * half, s2[rt][0], m2[rt][0]);
          a[1] = int4_pair<T>(hi, 2 * half, s2[rt][1], m2[rt][1]);
          a[2] = int4_pair<T>(lo, 2 * half + 1, s2[rt][0], m2[rt][0]);
          a[3] = int4_pair<T>(hi, 2 * half + 1, s2[rt][1], m2[rt][1]);
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) mma<T>(sums[rt][mt], a, b[mt][0], b[mt][1]);
      }
    }
  }
  if constexpr (F == kInt4Biased) {
    // row 15 of every tile (lane 28 + t, elements 2 and 3) holds B * sum(x) for activation rows 2t and 2t + 1
    constexpr float kInvBias = 1.f / Pair<T>::kBias;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const float x0 = __shfl_sync(0xffffffffu, step[0][mt][2], 28 + t) * kInvBias;
      const float x1 = __shfl_sync(0xffffffffu, step[0][mt][3], 28 + t) * kInvBias;
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float scale = bits_to_float<T>(s2[rt][h] & 0xFFFFu);
          const float shift = fmaf(-Pair<T>::kBias, scale, bits_to_float<T>(m2[rt][h] & 0xFFFFu));
          acc[rt][mt][2 * h] = fmaf(scale, step[rt][mt][2 * h], fmaf(shift, x0, acc[rt][mt][2 * h]));
          acc[rt][mt][2 * h + 1] = fmaf(scale, step[rt][mt][2 * h + 1], fmaf(shift, x1, acc[rt][mt][2 * h + 1]));
        }
    }
  }
}

// The weight row n and activation row m of epilogue element e (reduce_tile's numbering, below)
template <int F, int MT, bool G>
__device__ __forceinline__ void element_of(int e, int n0, int n_out, int& n, int& m) {
  const int j = e >> 5, l = e & 31, c = j & 3;
  n = tile_row<F, G>(n0 + kOutputs<F, G> * (j / (MT * 4)), l >> 2, c >> 1, n_out);
  m = 8 * ((j >> 2) % MT) + 2 * (l & 3) + (c & 1);
}

// The norm's scale rsqrt(mean of h^2 + eps) of a row whose partial sums of squares add up to `sum`
template <typename T> __device__ __forceinline__ float norm_scale_of(const NormArgs<T>& na, float sum) {
  return rsqrtf(fmaf(sum, na.inv_k, na.eps));
}

// kScaleNorm: the norm's scale of activation row m from the row's partial sums of squares in memory (summed by one
// warp in the same order in every block, so every block scales a row alike)
template <typename T> __device__ __forceinline__ float row_norm_scale(const NormArgs<T>& na, int m, int lane) {
  float sum = 0.f;
  for (int i = lane; i < na.slots; i += 32) sum += load_coherent(na.partials + m * static_cast<int64_t>(na.slots) + i);
  return norm_scale_of(na, warp_sum(sum));
}

// What a norm epilogue reads from earlier kernels, loaded right after pdl_wait so that its latency hides behind the
// weight loads in flight instead of adding to the block's tail. kScaleNorm with at most one row per warp: warp w's
// row scale (pre_a); kAddNorm: the residual and norm weight of the first element this thread writes.
template <typename T, int F, int MT, int RT, bool G, int E>
__device__ __forceinline__ void prefetch_norm(const NormArgs<T>& na, int n0, int m_rows, int n_out, float& pre_a,
                                              float& pre_b) {
  if constexpr (E == kScaleNorm) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (m_rows <= static_cast<int>(blockDim.x >> 5) && warp < m_rows) pre_a = row_norm_scale(na, warp, lane);
  } else if constexpr (E == kAddNorm) {
    int n, m;
    element_of<F, MT, G>(threadIdx.x, n0, n_out, n, m);
    if (threadIdx.x < RT * MT * 4 * 32 && n >= 0 && m < m_rows) {
      pre_a = to_float(na.residual[m * na.residual_stride + n]);
      pre_b = to_float(na.norm_weight[n]);
    }
  }
}

// Sum the warps' partial tiles of the block's outputs (from n0) and write them. Element (rt, mt, c) of lane l is
// tile row g + 8 h (g = l / 4, h = c / 2) of row tile rt (its weight row: tile_row) and activation row
// 8 mt + 2 (l % 4) + c % 2. Gated: the gate half (h = 0) and the up half (h = 1) make act(gate) * up, each
// rounded as the separate layer and act_mul kernel would. E: the norm epilogues (top of this file); `partial` has
// room behind the warps' tiles for 16 RT x 8 floats (kAddNorm: the squares, kScaleNorm: the rows' scales);
// pre_a / pre_b: what prefetch_norm read.
template <typename T, int F, int MT, int RT, bool G, int E>
__device__ __forceinline__ void reduce_tile(const float (&acc)[RT][MT][4], float* partial, T* __restrict__ out,
                                            const uint16_t* __restrict__ scales, const T* __restrict__ bias, int n0,
                                            int m_rows, int n_out, int64_t out_stride, int act,
                                            const NormArgs<T>& na, float pre_a, float pre_b) {
  static_assert(E == kPlain || (F != kInt8 && MT == 1), "norm epilogues: INT4, up to 8 rows");
  static_assert(E != kAddNorm || !G, "a gated layer does not feed a norm");
  constexpr int kAcc = RT * MT * 4;
  const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int c = 0; c < 4; ++c) partial[(warp * kAcc + (rt * MT + mt) * 4 + c) * 32 + lane] = acc[rt][mt][c];
  float* extra = partial + warps * kAcc * 32;  // [8][16 RT] squares, or [8] row scales
  if constexpr (E == kScaleNorm) {  // every block sums the slots in the same order
    if (m_rows <= warps) {
      if (warp < m_rows && lane == 0) extra[warp] = pre_a;
    } else {
      for (int m = warp; m < m_rows; m += warps) {
        const float scale = row_norm_scale(na, m, lane);
        if (lane == 0) extra[m] = scale;
      }
    }
  }
  __syncthreads();
  const auto result = [&](int e, int n, int m) {  // element e summed over the warps, of weight row n, x row m
    float total = 0.f;
    for (int wi = 0; wi < warps; ++wi) total += partial[wi * kAcc * 32 + e];
    if constexpr (F == kInt8) total *= to_float(reinterpret_cast<const T*>(scales)[n]);
    if constexpr (E == kScaleNorm) total *= extra[m];
    if (bias != nullptr) total += to_float(bias[n]);
    return total;
  };
  for (int e = threadIdx.x; e < kAcc * 32; e += blockDim.x) {
    const int j = e >> 5, l = e & 31, c = j & 3;
    if (G && c >= 2) continue;  // the up half, read with its gate
    int n, m;
    element_of<F, MT, G>(e, n0, n_out, n, m);
    float* square = extra + m * 16 * RT + j / (MT * 4) * 16 + (l >> 2) + 8 * (c >> 1);  // kAddNorm: its slot
    if (n < 0 || m >= m_rows) {
      if constexpr (E == kAddNorm) *square = 0.f;
      continue;
    }
    if constexpr (G) {
      const float gate = rnd<T>(result(e, n, m)), up = rnd<T>(result(e + 64, n + n_out, m));  // e + 64: c + 2
      out[m * out_stride + n] = from_float<T>(rnd<T>(activation(gate, act)) * up);
    } else if constexpr (E == kAddNorm) {
      // the layer's output rounded as the separate layer writes it, plus the residual as the add+norm kernel adds
      const bool first = e == static_cast<int>(threadIdx.x);  // prefetched
      const float residual = first ? pre_a : to_float(na.residual[m * na.residual_stride + n]);
      const float weight = first ? pre_b : to_float(na.norm_weight[n]);
      const float h = rnd<T>(rnd<T>(result(e, n, m)) + residual);
      out[m * out_stride + n] = from_float<T>(h);
      na.normed[m * na.normed_stride + n] = from_float<T>(h * weight);
      *square = h * h;
    } else {
      out[m * out_stride + n] = from_float<T>(result(e, n, m));
    }
  }
  if constexpr (E == kAddNorm) {
    __syncthreads();
    for (int m = warp; m < m_rows; m += warps) {
      float sum = 0.f;
#pragma unroll
      for (int f = lane; f < 16 * RT; f += 32) sum += extra[m * 16 * RT + f];
      sum = warp_sum(sum);
      if (lane == 0)
        for (int slot = blockIdx.x; slot < na.slots; slot += gridDim.x)
          na.partials[m * static_cast<int64_t>(na.slots) + slot] = slot == blockIdx.x ? sum : 0.f;
    }
  }
}

// One block per RT row tiles of output features; its warps split K in 4-slice steps, U steps' loads in flight per
// lane before their math. (Issuing the next U steps' loads before this U's math, in a second register buffer,
// measured slower: benchmarks/results/2026-11-26-h100-gemv-quant-mma-sweep.txt; so did keeping the block's next
// rounds of weights on their way into L2 with bulk prefetches, ...-gemv-quant-l2-prefetch-rejected.txt.)
// L: the launch shape the registers are budgeted for. 0: up to 8 warps; 1: up to 8 warps, three blocks per SM
// (at most 85 registers); 2: up to 16 warps.
template <int L> constexpr int kMaxThreads = L == 2 ? 512 : 256;
template <int L> constexpr int kMinBlocks = L == 1 ? 3 : 1;

template <typename T, int F, int MT, int RT, int U, int L, bool G, int E>
__global__ void __launch_bounds__(kMaxThreads<L>, kMinBlocks<L>) quant_mma_kernel(
    T* __restrict__ out, const T* __restrict__ x, const uint4* __restrict__ w, const uint16_t* __restrict__ scales,
    const uint16_t* __restrict__ mins, const T* __restrict__ bias, int m_rows, int n_out, int k, int group,
    int64_t x_stride, int64_t out_stride, int act, bool early, NormArgs<T> na) {
  if (early) pdl_trigger();
  constexpr int kCodes = F == kInt8 ? 16 : 32;  // codes per 16-byte slice
  const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int slices = k / kCodes, steps = (slices + 3) >> 2;
  const int groups = F == kInt8 ? 1 : k / group;
  const int n0 = blockIdx.x * kOutputs<F, G> * RT;
  float acc[RT][MT][4] = {};
  float pre_a = 0.f, pre_b = 0.f;  // the norm epilogues' early reads (prefetch_norm)
  for (int step0 = warp; step0 < steps; step0 += warps * U) {
    uint4 code[U][RT][2];
    uint32_t s2[U][RT][2], m2[U][RT][2];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int s = (step0 + u * warps) * 4 + t;
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int n = tile_row<F, G>(n0 + kOutputs<F, G> * rt, g, h, n_out);
          const bool valid = s < slices && n >= 0;
          code[u][rt][h] = valid ? load_stream(w + static_cast<int64_t>(n) * slices + s) : make_uint4(0, 0, 0, 0);
          if constexpr (F != kInt8) {
            const int64_t at = static_cast<int64_t>(n) * groups + s * kCodes / group;
            const uint32_t sc = valid ? __ldg(scales + at) : 0u, mn = valid ? __ldg(mins + at) : 0u;
            s2[u][rt][h] = sc | (sc << 16);
            m2[u][rt][h] = mn | (mn << 16);
          }
        }
    }
    if (step0 == warp) {  // the first weights are on their way; x comes from the previous kernel
      pdl_wait();
      if constexpr (E != kPlain) prefetch_norm<T, F, MT, RT, G, E>(na, n0, m_rows, n_out, pre_a, pre_b);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int s = (step0 + u * warps) * 4 + t;
      mma_step<T, F, MT, RT>(acc, code[u], s2[u], m2[u], x, x_stride, m_rows, g, t, s, s < slices);
    }
  }
  pdl_wait();  // (a warp without steps)
  if constexpr (E != kPlain)
    if (warp >= steps) prefetch_norm<T, F, MT, RT, G, E>(na, n0, m_rows, n_out, pre_a, pre_b);
  if (!early) pdl_trigger();
  extern __shared__ float partial[];  // [warps][RT * MT * 4][32], then the norm epilogue's 16 RT x 8
  reduce_tile<T, F, MT, RT, G, E>(acc, partial, out, scales, bias, n0, m_rows, n_out, out_stride, act, na, pre_a,
                                  pre_b);
}

template <typename T, int F, int MT, int RT, int L, bool G, int E>
void launch_quant(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
            const c10::optional<torch::Tensor>& mins, const c10::optional<torch::Tensor>& bias, int group,
            int warps, int act, const NormArgs<T>& na, cudaStream_t stream) {
  constexpr int U = L == 1 ? (RT == 1 ? 2 : 1) : 4 / RT;  // 16-byte weight loads in flight per lane: 2 U RT
  const int n = out.size(1), k = x.size(1);
  const int blocks = (n + kOutputs<F, G> * RT - 1) / (kOutputs<F, G> * RT);
  const size_t smem = (static_cast<size_t>(warps) * RT * MT * 4 * 32 + (E == kPlain ? 0 : 16 * RT * 8)) *
                      sizeof(float);
  if (smem > 48 * 1024)  // above the default dynamic shared memory limit (4 row tiles x 32 rows x 8 warps)
    C10_CUDA_CHECK(cudaFuncSetAttribute(quant_mma_kernel<T, F, MT, RT, U, L, G, E>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  flux::launch(quant_mma_kernel<T, F, MT, RT, U, L, G, E>, blocks, warps * 32, smem, stream, out.data_ptr<T>(),
               x.data_ptr<T>(),
               reinterpret_cast<const uint4*>(qweight.data_ptr()), reinterpret_cast<const uint16_t*>(scales.data_ptr()),
               F == kInt8 ? nullptr : reinterpret_cast<const uint16_t*>(mins->data_ptr()),
               bias ? bias->data_ptr<T>() : nullptr, static_cast<int>(x.size(0)), n, k, group, x.stride(0),
               out.stride(0), act, trigger_early(x.size(0)), na);
}


}  // namespace

// What quant_mma launches: the format (kInt8 / kInt4 / kInt4Biased), 8-row activation tiles (1, 2 or 4), row tiles
// per block, warps, launch shape and, for gated layers, the activation.
struct QuantLaunch {
  int format, mt, row_tiles, warps, shape, act;
};

namespace {

// Instantiates the kernel for one launch (G: gated, E: epilogue). quant_linear.cu, quant_linear_gated.cu and
// quant_linear_norm*.cu each compile a share, in parallel (internal linkage: each file has its own copy). `norm`
// points at NormArgs<scalar_t> for the norm epilogues (which exist for INT4 up to 8 rows).
template <bool G, int E = kPlain>
void dispatch_quant_mma(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& qweight,
                        const torch::Tensor& scales, const c10::optional<torch::Tensor>& mins,
                        const c10::optional<torch::Tensor>& bias, int group, const QuantLaunch& p,
                        cudaStream_t stream, const void* norm = nullptr) {
  TORCH_CHECK(E == kPlain || (p.format != kInt8 && p.mt == 1 && norm != nullptr),
              "quant_mma: the norm epilogues are for INT4 up to 8 rows");
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "quant_mma", [&] {
    const NormArgs<scalar_t> na = norm ? *static_cast<const NormArgs<scalar_t>*>(norm) : NormArgs<scalar_t>{};
    auto pick = [&](auto format_c) {
      constexpr int F = decltype(format_c)::value;
      auto go = [&](auto mt_c, auto rt_c) {
        constexpr int MT = decltype(mt_c)::value, RT = decltype(rt_c)::value;
        auto with_shape = [&](auto l_c) {
          if constexpr (E == kPlain || (F != kInt8 && MT == 1))
            launch_quant<scalar_t, F, MT, RT, decltype(l_c)::value, G, E>(out, x, qweight, scales, mins, bias,
                                                                          group, p.warps, p.act, na, stream);
        };
        if constexpr (MT <= 2) {  // launch shapes 1 and 2 exist for up to 16 rows
          if (p.shape == 1) return with_shape(std::integral_constant<int, 1>{});
          if (p.shape == 2) return with_shape(std::integral_constant<int, 2>{});
        }
        with_shape(std::integral_constant<int, 0>{});
      };
      using C1 = std::integral_constant<int, 1>;
      using C2 = std::integral_constant<int, 2>;
      using C4 = std::integral_constant<int, 4>;
      auto with_rt = [&](auto mt_c) {
        if (p.row_tiles == 1) go(mt_c, C1{});
        else if (p.row_tiles == 2) go(mt_c, C2{});
        else go(mt_c, C4{});
      };
      if (p.mt == 1) with_rt(C1{});
      else if constexpr (E == kPlain) {
        if (p.mt == 2) with_rt(C2{});
        else with_rt(C4{});
      }
    };
    if (p.format == kInt8) {
      if constexpr (E == kPlain) pick(std::integral_constant<int, kInt8>{});
    } else if (p.format == kInt4) pick(std::integral_constant<int, kInt4>{});
    else pick(std::integral_constant<int, kInt4Biased>{});
  });
}

}  // namespace

void quant_mma_gated(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& qweight,
                     const torch::Tensor& scales, const c10::optional<torch::Tensor>& mins,
                     const c10::optional<torch::Tensor>& bias, int group, const QuantLaunch& p, cudaStream_t stream);

// quant_mma_gated with the kScaleNorm epilogue (quant_linear_norm_gated.cu); `norm`: NormArgs of x's type
void quant_mma_gated_scale_norm(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& qweight,
                                const torch::Tensor& scales, const c10::optional<torch::Tensor>& mins,
                                const c10::optional<torch::Tensor>& bias, int group, const QuantLaunch& p,
                                cudaStream_t stream, const void* norm);

// The checks of quant_mma's arguments and its launch (quant_linear.cu: the plan from the shape, then the overrides)
QuantLaunch plan_quant_mma(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
                           const c10::optional<torch::Tensor>& mins, int64_t group,
                           const c10::optional<torch::Tensor>& bias, int64_t warps, int64_t row_tiles,
                           int64_t int4_mode, int64_t launch_shape, int64_t activation);

}  // namespace flux
