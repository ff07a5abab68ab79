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
// Dequantization, exact and two codes at a time (no int-to-float conversions):
// - INT4 (w = q * scale + min): (word >> 4p) & 0x000F000F | magic is the 16-bit pair (B + q_p, B + q_{p+4})
//   (B = 1024 in fp16, 128 in bf16); subtracting B gives the codes exactly, and one fused multiply-add per pair
//   applies the group's scale and min with a single rounding: bit for bit the reference's dequantized weight.
// - INT8 (w = q * scale[n], scale applied to the sum): byte permutes build fp16 (1024 + u) pairs, or float32
//   2^23 + u for bf16, with u = q + 128; subtracting the offset gives q exactly (every int8 is a bf16/fp16).
// Each warp walks a share of K; the warps of a block sum their partial tiles through shared memory.
#include "common.cuh"

namespace flux {
namespace {

template <typename T> struct Pair;  // packed 2 x 16-bit arithmetic on raw 32-bit registers
template <> struct Pair<at::Half> {
  static constexpr uint32_t kInt4Magic = 0x64006400u;  // (1024, 1024)
  static __device__ __forceinline__ uint32_t fma(uint32_t a, uint32_t b, uint32_t c) {
    __half2 r = __hfma2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b),
                        *reinterpret_cast<__half2*>(&c));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  static __device__ __forceinline__ uint32_t sub(uint32_t a, uint32_t b) {
    __half2 r = __hsub2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
};
template <> struct Pair<at::BFloat16> {
  static constexpr uint32_t kInt4Magic = 0x43004300u;  // (128, 128)
  static __device__ __forceinline__ uint32_t fma(uint32_t a, uint32_t b, uint32_t c) {
    __nv_bfloat162 r = __hfma2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b),
                               *reinterpret_cast<__nv_bfloat162*>(&c));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  static __device__ __forceinline__ uint32_t sub(uint32_t a, uint32_t b) {
    __nv_bfloat162 r = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
};

// d += a (16 x 16, row major) @ b (16 x 8, column major), float32 accumulators
template <typename T> __device__ __forceinline__ void mma(float* d, const uint32_t* a, uint32_t b0, uint32_t b1);
template <> __device__ __forceinline__ void mma<at::BFloat16>(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma<at::Half>(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// codes p and p + 4 of an INT4 word, dequantized: (q_p * s + m, q_{p+4} * s + m) with s2 = (s, s), m2 = (m, m)
template <typename T>
__device__ __forceinline__ uint32_t int4_pair(uint32_t word, int p, uint32_t s2, uint32_t m2) {
  const uint32_t biased = ((word >> (4 * p)) & 0x000F000Fu) | Pair<T>::kInt4Magic;
  return Pair<T>::fma(Pair<T>::sub(biased, Pair<T>::kInt4Magic), s2, m2);
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
  return valid ? __ldg(p) : make_uint4(0, 0, 0, 0);
}

// MT tiles of 8 activation rows, RT tiles of 16 output features per block, U 4-slice steps of loads in flight.
template <typename T, bool kInt4, int MT, int RT, int U>
__global__ void __launch_bounds__(256) quant_mma_kernel(
    T* __restrict__ out, const T* __restrict__ x, const uint4* __restrict__ w, const uint16_t* __restrict__ scales,
    const uint16_t* __restrict__ mins, const T* __restrict__ bias, int m_rows, int n_rows, int k, int group,
    int64_t x_stride, int64_t out_stride) {
  constexpr int kCodes = kInt4 ? 32 : 16;  // codes per 16-byte slice
  constexpr int kAcc = RT * MT * 4;
  const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int slices = k / kCodes, steps = (slices + 3) >> 2;
  const int groups = kInt4 ? k / group : 1;
  const int n0 = blockIdx.x * 16 * RT;

  float acc[RT][MT][4];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[rt][mt][c] = 0.f;

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
          const int n = n0 + 16 * rt + g + 8 * h;
          const bool valid = s < slices && n < n_rows;
          code[u][rt][h] = valid ? load_stream(w + static_cast<int64_t>(n) * slices + s) : make_uint4(0, 0, 0, 0);
          if constexpr (kInt4) {
            const int64_t at = static_cast<int64_t>(n) * groups + s * kCodes / group;
            const uint32_t sc = valid ? __ldg(scales + at) : 0u, mn = valid ? __ldg(mins + at) : 0u;
            s2[u][rt][h] = sc | (sc << 16);
            m2[u][rt][h] = mn | (mn << 16);
          }
        }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int s = (step0 + u * warps) * 4 + t;
      const int64_t k0 = static_cast<int64_t>(s) * kCodes;
      if constexpr (kInt4) {
#pragma unroll
        for (int word = 0; word < 4; ++word) {
          uint4 xv[MT];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            const int m = 8 * mt + g;
            xv[mt] = load_x(reinterpret_cast<const uint4*>(x + m * x_stride + k0) + word, s < slices && m < m_rows);
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
              const uint32_t lo = reinterpret_cast<const uint32_t*>(&code[u][rt][0])[word];
              const uint32_t hi = reinterpret_cast<const uint32_t*>(&code[u][rt][1])[word];
              const uint32_t a[4] = {int4_pair<T>(lo, 2 * half, s2[u][rt][0], m2[u][rt][0]),
                                     int4_pair<T>(hi, 2 * half, s2[u][rt][1], m2[u][rt][1]),
                                     int4_pair<T>(lo, 2 * half + 1, s2[u][rt][0], m2[u][rt][0]),
                                     int4_pair<T>(hi, 2 * half + 1, s2[u][rt][1], m2[u][rt][1])};
#pragma unroll
              for (int mt = 0; mt < MT; ++mt) mma<T>(acc[rt][mt], a, b[mt][0], b[mt][1]);
            }
          }
        }
      } else {
        uint4 xv[MT][2];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const int m = 8 * mt + g;
          const uint4* xp = reinterpret_cast<const uint4*>(x + m * x_stride + k0);
          xv[mt][0] = load_x(xp, s < slices && m < m_rows);
          xv[mt][1] = load_x(xp + 1, s < slices && m < m_rows);
        }
#pragma unroll
        for (int word = 0; word < 4; ++word) {  // codes 4 word .. 4 word + 3: one MMA
#pragma unroll
          for (int rt = 0; rt < RT; ++rt) {
            const uint32_t lo = reinterpret_cast<const uint32_t*>(&code[u][rt][0])[word] ^ 0x80808080u;
            const uint32_t hi = reinterpret_cast<const uint32_t*>(&code[u][rt][1])[word] ^ 0x80808080u;
            const uint32_t a[4] = {int8_pair<T>(lo, 0), int8_pair<T>(hi, 0), int8_pair<T>(lo, 2),
                                   int8_pair<T>(hi, 2)};
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              const uint32_t* r = reinterpret_cast<const uint32_t*>(&xv[mt][0]);  // 8 registers over both loads
              mma<T>(acc[rt][mt], a, r[2 * word], r[2 * word + 1]);
            }
          }
        }
      }
    }
  }

  // sum the warps' partial tiles; element (rt, mt, c) of lane l is feature 16 rt + l / 4 (+ 8 for c >= 2) and
  // activation row 8 mt + 2 (l % 4) + c % 2
  extern __shared__ float partial[];  // [warps][kAcc][32]
