// quant_mma's gated layers with the kScaleNorm epilogue (the gate/up layer after an RMSNorm), compiled apart so the
// instantiations build in parallel.
#include "quant_mma.cuh"

namespace flux {

void quant_mma_gated_scale_norm(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& qweight,
                                const torch::Tensor& scales, const c10::optional<torch::Tensor>& mins,
                                const c10::optional<torch::Tensor>& bias, int group, const QuantLaunch& p,
                                cudaStream_t stream, const void* norm) {
  dispatch_quant_mma<true, kScaleNorm>(out, x, qweight, scales, mins, bias, group, p, stream, norm);
}

}  // namespace flux
