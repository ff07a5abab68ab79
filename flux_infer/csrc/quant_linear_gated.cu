// quant_mma's gated layers (act(gate) * up in the epilogue), compiled apart from the plain ones: the two halves of
// the kernel's instantiations build in parallel.
#include "quant_mma.cuh"

namespace flux {

void quant_mma_gated(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& qweight,
                     const torch::Tensor& scales, const c10::optional<torch::Tensor>& mins,
                     const c10::optional<torch::Tensor>& bias, int group, const QuantLaunch& p, cudaStream_t stream) {
  dispatch_quant_mma<true>(out, x, qweight, scales, mins, bias, group, p, stream);
}

}  // namespace flux
