// quant_mma: the weight-only quantized linear for 1-32 rows (the kernels: quant_mma.cuh), its launch plans
// and its binding; dequantize_weight: the dense weight for long prefills (cuBLAS then runs the matmul).
#include "quant_mma.cuh"

namespace flux {
namespace {

// How a layer runs: INT4 as biased codes or with per-weight scales, row tiles per block, warps per block, launch
// shape (L above).
struct Plan {
  bool biased;
  int row_tiles, warps, shape;
};

// Choices measured on H100 (benchmarks/gemv.py --quant --sweep, Llama-3-8B shapes; raw in benchmarks/results/
// 2026-11-26-h100-gemv-quant-sweep-shapes.txt for 1-16 rows, ...-sweep-rt4.txt for 17-32; up to 8 rows, biased
// codes only for outputs of 14336 and more: at 1 row the fused q/k/v layer, 6144 x 4096, took 7.9 us with
// per-weight scales, 2 row tiles and 8 warps against 8.3 us biased in ...-sweep-shapes.txt, and 7.3 us in
// 2026-11-27-h100-gemv-quant-biased16-sweep-rejected.txt, whose per-weight kernel is this one). The fused gate/up
// layer runs gated in decode, where biased codes are the faster form (29.2 vs 32.3 us at 1 row, gemv.py --gated:
// ...-gemv-quant-gated-sweep.txt; its plain form measures the other way round, and per-weight for it and lm_head
// lost end to end, 399.1 vs 416.6 tok/s: docs/benchmarks.md, sixth session). Up to 16 rows the
// kernels are latency bound (two to four warps per scheduler, each waiting on its own dependent chain), so layers
// deeper than wide (q/o, down: few blocks) take 16 warps per block, and wider ones fewer registers for more blocks
// per SM (launch shape 1) or, for outputs of 14336 and more above 8 rows, 16-warp-capable blocks of 4 row tiles
// (every block re-reads all of x, so wider blocks pay off as rows grow). Above 16 rows: 4 row tiles for layers
// wider than deep, else 2 (INT4) or 1 (INT8); 4 warps for outputs of 14336 and wider. A single INT4 row (decode
// of one sequence) runs square layers (q/o) on 8-warp blocks of one row tile, and the wide biased layers (gate/up,
// lm_head) with the 16-warp-capable register budget at 8 warps (two blocks per SM): gemv.py --sweep 4.7 vs 5.0,
// 28.1 vs 31.2 (gated) and 101.2 vs 110.4 us (...-2026-11-27-h100-gemv-quant-cluster-splits*-rejected.txt, the
// split-1 rows), end to end 426.0 vs 422.2 and 424.6 vs 420.2 tok/s in two runs (decode.py --plans,
// ...-decode-greedy-on-device*.json).
inline Plan choose_plan(bool int4, bool biased_ok, int rows, int n, int k) {
  const bool wide = n > k, big = n >= 14336;
  if (rows <= 16) {
    if (!wide) return (int4 && (rows > 1 || k >= 2 * n)) || rows > 8 ? Plan{false, 2, 16, 2} : Plan{false, 1, 8, 0};
    if (!int4) return {false, 1, 8, 1};
    if (rows <= 8) return biased_ok && big ? Plan{true, 2, 8, rows == 1 ? 2 : 1} : Plan{false, 2, big ? 4 : 8, 0};
    return big ? Plan{false, 4, 8, 2} : Plan{false, 2, 8, 1};
  }
  return {false, wide ? 4 : int4 ? 2 : 1, big ? 4 : 8, 0};
}

// Dense weights [N, K] from INT4 codes: one thread per packed word (8 weights, one 16-byte store). q * scale is
// exact in float32 (4-bit code, 16-bit scale), so one fused multiply-add rounds as the reference's q * s + m does.
template <typename T>
__global__ void dequantize_int4_kernel(T* __restrict__ out, const uint32_t* __restrict__ codes,
                                       const T* __restrict__ scales, const T* __restrict__ mins, int64_t words,
                                       int row_words, int groups, int group_words) {
  pdl_wait();  // the output may reuse memory an earlier kernel still reads
  pdl_trigger();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < words;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / row_words;
    const int64_t at = row * groups + (i - row * row_words) / group_words;
    const float s = to_float(scales[at]), m = to_float(mins[at]);
    const uint32_t word = codes[i];
    uint4 v;
    T* o = reinterpret_cast<T*>(&v);
#pragma unroll
    for (int j = 0; j < 8; ++j) o[j] = from_float<T>(fmaf(static_cast<float>((word >> (4 * j)) & 0xFu), s, m));
    reinterpret_cast<uint4*>(out)[i] = v;
  }
}

// Dense weights from INT8 codes and per-row scales: 16 weights per thread; q * scale is exact in float32.
template <typename T>
__global__ void dequantize_int8_kernel(T* __restrict__ out, const int8_t* __restrict__ codes,
                                       const T* __restrict__ scale, int64_t chunks, int row_chunks) {
  pdl_wait();
  pdl_trigger();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < chunks;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float s = to_float(scale[i / row_chunks]);
    const uint4 q = reinterpret_cast<const uint4*>(codes)[i];
    const int8_t* c = reinterpret_cast<const int8_t*>(&q);
    uint4 v[2];
    T* o = reinterpret_cast<T*>(v);
#pragma unroll
    for (int j = 0; j < 16; ++j) o[j] = from_float<T>(static_cast<float>(c[j]) * s);
    reinterpret_cast<uint4*>(out)[2 * i] = v[0];
    reinterpret_cast<uint4*>(out)[2 * i + 1] = v[1];
  }
}

}  // namespace
}  // namespace flux

