// quant_frag: INT4 linear layers (group 128, bf16) on the fragment layout (flux_infer/kernels/quant_frag.py),
// 1-16 rows of x per launch (1-8 rows: quant_frag_rows.cuh): the decode-batch kernel of benchmarks/lab/q16.cu's
// mq16 (docs/benchmarks.md, thirteenth session), with the epilogues the decode paths use (plain, gated
// act(gate) * up, the RMSNorm scale applied to the sums, and the residual add + norm pieces before an RMSNorm); and
// the fragment layout's dense weight for long prefills.
//
// x is the MMA's A operand (16 rows = M), 8 output features its N. A block of WN warps owns WN fragment tiles of 32
// features (gated: WN / 2 gate tiles and the matching up tiles); a stage is one 128-input group: each warp's tile
// codes (a contiguous 2 KB run), scales and mins (one 128-byte pair) and x[16][128] (4 KB), copied by cp.async into
// STAGES slots, one __syncthreads per stage. Per warp and stage: 32 MMAs on biased codes (0x4300 | q = 128 + q in
// bf16, two lop3 per four codes) into per-group accumulators, finished in fp32 as acc += s acc_g + (m - 128 s)
// sum(x), with sum(x) per row from 8 MMAs against ones. Layers with few tiles split K over ksplit blocks: fp32
// partials, the last block of a tile (an arrival counter it resets) adds them in split order and runs the epilogue.
#include "quant_mma.cuh"  // and_or / int4_biased, bits_to_float, NormArgs and norm_scale_of

namespace flux {
namespace {

constexpr int kPlainE = 0, kGatedE = 1, kAddNormE = 2;  // epilogues; the norm scale is a run-time option of all

struct FragArgs {
  at::BFloat16* out;
  const at::BFloat16* x;
  const uint32_t* codes;
  const uint16_t* scales;
  const uint16_t* mins;
  const at::BFloat16* bias;
  float* ws;  // ksplit > 1: [ksplit][blocks per split][4][threads] float4 partial sums (the register layout)
  int* counters;  // one per block index, zero between launches
  int rows, n, k, ksplit;
  bool pdl;  // launched programmatically: the first stages' weights stream before pdl_wait, their x after it
  bool early;  // signal dependents at the start (pdl_trigger) instead of after the main loop
  NormArgs<at::BFloat16> scale_norm;  // partials non-null: the rows' norm scales from these sums of squares
  bool stage_partials;  // scale_norm's partials copied into shared memory with the first stage (else read at the end)
  const at::BFloat16* residual;  // kAddNormE: out = h = residual + layer, normed = h * norm_weight,
  int64_t residual_stride;  // norm_partials[row][tile] = sum of h^2 over the 32 features of a fragment tile
  const at::BFloat16* norm_weight;
  at::BFloat16* normed;
  float* norm_partials;
};

// Shared memory behind the stage slots for the epilogue's inputs (the kernel's load_epilogue_inputs): the staged
// partial sums (16-byte aligned), then for add-norm the residual tile [rows][nb] and norm weights [nb], bf16
__host__ __device__ inline int staged_partials_bytes(const FragArgs& a) {
  return a.stage_partials ? (a.rows * a.scale_norm.slots * 4 + 15) / 16 * 16 : 0;
}
__host__ __device__ constexpr int residual_tile_bytes(int rows, int nb) { return rows * nb * 2; }

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ void ldmatrix4(uint32_t* a, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3]) : "r"(addr));
}
__device__ __forceinline__ void mma_zero(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {  // d = a b
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%10, %10, %10, %10};"
               : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.f));
}
__device__ __forceinline__ float bf_lo(uint32_t v) { return bits_to_float<at::BFloat16>(v); }  // the low half
__device__ __forceinline__ float bf_hi(uint32_t v) { return __uint_as_float(v & 0xffff0000u); }  // the high half

// The (scale, min) pair run of group grp of fragment tile `tile` (kernels/quant_frag.py): its 32 scales, then its 32
// mins; the pairs of a tile's first half of groups sit in its rows of `scales`, the others in its rows of `mins`
template <typename T>
__device__ __forceinline__ const T* frag_pair(const T* scales, const T* mins, int64_t tile, int groups, int grp) {
  const int half = groups / 2;
  return (grp < half ? scales : mins) + tile * groups * 32 + (grp < half ? grp : grp - half) * 64;
}

// o[0..1]: row g, columns f and f + 1; o[2..3]: row g + 8; bf16 pairs, rows past the batch skipped
__device__ __forceinline__ void store_rows(at::BFloat16* out, int stride, int f, const float (&o)[4], int g, int rows) {
  if (g < rows)
    *reinterpret_cast<__nv_bfloat162*>(out + (int64_t)g * stride + f) = __floats2bfloat162_rn(o[0], o[1]);
  if (g + 8 < rows)
    *reinterpret_cast<__nv_bfloat162*>(out + (int64_t)(g + 8) * stride + f) = __floats2bfloat162_rn(o[2], o[3]);
}

