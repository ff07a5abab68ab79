// quant_frag_rows: the fragment layout's kernel for 1-8 rows of x (decode of a few sequences), included by
// quant_frag.cu after FragArgs and its helpers.
//
// The 16-row kernel (quant_frag.cu) takes x as the MMA's A operand: at one row 15 of its 16 rows are zeros, and its
// 2-warp blocks split K across blocks through a workspace. Here the roles swap (Marlin's small-batch form): the
// codes are the A operand (16 features x 16 inputs: a lane's words j and j + 1 of the fragment layout hold rows g
// and g + 8 of it) and x the B operand (16 inputs x 8 rows), so a group takes 16 MMAs for 32 features instead of
// 32, and 8 more against ones for the rows' sums of x. A block streams one fragment tile (gated: the gate tile and
// its up tile) with KW warps splitting its groups round robin; each warp loads its codes, scales and mins straight
// into registers (no shared-memory ring, no barrier per group) and its x fragments from global memory (L1 hits
// after the first block of an SM); the warps' sums meet in shared memory in warp order, and warp 0 runs the
// epilogue. Same epilogues and roundings as the 16-row kernel; the sums come in another order.
namespace flux {
namespace {

constexpr int kFewRows = 8;  // the MMA's N: rows of x this kernel takes

template <int KW, int E, int ACT = 0>
__global__ void __launch_bounds__(KW * 32) quant_frag_rows_kernel(const FragArgs a) {
  constexpr int T = E == kGatedE ? 2 : 1;  // fragment tiles a warp streams (gated: gate and up)
  constexpr int U = E == kGatedE ? 1 : 2;  // groups a warp has in flight per iteration
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int groups = a.k / 128, lt = blockIdx.x;
  const int tiles[2] = {lt, lt + a.n / 64};  // (gated: the up tile of gate tile lt)
  const bool scaled = a.scale_norm.partials != nullptr;
  __shared__ float row_scale[kFewRows];
  // once a warp's first weights are on their way (or, without groups, after its empty loop): the earlier kernels'
  // outputs (x, the norm's partial sums) may be read
  auto wait_for_inputs = [&]() {
    pdl_wait();
    if (a.early) pdl_trigger();
    if (scaled && warp < a.rows) {
      const float s = row_norm_scale(a.scale_norm, warp, lane);
      if (lane == 0) row_scale[warp] = s;
    }
  };
  // lane (g, t)'s x: row g, inputs 2 t, 2 t + 1 and 2 t + 8, 2 t + 9 of each 16-input slice (zeros past the rows)
  const at::BFloat16* xrow = a.x + static_cast<int64_t>(g) * a.k + 2 * t;
  const bool xvalid = g < a.rows;
  const uint32_t ones[4] = {0x3F803F80u, 0x3F803F80u, 0x3F803F80u, 0x3F803F80u};
  float acc[T][2][4] = {};
  for (int grp0 = warp; grp0 < groups; grp0 += KW * U) {
    uint4 code[U][T][4], sv[U][T], mv[U][T];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int grp = grp0 + u * KW;
      const bool valid = grp < groups;
#pragma unroll
      for (int tt = 0; tt < T; ++tt) {
        const uint4* w =
            reinterpret_cast<const uint4*>(a.codes) + (static_cast<int64_t>(tiles[tt]) * groups + grp) * 128;
#pragma unroll
        for (int p = 0; p < 4; ++p) code[u][tt][p] = valid ? load_stream(w + p * 32 + lane) : make_uint4(0, 0, 0, 0);
        // the group's (scale, min) pair (kernels/quant_frag.py): lane g's features 8 j + g sit in its 16 bytes
        // (g / 2) of the scales and of the mins, word j, half g % 2
        const uint16_t* pair = frag_pair(a.scales, a.mins, tiles[tt], groups, grp) + (g >> 1) * 8;
        sv[u][tt] = valid ? __ldg(reinterpret_cast<const uint4*>(pair)) : make_uint4(0, 0, 0, 0);
        mv[u][tt] = valid ? __ldg(reinterpret_cast<const uint4*>(pair + 32)) : make_uint4(0, 0, 0, 0);
      }
    }
    if (grp0 == warp) wait_for_inputs();
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int grp = grp0 + u * KW;
      if (grp >= groups) break;
      uint32_t bx[8][2];
#pragma unroll
      for (int s = 0; s < 8; ++s) {
        const int* pairs = reinterpret_cast<const int*>(xrow + grp * 128 + 16 * s);  // (after pdl_wait)
        bx[s][0] = xvalid ? static_cast<uint32_t>(load_coherent(pairs)) : 0u;
        bx[s][1] = xvalid ? static_cast<uint32_t>(load_coherent(pairs + 4)) : 0u;
      }
      float accg[T][2][4], sx[4];
#pragma unroll
      for (int s = 0; s < 8; ++s) {
        const int p = s >> 1, h = s & 1;
        if (s == 0) mma_zero(sx, ones, bx[s][0], bx[s][1]);
        else mma<at::BFloat16>(sx, ones, bx[s][0], bx[s][1]);
#pragma unroll
        for (int tt = 0; tt < T; ++tt) {
          const uint32_t qw[4] = {code[u][tt][p].x, code[u][tt][p].y, code[u][tt][p].z, code[u][tt][p].w};
#pragma unroll
          for (int jp = 0; jp < 2; ++jp) {
            const uint32_t af[4] = {int4_biased<at::BFloat16>(qw[2 * jp], 2 * h),
                                    int4_biased<at::BFloat16>(qw[2 * jp + 1], 2 * h),
                                    int4_biased<at::BFloat16>(qw[2 * jp], 2 * h + 1),
                                    int4_biased<at::BFloat16>(qw[2 * jp + 1], 2 * h + 1)};
            if (s == 0) mma_zero(accg[tt][jp], af, bx[s][0], bx[s][1]);
            else mma<at::BFloat16>(accg[tt][jp], af, bx[s][0], bx[s][1]);
          }
        }
      }
      // acc += s acc_g + (m - 128 s) sum(x): element e of accg[tt][jp] is feature 16 jp + 8 (e / 2) + g (word
      // j = 2 jp + e / 2), row 2 t + e % 2; sx[0] and sx[1] the sums of rows 2 t and 2 t + 1
#pragma unroll
      for (int tt = 0; tt < T; ++tt) {
        const uint32_t svv[4] = {sv[u][tt].x, sv[u][tt].y, sv[u][tt].z, sv[u][tt].w};
        const uint32_t mvv[4] = {mv[u][tt].x, mv[u][tt].y, mv[u][tt].z, mv[u][tt].w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float s = g & 1 ? bf_hi(svv[j]) : bf_lo(svv[j]);
          const float m = fmaf(-128.f, s, g & 1 ? bf_hi(mvv[j]) : bf_lo(mvv[j]));
          float* d = accg[tt][j >> 1] + 2 * (j & 1);
          float* o = acc[tt][j >> 1] + 2 * (j & 1);
          o[0] = fmaf(s, d[0], fmaf(m, sx[0], o[0]));
          o[1] = fmaf(s, d[1], fmaf(m, sx[1], o[1]));
        }
      }
    }
  }
  if (warp >= groups) wait_for_inputs();  // a warp without groups
  if (!a.early) pdl_trigger();
  // the warps' sums into warp 0's, in warp order
  __shared__ float4 sums[(KW > 1 ? KW - 1 : 1) * T * 2 * 32];
  if (warp > 0)
#pragma unroll
    for (int tt = 0; tt < T; ++tt)
#pragma unroll
      for (int jp = 0; jp < 2; ++jp)
        sums[(((warp - 1) * T + tt) * 2 + jp) * 32 + lane] =
            make_float4(acc[tt][jp][0], acc[tt][jp][1], acc[tt][jp][2], acc[tt][jp][3]);
  __syncthreads();  // (and row_scale)
  if (warp > 0) return;
  for (int w = 1; w < KW; ++w)
#pragma unroll
    for (int tt = 0; tt < T; ++tt)
#pragma unroll
      for (int jp = 0; jp < 2; ++jp) {
        const float4 v = sums[(((w - 1) * T + tt) * 2 + jp) * 32 + lane];
        acc[tt][jp][0] += v.x;
        acc[tt][jp][1] += v.y;
        acc[tt][jp][2] += v.z;
        acc[tt][jp][3] += v.w;
      }
  // the layer's output: element e of acc[.][jp] is row 2 t + e % 2, tile feature 16 jp + 8 (e / 2) + g
  const int n_out = E == kGatedE ? a.n / 2 : a.n;
  float squares[2] = {0.f, 0.f};
#pragma unroll
  for (int jp = 0; jp < 2; ++jp)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int m = 2 * t + (e & 1), f = lt * 32 + 16 * jp + 8 * (e >> 1) + g;
      if (m >= a.rows) continue;
      const float scale = scaled ? row_scale[m] : 1.f;
      auto value = [&](float sum, int feature) {
        float v = sum * scale;
        if (a.bias != nullptr) v += static_cast<float>(a.bias[feature]);
        return v;
      };
      const int64_t at = static_cast<int64_t>(m) * n_out + f;
      if constexpr (E == kGatedE) {
        const float gate = rnd<at::BFloat16>(value(acc[0][jp][e], f)), up = value(acc[T - 1][jp][e], n_out + f);
        a.out[at] = from_float<at::BFloat16>(rnd<at::BFloat16>(activation(gate, ACT)) * rnd<at::BFloat16>(up));
      } else if constexpr (E == kAddNormE) {
        const float r = static_cast<float>(a.residual[m * a.residual_stride + f]);  // (warp 0 waited)
        const float h = rnd<at::BFloat16>(rnd<at::BFloat16>(value(acc[0][jp][e], f)) + r);
        a.out[at] = from_float<at::BFloat16>(h);
        a.normed[at] = from_float<at::BFloat16>(h * static_cast<float>(a.norm_weight[f]));
        squares[e & 1] += h * h;
      } else {
        a.out[at] = from_float<at::BFloat16>(value(acc[0][jp][e], f));
      }
    }
  if constexpr (E == kAddNormE) {  // sums of h^2 over the tile's 32 features: lanes of one t hold a row's
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      squares[r] += __shfl_xor_sync(0xffffffffu, squares[r], 4);
      squares[r] += __shfl_xor_sync(0xffffffffu, squares[r], 8);
      squares[r] += __shfl_xor_sync(0xffffffffu, squares[r], 16);
      if (g == 0 && 2 * t + r < a.rows) a.norm_partials[static_cast<int64_t>(2 * t + r) * (a.n / 32) + lt] = squares[r];
    }
  }
}

template <int KW, int E, int ACT>
void launch_frag_rows(const FragArgs& args, cudaStream_t stream) {
  const int blocks = E == kGatedE ? args.n / 64 : args.n / 32;
  auto kernel = quant_frag_rows_kernel<KW, E, ACT>;
  if (args.pdl) launch(kernel, blocks, KW * 32, 0, stream, args);
  else kernel<<<blocks, KW * 32, 0, stream>>>(args);
}

}  // namespace
}  // namespace flux