namespace flux {

QuantLaunch plan_quant_mma(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
                           const c10::optional<torch::Tensor>& mins, int64_t group,
                           const c10::optional<torch::Tensor>& bias, int64_t warps, int64_t row_tiles,
                           int64_t int4_mode, int64_t launch_shape, int64_t activation) {
  check_cuda(x, "x");
  const bool int4 = qweight.scalar_type() == at::kInt;
  const int64_t rows = x.size(0), k = x.size(1), n = qweight.size(0);
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && rows >= 1 && rows <= 32 && x.stride(0) % 8 == 0 && aligned16(x),
              "quant_mma: x must be [1..32, K], 16-byte aligned rows with a contiguous last dim");
  TORCH_CHECK(qweight.is_contiguous() && aligned16(qweight) && scales.is_contiguous() &&
                  scales.scalar_type() == x.scalar_type(),
              "quant_mma: contiguous, 16-byte aligned qweight; scales in x's dtype");
  TORCH_CHECK(int4 ? (qweight.size(1) * 8 == k && mins && mins->is_contiguous() && group > 0 && group % 32 == 0 &&
                      k % group == 0)
                   : (qweight.scalar_type() == at::kChar && qweight.size(1) == k && k % 16 == 0),
              "quant_mma: unsupported quantized layout");
  TORCH_CHECK(!bias || (bias->is_contiguous() && bias->scalar_type() == x.scalar_type() && bias->numel() == n),
              "quant_mma: bias must be [N] in x's dtype");
  TORCH_CHECK(int4_mode >= 0 && int4_mode <= 2, "quant_mma: int4_mode 0 (choose), 1 (biased) or 2 (per weight)");
  const bool gated = activation >= 0;
  TORCH_CHECK(activation >= -1 && activation <= 1 && (!gated || n % 2 == 0),
              "quant_mma: activation -1 (none), 0 (silu) or 1 (gelu_tanh); a gated layer has an even N");
  const bool biased_ok = int4 && group % 128 == 0;
  Plan plan = choose_plan(int4, biased_ok, static_cast<int>(rows), static_cast<int>(n), static_cast<int>(k));
  if (int4_mode > 0) plan.biased = int4_mode == 1 && biased_ok;
  if (row_tiles > 0) plan.row_tiles = static_cast<int>(row_tiles);
  if (warps > 0) plan.warps = static_cast<int>(warps);
  if (launch_shape >= 0) plan.shape = static_cast<int>(launch_shape);
  // an override of one of warps / launch shape keeps the other consistent: more than 8 warps need shape 2, and a
  // chosen warp count is capped to what an explicit shape allows
  if (launch_shape < 0 && plan.warps > 8) plan.shape = 2;
  if (warps <= 0 && plan.shape != 2) plan.warps = std::min(plan.warps, 8);
  const int format = !int4 ? kInt8 : plan.biased ? kInt4Biased : kInt4;
  const int rt = plan.row_tiles, w = plan.warps, shape = plan.shape;
  TORCH_CHECK(shape >= 0 && shape <= 2 && (shape == 0 || rows <= 16),
              "quant_mma: launch shape 0, 1 or 2 (<= 16 rows)");
  TORCH_CHECK(w >= 1 && w <= (shape == 2 ? 16 : 8) && (rt == 1 || rt == 2 || rt == 4),
              "quant_mma: 1..8 warps (16 with launch shape 2), 1, 2 or 4 row tiles");
  return {format, rows <= 8 ? 1 : rows <= 16 ? 2 : 4, rt, w, shape, static_cast<int>(activation)};
}

}  // namespace flux

