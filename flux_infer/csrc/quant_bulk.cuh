// Weight-only INT4 linear layers for 1-8 rows of activations with the weights streamed through shared memory by
// the Hopper bulk-copy engine (launch shape 3).
//
// quant_mma_kernel (quant_mma.cuh) has each lane load its own weights into registers, so a warp waits out the
// memory latency before each round of math and the loads in flight are bounded by the registers the math leaves.
// Here one producer lane per block keeps `stages` stages of weights in flight with the tensor memory accelerator
// (cp.async.bulk.tensor: one copy per 16-row box of codes, scales or mins and stage, completion counted in bytes
// on an mbarrier; no registers held, a few instructions per 16 KB), while the consumer warps run the same math
// (mma_step) on the stage that arrived and release it. (One 1-D bulk copy per row, scales and mins in 16-byte
// copies, measured 1.6-2.6x slower than the register-fed kernel: the copy engine, not DRAM, was the limit.) Blocks
// are persistent: a block walks tiles of output features (gridDim apart) and its producer runs ahead across tile
// boundaries, so the pipeline fills once per launch instead of once per tile.
//
// A stage is 8 four-slice steps of every row of the tile: 1,024 INT4 codes (512 bytes) per row, and their groups'
// scales and mins (1,024 / group values each; groups of 32, 64 or 128, so K must be a multiple of 1,024), in boxes
// of 16 rows (a row tile; gated layers: its 8 gate and 8 up rows, two boxes). Rows sit 512 bytes apart in shared
// memory as the copy engine writes them (the 16-byte loads of tile rows g and g + 1 share banks: two-way
// conflicts on a small part of the loop). Rows past the layer's end arrive as zeros and rows of a box that belong
// to another tile are masked like the register-fed kernel's. Consumer warp c takes steps c, c + consumers, ... of
// every stage, the same K split for the plain and the gated layer (whose sums are then bit for bit the same).
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>

#include <map>
#include <mutex>
#include <tuple>

#include "quant_mma.cuh"

namespace flux {

constexpr int kBulkStageSteps = 8;                      // 4-slice steps per row and stage
constexpr int kBulkStageCodes = kBulkStageSteps * 128;  // INT4 codes per row and stage
constexpr int kBulkRowBytes = kBulkStageCodes / 2;
constexpr int kBulkMaxConsumers = 8;                // they split a stage's 8 steps

// Shared-memory layout of a block: per stage the rows' codes, scales and mins; then the full / empty barriers of
// every stage and two buffers of the consumers' partial tiles (tiles alternate between them).
struct BulkLayout {
  int codes, scales, mins, barriers, partial, bytes;
  __host__ __device__ BulkLayout(int rows, int group, int stages, int consumers, int acc_floats) {
    const int params = rows * (kBulkStageCodes / group) * 2;  // bytes of scales (or mins) per stage
    codes = 0;
    scales = stages * rows * kBulkRowBytes;
    mins = scales + stages * params;
    barriers = mins + stages * params;
    partial = barriers + 2 * stages * 8;
    bytes = partial + 2 * consumers * acc_floats * 32 * 4;
  }
};

namespace {

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void barrier_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared.b64 [%0], %1;" ::"r"(shared_address(bar)), "r"(count) : "memory");
}
// one arrival that also announces `bytes` of copies completing on this phase
__device__ __forceinline__ void barrier_expect(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared.b64 _, [%0], %1;" ::"r"(shared_address(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void barrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared.b64 _, [%0];" ::"r"(shared_address(bar)) : "memory");
}
__device__ __forceinline__ void barrier_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done)
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
        : "=r"(done)
        : "r"(shared_address(bar)), "r"(parity)
        : "memory");
}
// the box of a 2-D tensor map at (column c0, row c1) into shared memory, counted on `bar`
__device__ __forceinline__ void tensor_copy(void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::
          "r"(shared_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(shared_address(bar))
      : "memory");
}
#endif

// the consumer warps' own barrier (named barrier 1; the producer never joins it)
__device__ __forceinline__ void consumers_sync(int consumers) {
  asm volatile("bar.sync 1, %0;" ::"r"(consumers * 32) : "memory");
}

