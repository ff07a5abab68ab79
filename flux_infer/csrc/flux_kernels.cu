// flux_infer CUDA kernels: RMSNorm (+ residual add), gated activations, rotary embedding, single-row GEMV, and the
// Python bindings of every kernel (the quantized linear layers live in quant_linear.cu).
//
// Every kernel reproduces the rounding points of its PyTorch reference (flux_infer/kernels/*.py), which mirror
// transformers: in bf16/fp16 the intermediate results the reference rounds are rounded here too, so outputs
// agree with the reference except for the order of the RMS reduction. Arithmetic is float32.
#include "common.cuh"

using flux::check_cuda;
using flux::from_float;
using flux::rnd;
using flux::to_float;
using flux::warp_sum;

namespace {

constexpr int kMaxThreads = 1024;

__device__ float block_sum(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  v = (threadIdx.x < warps) ? partial[threadIdx.x] : 0.f;
  if (warp == 0) v = warp_sum(v);
  if (threadIdx.x == 0) partial[0] = v;
  __syncthreads();
  const float total = partial[0];
  __syncthreads();
  return total;
}

// One block per row. The row is staged in shared memory as float (the reduction and the scaling both read it).
// With a residual: s = round(residual + x) is written to residual_out and normalized.
template <typename T, bool kResidual>
__global__ void rms_norm_kernel(T* __restrict__ out, T* __restrict__ residual_out, const T* __restrict__ x,
                                const T* __restrict__ residual, const T* __restrict__ weight, int hidden,
                                int64_t x_stride, int64_t res_stride, float eps, float weight_offset) {
  extern __shared__ float row[];
  flux::pdl_wait();
  flux::pdl_trigger();
  const int64_t r = blockIdx.x;
  const T* xr = x + r * x_stride;
  float sq = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    float v = to_float(xr[i]);
    if constexpr (kResidual) {
      v = rnd<T>(to_float(residual[r * res_stride + i]) + v);
      residual_out[r * hidden + i] = from_float<T>(v);
    }
    row[i] = v;
    sq += v * v;
  }
  const float inv = rsqrtf(block_sum(sq) / hidden + eps);
  T* o = out + r * hidden;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float normed = row[i] * inv;
    const float w = to_float(weight[i]);
    // Llama: weight * normed.to(dtype); Gemma: (normed * (1 + weight)).to(dtype)
    o[i] = from_float<T>(weight_offset == 0.f ? rnd<T>(normed) * w : normed * (weight_offset + w));
  }
}

// The same, for 16-bit types with hidden % 8 == 0 and hidden <= 8 * 1024: each thread keeps its 8 elements in
// registers (one 16-byte load of x, one of the residual, one store of each output): a decode-sized row is then a
// single round trip to memory.
template <typename T, bool kResidual>
__global__ void rms_norm_vec_kernel(T* __restrict__ out, T* __restrict__ residual_out, const T* __restrict__ x,
                                    const T* __restrict__ residual, const T* __restrict__ weight, int hidden,
                                    int64_t x_stride, int64_t res_stride, float eps, float weight_offset) {
  const int64_t r = blockIdx.x;
  const int i = threadIdx.x * 8;
  const bool active = i < hidden;
  // the weight is no earlier kernel's output: its load overlaps the previous kernel's tail
  const uint4 wv = active ? *reinterpret_cast<const uint4*>(weight + i) : make_uint4(0, 0, 0, 0);
  flux::pdl_wait();
  flux::pdl_trigger();
  float v[8];
  float sq = 0.f;
  if (active) {
    const uint4 xv = flux::load_activation(x + r * x_stride + i);  // (ordered after the wait)
    const T* xe = reinterpret_cast<const T*>(&xv);
    uint4 rv;
    if constexpr (kResidual) rv = flux::load_activation(residual + r * res_stride + i);
    const T* re = reinterpret_cast<const T*>(&rv);
    uint4 sv;
    T* se = reinterpret_cast<T*>(&sv);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      v[j] = to_float(xe[j]);
      if constexpr (kResidual) {
        se[j] = from_float<T>(to_float(re[j]) + v[j]);
        v[j] = to_float(se[j]);
      }
      sq += v[j] * v[j];
    }
    if constexpr (kResidual) *reinterpret_cast<uint4*>(residual_out + r * hidden + i) = sv;
  }
  const float inv = rsqrtf(block_sum(sq) / hidden + eps);
  if (!active) return;
  const T* we = reinterpret_cast<const T*>(&wv);
  uint4 ov;
  T* oe = reinterpret_cast<T*>(&ov);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float normed = v[j] * inv;
    const float w = to_float(we[j]);
    oe[j] = from_float<T>(weight_offset == 0.f ? rnd<T>(normed) * w : normed * (weight_offset + w));
  }
  *reinterpret_cast<uint4*>(out + r * hidden + i) = ov;
}