#pragma unroll
  for (int rt = 0; rt < RT; ++rt)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int c = 0; c < 4; ++c) partial[(warp * kAcc + (rt * MT + mt) * 4 + c) * 32 + lane] = acc[rt][mt][c];
  __syncthreads();
  for (int e = threadIdx.x; e < kAcc * 32; e += blockDim.x) {
    float total = 0.f;
    for (int wi = 0; wi < warps; ++wi) total += partial[wi * kAcc * 32 + e];
    const int j = e >> 5, l = e & 31, c = j & 3;
    const int n = n0 + 16 * (j / (MT * 4)) + (l >> 2) + (c >= 2 ? 8 : 0);
    const int m = 8 * ((j >> 2) % MT) + 2 * (l & 3) + (c & 1);
    if (n >= n_rows || m >= m_rows) continue;
    if constexpr (!kInt4) total *= to_float(reinterpret_cast<const T*>(scales)[n]);
    if (bias != nullptr) total += to_float(bias[n]);
    out[m * out_stride + n] = from_float<T>(total);
  }
}

template <typename T, bool kInt4, int MT, int RT>
void launch(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
            const c10::optional<torch::Tensor>& mins, const c10::optional<torch::Tensor>& bias, int group,
            int warps, cudaStream_t stream) {
  constexpr int U = RT == 1 ? 4 : 2;
  const int n = qweight.size(0), k = x.size(1);
  const int blocks = (n + 16 * RT - 1) / (16 * RT);
  const size_t smem = static_cast<size_t>(warps) * RT * MT * 4 * 32 * sizeof(float);
  quant_mma_kernel<T, kInt4, MT, RT, U><<<blocks, warps * 32, smem, stream>>>(
      out.data_ptr<T>(), x.data_ptr<T>(), reinterpret_cast<const uint4*>(qweight.data_ptr()),
      reinterpret_cast<const uint16_t*>(scales.data_ptr()),
      kInt4 ? reinterpret_cast<const uint16_t*>(mins->data_ptr()) : nullptr,
      bias ? bias->data_ptr<T>() : nullptr, x.size(0), n, k, group, x.stride(0), out.stride(0));
}

}  // namespace
}  // namespace flux