// ACT: a gated layer's activation (0 silu, 1 gelu_tanh) fixed at compile time: with the kind a run-time argument
// both activations were compiled in and the 16-row gated gate/up call took 0.7-0.9 us longer (benchmarks/lab/q16.cu
// mq16g kPkgEpi against kPkgEpi | kSiluOnly, fifteenth session)
template <int WN, int STAGES, int E, int ACT = 0>
__global__ void __launch_bounds__(WN * 32) quant_frag_kernel(const FragArgs a) {
  constexpr int NB = 32 * WN, THREADS = 32 * WN, kCodes = 2048, kScales = 64, kX = 4096;
  constexpr int kStage = WN * (kCodes + 2 * kScales) + kX, kXC = 256 / THREADS;
  static_assert(E != kGatedE || WN % 2 == 0, "a gated block pairs gate and up tiles");
  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int groups = a.k / 128, blk = blockIdx.x / a.ksplit, split = blockIdx.x % a.ksplit;
  const int g0 = split * groups / a.ksplit, ng = (split + 1) * groups / a.ksplit - g0;
  // this warp's fragment tile: gated blocks pair gate tile i with up tile i (n / 64 tiles further)
  const int lt = E == kGatedE ? (warp < WN / 2 ? blk * (WN / 2) + warp : a.n / 64 + blk * (WN / 2) + warp - WN / 2)
                              : blk * WN + warp;
  const unsigned char* wnext = reinterpret_cast<const unsigned char*>(a.codes) +
                               ((int64_t)lt * groups + g0) * kCodes + lane * 16;
  // the tile's (scale, min) pairs, 64 values a group: groups below half in the tile's rows of scales, the rest in
  // those of mins (kernels/quant_frag.py); lanes 0-3 copy a pair's scales, 4-7 its mins
  const int half = groups / 2;
  const uint16_t* pairs_hi = a.mins + (int64_t)lt * groups * 32 + lane * 8;
  const uint16_t* snext = g0 < half ? a.scales + (int64_t)lt * groups * 32 + g0 * 64 + lane * 8
                                    : pairs_hi + (g0 - half) * 64;
  int sgroup = g0;
  const uint32_t sbase = smem_addr(smem);
  const uint32_t wdst = warp * kCodes + lane * 16, sdst = WN * kCodes + (lane < 4 ? 0 : WN * kScales) +
                                                          warp * kScales + (lane & 3) * 16;
  const int xrow = threadIdx.x >> 4, xch = threadIdx.x & 15;
  const at::BFloat16* xnext[kXC];
  uint32_t xdst[kXC];
#pragma unroll
  for (int c = 0; c < kXC; ++c) {
    const int row = xrow + c * (THREADS / 16);
    xnext[c] = a.x + (int64_t)min(row, a.rows - 1) * a.k + g0 * 128 + xch * 8;
    xdst[c] = WN * (kCodes + 2 * kScales) + row * 256 + ((xch ^ (row & 7)) << 4);  // swizzled: ldmatrix, no conflicts
    // rows past the batch: zeros in every slot, written once and never copied over (copying the last row into
    // them instead has every block read one L2 line 16 times per stage; with it 1-row gate/up took 55 us, and
    // batch-1 decode went from 307.6 to 391.0 tok/s with this change and the dequantize fix: docs/benchmarks.md)
    if (row >= a.rows)
      for (int s = 0; s < STAGES; ++s) *reinterpret_cast<uint4*>(smem + s * kStage + xdst[c]) = make_uint4(0, 0, 0, 0);
  }
  int next = 0, slot = 0;
  auto load_weights = [&]() {  // stage `next`'s codes, scales and mins into `slot`
    if (next < ng) {
      const uint32_t dst = sbase + slot * kStage;
#pragma unroll
      for (int i = 0; i < 4; ++i) cp_async16(dst + wdst + i * 512, wnext + i * 512);
      if (lane < 8) cp_async16(dst + sdst, snext);
      wnext += kCodes;
      snext = ++sgroup == half ? pairs_hi : snext + 64;
    }
  };
  auto load_x = [&]() {  // and its x; then the stage's commit group
    if (next < ng) {
      const uint32_t dst = sbase + slot * kStage;
#pragma unroll
      for (int c = 0; c < kXC; ++c)
        if (xrow + c * (THREADS / 16) < a.rows) cp_async16(dst + xdst[c], xnext[c] + next * 128);
      slot = slot == STAGES - 1 ? 0 : slot + 1;
    }
    ++next;
    cp_commit();
  };
  // What the epilogue reads from earlier kernels, copied with the first stage behind the stages' slots (read when
  // the epilogue needed them, each was a round trip to memory the block waited for: norm-scaled 16-row calls took
  // 3-4 us longer than plain ones, sixteenth session): the rows' partial sums of squares [rows][slots] (norm-scaled)
  // or the block's residual tile [rows][NB] and norm weights [NB] (add-norm)
  const uint32_t extra = sbase + STAGES * kStage;
  const int slots = a.scale_norm.slots;
  const uint32_t res_smem = extra + staged_partials_bytes(a);
  const uint32_t nw_smem = res_smem + residual_tile_bytes(a.rows, NB);
  // 16-byte copies (4-byte ones for partial sums not in 16-byte runs: as many requests as the block's weights)
  auto load_epilogue_inputs = [&]() {
    if (a.stage_partials && slots % 4 == 0)
      for (int i = threadIdx.x; i < a.rows * slots / 4; i += THREADS)
        cp_async16(extra + i * 16, a.scale_norm.partials + 4 * i);
    else if (a.stage_partials)
      for (int i = threadIdx.x; i < a.rows * slots; i += THREADS) cp_async4(extra + i * 4, a.scale_norm.partials + i);
    if constexpr (E == kAddNormE) {  // residual rows and norm weights 16-byte aligned (the host copies them if not)
      const int f_base = blk * NB;
      for (int i = threadIdx.x; i < a.rows * (NB / 8); i += THREADS) {
        const int m = i / (NB / 8), c = i % (NB / 8);
        cp_async16(res_smem + i * 16, a.residual + m * a.residual_stride + f_base + 8 * c);
      }
      for (int i = threadIdx.x; i < NB / 8; i += THREADS) cp_async16(nw_smem + i * 16, a.norm_weight + f_base + 8 * i);
    }
  };
  if (a.pdl) {  // the weights of the first stages stream while the kernel before this one finishes; x after it has
    for (int s = 0; s < STAGES - 1; ++s) {
      load_weights();
      slot = slot == STAGES - 1 ? 0 : slot + 1;
      ++next;
    }
    pdl_wait();
    if (a.early) pdl_trigger();
    next = slot = 0;
    load_epilogue_inputs();
    for (int s = 0; s < STAGES - 1; ++s) load_x();
  } else {  // a stage per commit group: the first waits for one stage, not three stages' weights (16 rows: down
            // 16.8 -> 16.2 us, gated gate/up 26.1 -> 25.7 in benchmarks/lab/q16.cu's mq16g, fifteenth session)
    load_epilogue_inputs();
    for (int s = 0; s < STAGES - 1; ++s) {
      load_weights();
      load_x();
    }
  }
  // The rows' norm scales (the layer after an RMSNorm), THREADS / 16 threads a row: staged partial sums are added up
  // when the first stage has landed (they land with it), while the next stages stream; others after the main loop
  const bool scaled = a.scale_norm.partials != nullptr;
  __shared__ float row_scale[16];
  auto sum_row_scales = [&]() {
    constexpr int kPerRow = THREADS / 16;
    const int m = threadIdx.x / kPerRow, q = threadIdx.x % kPerRow;
    float sum = 0.f;
    if (m < a.rows && a.stage_partials && slots % 4 == 0) {  // 16-byte reads, four sums in flight
      const float4* staged = reinterpret_cast<const float4*>(smem + STAGES * kStage) + m * (slots / 4);
      float4 s4 = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int i = q; i < slots / 4; i += kPerRow) {
        const float4 v = staged[i];
        s4.x += v.x;
        s4.y += v.y;
        s4.z += v.z;
        s4.w += v.w;
      }
      sum = (s4.x + s4.y) + (s4.z + s4.w);
    } else if (m < a.rows && a.stage_partials) {
      const float* staged = reinterpret_cast<const float*>(smem + STAGES * kStage) + m * slots;
      for (int i = q; i < slots; i += kPerRow) sum += staged[i];
    } else if (m < a.rows) {  // row_norm_scale's sum, THREADS / 16 threads a row (a warp a row spilled here)
      const float* global = a.scale_norm.partials + m * static_cast<int64_t>(slots);
      for (int i = q; i < slots; i += kPerRow) sum += load_coherent(global + i);
    }
#pragma unroll
    for (int o = kPerRow / 2; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (q == 0 && m < a.rows) row_scale[m] = norm_scale_of(a.scale_norm, sum);
  };
  if (scaled && a.stage_partials) {  // outside the main loop: inside it, its registers spilled
    cp_wait<STAGES - 2>();
    __syncthreads();
    sum_row_scales();  // visible to the epilogue after the first stage's __syncthreads
  }
  float acc[4][4] = {};
  const uint32_t ones = 0x3F803F80u;
  const int lrow = (lane & 7) + ((lane >> 3) & 1) * 8, lhalf = lane >> 4;
  for (int s = 0; s < ng; ++s) {
    cp_wait<STAGES - 2>();
    __syncthreads();
    load_weights();
    load_x();
    const unsigned char* st = smem + (s % STAGES) * kStage;
    const uint4* wv = reinterpret_cast<const uint4*>(st + warp * kCodes) + lane;
    const uint4 sv = *reinterpret_cast<const uint4*>(st + WN * kCodes + warp * kScales + t * 16);
    const uint4 mv = *reinterpret_cast<const uint4*>(st + WN * (kCodes + kScales) + warp * kScales + t * 16);
    const uint32_t xs = sbase + (s % STAGES) * kStage + WN * (kCodes + 2 * kScales);
    float accg[4][4], sx[4];
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      const uint4 q = wv[p * 32];
      const uint32_t qw[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int slice = 2 * p + h, ch = 2 * slice + lhalf;
        uint32_t xa[4];
        ldmatrix4(xa, xs + lrow * 256 + ((ch ^ (lrow & 7)) << 4));
        if (slice == 0) mma_zero(sx, xa, ones, ones);
        else mma<at::BFloat16>(sx, xa, ones, ones);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint32_t b0 = int4_biased<at::BFloat16>(qw[j], 2 * h);
          const uint32_t b1 = int4_biased<at::BFloat16>(qw[j], 2 * h + 1);
          if (slice == 0) mma_zero(accg[j], xa, b0, b1);
          else mma<at::BFloat16>(accg[j], xa, b0, b1);
        }
      }
    }
    const uint32_t svv[4] = {sv.x, sv.y, sv.z, sv.w}, mvv[4] = {mv.x, mv.y, mv.z, mv.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float s0 = bf_lo(svv[j]), s1 = bf_hi(svv[j]);
      const float m0 = fmaf(-128.f, s0, bf_lo(mvv[j])), m1 = fmaf(-128.f, s1, bf_hi(mvv[j]));
      acc[j][0] = fmaf(s0, accg[j][0], fmaf(m0, sx[0], acc[j][0]));
      acc[j][1] = fmaf(s1, accg[j][1], fmaf(m1, sx[0], acc[j][1]));
      acc[j][2] = fmaf(s0, accg[j][2], fmaf(m0, sx[2], acc[j][2]));
      acc[j][3] = fmaf(s1, accg[j][3], fmaf(m1, sx[2], acc[j][3]));
    }
  }
  cp_wait<0>();
  if (!a.early) pdl_trigger();
  // The results stay in registers (a round trip through shared memory and one 2-byte store per output took
  // Llama-3-8B's 16-row gate/up from 26.2 to 30.8 us on an H100: docs/benchmarks.md, fourteenth session): lane
  // (g, t) of a warp holds rows g and g + 8 (acc[j][0..1] and acc[j][2..3]) of columns 8 j + 2 t and + 1 of the
  // warp's fragment tile.
  if (a.ksplit > 1) {  // partials out; the last block of the tile adds them in split order
    // workspace [ksplit][blocks per split][4][THREADS] float4: acc[j] of consecutive threads adjacent, so each store
    // and load instruction covers 512 contiguous bytes (with each thread's 16 sums contiguous instead, every
    // instruction touched twice the sectors: 16-row down 19.1 against 16.1 us in the lab, fifteenth session); the
    // reduction keeps four splits' loads in flight
    const int64_t per_split = (int64_t)(gridDim.x / a.ksplit) * THREADS * 4;  // in float4
    float4* part = reinterpret_cast<float4*>(a.ws) + (int64_t)split * per_split + blk * THREADS * 4 + threadIdx.x;
#pragma unroll
    for (int j = 0; j < 4; ++j) __stcg(part + j * THREADS, make_float4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]));
    __threadfence();
    __syncthreads();
    __shared__ int last;
    if (threadIdx.x == 0) last = atomicAdd(a.counters + blk, 1) == a.ksplit - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    const float4* mine = reinterpret_cast<const float4*>(a.ws) + blk * THREADS * 4 + threadIdx.x;
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    for (int s0 = 0; s0 < a.ksplit; s0 += 4) {
      float4 v[4][4];
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int j = 0; j < 4; ++j)
          v[u][j] = s0 + u < a.ksplit ? __ldcg(mine + (s0 + u) * per_split + j * THREADS)
                                      : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          acc[j][0] += v[u][j].x;
          acc[j][1] += v[u][j].y;
          acc[j][2] += v[u][j].z;
          acc[j][3] += v[u][j].w;
        }
    }
    if (threadIdx.x == 0) a.counters[blk] = 0;
  }
  if (E == kAddNormE && a.ksplit == 1) __syncthreads();  // every thread's epilogue copies have landed
  if (scaled && !a.stage_partials) {
    sum_row_scales();
    __syncthreads();
  }
  const float scale[2] = {scaled && g < a.rows ? row_scale[g] : 1.f, scaled && g + 8 < a.rows ? row_scale[g + 8] : 1.f};
  // the layer's output from a sum of element e (row g + 8 (e / 2); in acc[j]: column 8 j + 2 t + e % 2)
  auto value = [&](float sum, int e, int feature) {
    float v = sum * scale[e >> 1];
    if (a.bias != nullptr) v += static_cast<float>(a.bias[feature]);
    return v;
  };
  if constexpr (E == kGatedE) {  // up warps hand their values to the gate warps of the same columns
    float4* xchg = reinterpret_cast<float4*>(smem);
    __syncthreads();  // every warp is past its last read of the stage slots
    if (warp >= WN / 2)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        xchg[((warp - WN / 2) * 4 + j) * 32 + lane] = make_float4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]);
    __syncthreads();
    if (warp >= WN / 2) return;
    const int f0 = lt * 32 + 2 * t, n_out = a.n / 2;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float4 up4 = xchg[(warp * 4 + j) * 32 + lane];
      const float ups[4] = {up4.x, up4.y, up4.z, up4.w};
      float o[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int f = f0 + 8 * j + (e & 1);
        const float gate = rnd<at::BFloat16>(value(acc[j][e], e, f)), up = value(ups[e], e, n_out + f);
        o[e] = rnd<at::BFloat16>(activation(gate, ACT)) * rnd<at::BFloat16>(up);
      }
      store_rows(a.out, n_out, f0 + 8 * j, o, g, a.rows);
    }
  } else {
    const int f0 = lt * 32 + 2 * t;
    float squares[2] = {0.f, 0.f};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float o[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) o[e] = value(acc[j][e], e, f0 + 8 * j + (e & 1));
      if constexpr (E == kAddNormE) {  // from the residual tile and norm weights in shared memory
        const __nv_bfloat162* res = reinterpret_cast<const __nv_bfloat162*>(smem + (res_smem - sbase));
        const float2 nw = __bfloat1622float2(
            reinterpret_cast<const __nv_bfloat162*>(smem + (nw_smem - sbase))[(warp * 32 + 2 * t + 8 * j) / 2]);
        float normed[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int m = g + 8 * (e >> 1);
          const float2 r = m < a.rows ? __bfloat1622float2(res[m * (NB / 2) + (warp * 32 + 2 * t + 8 * j) / 2])
                                      : make_float2(0.f, 0.f);
          o[e] = rnd<at::BFloat16>(rnd<at::BFloat16>(o[e]) + (e & 1 ? r.y : r.x));
          normed[e] = o[e] * (e & 1 ? nw.y : nw.x);
          squares[e >> 1] += o[e] * o[e];
        }
        store_rows(a.normed, a.n, f0 + 8 * j, normed, g, a.rows);
      }
      store_rows(a.out, a.n, f0 + 8 * j, o, g, a.rows);
    }
    if constexpr (E == kAddNormE) {  // sums of h^2 over the warp's 32 columns: one fragment tile
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        squares[h] += __shfl_xor_sync(0xffffffffu, squares[h], 1);
        squares[h] += __shfl_xor_sync(0xffffffffu, squares[h], 2);
        if (t == 0 && g + 8 * h < a.rows) a.norm_partials[(int64_t)(g + 8 * h) * (a.n / 32) + lt] = squares[h];
      }
    }
  }
}