template <typename T, int F, int RT, bool G>
__global__ void __launch_bounds__((kBulkMaxConsumers + 1) * 32, 1) quant_bulk_kernel(
    T* __restrict__ out, const T* __restrict__ x, const __grid_constant__ CUtensorMap codes_map,
    const __grid_constant__ CUtensorMap scales_map, const __grid_constant__ CUtensorMap mins_map,
    const T* __restrict__ bias, int m_rows, int n_out, int k, int group, int64_t x_stride, int64_t out_stride,
    int act, bool early, int stages) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  static_assert(F != kInt8, "INT4 only");
  if (early) pdl_trigger();
  constexpr int kRows = 16 * RT, kTileOutputs = kOutputs<F, G> * RT;
  extern __shared__ __align__(128) unsigned char smem[];
  const int consumers = (blockDim.x >> 5) - 1, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const BulkLayout layout(kRows, group, stages, consumers, RT * 4);
  unsigned char* codes = smem + layout.codes;
  uint16_t* stage_scales = reinterpret_cast<uint16_t*>(smem + layout.scales);
  uint16_t* stage_mins = reinterpret_cast<uint16_t*>(smem + layout.mins);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + layout.barriers);
  uint64_t* empty = full + stages;
  const int params = kBulkStageCodes / group;  // scales (and mins) per row and stage
  const int tiles = (n_out + kTileOutputs - 1) / kTileOutputs, tile_stages = k / kBulkStageCodes;
  if (threadIdx.x == 0) {
    for (const CUtensorMap* map : {&codes_map, &scales_map, &mins_map})
      asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
    for (int b = 0; b < stages; ++b) {
      barrier_init(full + b, 1);
      barrier_init(empty + b, consumers);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp == consumers) {  // the producer (weights are immutable: no pdl_wait first)
    if (lane == 0) {
      constexpr int kBoxes = G ? 2 : 1, kBoxRows = 16 / kBoxes;  // per row tile
      const uint32_t bytes = kRows * (kBulkRowBytes + 4 * params);  // whole boxes, zeros past the end included
      int j = 0;  // stages issued by this block
      for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        for (int st = 0; st < tile_stages; ++st, ++j) {
          const int b = j % stages;
          if (j >= stages) barrier_wait(empty + b, ((j / stages) - 1) & 1);
          barrier_expect(full + b, bytes);
#pragma unroll
          for (int rt = 0; rt < RT; ++rt)
#pragma unroll
            for (int box = 0; box < kBoxes; ++box) {
              // the box's first weight row: the tile's first (plain layers) or its gate / up halves' (gated)
              const int row = tile * kTileOutputs + kOutputs<F, G> * rt + box * n_out;
              const int slot = b * kRows + rt * 16 + box * kBoxRows;
              tensor_copy(codes + slot * kBulkRowBytes, &codes_map, st * kBulkRowBytes / 4, row, full + b);
              tensor_copy(stage_scales + slot * params, &scales_map, st * params, row, full + b);
              tensor_copy(stage_mins + slot * params, &mins_map, st * params, row, full + b);
            }
        }
      }
    }
  } else {  // a consumer
    const int g = lane >> 2, t = lane & 3;
    float* partial = reinterpret_cast<float*>(smem + layout.partial);
    int j = 0, parity = 0;  // stages consumed; which partial buffer the next tile uses
    bool waited = false;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x, parity ^= 1) {
      const int n0 = tile * kTileOutputs;
      bool valid[RT][2];
#pragma unroll
      for (int rt = 0; rt < RT; ++rt)
#pragma unroll
        for (int h = 0; h < 2; ++h) valid[rt][h] = tile_row<F, G>(n0 + kOutputs<F, G> * rt, g, h, n_out) >= 0;
      float acc[RT][1][4] = {};
      for (int st = 0; st < tile_stages; ++st, ++j) {
        const int b = j % stages;
        barrier_wait(full + b, (j / stages) & 1);
        for (int s = warp; s < kBulkStageSteps; s += consumers) {
          uint4 code[RT][2];
          uint32_t s2[RT][2], m2[RT][2];
          const int at = (s * 4 + t) * 32 / group;  // this lane's group within the stage
#pragma unroll
          for (int rt = 0; rt < RT; ++rt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int slot = b * kRows + rt * 16 + h * 8 + g;
              code[rt][h] = valid[rt][h]
                                ? *reinterpret_cast<const uint4*>(codes + slot * kBulkRowBytes + s * 64 + t * 16)
                                : make_uint4(0, 0, 0, 0);
              const uint32_t sc = valid[rt][h] ? stage_scales[slot * params + at] : 0u;
              const uint32_t mn = valid[rt][h] ? stage_mins[slot * params + at] : 0u;
              s2[rt][h] = sc | (sc << 16);
              m2[rt][h] = mn | (mn << 16);
            }
          if (!waited) {  // x comes from the previous kernel
            pdl_wait();
            waited = true;
          }
          mma_step<T, F, 1, RT>(acc, code, s2, m2, x, x_stride, m_rows, g, t,
                                st * kBulkStageSteps * 4 + s * 4 + t, true);
        }
        __syncwarp();
        if (lane == 0) barrier_arrive(empty + b);
      }
      pdl_wait();  // (a consumer without steps)
      if (!early) pdl_trigger();
      reduce_tile<T, F, 1, RT, G>(acc, partial + parity * consumers * RT * 4 * 32, out, nullptr, bias, n0, m_rows,
                                  n_out, out_stride, act, consumers, [consumers] { consumers_sync(consumers); });
    }
  }
  pdl_wait();  // every thread ends after the previous kernel has (completion stays transitive)
#endif
}