// weight-only quantized linear for 1..32 rows of x: INT8 (qweight int8 [N, K], scale [N]) or INT4 (qweight int32
// [N, K / 8], scales/mins [N, K / group]). warps (the K split inside a block), row_tiles (16-row tiles per block)
// and int4_mode (1 = biased codes, 2 = per-weight scales): 0 = chosen from the shape; launch_shape (0, 1, 2: the
// kernel's register budget, see quant_mma_kernel): -1 = chosen. activation >= 0: a gated layer, qweight holds
// [gate; up] and the result is act(gate) * up (0 = silu, 1 = gelu_tanh), half as wide; the plan is the one of the
// whole [gate; up] layer, so each half sums exactly as that fused layer's un-gated launch does.
torch::Tensor quant_mma(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, c10::optional<torch::Tensor> mins,
                        int64_t group, c10::optional<torch::Tensor> bias, int64_t warps, int64_t row_tiles,
                        int64_t int4_mode, int64_t launch_shape, int64_t activation) {
  const flux::QuantLaunch launch =
      flux::plan_quant_mma(x, qweight, scales, mins, group, bias, warps, row_tiles, int4_mode, launch_shape, activation);
  const bool gated = activation >= 0;
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = torch::empty({x.size(0), gated ? qweight.size(0) / 2 : qweight.size(0)}, x.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (gated) flux::quant_mma_gated(out, x, qweight, scales, mins, bias, static_cast<int>(group), launch, stream);
  else flux::dispatch_quant_mma<false>(out, x, qweight, scales, mins, bias, static_cast<int>(group), launch, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// The dense weight [N, K] (in the scales' dtype) that INT8 (mins None) or INT4 codes stand for, bit for bit the
// reference's dequantization: past a few hundred rows a matmul on it (cuBLAS) beats dequantizing inside one.
torch::Tensor dequantize_weight(torch::Tensor qweight, torch::Tensor scales, c10::optional<torch::Tensor> mins,
                                int64_t group) {
  flux::check_cuda(qweight, "qweight");
  const bool int4 = qweight.scalar_type() == at::kInt;
  const int64_t n = qweight.size(0), k = int4 ? qweight.size(1) * 8 : qweight.size(1);
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous() && flux::aligned16(qweight) && scales.is_contiguous() &&
                  (scales.scalar_type() == at::kBFloat16 || scales.scalar_type() == at::kHalf),
              "dequantize_weight: contiguous, 16-byte aligned qweight; bf16/fp16 scales");
  TORCH_CHECK(int4 ? (mins && mins->is_contiguous() && mins->scalar_type() == scales.scalar_type() && group > 0 &&
                      group % 8 == 0 && k % group == 0 && scales.numel() == n * (k / group) &&
                      mins->numel() == scales.numel())
                   : (qweight.scalar_type() == at::kChar && k % 16 == 0 && scales.numel() == n),
              "dequantize_weight: unsupported quantized layout");
  const c10::cuda::CUDAGuard guard(qweight.device());
  auto out = torch::empty({n, k}, scales.options());
  if (n == 0 || k == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int threads = 256;
  const int64_t items = int4 ? n * k / 8 : n * k / 16;
  const int64_t blocks = std::min<int64_t>((items + threads - 1) / threads, 65535);
  AT_DISPATCH_REDUCED_FLOATING_TYPES(scales.scalar_type(), "dequantize_weight", [&] {
    if (int4)
      flux::launch(flux::dequantize_int4_kernel<scalar_t>, blocks, threads, 0, stream, out.data_ptr<scalar_t>(),
                   reinterpret_cast<const uint32_t*>(qweight.data_ptr()), scales.data_ptr<scalar_t>(),
                   mins->data_ptr<scalar_t>(), items, static_cast<int>(k / 8), static_cast<int>(k / group),
                   static_cast<int>(group / 8));
    else
      flux::launch(flux::dequantize_int8_kernel<scalar_t>, blocks, threads, 0, stream, out.data_ptr<scalar_t>(),
                   qweight.data_ptr<int8_t>(), scales.data_ptr<scalar_t>(), items, static_cast<int>(k / 16));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
