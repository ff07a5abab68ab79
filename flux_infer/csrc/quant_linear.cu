// quant_mma: the weight-only quantized linear for 1-32 rows (the kernels: quant_mma.cuh), its launch plans
// and its binding.
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
// 2026-11-26-h100-gemv-quant-sweep-shapes.txt for 1-16 rows, ...-sweep-rt4.txt for 17-32). Up to 16 rows the
// kernels are latency bound (two to four warps per scheduler, each waiting on its own dependent chain), so layers
// deeper than wide (q/o, down: few blocks) take 16 warps per block, and wider ones fewer registers for more blocks
// per SM (launch shape 1) or, for outputs of 14336 and more above 8 rows, 16-warp-capable blocks of 4 row tiles
// (every block re-reads all of x, so wider blocks pay off as rows grow). Above 16 rows: 4 row tiles for layers
// wider than deep, else 2 (INT4) or 1 (INT8); 4 warps for outputs of 14336 and wider.
inline Plan choose_plan(bool int4, bool biased_ok, int rows, int n, int k) {
  const bool wide = n > k, big = n >= 14336;
  if (rows <= 16) {
    if (!wide) return int4 || rows > 8 ? Plan{false, 2, 16, 2} : Plan{false, 1, 8, 0};
    if (!int4) return {false, 1, 8, 1};
    if (rows <= 8) return biased_ok ? Plan{true, 2, 8, 1} : Plan{false, 2, big ? 4 : 8, 0};
    return big ? Plan{false, 4, 8, 2} : Plan{false, 2, 8, 1};
  }
  return {false, wide ? 4 : int4 ? 2 : 1, big ? 4 : 8, 0};
}

}  // namespace
}  // namespace flux


// weight-only quantized linear for 1..32 rows of x: INT8 (qweight int8 [N, K], scale [N]) or INT4 (qweight int32
// [N, K / 8], scales/mins [N, K / group]). warps (the K split inside a block), row_tiles (16-row tiles per block)
// and int4_mode (1 = biased codes, 2 = per-weight scales): 0 = chosen from the shape; launch_shape (0, 1, 2: the
// kernel's register budget, see quant_mma_kernel): -1 = chosen. activation >= 0: a gated layer, qweight holds
// [gate; up] and the result is act(gate) * up (0 = silu, 1 = gelu_tanh), half as wide; the plan is the one of the
// whole [gate; up] layer, so each half sums exactly as it would alone.
torch::Tensor quant_mma(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, c10::optional<torch::Tensor> mins,
                        int64_t group, c10::optional<torch::Tensor> bias, int64_t warps, int64_t row_tiles,
                        int64_t int4_mode, int64_t launch_shape, int64_t activation) {
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
  TORCH_CHECK(int4_mode >= 0 && int4_mode <= 2, "quant_mma: int4_mode 0 (choose), 1 (biased) or 2 (per weight)");
  const bool gated = activation >= 0;
  TORCH_CHECK(activation >= -1 && activation <= 1 && (!gated || n % 2 == 0),
              "quant_mma: activation -1 (none), 0 (silu) or 1 (gelu_tanh); a gated layer has an even N");
  const bool biased_ok = int4 && group % 128 == 0;
  flux::Plan plan =
      flux::choose_plan(int4, biased_ok, static_cast<int>(rows), static_cast<int>(n), static_cast<int>(k));
  if (int4_mode > 0) plan.biased = int4_mode == 1 && biased_ok;
  if (row_tiles > 0) plan.row_tiles = static_cast<int>(row_tiles);
  if (warps > 0) plan.warps = static_cast<int>(warps);
  if (launch_shape >= 0) plan.shape = static_cast<int>(launch_shape);
  // an override of one of warps / launch shape keeps the other consistent: more than 8 warps need shape 2, and a
  // chosen warp count is capped to what an explicit shape allows
  if (launch_shape < 0 && plan.warps > 8) plan.shape = 2;
  if (warps <= 0 && plan.shape != 2) plan.warps = std::min(plan.warps, 8);
  const int format = !int4 ? flux::kInt8 : plan.biased ? flux::kInt4Biased : flux::kInt4;
  const int rt = plan.row_tiles, w = plan.warps, shape = plan.shape;
  TORCH_CHECK(shape >= 0 && shape <= 2 && (shape == 0 || rows <= 16),
              "quant_mma: launch shape 0, 1 or 2 (<= 16 rows)");
  TORCH_CHECK(w >= 1 && w <= (shape == 2 ? 16 : 8) && (rt == 1 || rt == 2 || rt == 4),
              "quant_mma: 1..8 warps (16 with launch shape 2), 1, 2 or 4 row tiles");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = torch::empty({rows, gated ? n / 2 : n}, x.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const flux::QuantLaunch launch{format, rows <= 8 ? 1 : rows <= 16 ? 2 : 4, rt, w, shape,
                                 static_cast<int>(activation)};
  if (gated) flux::quant_mma_gated(out, x, qweight, scales, mins, bias, static_cast<int>(group), launch, stream);
  else flux::dispatch_quant_mma<false>(out, x, qweight, scales, mins, bias, static_cast<int>(group), launch, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
