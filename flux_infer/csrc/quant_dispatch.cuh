// What quant_mma launches and the dispatch onto the kernel instantiations: quant_mma_kernel (launch shapes 0-2,
// quant_mma.cuh) and quant_bulk_kernel (launch shape 3, quant_bulk.cuh).
#pragma once

#include "quant_bulk.cuh"

namespace flux {

// What quant_mma launches: the format (kInt8 / kInt4 / kInt4Biased), 8-row activation tiles (1, 2 or 4), row tiles
// per block, warps (for launch shape 3: consumer warps), launch shape and, for gated layers, the activation.
struct QuantLaunch {
  int format, mt, row_tiles, warps, shape, act;
};

namespace {

// Instantiates the kernel for one launch (G: gated). quant_linear.cu and quant_linear_gated.cu each compile one
// half, in parallel (internal linkage: each file has its own copy).
template <bool G>
void dispatch_quant_mma(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& qweight,
                        const torch::Tensor& scales, const c10::optional<torch::Tensor>& mins,
                        const c10::optional<torch::Tensor>& bias, int group, const QuantLaunch& p,
                        cudaStream_t stream) {
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "quant_mma", [&] {
    auto pick = [&](auto format_c) {
      constexpr int F = decltype(format_c)::value;
      auto go = [&](auto mt_c, auto rt_c) {
        constexpr int MT = decltype(mt_c)::value, RT = decltype(rt_c)::value;
        auto with_shape = [&](auto l_c) {
          launch_quant<scalar_t, F, MT, RT, decltype(l_c)::value, G>(out, x, qweight, scales, mins, bias, group,
                                                                     p.warps, p.act, stream);
        };
        if constexpr (MT == 1 && F != kInt8 && RT <= 2) {  // launch shape 3: INT4, up to 8 rows (quant_bulk.cuh)
          if (p.shape == 3)
            return launch_bulk<scalar_t, F, RT, G>(out, x, qweight, scales, mins, bias, group, p.warps, p.act, stream);
        }
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
      else if (p.mt == 2) with_rt(C2{});
      else with_rt(C4{});
    };
    if (p.format == kInt8) pick(std::integral_constant<int, kInt8>{});
    else if (p.format == kInt4) pick(std::integral_constant<int, kInt4>{});
    else pick(std::integral_constant<int, kInt4Biased>{});
  });
}

}  // namespace

void quant_mma_gated(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& qweight,
                     const torch::Tensor& scales, const c10::optional<torch::Tensor>& mins,
                     const c10::optional<torch::Tensor>& bias, int group, const QuantLaunch& p, cudaStream_t stream);

}  // namespace flux