// Dense weights [N, K] of the fragment layout: one thread per 8 consecutive outputs of a row (one 16-byte store),
// gathered from the four words (lanes t = 0..3) that hold them; bit for bit dequantize_int4_kernel's values (q * scale
// exact in float32, one rounding of the fused multiply-add).
__global__ void frag_dequantize_kernel(at::BFloat16* __restrict__ out, const uint32_t* __restrict__ codes,
                                       const at::BFloat16* __restrict__ scales, const at::BFloat16* __restrict__ mins,
                                       int64_t chunks, int k) {
  pdl_wait();
  pdl_trigger();
  const int groups = k / 128;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < chunks;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t feature = i / (k / 8);
    const int kc = static_cast<int>(i % (k / 8)), grp = kc >> 4, p = (kc >> 2) & 3, a = kc & 3;
    const int64_t tile = feature >> 5;
    const int j = (feature >> 3) & 3, g = feature & 7;
    const int64_t tg = tile * groups + grp;
    const uint32_t* words = codes + tg * 512 + p * 128 + g * 16 + j;  // word (p, g, t, j) = + 4 t
    const at::BFloat16* pair = frag_pair(scales, mins, tile, groups, grp);
    const int at = (g >> 1) * 8 + j * 2 + (g & 1);  // the feature's place in the pair's scales and mins
    const float s = static_cast<float>(pair[at]), m = static_cast<float>(pair[32 + at]);
    uint4 v;
    at::BFloat16* o = reinterpret_cast<at::BFloat16*>(&v);
#pragma unroll
    for (int t = 0; t < 4; ++t) {  // inputs 8 a + 2 t + b: nibble a + 4 b of lane t's word
      const uint32_t word = words[4 * t];
      o[2 * t] = from_float<at::BFloat16>(fmaf(static_cast<float>((word >> (4 * a)) & 0xFu), s, m));
      o[2 * t + 1] = from_float<at::BFloat16>(fmaf(static_cast<float>((word >> (4 * a + 16)) & 0xFu), s, m));
    }
    reinterpret_cast<uint4*>(out)[i] = v;
  }
}

}  // namespace
}  // namespace flux