// How many blocks of a launch are resident on the whole GPU at once (cached per kernel, device, block size and
// shared memory).
template <typename Kernel> int resident_blocks(Kernel kernel, int threads, size_t smem) {
  static std::mutex lock;
  static std::map<std::tuple<const void*, int, int, size_t>, int> cache;
  const std::lock_guard<std::mutex> guard(lock);
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), static_cast<int>(c10::cuda::current_device()),
                                   threads, smem);
  auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  int optin = 0, sms = 0, device = c10::cuda::current_device();
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  TORCH_CHECK(smem <= static_cast<size_t>(optin), "quant_mma: launch shape 3 needs ", smem,
              " bytes of shared memory per block, the device allows ", optin, "; use fewer stages");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem));
  return cache[key] = sms * std::max(blocks, 1);
}

}  // namespace

// Stages of weights in flight per block for launch shape 3 (0: as many as 64 KB of shared memory holds, 2 to 8:
// 3 for two row tiles in groups of 128, which measured fastest with 8 consumers); a tuning hook for benchmarks
// (set_quant_bulk_stages).
inline int& bulk_stages() {
  static int stages = 0;
  return stages;
}

inline int bulk_stage_count(int row_tiles, int group) {
  if (bulk_stages() > 0) return bulk_stages();
  const int stage_bytes = 16 * row_tiles * (kBulkRowBytes + 4 * (kBulkStageCodes / group));
  return std::min(8, std::max(2, 64 * 1024 / stage_bytes));
}

namespace {

// A 2-D tensor map over a [rows, cols] row-major tensor of `dtype` with boxes of box_rows x box_cols (cached: a
// CUDA graph replays the launch with the map it was captured with; eager calls reuse the encoding).
inline const CUtensorMap& tensor_map(const torch::Tensor& t, CUtensorMapDataType dtype, int element_bytes,
                                     int box_cols, int box_rows) {
  static std::mutex lock;
  static std::map<std::tuple<const void*, int64_t, int64_t, int, int>, CUtensorMap> cache;
  static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
  const int64_t rows = t.size(0), cols = t.numel() / rows;
  const std::lock_guard<std::mutex> guard(lock);
  const auto key = std::make_tuple(t.data_ptr(), rows, cols, box_cols, box_rows);
  auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  if (encode == nullptr) {
    cudaDriverEntryPointQueryResult status;
#if CUDART_VERSION >= 12050
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", reinterpret_cast<void**>(&encode),
                                                    12000, cudaEnableDefault, &status));
#else
    C10_CUDA_CHECK(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", reinterpret_cast<void**>(&encode),
                                           cudaEnableDefault, &status));
#endif
    TORCH_CHECK(status == cudaDriverEntryPointSuccess && encode != nullptr,
                "quant_mma: the driver has no cuTensorMapEncodeTiled (launch shape 3); use launch shape 0-2");
  }
  if (cache.size() >= 4096) cache.clear();  // weights freed and reallocated: stale entries
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols) * element_bytes};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_cols), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t unit[2] = {1, 1};
  const CUresult result = encode(&map, dtype, 2, t.data_ptr(), dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                 CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                 CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(result == CUDA_SUCCESS, "quant_mma: cuTensorMapEncodeTiled failed (", static_cast<int>(result), ")");
  return cache[key] = map;
}

template <typename T, int F, int RT, bool G>
void launch_bulk(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& qweight,
                 const torch::Tensor& scales, const c10::optional<torch::Tensor>& mins,
                 const c10::optional<torch::Tensor>& bias, int group, int consumers, int act, cudaStream_t stream) {
  const int n = out.size(1), k = x.size(1);
  const int tiles = (n + kOutputs<F, G> * RT - 1) / (kOutputs<F, G> * RT);
  const int stages = bulk_stage_count(RT, group), threads = (consumers + 1) * 32;
  const size_t smem = BulkLayout(16 * RT, group, stages, consumers, RT * 4).bytes;
  const int box_rows = G ? 8 : 16, params = kBulkStageCodes / group;
  const CUtensorMap codes = tensor_map(qweight, CU_TENSOR_MAP_DATA_TYPE_INT32, 4, kBulkRowBytes / 4, box_rows);
  const CUtensorMap scale_map = tensor_map(scales, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, params, box_rows);
  const CUtensorMap min_map = tensor_map(*mins, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, params, box_rows);
  auto kernel = quant_bulk_kernel<T, F, RT, G>;
  const int blocks = std::min(tiles, resident_blocks(kernel, threads, smem));
  flux::launch(kernel, blocks, threads, smem, stream, out.data_ptr<T>(), x.data_ptr<T>(), codes, scale_map, min_map,
               bias ? bias->data_ptr<T>() : nullptr, static_cast<int>(x.size(0)), n, k, group, x.stride(0),
               out.stride(0), act, trigger_early(x.size(0)), stages);
}

}  // namespace
}  // namespace flux
