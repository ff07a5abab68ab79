// Helpers shared by the flux_infer CUDA kernels.
#pragma once

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdlib>
#include <type_traits>
#include <utility>

namespace flux {

template <typename T> __device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <typename T> __device__ __forceinline__ T from_float(float v) { return static_cast<T>(v); }
// round to the storage type and back: the value the reference's intermediate tensor would hold
template <typename T> __device__ __forceinline__ float rnd(float v) { return to_float<T>(from_float<T>(v)); }

// the gated MLPs' activations (0 = silu, 1 = tanh-approximated gelu), as transformers computes them in float32
__device__ __forceinline__ float activation(float g, int kind) {
  if (kind == 0) return g / (1.f + expf(-g));
  const float c = 0.7978845608028654f;  // sqrt(2/pi)
  return 0.5f * g * (1.f + tanhf(c * (g + 0.044715f * g * g * g)));
}

// One rotary pair (x1 at feature i, x2 at i + rot / 2) as the reference rotates it: t * cos + rotate_half(t) * sin
// with cos/sin cast to the storage type first and each product and the sum rounded to it. __fmul_rn/__fadd_rn keep
// the compiler from contracting into FMAs the reference does not do.
template <typename T>
__device__ __forceinline__ void rotate_pair(float x1, float x2, float c1, float c2, float s1, float s2, T& y1, T& y2) {
  c1 = rnd<T>(c1), c2 = rnd<T>(c2), s1 = rnd<T>(s1), s2 = rnd<T>(s2);
  y1 = from_float<T>(__fadd_rn(rnd<T>(__fmul_rn(x1, c1)), rnd<T>(__fmul_rn(-x2, s1))));
  y2 = from_float<T>(__fadd_rn(rnd<T>(__fmul_rn(x2, c2)), rnd<T>(__fmul_rn(x1, s2))));
}

// tensor cores: d += a (16 x 16, row major) @ b (16 x 8, column major), float32 accumulators
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

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
  return v;
}

// 16 bytes of weights, read once: streamed past L1 (the L1 keeps the activations every warp re-reads)
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

// 16 bytes the previous kernel wrote (activations): a coherent load, ordered after pdl_wait(). An __ldg of a
// const __restrict__ pointer counts as invariant to the compiler, which may then hoist it above the wait.
__device__ __forceinline__ uint4 load_activation(const void* p) {
  uint4 r;
  asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p) : "memory");
  return r;
}

// 8 bytes the previous kernel wrote, as load_activation
__device__ __forceinline__ uint2 load_activation8(const void* p) {
  uint2 r;
  asm volatile("ld.global.v2.u32 {%0, %1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p) : "memory");
  return r;
}

// a value earlier kernels wrote (ordered after pdl_wait: the compiler may hoist plain loads of const __restrict__
// data above it)
__device__ __forceinline__ int64_t load_coherent(const int64_t* p) {
  int64_t r;
  asm volatile("ld.global.s64 %0, [%1];" : "=l"(r) : "l"(p) : "memory");
  return r;
}
__device__ __forceinline__ int load_coherent(const int* p) {
  int r;
  asm volatile("ld.global.s32 %0, [%1];" : "=r"(r) : "l"(p) : "memory");
  return r;
}
__device__ __forceinline__ float load_coherent(const float* p) {
  float r;
  asm volatile("ld.global.f32 %0, [%1];" : "=f"(r) : "l"(p) : "memory");
  return r;
}

inline void check_cuda(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
}

inline bool aligned16(const torch::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// ---- programmatic dependent launch (Hopper and later) ----------------------------------------------------------
// Every flux kernel is launched with programmatic stream serialization: it may start while the kernel before it
// in the stream is finishing, once all of that kernel's blocks have called pdl_trigger() (or exited). It must call
// pdl_wait() before it reads anything the earlier kernels write (and before it writes anything): pdl_wait()
// returns when the previous kernel has completed and its memory is visible. Reads of immutable data (weights) may
// come first: a linear layer streams its first weights while the norm before it runs. A kernel that some thread
// reaches the end of only after pdl_wait() completes after its predecessor, so completion stays transitive.
// Kernels from elsewhere (Triton, cuBLAS) are launched normally and wait as usual.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Where the linear-layer kernels signal their dependents (pdl_trigger) for up to early_trigger_rows() rows of
// activations (one by default): at their start ("early", the default: the next kernel's blocks launch once every
// block of this one has started, so a linear layer among them streams its first weights during this kernel's tail
// instead of after it) or after their main loop, as they always do for more rows. Measured on H100
// (docs/benchmarks.md): early is faster at batch 1 and slower at batch 16. Run-time switches (set_early_trigger)
// for A/B runs, read when a kernel is launched (or captured into a graph).
inline bool& early_trigger() {
  static bool enabled = true;
  return enabled;
}
inline int64_t& early_trigger_rows() {
  static int64_t rows = 1;
  return rows;
}

// the trigger placement for a launch over `rows` rows of activations (the `early` argument of those kernels)
inline bool trigger_early(int64_t rows) { return early_trigger() && rows <= early_trigger_rows(); }

inline bool& pdl_enabled() {  // FLUX_INFER_DISABLE_PDL=1 turns it off; set_programmatic_launch() at run time
  static bool enabled = std::getenv("FLUX_INFER_DISABLE_PDL") == nullptr;
  return enabled;
}

inline int compute_major(int device) {  // the device's compute capability major (cached; 0 for an unknown index)
  static int major[64] = {};
  if (device < 0 || device >= 64) return 0;
  if (major[device] == 0)
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major[device], cudaDevAttrComputeCapabilityMajor, device));
  return major[device];
}

inline bool pdl_supported(int device) { return compute_major(device) >= 9; }

// A launch with programmatic stream serialization (when enabled); `cluster` > 1 groups that many consecutive
// blocks along z into a thread block cluster.
template <typename... Params, typename... Args>
void launch_clustered(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                      unsigned cluster, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attributes[2];
  unsigned count = 0;
  if (pdl_enabled() && pdl_supported(c10::cuda::current_device())) {
    attributes[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attributes[count++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster > 1) {
    attributes[count].id = cudaLaunchAttributeClusterDimension;
    attributes[count++].val.clusterDim = {1, 1, cluster};
  }
  config.attrs = attributes;
  config.numAttrs = count;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
  launch_clustered(kernel, grid, block, smem, stream, 1, std::forward<Args>(args)...);
}

}  // namespace flux