template <typename T>
__global__ void act_mul_kernel(T* __restrict__ out, const T* __restrict__ gate, const T* __restrict__ up,
                               int64_t rows, int width, int64_t gate_stride, int64_t up_stride, int kind) {
  flux::pdl_wait();
  flux::pdl_trigger();
  const int64_t n = rows * width;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n; idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = idx / width;
    const int c = idx - r * width;
    const float a = rnd<T>(flux::activation(to_float(gate[r * gate_stride + c]), kind));
    out[idx] = from_float<T>(a * to_float(up[r * up_stride + c]));
  }
}

// The same, 8 elements per thread with 16-byte loads (width and row strides multiples of 8, 16-byte aligned rows):
// a decode step's gate/up rows are only a few hundred KB, so the scalar kernel's per-element loads and 64-bit index
// divisions, not bandwidth, set its time.
template <typename T>
__global__ void act_mul_vec_kernel(T* __restrict__ out, const T* __restrict__ gate, const T* __restrict__ up,
                                   int rows, int width, int64_t gate_stride, int64_t up_stride, int kind) {
  flux::pdl_wait();
  flux::pdl_trigger();
  const int vecs = width >> 3, n = rows * vecs;
  for (int idx = blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += gridDim.x * blockDim.x) {
    const int r = idx / vecs, c = (idx - r * vecs) << 3;
    const uint4 g = flux::load_activation(reinterpret_cast<const uint4*>(gate + r * gate_stride + c));
    const uint4 u = flux::load_activation(reinterpret_cast<const uint4*>(up + r * up_stride + c));
    const T* gv = reinterpret_cast<const T*>(&g);
    const T* uv = reinterpret_cast<const T*>(&u);
    uint4 result;
    T* o = reinterpret_cast<T*>(&result);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float a = rnd<T>(flux::activation(to_float(gv[j]), kind));
      o[j] = from_float<T>(a * to_float(uv[j]));
    }
    *reinterpret_cast<uint4*>(out + static_cast<int64_t>(r) * width + c) = result;
  }
}