#include "quant_frag_rows.cuh"  // quant_frag_rows_kernel: 1-8 rows

namespace flux {
namespace {

struct FragPlan {
  int warps, ksplit;
};

// Measured on H100 (docs/benchmarks.md, thirteenth session): 2-warp blocks for most layers, K split until about
// 384 blocks run; 8-warp blocks of 3 stages for the widest (lm_head). The norm epilogues want fewer splits (every
// block of a split stages their inputs, the last one runs them; seventeenth session, 16 rows): norm-scaled until
// about 192 blocks (Llama-3-8B's q/k/v: 2 splits, 10.2 us against 12.1 with 4), add-norm until about 256 (o: 4
// splits, 8.3 against 9.1 with 8; down 4 or 8 alike).
// Up to 4 rows every layer but the widest takes quant_frag_rows_kernel (warps < 0: that kernel with -warps warps a
// block), 5-8 rows those of more than 128 tiles; 16 warps for up to 128 tiles, else 8. Measured on H200
// (docs/benchmarks.md, nineteenth session; benchmarks/gemv.py --quant --frag --sweep --rows 1,4,8): at one row
// Llama-3-8B's norm-scaled q/k/v 6.7 us (8 warps; 8.4 with 16; the 16-row kernel's best 8.7), add-norm o 5.8
// (16 warps; 7.4), add-norm down 13.0 (16; 14.8), the gated, norm-scaled gate/up 20.1 (8; 29.7); at 8 rows o and
// down are faster on the 16-row kernel (7.4 against 7.9, 16.0 against 17.6), q/k/v and gate/up not (8.9 against
// 9.8, 25.5 against 33.1). The plan depends on the whole layer's shape and the rows only, so a gated layer's halves
// sum as the plain layer's.
FragPlan choose_frag_plan(int n, int k, bool gated, bool norm_scaled, bool add_norm, int rows) {
  if (n >= 65536 && n % 256 == 0 && !gated) return {8, 1};
  if (rows <= 4 || (rows <= kFewRows && n / 32 > 128)) return {n / 32 <= 128 ? -16 : -8, 1};
  const int blocks = n / 64, groups = k / 128, target = norm_scaled ? 192 : add_norm ? 256 : 384;
  int ksplit = 1;
  while (blocks * ksplit < target && ksplit < 8 && groups / (2 * ksplit) >= 4) ksplit *= 2;
  return {2, ksplit};
}

constexpr int kMaxStagedSlots = 512;  // norm-scaled layers of norms up to 16384 wide stage their partial sums

template <int WN, int STAGES, int E, int ACT>
void launch_frag(const FragArgs& args, int blocks, cudaStream_t stream) {
  constexpr int kStage = WN * (2048 + 128) + 4096, NB = 32 * WN;
  constexpr size_t kStages = static_cast<size_t>(STAGES) * kStage;
  constexpr size_t kMaxExtra = 16 * kMaxStagedSlots * 4 + (E == kAddNormE ? residual_tile_bytes(16, NB) + NB * 2 : 0);
  static_assert(STAGES * kStage >= 16 * 32 * WN * 4, "the tile reuses the stage slots");
  // behind the stages: the epilogue's inputs (the kernel's load_epilogue_inputs)
  size_t smem = kStages + staged_partials_bytes(args);
  if constexpr (E == kAddNormE) smem += residual_tile_bytes(args.rows, NB) + NB * 2;  // and the norm weights
  auto kernel = quant_frag_kernel<WN, STAGES, E, ACT>;
  static bool configured = false;  // per instantiation
  if (!configured) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(kStages + kMaxExtra)));
    configured = true;
  }
  if (args.pdl) launch(kernel, blocks, WN * 32, smem, stream, args);
  else kernel<<<blocks, WN * 32, smem, stream>>>(args);
}

