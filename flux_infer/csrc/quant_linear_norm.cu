// quant_mma with the norm epilogues (quant_mma.cuh, top): the layer before an RMSNorm adds the residual and leaves
// the norm's sums of squares (quant_mma_add_norm), the layer after it applies the norm's scale to its sums
// (quant_mma_scale_norm), so a quantized decode step runs no norm kernel between them. INT4, up to 8 rows (at 16
// rows the fused step measured slower than the one with norm kernels: docs/benchmarks.md).
#include "quant_mma.cuh"

namespace flux {
namespace {

// The plan of quant_mma, except that a single row's add-norm layer (o_proj, down) runs 8-warp blocks of one row
// tile unless told otherwise: without a norm kernel after it, the next layer's blocks (launched at this one's start,
// programmatic dependent launch) must find room on the SMs beside it to stream their first weights, which down's
// 16-warp two-tile blocks (a full register file each) leave none for. H100, same process: 451.9 vs 441.2 tok/s
// (docs/benchmarks.md, tenth session).
QuantLaunch norm_launch(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
                        const c10::optional<torch::Tensor>& mins, int64_t group,
                        const c10::optional<torch::Tensor>& bias, int64_t warps, int64_t row_tiles,
                        int64_t int4_mode, int64_t launch_shape, int64_t activation, bool add_norm) {
  TORCH_CHECK(qweight.scalar_type() == at::kInt && x.dim() == 2 && x.size(0) <= 8,
              "quant_mma norm epilogues: INT4 weights and up to 8 rows of x");
  if (add_norm && x.size(0) == 1 && warps <= 0 && row_tiles <= 0 && launch_shape < 0) {
    warps = 8;
    row_tiles = 1;
    launch_shape = 0;
  }
  return plan_quant_mma(x, qweight, scales, mins, group, bias, warps, row_tiles, int4_mode, launch_shape, activation);
}

}  // namespace

void quant_mma_gated_scale_norm(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& qweight,
                                const torch::Tensor& scales, const c10::optional<torch::Tensor>& mins,
                                const c10::optional<torch::Tensor>& bias, int group, const QuantLaunch& p,
                                cudaStream_t stream, const void* norm);

}  // namespace flux

// (normed, h, partials) of a layer followed by a residual add and an RMSNorm: h = residual + x @ W.T (+ bias), each
// rounded as the layer and the add write them; normed = h * norm_weight; partials [rows, slots] float32, whose rows
// sum to sum(h^2) (slots >= ceil(N / 15): one per block, zeros after).
std::vector<torch::Tensor> quant_mma_add_norm(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                                              torch::Tensor mins, int64_t group, c10::optional<torch::Tensor> bias,
                                              torch::Tensor residual, torch::Tensor norm_weight, int64_t slots,
                                              int64_t warps, int64_t row_tiles, int64_t int4_mode,
                                              int64_t launch_shape) {
  const flux::QuantLaunch launch =
      flux::norm_launch(x, qweight, scales, mins, group, bias, warps, row_tiles, int4_mode, launch_shape, -1, true);
  const int64_t rows = x.size(0), n = qweight.size(0);
  TORCH_CHECK(residual.dim() == 2 && residual.size(0) == rows && residual.size(1) == n && residual.stride(1) == 1 &&
                  residual.scalar_type() == x.scalar_type() && residual.is_cuda(),
              "quant_mma_add_norm: residual must be [rows, N] in x's dtype with a contiguous last dim");
  TORCH_CHECK(norm_weight.is_contiguous() && norm_weight.numel() == n && norm_weight.scalar_type() == x.scalar_type(),
              "quant_mma_add_norm: norm_weight must be [N] in x's dtype");
  TORCH_CHECK(slots >= (n + 14) / 15, "quant_mma_add_norm: slots must be at least ceil(N / 15)");
  const c10::cuda::CUDAGuard guard(x.device());
  auto h = torch::empty({rows, n}, x.options());
  auto normed = torch::empty({rows, n}, x.options());
  auto partials = torch::empty({rows, slots}, x.options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "quant_mma_add_norm", [&] {
    flux::NormArgs<scalar_t> na;
    na.residual = residual.data_ptr<scalar_t>();
    na.residual_stride = residual.stride(0);
    na.norm_weight = norm_weight.data_ptr<scalar_t>();
    na.normed = normed.data_ptr<scalar_t>();
    na.normed_stride = normed.stride(0);
    na.partials = partials.data_ptr<float>();
    na.slots = static_cast<int>(slots);
    flux::dispatch_quant_mma<false, flux::kAddNorm>(h, x, qweight, scales, mins, bias, static_cast<int>(group),
                                                    launch, stream, &na);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {normed, h, partials};
}

// x @ W.T scaled per row by rsqrt(sum(partials[row]) / K + eps) (then + bias): the layer after an RMSNorm whose
// weight x already carries (quant_mma_add_norm's normed). activation >= 0: gated, as quant_mma.
torch::Tensor quant_mma_scale_norm(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor mins,
                                   int64_t group, c10::optional<torch::Tensor> bias, torch::Tensor partials,
                                   double eps, int64_t warps, int64_t row_tiles, int64_t int4_mode,
                                   int64_t launch_shape, int64_t activation) {
  const flux::QuantLaunch launch =
      flux::norm_launch(x, qweight, scales, mins, group, bias, warps, row_tiles, int4_mode, launch_shape, activation,
                        false);
  const int64_t rows = x.size(0), n = qweight.size(0);
  TORCH_CHECK(partials.dim() == 2 && partials.size(0) == rows && partials.is_contiguous() &&
                  partials.scalar_type() == at::kFloat && partials.is_cuda(),
              "quant_mma_scale_norm: partials must be contiguous float32 [rows, slots]");
  const bool gated = activation >= 0;
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = torch::empty({rows, gated ? n / 2 : n}, x.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "quant_mma_scale_norm", [&] {
    flux::NormArgs<scalar_t> na;
    na.partials = partials.data_ptr<float>();
    na.slots = static_cast<int>(partials.size(1));
    na.inv_k = 1.f / static_cast<float>(x.size(1));
    na.eps = static_cast<float>(eps);
    if (gated)
      flux::quant_mma_gated_scale_norm(out, x, qweight, scales, mins, bias, static_cast<int>(group), launch, stream,
                                       &na);
    else
      flux::dispatch_quant_mma<false, flux::kScaleNorm>(out, x, qweight, scales, mins, bias, static_cast<int>(group),
                                                        launch, stream, &na);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