// Rotary embedding, in place on q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim] (token and head
// strides given, head_dim contiguous); cos/sin [positions, rot] float32. Blocks (token, part): blockIdx.y splits a
// token's work (a decode step has only a few tokens). With a cache, the rotated k and the untouched v of token
// (b, t) are also written to k_cache/v_cache[b, head, slots[t], :]. kVec (16-bit types, rot / 2 and head_dim
// multiples of 8, 16-byte aligned rows): a thread rotates 8 pairs or copies 8 elements with 16-byte loads and
// stores, so a decode step is one round trip for q/k/v and the position and one for the cos/sin rows; else one
// element pair per thread. Both forms are bit for bit the reference (rotate_pair). Inputs earlier kernels wrote are
// read after pdl_wait with coherent loads: positions and slots through load_coherent, v without __restrict__ (so the
// scalar form's plain reads cannot become non-coherent loads hoisted above the wait).
template <typename T, bool kVec>
__global__ void rotary_kernel(T* __restrict__ q, T* __restrict__ k, const T* v,
                              T* __restrict__ k_cache, T* __restrict__ v_cache, const float* __restrict__ cos,
                              const float* __restrict__ sin, const int64_t* __restrict__ positions,
                              const int64_t* __restrict__ slots, int tokens_per_row, int heads, int kv_heads,
                              int head_dim, int rot, int64_t q_token_stride, int64_t k_token_stride,
                              int64_t v_token_stride, int64_t q_head_stride, int64_t k_head_stride,
                              int64_t v_head_stride, int64_t cache_row_stride, int64_t cache_head_stride,
                              int64_t cache_slot_stride) {
  static_assert(!kVec || sizeof(T) == 2, "the 16-byte form packs 8 elements per load");
  flux::pdl_wait();
  flux::pdl_trigger();
  const int64_t token = blockIdx.x;
  const int half = rot / 2;
  const int first = blockIdx.y * blockDim.x + threadIdx.x, stride = blockDim.x * gridDim.y;
  const int64_t pos = flux::load_coherent(positions + token);  // the step's metadata: written by earlier kernels
  const float* c = cos + pos * rot;
  const float* s = sin + pos * rot;
  T* k_out = nullptr;
  T* v_out = nullptr;
  if (k_cache != nullptr) {
    const int64_t row = token / tokens_per_row, slot = flux::load_coherent(slots + token % tokens_per_row);
    k_out = k_cache + row * cache_row_stride + slot * cache_slot_stride;
    v_out = v_cache + row * cache_row_stride + slot * cache_slot_stride;
  }
  const auto head_of = [&](int head) {  // the row of query head `head` (heads and up: key head head - heads)
    return head < heads ? q + token * q_token_stride + head * q_head_stride
                        : k + token * k_token_stride + (head - heads) * k_head_stride;
  };
  if constexpr (kVec) {
    const int per_head = half / 8, tail = (head_dim - rot) / 8, whole = head_dim / 8;
    const int rotations = (heads + kv_heads) * per_head;
    const int items = rotations + (k_out != nullptr ? kv_heads * (tail + whole) : 0);
    for (int p = first; p < items; p += stride) {
      if (p < rotations) {
        const int head = p / per_head, i = (p - head * per_head) * 8, kh = head - heads;
        T* base = head_of(head);
        const uint4 a = flux::load_activation(base + i), b = flux::load_activation(base + i + half);
        const float4* cv = reinterpret_cast<const float4*>(c + i);
        const float4* sv = reinterpret_cast<const float4*>(s + i);
        const float4 cs[4] = {__ldg(cv), __ldg(cv + 1), __ldg(cv + half / 4), __ldg(cv + half / 4 + 1)};
        const float4 ss[4] = {__ldg(sv), __ldg(sv + 1), __ldg(sv + half / 4), __ldg(sv + half / 4 + 1)};
        const float* c8 = reinterpret_cast<const float*>(cs);  // cos[i .. i + 7], then cos[i + half ..]
        const float* s8 = reinterpret_cast<const float*>(ss);
        const T* x1 = reinterpret_cast<const T*>(&a);
        const T* x2 = reinterpret_cast<const T*>(&b);
        uint4 ya, yb;
        T* y1 = reinterpret_cast<T*>(&ya);
        T* y2 = reinterpret_cast<T*>(&yb);
#pragma unroll
        for (int j = 0; j < 8; ++j)
          flux::rotate_pair<T>(to_float(x1[j]), to_float(x2[j]), c8[j], c8[8 + j], s8[j], s8[8 + j], y1[j], y2[j]);
        *reinterpret_cast<uint4*>(base + i) = ya;
        *reinterpret_cast<uint4*>(base + i + half) = yb;
        if (kh >= 0 && k_out != nullptr) {
          *reinterpret_cast<uint4*>(k_out + kh * cache_head_stride + i) = ya;
          *reinterpret_cast<uint4*>(k_out + kh * cache_head_stride + i + half) = yb;
        }
      } else if (p < rotations + kv_heads * tail) {  // k past the rotary dims, unchanged
        const int e = p - rotations, kh = e / tail, i = rot + (e - kh * tail) * 8;
        *reinterpret_cast<uint4*>(k_out + kh * cache_head_stride + i) =
            flux::load_activation(k + token * k_token_stride + kh * k_head_stride + i);
      } else {  // v, unchanged
        const int e = p - rotations - kv_heads * tail, kh = e / whole, i = (e - kh * whole) * 8;
        *reinterpret_cast<uint4*>(v_out + kh * cache_head_stride + i) =
            flux::load_activation(v + token * v_token_stride + kh * v_head_stride + i);
      }
    }
  } else {
    for (int p = first; p < (heads + kv_heads) * half; p += stride) {
      const int head = p / half, i = p - head * half, kh = head - heads;
      T* base = head_of(head);
      T y1, y2;
      flux::rotate_pair<T>(to_float(base[i]), to_float(base[i + half]), c[i], c[i + half], s[i], s[i + half], y1, y2);
      base[i] = y1;
      base[i + half] = y2;
      if (kh >= 0 && k_out != nullptr) {
        k_out[kh * cache_head_stride + i] = y1;
        k_out[kh * cache_head_stride + i + half] = y2;
      }
    }
    if (k_out == nullptr) return;
    // the part of k past the rotary dims, and all of v, go to the cache unchanged
    const int tail = head_dim - rot;
    for (int p = first; p < kv_heads * tail; p += stride) {
      const int kh = p / tail, i = rot + p % tail;
      k_out[kh * cache_head_stride + i] = k[token * k_token_stride + kh * k_head_stride + i];
    }
    for (int p = first; p < kv_heads * head_dim; p += stride) {
      const int kh = p / head_dim, i = p % head_dim;
      v_out[kh * cache_head_stride + i] = v[token * v_token_stride + kh * v_head_stride + i];
    }
  }
}

