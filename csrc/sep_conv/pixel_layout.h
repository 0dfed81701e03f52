// Moving activation rows between the tensors' memory format and the tiles' pixel-major
// buffers (pixels x channels, channels contiguous), converting dtypes on the way. NCHW needs
// a transpose; it runs in kBlock x kBlock blocks so that both sides stay in L1.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace lowrank {
namespace sep_conv {

constexpr int64_t kBlock = 16;

// dst (nin*W pixels x cg) = channels [c0, c0 + cg) of rows [top, top + nin) of one image
// (C channels, H x W), converted to Op; rows outside [0, H) are zero.
template <typename In, typename Op, bool CL>
void load_pixel_rows(const In* img, int64_t C, int64_t H, int64_t W, int64_t c0, int64_t cg, int64_t top, int64_t nin,
                     Op* dst) {
  for (int64_t rr = 0; rr < nin; ++rr) {
    const int64_t h = top + rr;
    Op* d = dst + rr * W * cg;
    if (h < 0 || h >= H) {
      std::fill_n(d, W * cg, Op(0));
    } else if (CL) {
      for (int64_t w = 0; w < W; ++w) {
        const In* src = img + (h * W + w) * C + c0;
        for (int64_t c = 0; c < cg; ++c) d[w * cg + c] = Op(src[c]);
      }
    } else {
      const In* plane = img + (c0 * H + h) * W;  // channel c0's row h; channel c at + c*H*W
      for (int64_t cb = 0; cb < cg; cb += kBlock)
        for (int64_t wb = 0; wb < W; wb += kBlock) {
          const int64_t ce = std::min(cg, cb + kBlock), we = std::min(W, wb + kBlock);
          for (int64_t w = wb; w < we; ++w)
            for (int64_t c = cb; c < ce; ++c) d[w * cg + c] = Op(plane[c * H * W + w]);
        }
    }
  }
}

// dst[i] = src[i] rounded to In (the intermediate's dtype in the unfused pair) then held as Op.
template <typename In, typename Op, typename Acc>
void round_rows(const Acc* src, int64_t n, Op* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Op(static_cast<In>(src[i]));
}

// Output rows [r0, r0 + rows), channels [n0, n0 + ng) of one image (N channels, Ho x Wo) =
// src (rows x ld_pix pixels x ng, the first Wo pixels of each row used) + bias, converted to Out.
template <typename Acc, typename Out, bool CL>
void store_pixel_rows(const Acc* src, int64_t ld_pix, int64_t ng, const Acc* bias, int64_t rows, int64_t Wo, Out* img,
                      int64_t N, int64_t Ho, int64_t n0, int64_t r0) {
  for (int64_t rr = 0; rr < rows; ++rr) {
    const Acc* s = src + rr * ld_pix * ng;
    if (CL) {
      Out* d = img + (r0 + rr) * Wo * N + n0;
      for (int64_t w = 0; w < Wo; ++w)
        for (int64_t n = 0; n < ng; ++n) d[w * N + n] = Out(s[w * ng + n] + bias[n]);
    } else {
      Out* d = img + (n0 * Ho + r0 + rr) * Wo;  // channel n at + n*Ho*Wo
      for (int64_t nb = 0; nb < ng; nb += kBlock)
        for (int64_t wb = 0; wb < Wo; wb += kBlock) {
          const int64_t ne = std::min(ng, nb + kBlock), we = std::min(Wo, wb + kBlock);
          for (int64_t n = nb; n < ne; ++n)
            for (int64_t w = wb; w < we; ++w) d[n * Ho * Wo + w] = Out(s[w * ng + n] + bias[n]);
        }
    }
  }
}

// Visits every weight once for repacking: put_v(g, i, c, k, w) for weight_v[g*Kg + k][c][i] and
// put_h(g, j, k, n, w) for weight_h[g*Ng + n][k][j]. The weights are read in order, in 16 x 32
// blocks whose scattered writes stay in L1, in parallel over groups and blocks.
template <typename Shape, typename In, typename PutV, typename PutH>
void for_each_weight(const Shape& s, const In* wv, const In* wh, PutV put_v, PutH put_h) {
  const int64_t kblocks = (s.kg + 15) / 16, nblocks = (s.ng + 15) / 16;
  at::parallel_for(0, s.groups * (kblocks + nblocks), 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / (kblocks + nblocks), blk = task % (kblocks + nblocks);
      if (blk < kblocks) {
        for (int64_t c0 = 0; c0 < s.cg; c0 += 32)
          for (int64_t k = blk * 16; k < std::min(s.kg, blk * 16 + 16); ++k)
            for (int64_t c = c0; c < std::min(s.cg, c0 + 32); ++c)
              for (int64_t i = 0; i < s.dv; ++i) put_v(g, i, c, k, wv[((g * s.kg + k) * s.cg + c) * s.dv + i]);
      } else {
        const int64_t n0 = (blk - kblocks) * 16;
        for (int64_t k0 = 0; k0 < s.kg; k0 += 32)
          for (int64_t n = n0; n < std::min(s.ng, n0 + 16); ++n)
            for (int64_t k = k0; k < std::min(s.kg, k0 + 32); ++k)
              for (int64_t j = 0; j < s.dh; ++j) put_h(g, j, k, n, wh[((g * s.ng + n) * s.kg + k) * s.dh + j]);
      }
    }
  });
}

}  // namespace sep_conv
}  // namespace lowrank