// weight-only quantized linear for 1..32 rows of x: INT8 (qweight int8 [N, K], scale [N]) or INT4 (qweight int32
// [N, K / 8], scales/mins [N, K / group]). warps (K split inside a block) and row_tiles (16-feature tiles per
// block) 0 = chosen by the number of rows.
torch::Tensor quant_mma(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, c10::optional<torch::Tensor> mins,
                        int64_t group, c10::optional<torch::Tensor> bias, int64_t warps, int64_t row_tiles) {
  using flux::aligned16;
  flux::check_cuda(x, "x");
  const bool int4 = qweight.scalar_type() == at::kInt;
  const int64_t rows = x.size(0), k = x.size(1), n = qweight.size(0);
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && rows >= 1 && rows <= 32 && x.stride(0) % 8 == 0 && aligned16(x),
              "quant_mma: x must be [1..32, K], 16-byte aligned rows with a contiguous last dim");
  TORCH_CHECK(qweight.is_contiguous() && aligned16(qweight) && scales.is_contiguous() &&
                  scales.scalar_type() == x.scalar_type(),
              "quant_mma: contiguous, 16-byte aligned qweight; scales in x's dtype");
  TORCH_CHECK(int4 ? (qweight.size(1) * 8 == k && mins && mins->is_contiguous() && group % 32 == 0 && k % group == 0)
                   : (qweight.scalar_type() == at::kChar && qweight.size(1) == k && k % 16 == 0),
              "quant_mma: unsupported quantized layout");
  TORCH_CHECK(!bias || (bias->is_contiguous() && bias->scalar_type() == x.scalar_type() && bias->numel() == n),
              "quant_mma: bias must be [N] in x's dtype");
  const int w = warps > 0 ? static_cast<int>(warps) : 8;
  const int rt = row_tiles > 0 ? static_cast<int>(row_tiles) : (rows <= 8 ? 1 : 2);
  TORCH_CHECK(w >= 1 && w <= 8 && (rt == 1 || rt == 2), "quant_mma: 1..8 warps, 1 or 2 row tiles");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = torch::empty({rows, n}, x.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int mt = rows <= 8 ? 1 : rows <= 16 ? 2 : 4;
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "quant_mma", [&] {
    auto pick = [&](auto int4_tag) {
      constexpr bool I4 = decltype(int4_tag)::value;
      if (mt == 1 && rt == 1) flux::launch<scalar_t, I4, 1, 1>(out, x, qweight, scales, mins, bias, group, w, stream);
      else if (mt == 1) flux::launch<scalar_t, I4, 1, 2>(out, x, qweight, scales, mins, bias, group, w, stream);
      else if (mt == 2 && rt == 1) flux::launch<scalar_t, I4, 2, 1>(out, x, qweight, scales, mins, bias, group, w, stream);
      else if (mt == 2) flux::launch<scalar_t, I4, 2, 2>(out, x, qweight, scales, mins, bias, group, w, stream);
      else if (rt == 1) flux::launch<scalar_t, I4, 4, 1>(out, x, qweight, scales, mins, bias, group, w, stream);
      else flux::launch<scalar_t, I4, 4, 2>(out, x, qweight, scales, mins, bias, group, w, stream);
    };
    if (int4) pick(std::true_type{});
    else pick(std::false_type{});
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