// ---- small-batch linear (GEMV) -----------------------------------------------------------------------------------
// out[m, n] = x[m, :] . w[n, :] (+ bias[n]) for M <= 8 rows of x. Memory-bound: every weight byte is read once,
// 16 bytes per load, streamed past L1 (ld.global.nc.L1::no_allocate); kLoads independent loads in flight per lane
// before the first is used. One warp per output row; x rows are re-read from L1/L2 by every warp.
using flux::load_stream;

template <typename T> __device__ __forceinline__ void unpack8(const uint4& v, float* f);
template <> __device__ __forceinline__ void unpack8<at::BFloat16>(const uint4& v, float* f) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}
template <> __device__ __forceinline__ void unpack8<at::Half>(const uint4& v, float* f) {
  const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __half22float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

constexpr int kGemvWarps = 8;
constexpr int kLoads = 4;

template <typename T, int M>
__global__ void __launch_bounds__(kGemvWarps * 32) gemv_kernel(T* __restrict__ out, const T* __restrict__ x,
                                                               const T* __restrict__ w, const T* __restrict__ bias,
                                                               int n_rows, int k, int64_t x_stride,
                                                               int64_t out_stride, bool early) {
  if (early) flux::pdl_trigger();  // see flux::early_trigger()
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n = blockIdx.x * kGemvWarps + warp;
  if (n >= n_rows) return;
  const int chunks = k >> 3;  // 8 elements per 16-byte chunk
  const uint4* wrow = reinterpret_cast<const uint4*>(w + static_cast<int64_t>(n) * k);
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
  for (int base = lane; base < chunks; base += 32 * kLoads) {
    uint4 wv[kLoads];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int c = base + u * 32;
      wv[u] = c < chunks ? load_stream(wrow + c) : make_uint4(0, 0, 0, 0);
    }
    if (base == lane) flux::pdl_wait();  // the first weights are on their way; x comes from the previous kernel
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int c = base + u * 32;
      if (c >= chunks) break;
      float wf[8];
      unpack8<T>(wv[u], wf);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const uint4 xv = flux::load_activation(reinterpret_cast<const uint4*>(x + m * x_stride) + c);
        float xf[8];
        unpack8<T>(xv, xf);
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[m] = fmaf(wf[j], xf[j], acc[m]);
      }
    }
  }
  if (!early) flux::pdl_trigger();
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float total = warp_sum(acc[m]);
    if (lane == 0) {
      const float b = bias != nullptr ? to_float(bias[n]) : 0.f;
      out[m * out_stride + n] = from_float<T>(total + b);
    }
  }
}

// ---- weight-only INT8 GEMV (one row of x) ------------------------------------------------------------------------
// The tensor-core kernel (quant_linear.cu) serves every other quantized case; for a single row this CUDA-core
// GEMV measured 2% faster end to end (benchmarks/results/2026-11-26-h100-decode-quant-mma.json).
// Integer codes become floats through the exponent trick (OR the code into the mantissa of 2^23, subtract 2^23):
// one logic op and one add instead of an int-to-float conversion. 16 weights per 16-byte load, the per-row scale
// applied once at the end.
__device__ __forceinline__ float code_to_float(uint32_t code) {  // code < 2^23
  return __uint_as_float(0x4B000000u | code) - 8388608.f;
}

template <typename T>
__global__ void __launch_bounds__(kGemvWarps * 32) int8_gemv_kernel(
    T* __restrict__ out, const T* __restrict__ x, const int8_t* __restrict__ w, const T* __restrict__ scale,
    const T* __restrict__ bias, int n_rows, int k, bool early) {
  if (early) flux::pdl_trigger();  // see flux::early_trigger()
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n = blockIdx.x * kGemvWarps + warp;
  if (n >= n_rows) return;
  const int chunks = k >> 4;  // 16 weights per chunk
  const uint4* wrow = reinterpret_cast<const uint4*>(w + static_cast<int64_t>(n) * k);
  float acc = 0.f;
  for (int base = lane; base < chunks; base += 32 * kLoads) {
    uint4 wv[kLoads];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int c = base + u * 32;
      wv[u] = c < chunks ? load_stream(wrow + c) : make_uint4(0, 0, 0, 0);
    }
    if (base == lane) flux::pdl_wait();  // the first weights are on their way; x comes from the previous kernel
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int c = base + u * 32;
      if (c >= chunks) break;
      const uint32_t* words = reinterpret_cast<const uint32_t*>(&wv[u]);
      float wf[16];
#pragma unroll
      for (int word = 0; word < 4; ++word)
#pragma unroll
        for (int j = 0; j < 4; ++j)  // signed byte b -> (b + 128) as an unsigned code, then subtract 128
          wf[word * 4 + j] = code_to_float(((words[word] >> (8 * j)) & 0xFFu) ^ 0x80u) - 128.f;
      const uint4* xp = reinterpret_cast<const uint4*>(x) + 2 * c;
      float xf[16];
      unpack8<T>(flux::load_activation(xp), xf);
      unpack8<T>(flux::load_activation(xp + 1), xf + 8);
#pragma unroll
      for (int j = 0; j < 16; ++j) acc = fmaf(wf[j], xf[j], acc);
    }
  }
  if (!early) flux::pdl_trigger();
  const float total = warp_sum(acc);
  if (lane == 0) out[n] = from_float<T>(total * to_float(scale[n]) + (bias != nullptr ? to_float(bias[n]) : 0.f));
}