// How a call launches. Single rows: programmatically, triggering early (the next kernel streams its first weights
// during this one). Above, layers of at most programmatic_bytes of weights do the same (short calls: their launch
// and ramp are a large part of them; the lab's 16-row q/k/v 10.2 -> 9.3 us, o 9.2 -> 7.8 back to back on an H100,
// sixteenth session), larger ones a plain launch: the programmatic one made back-to-back 16-row gate/up and down
// calls slower (fourteenth and sixteenth sessions in docs/benchmarks.md). set_frag_launch switches it at run time
// (A/B runs; read when a call is launched or captured).
struct FragLaunch {
  int64_t programmatic_bytes = int64_t{16} << 20;  // 16 MiB: Llama-3-8B's q/k/v (12 MiB) and o (8 MiB), not its MLP
  bool all_programmatic = false;  // every call programmatic (late trigger above one row): A/B runs
  bool early = true;  // the small layers' trigger at the start (else after the main loop): A/B runs
};
FragLaunch& frag_launch() {
  static FragLaunch launch;
  return launch;
}

template <int E, int ACT = 0>
void dispatch_frag(const FragArgs& args, const FragPlan& plan, cudaStream_t stream) {
  if (plan.warps == -16) return launch_frag_rows<16, E, ACT>(args, stream);
  if (plan.warps == -8) return launch_frag_rows<8, E, ACT>(args, stream);
  const int blocks = args.n / (32 * plan.warps) * plan.ksplit;
  if constexpr (E == kGatedE) launch_frag<2, 4, E, ACT>(args, blocks, stream);  // gated: 2 warps (checked)
  else if (plan.warps == 8) launch_frag<8, 3, E, ACT>(args, blocks, stream);
  else launch_frag<2, 4, E, ACT>(args, blocks, stream);
}

}  // namespace
}  // namespace flux

