// quant_mma's fused q/k/v layers with rotary embedding and the KV-cache write in the epilogue, compiled apart from
// the plain and gated ones: the kernel's instantiations build in parallel.
#include "quant_mma.cuh"

namespace flux {

void quant_mma_rotary(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& qweight,
                      const torch::Tensor& scales, const c10::optional<torch::Tensor>& mins,
                      const c10::optional<torch::Tensor>& bias, int group, const QuantLaunch& p, const RopeArgs& rope,
                      cudaStream_t stream) {
  dispatch_quant_mma<kRotaryOut>(out, x, qweight, scales, mins, bias, group, p, rope, stream);
}

}  // namespace flux