template <typename T, int M>
void launch_gemv(torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& w, const T* bias,
                 cudaStream_t stream) {
  const int n = w.size(0), k = w.size(1);
  const int blocks = (n + kGemvWarps - 1) / kGemvWarps;
  flux::launch(gemv_kernel<T, M>, blocks, kGemvWarps * 32, 0, stream, out.data_ptr<T>(), x.data_ptr<T>(),
               w.data_ptr<T>(), bias, n, k, x.stride(0), out.stride(0), flux::trigger_early(x.size(0)));
}

int threads_for(int64_t work) {
  int t = 32;
  while (t < kMaxThreads && t < work) t <<= 1;
  return t;
}

}  // namespace

// x [rows, hidden] with unit stride in the last dim; returns out (and the new residual when given one)
std::vector<torch::Tensor> rms_norm(torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor weight,
                                    double eps, double weight_offset) {
  check_cuda(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "rms_norm: x must be [rows, hidden] with a contiguous last dim");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1), "rms_norm: weight must match hidden");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0);
  const int hidden = x.size(1);
  auto out = torch::empty({rows, hidden}, x.options());
  torch::Tensor res_out;
  const int threads = threads_for(hidden);
  const size_t smem = hidden * sizeof(float);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (rows == 0) return {out, residual ? torch::empty_like(out) : out};
  if (residual) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->stride(1) == 1, "rms_norm: residual must match x");
    res_out = torch::empty({rows, hidden}, x.options());
  }
  const bool vec = x.element_size() == 2 && hidden % 8 == 0 && hidden <= 8 * kMaxThreads && x.stride(0) % 8 == 0 &&
                   (!residual || residual->stride(0) % 8 == 0) &&
                   reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16 == 0 &&
                   (!residual || reinterpret_cast<uintptr_t>(residual->data_ptr()) % 16 == 0);
  if (vec) {
    const int vthreads = ((hidden / 8 + 31) / 32) * 32;
    AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "rms_norm_vec", [&] {
      if (residual) {
        flux::launch(rms_norm_vec_kernel<scalar_t, true>, rows, vthreads, 0, stream, out.data_ptr<scalar_t>(),
                     res_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), residual->data_ptr<scalar_t>(),
                     weight.data_ptr<scalar_t>(), hidden, x.stride(0), residual->stride(0), (float)eps,
                     (float)weight_offset);
      } else {
        flux::launch(rms_norm_vec_kernel<scalar_t, false>, rows, vthreads, 0, stream, out.data_ptr<scalar_t>(),
                     nullptr, x.data_ptr<scalar_t>(), nullptr, weight.data_ptr<scalar_t>(), hidden, x.stride(0),
                     int64_t{0}, (float)eps, (float)weight_offset);
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (residual) return {out, res_out};
    return {out};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    if (residual) {
      flux::launch(rms_norm_kernel<scalar_t, true>, rows, threads, smem, stream, out.data_ptr<scalar_t>(),
                   res_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), residual->data_ptr<scalar_t>(),
                   weight.data_ptr<scalar_t>(), hidden, x.stride(0), residual->stride(0), (float)eps,
                   (float)weight_offset);
    } else {
      flux::launch(rms_norm_kernel<scalar_t, false>, rows, threads, smem, stream, out.data_ptr<scalar_t>(), nullptr,
                   x.data_ptr<scalar_t>(), nullptr, weight.data_ptr<scalar_t>(), hidden, x.stride(0), int64_t{0},
                   (float)eps, (float)weight_offset);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (residual) return {out, res_out};
  return {out};
}

// gate, up [rows, width] with unit stride in the last dim (row strides may differ: views of one tensor)
torch::Tensor act_mul(torch::Tensor gate, torch::Tensor up, int64_t kind) {
  check_cuda(gate, "gate");
  TORCH_CHECK(gate.dim() == 2 && gate.sizes() == up.sizes() && gate.stride(1) == 1 && up.stride(1) == 1,
              "act_mul: gate and up must be [rows, width] with a contiguous last dim");
  const c10::cuda::CUDAGuard guard(gate.device());
  auto out = torch::empty(gate.sizes(), gate.options());
  const int64_t n = gate.numel();
  if (n == 0) return out;
  const int threads = 256;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t width = gate.size(1);
  const bool vec = (gate.scalar_type() == at::kHalf || gate.scalar_type() == at::kBFloat16) && width % 8 == 0 &&
                   gate.stride(0) % 8 == 0 && up.stride(0) % 8 == 0 && flux::aligned16(gate) &&
                   flux::aligned16(up) && n < (int64_t(1) << 30);  // 32-bit element and loop indices
  if (vec) {
    const int64_t blocks = std::min<int64_t>((n / 8 + threads - 1) / threads, 65535);
    AT_DISPATCH_REDUCED_FLOATING_TYPES(gate.scalar_type(), "act_mul", [&] {
      flux::launch(act_mul_vec_kernel<scalar_t>, blocks, threads, 0, stream, out.data_ptr<scalar_t>(),
                   gate.data_ptr<scalar_t>(), up.data_ptr<scalar_t>(), static_cast<int>(gate.size(0)),
                   static_cast<int>(width), gate.stride(0), up.stride(0), (int)kind);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65535);
  // the activation is computed in float32: float64 stays on the reference (flux_infer/kernels/cuda.py)
  const auto run = [&](auto zero) {
    using T = decltype(zero);
    flux::launch(act_mul_kernel<T>, blocks, threads, 0, stream, out.data_ptr<T>(), gate.data_ptr<T>(),
                 up.data_ptr<T>(), gate.size(0), static_cast<int>(gate.size(1)), gate.stride(0), up.stride(0),
                 (int)kind);
  };
  AT_DISPATCH_SWITCH(gate.scalar_type(), "act_mul",
                     AT_DISPATCH_CASE(at::kFloat, [&] { run(scalar_t{}); })
                         AT_DISPATCH_CASE_REDUCED_FLOATING_TYPES([&] { run(scalar_t{}); }));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// q [tokens, heads, head_dim], k [tokens, kv_heads, head_dim] rotated in place; with caches ([rows, kv_heads,
// slots, head_dim] views), rotated k and v are also written at slots[t] for token (row, t).
void rotary_embedding(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin,
                      torch::Tensor positions, c10::optional<torch::Tensor> v, c10::optional<torch::Tensor> k_cache,
                      c10::optional<torch::Tensor> v_cache, c10::optional<torch::Tensor> slots) {
  check_cuda(q, "q");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1,
              "rotary_embedding: q and k must be [tokens, heads, head_dim] with a contiguous head_dim");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous(),
              "rotary_embedding: cos/sin must be contiguous float32 tables");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() &&
                  positions.numel() == q.size(0), "rotary_embedding: one int64 position per token");
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t tokens = q.size(0);
  if (tokens == 0) return;
  const int rot = cos.size(1);
  TORCH_CHECK(rot % 2 == 0 && rot <= q.size(2), "rotary_embedding: rotary dim must be even and <= head_dim");
  const bool write = k_cache.has_value();
  int tokens_per_row = 1;
  if (write) {
    TORCH_CHECK(v && v_cache && slots && v->dim() == 3 && v->stride(2) == 1, "rotary_embedding: v, caches, slots");
    TORCH_CHECK(k_cache->stride(3) == 1 && k_cache->strides() == v_cache->strides(), "rotary_embedding: caches");
    TORCH_CHECK(slots->scalar_type() == at::kLong && slots->is_contiguous(), "rotary_embedding: int64 slots");
    tokens_per_row = slots->numel();
    TORCH_CHECK(tokens % tokens_per_row == 0 && tokens / tokens_per_row <= k_cache->size(0),
                "rotary_embedding: tokens must be rows x len(slots)");
  }
  const int64_t head_dim = q.size(2);
  const auto rows_fit = [](const torch::Tensor& t) {  // 16-byte aligned rows of 8-element multiples
    return flux::aligned16(t) && t.stride(-2) % 8 == 0 && (t.dim() < 4 || t.stride(-3) % 8 == 0) &&
           t.stride(0) % 8 == 0;
  };
  const bool vec = (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf) && rot % 16 == 0 &&
                   head_dim % 8 == 0 && k.size(2) == head_dim && rows_fit(q) && rows_fit(k) &&
                   flux::aligned16(cos) && flux::aligned16(sin) &&
                   (!write || (rows_fit(*v) && rows_fit(*k_cache) && rows_fit(*v_cache)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t items = vec ? (q.size(1) + k.size(1)) * (rot / 16) + (write ? k.size(1) * (2 * head_dim - rot) / 8 : 0)
                            : (q.size(1) + k.size(1)) * (rot / 2);  // threads' work items per token
  const int threads = vec ? 128 : 256;
  const dim3 grid(tokens, std::min<int64_t>(16, std::max<int64_t>(1, (items + threads - 1) / threads)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rotary_embedding", [&] {
    const auto kernel = [&] {  // the 16-byte form exists for 16-bit types only
      if constexpr (sizeof(scalar_t) == 2) return vec ? rotary_kernel<scalar_t, true> : rotary_kernel<scalar_t, false>;
      else return rotary_kernel<scalar_t, false>;
    }();
    flux::launch(kernel, grid, threads, 0, stream, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
        write ? v->data_ptr<scalar_t>() : nullptr,
        write ? k_cache->data_ptr<scalar_t>() : nullptr, write ? v_cache->data_ptr<scalar_t>() : nullptr,
        cos.data_ptr<float>(), sin.data_ptr<float>(), positions.data_ptr<int64_t>(),
        write ? slots->data_ptr<int64_t>() : nullptr, tokens_per_row, q.size(1), k.size(1), q.size(2), rot,
        q.stride(0), k.stride(0), write ? v->stride(0) : 0, q.stride(1), k.stride(1), write ? v->stride(1) : 0,
        write ? k_cache->stride(0) : 0, write ? k_cache->stride(1) : 0, write ? k_cache->stride(2) : 0);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// x [M, K] (unit stride in K, 16-byte aligned rows), w [N, K] contiguous, M <= 8: out [M, N]
torch::Tensor gemv(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  check_cuda(x, "x");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && x.stride(1) == 1 && w.is_contiguous(),
              "gemv: x [M, K] and contiguous w [N, K]");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 8 && w.size(1) % 8 == 0 && x.stride(0) % 8 == 0,
              "gemv: 1..8 rows and K a multiple of 8");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "gemv: x and w must have the same dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = torch::empty({x.size(0), w.size(0)}, x.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "gemv", [&] {
    const scalar_t* b = bias ? bias->data_ptr<scalar_t>() : nullptr;
    switch (x.size(0)) {
      case 1: launch_gemv<scalar_t, 1>(out, x, w, b, stream); break;
      case 2: launch_gemv<scalar_t, 2>(out, x, w, b, stream); break;
      case 3: launch_gemv<scalar_t, 3>(out, x, w, b, stream); break;
      case 4: launch_gemv<scalar_t, 4>(out, x, w, b, stream); break;
      case 5: launch_gemv<scalar_t, 5>(out, x, w, b, stream); break;
      case 6: launch_gemv<scalar_t, 6>(out, x, w, b, stream); break;
      case 7: launch_gemv<scalar_t, 7>(out, x, w, b, stream); break;
      default: launch_gemv<scalar_t, 8>(out, x, w, b, stream); break;
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}


// weight-only INT8 linear for one row of x: qweight int8 [N, K], scale [N]
torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor qweight, torch::Tensor scale, c10::optional<torch::Tensor> bias) {
  check_cuda(x, "x");
  const int64_t k = x.size(1), n = qweight.size(0);
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(0) == 1 && flux::aligned16(x),
              "int8_gemv: x must be [1, K], 16-byte aligned with a contiguous last dim");
  TORCH_CHECK(qweight.is_contiguous() && flux::aligned16(qweight) && qweight.scalar_type() == at::kChar &&
                  qweight.size(1) == k && k % 16 == 0 && scale.is_contiguous() && scale.scalar_type() == x.scalar_type(),
              "int8_gemv: contiguous int8 qweight [N, K] (K a multiple of 16), scale in x's dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = torch::empty({1, n}, x.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int blocks = (n + kGemvWarps - 1) / kGemvWarps;
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "int8_gemv", [&] {
    flux::launch(int8_gemv_kernel<scalar_t>, blocks, kGemvWarps * 32, 0, stream, out.data_ptr<scalar_t>(),
                 x.data_ptr<scalar_t>(), qweight.data_ptr<int8_t>(), scale.data_ptr<scalar_t>(),
                 bias ? bias->data_ptr<scalar_t>() : nullptr, static_cast<int>(n), static_cast<int>(k),
                 flux::trigger_early(1));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

torch::Tensor quant_mma(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, c10::optional<torch::Tensor> mins,
                        int64_t group, c10::optional<torch::Tensor> bias, int64_t warps, int64_t row_tiles,
                        int64_t int4_mode, int64_t launch_shape, int64_t activation);

std::vector<torch::Tensor> quant_mma_add_norm(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                                              torch::Tensor mins, int64_t group, c10::optional<torch::Tensor> bias,
                                              torch::Tensor residual, torch::Tensor norm_weight, int64_t slots,
                                              int64_t warps, int64_t row_tiles, int64_t int4_mode,
                                              int64_t launch_shape);

torch::Tensor quant_mma_scale_norm(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor mins,
                                   int64_t group, c10::optional<torch::Tensor> bias, torch::Tensor partials,
                                   double eps, int64_t warps, int64_t row_tiles, int64_t int4_mode,
                                   int64_t launch_shape, int64_t activation);

torch::Tensor dequantize_weight(torch::Tensor qweight, torch::Tensor scales, c10::optional<torch::Tensor> mins,
                                int64_t group);

std::vector<torch::Tensor> quant_frag(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor mins,
                                      c10::optional<torch::Tensor> bias, int64_t activation,
                                      c10::optional<torch::Tensor> scale_partials, double eps,
                                      c10::optional<torch::Tensor> residual, c10::optional<torch::Tensor> norm_weight,
                                      torch::Tensor counters, int64_t warps, int64_t ksplit);

torch::Tensor frag_dequantize(torch::Tensor qweight, torch::Tensor scales, torch::Tensor mins);
void set_frag_launch(int64_t programmatic_bytes, bool all_programmatic, bool early);

torch::Tensor rotary_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos,
                               torch::Tensor sin, torch::Tensor positions, torch::Tensor k_cache,
                               torch::Tensor v_cache, torch::Tensor slots, torch::Tensor kv_start,
                               torch::Tensor kv_end, double scale, int64_t window, int64_t parts, int64_t warps);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm, optionally fused with the residual add");
  m.def("act_mul", &act_mul, "act(gate) * up (0 = silu, 1 = gelu_tanh)");
  m.def("rotary_embedding", &rotary_embedding, "rotary embedding of q and k in place (+ KV cache write)");
  m.def("rotary_attention", &rotary_attention,
        "one decode step's rotary embedding, KV-cache write and attention over the static cache, in one launch");
  m.def("gemv", &gemv, "x @ w.T (+ bias) for up to 8 rows of x");
  m.def("int8_gemv", &int8_gemv, "weight-only INT8 linear for one row of x");
  m.def("quant_mma", &quant_mma,
        "weight-only INT8/INT4 linear (optionally gated: act(gate) * up) for up to 32 rows of x, on the tensor cores");
  m.def("quant_mma_add_norm", &quant_mma_add_norm,
        "INT4 linear + residual add, leaving the next RMSNorm's weighted input and sums of squares (up to 8 rows)");
  m.def("quant_mma_scale_norm", &quant_mma_scale_norm,
        "INT4 linear (optionally gated) on an RMSNorm's weighted input, the norm's scale applied to its sums");
  m.def("dequantize_weight", &dequantize_weight, "the dense weight INT8/INT4 codes stand for (long prefills)");
  m.def("quant_frag", &quant_frag, "INT4 linear on the fragment layout, 1-16 rows per launch, with the decode epilogues");
  m.def("frag_dequantize", &frag_dequantize, "the dense weight of fragment-layout INT4 codes (long prefills)");
  m.def("set_frag_launch", &set_frag_launch,
        "fragment-layout calls above one row: programmatic with an early trigger for layers of at most "
        "programmatic_bytes weight bytes (early: else after the main loop), else a plain launch (all_programmatic: "
        "every call programmatic)");
  m.def("programmatic_launch", [] { return flux::pdl_enabled() && flux::pdl_supported(c10::cuda::current_device()); },
        "whether flux kernels launch with programmatic dependent launch on the current device");
  m.def("set_programmatic_launch", [](bool enabled) { flux::pdl_enabled() = enabled; },
        "launch flux kernels with programmatic dependent launch (Hopper and later; on by default)");
  m.def("early_trigger", [] { return flux::early_trigger(); },
        "whether the linear-layer kernels let their dependents launch from their start (else after their main loop)");
  m.def("early_trigger_rows", [] { return flux::early_trigger_rows(); },
        "up to how many rows (sequences) the early trigger applies");
  m.def("trigger_early", [](int64_t rows) { return flux::trigger_early(rows); },
        "whether a kernel over `rows` rows (sequences) lets its dependents launch from its start");
  m.def(
      "set_early_trigger",
      [](bool enabled, int64_t max_rows) {
        TORCH_CHECK(max_rows >= 1, "set_early_trigger: max_rows must be at least 1");
        flux::early_trigger() = enabled;
        flux::early_trigger_rows() = max_rows;
      },
      "linear-layer and decode-attention kernels over up to max_rows rows let their dependents launch from their "
      "start (on by default, for one row) or after their main loop",
      py::arg("enabled"), py::arg("max_rows") = 1);
}