// the launch policy above (flux_infer.kernels.cuda.set_frag_launch)
void set_frag_launch(int64_t programmatic_bytes, bool all_programmatic, bool early) {
  flux::frag_launch() = {programmatic_bytes, all_programmatic, early};
}

// x @ W.T (+ bias) for a fragment-layout INT4 layer (qweight int32 [N, K / 8], scales/mins bf16 [N, K / 128], both
// reordered by fragments.to_fragments), 1..16 rows of bf16 x per launch (more: launches of 16). activation >= 0:
// a [gate; up] layer's act(gate) * up (0 = silu, 1 = gelu_tanh). scale_partials: the layer after an RMSNorm, its
// sums scaled per row by rsqrt(sum(scale_partials[row]) / K + eps). residual + norm_weight: the layer before one,
// returning (normed, h, partials [rows, N / 32]) as quant_mma_add_norm does. counters: int32, zero, at least
// N / 64 entries, reset by the kernels (one buffer per device serves every layer: launches in one stream). warps and
// ksplit: 0 = the launcher's plan; warps -8 / -16: quant_frag_rows_kernel (at most 8 rows), else the 16-row kernel.
std::vector<torch::Tensor> quant_frag(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor mins,
                                      c10::optional<torch::Tensor> bias, int64_t activation,
                                      c10::optional<torch::Tensor> scale_partials, double eps,
                                      c10::optional<torch::Tensor> residual, c10::optional<torch::Tensor> norm_weight,
                                      torch::Tensor counters, int64_t warps, int64_t ksplit) {
  flux::check_cuda(x, "x");
  const int64_t rows = x.size(0), k = x.size(1), n = qweight.size(0);
  const bool gated = activation >= 0, add_norm = residual.has_value();
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.stride(0) == k && x.scalar_type() == at::kBFloat16 && rows >= 1 &&
                  flux::aligned16(x),
              "quant_frag: x must be contiguous bf16 [rows, K], 16-byte aligned");
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.is_contiguous() && qweight.size(1) * 8 == k &&
                  k % 256 == 0 && n % 64 == 0 && flux::aligned16(qweight) && scales.is_contiguous() &&
                  mins.is_contiguous() && scales.scalar_type() == at::kBFloat16 &&
                  mins.scalar_type() == at::kBFloat16 && scales.numel() == n * (k / 128) &&
                  mins.numel() == scales.numel() && flux::aligned16(scales) && flux::aligned16(mins),
              "quant_frag: fragment-layout INT4 weights, group 128 (an even number of groups), N a multiple of 64, "
              "bf16 scales and mins");
  TORCH_CHECK(!bias || (bias->is_contiguous() && bias->scalar_type() == at::kBFloat16 && bias->numel() == n),
              "quant_frag: bias must be bf16 [N]");
  TORCH_CHECK(activation >= -1 && activation <= 1 && !(gated && add_norm),
              "quant_frag: activation -1 (none), 0 (silu) or 1 (gelu_tanh); a gated layer does not feed a norm");
  TORCH_CHECK(counters.scalar_type() == at::kInt && counters.is_contiguous() && counters.numel() >= n / 64,
              "quant_frag: counters must be int32 with at least N / 64 zeros");
  TORCH_CHECK(!scale_partials || (scale_partials->dim() == 2 && scale_partials->size(0) == rows &&
                                  scale_partials->is_contiguous() && scale_partials->scalar_type() == at::kFloat),
              "quant_frag: scale_partials must be contiguous float32 [rows, slots]");
  TORCH_CHECK(!add_norm || (norm_weight && residual->dim() == 2 && residual->size(0) == rows &&
                            residual->size(1) == n && residual->stride(1) == 1 &&
                            residual->scalar_type() == at::kBFloat16 && norm_weight->is_contiguous() &&
                            norm_weight->numel() == n && norm_weight->scalar_type() == at::kBFloat16),
              "quant_frag: residual must be bf16 [rows, N] with a contiguous last dim, norm_weight bf16 [N]");
  // the kernel copies the residual's rows and the norm weight in 16-byte runs: other alignments are copied first
  torch::Tensor residual_pairs, norm_weight_pairs;
  if (add_norm) {
    const bool runs = residual->stride(0) % 8 == 0 && flux::aligned16(*residual);
    residual_pairs = runs ? *residual : residual->clone(at::MemoryFormat::Contiguous);
    norm_weight_pairs = flux::aligned16(*norm_weight) ? *norm_weight : norm_weight->clone(at::MemoryFormat::Contiguous);
  }
  // and the norm-scaled rows' partial sums in 16-byte runs where a row's are (slots a multiple of 4)
  torch::Tensor partials_runs;
  if (scale_partials)
    partials_runs = flux::aligned16(*scale_partials) ? *scale_partials : scale_partials->clone();
  flux::FragPlan plan = flux::choose_frag_plan(static_cast<int>(n), static_cast<int>(k), gated,
                                               scale_partials.has_value(), add_norm, static_cast<int>(rows));
  if (warps != 0) plan.warps = static_cast<int>(warps);
  if (ksplit > 0) plan.ksplit = static_cast<int>(ksplit);
  else if (warps < 0) plan.ksplit = 1;
  const bool few = plan.warps < 0;
  TORCH_CHECK(few ? (plan.warps == -8 || plan.warps == -16) && plan.ksplit == 1 && rows <= flux::kFewRows
                  : (plan.warps == 2 || (plan.warps == 8 && !gated)) && n % (32 * plan.warps) == 0 &&
                        plan.ksplit >= 1 && plan.ksplit <= k / 128,
              "quant_frag: 2 warps (8 for plain layers of N a multiple of 256), 1..K/128 splits; or -8 / -16 (the "
              "kernel for up to 8 rows, no K split) for at most 8 rows");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n_out = gated ? n / 2 : n;
  auto out = torch::empty({rows, n_out}, x.options());
  torch::Tensor normed, partials;
  if (add_norm) {
    normed = torch::empty({rows, n}, x.options());
    partials = torch::empty({rows, n / 32}, x.options().dtype(at::kFloat));
  }
  torch::Tensor ws;
  if (plan.ksplit > 1) ws = torch::empty({plan.ksplit * 16 * n}, x.options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    flux::FragArgs args = {};
    args.rows = static_cast<int>(std::min<int64_t>(16, rows - r0));
    args.out = reinterpret_cast<at::BFloat16*>(out.data_ptr()) + r0 * n_out;
    args.x = reinterpret_cast<const at::BFloat16*>(x.data_ptr()) + r0 * k;
    args.codes = reinterpret_cast<const uint32_t*>(qweight.data_ptr());
    args.scales = reinterpret_cast<const uint16_t*>(scales.data_ptr());
    args.mins = reinterpret_cast<const uint16_t*>(mins.data_ptr());
    args.bias = bias ? reinterpret_cast<const at::BFloat16*>(bias->data_ptr()) : nullptr;
    args.ws = plan.ksplit > 1 ? ws.data_ptr<float>() : nullptr;
    args.counters = counters.data_ptr<int>();
    args.n = static_cast<int>(n);
    args.k = static_cast<int>(k);
    args.ksplit = plan.ksplit;
    const bool small = n * k / 2 <= flux::frag_launch().programmatic_bytes;
    args.pdl = args.rows == 1 || small || flux::frag_launch().all_programmatic;
    args.early = flux::trigger_early(rows) || (small && flux::frag_launch().early && flux::early_trigger());
    if (scale_partials) {
      args.scale_norm.slots = static_cast<int>(partials_runs.size(1));
      args.scale_norm.partials = partials_runs.data_ptr<float>() + r0 * args.scale_norm.slots;
      args.scale_norm.inv_k = 1.f / static_cast<float>(k);
      args.scale_norm.eps = static_cast<float>(eps);
      args.stage_partials = args.scale_norm.slots <= flux::kMaxStagedSlots;
    }
    if (add_norm) {
      args.residual = reinterpret_cast<const at::BFloat16*>(residual_pairs.data_ptr()) + r0 * residual_pairs.stride(0);
      args.residual_stride = residual_pairs.stride(0);
      args.norm_weight = reinterpret_cast<const at::BFloat16*>(norm_weight_pairs.data_ptr());
      args.normed = reinterpret_cast<at::BFloat16*>(normed.data_ptr()) + r0 * n;
      args.norm_partials = partials.data_ptr<float>() + r0 * (n / 32);
    }
    if (gated && activation == 0) flux::dispatch_frag<flux::kGatedE, 0>(args, plan, stream);
    else if (gated) flux::dispatch_frag<flux::kGatedE, 1>(args, plan, stream);
    else if (add_norm) flux::dispatch_frag<flux::kAddNormE>(args, plan, stream);
    else flux::dispatch_frag<flux::kPlainE>(args, plan, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (add_norm) return {normed, out, partials};
  return {out};
}

// The dense bf16 weight [N, K] a fragment-layout INT4 layer stands for (long prefills: cuBLAS then runs the matmul).
torch::Tensor frag_dequantize(torch::Tensor qweight, torch::Tensor scales, torch::Tensor mins) {
  flux::check_cuda(qweight, "qweight");
  const int64_t n = qweight.size(0), k = qweight.size(1) * 8;
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.is_contiguous() && k % 256 == 0 && n % 32 == 0 &&
                  scales.is_contiguous() && mins.is_contiguous() && scales.scalar_type() == at::kBFloat16 &&
                  mins.scalar_type() == at::kBFloat16 && scales.numel() == n * (k / 128) &&
                  mins.numel() == scales.numel(),
              "frag_dequantize: fragment-layout INT4 weights, group 128 (an even number of groups), bf16 scales and "
              "mins");
  const c10::cuda::CUDAGuard guard(qweight.device());
  auto out = torch::empty({n, k}, scales.options());
  const int64_t chunks = n * k / 8;
  if (chunks == 0) return out;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((chunks + threads - 1) / threads, 65535);
  flux::launch(flux::frag_dequantize_kernel, blocks, threads, 0, c10::cuda::getCurrentCUDAStream(),
               reinterpret_cast<at::BFloat16*>(out.data_ptr()), reinterpret_cast<const uint32_t*>(qweight.data_ptr()),
               reinterpret_cast<const at::BFloat16*>(scales.data_ptr()),
               reinterpret_cast<const at::BFloat16*>(mins.data_ptr()), chunks, static_cast<int>(k));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
