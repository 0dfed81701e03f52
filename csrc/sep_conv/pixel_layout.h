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

// Weight repacking. A weight tensor of one group is an (R, Cc, T) array src[r][c][t] (R output
// channels, Cc input channels, T taps), read through its strides (a model converted with
// .to(memory_format=torch.channels_last) has channels_last weights; copying them contiguous
// on every call would cost more than the repacking). Each tap t becomes its own matrix,
// converted to Op:
//   split_taps_transposed: dst[t] is Cc x R, dst[(t * Cc + c) * R + r] = src[r][c][t];
//   split_taps:            dst[t] is R x Cc, dst[(t * R + r) * Cc + c] = src[r][c][t];
// both for the rows r in [r_begin, r_end). The transpose runs in kBlock x kBlock blocks with r
// innermost, so each destination line is written in one burst while the block's source lines
// stay in L1 (a loop that writes each line one element per pass keeps dozens of lines live,
// and with R a multiple of 128 floats they fall into the same few L1 sets and thrash).
template <typename In>
struct WeightTaps {
  const In* data;
  int64_t R, Cc, T;    // sizes
  int64_t sr, sc, st;  // strides in elements
  const In& at(int64_t r, int64_t c, int64_t t) const { return data[r * sr + c * sc + t * st]; }
  // Group g's (R, Cc, T) block of a weight whose dim 0 holds the groups one after another.
  WeightTaps group(int64_t g) const { return {data + g * R * sr, R, Cc, T, sr, sc, st}; }
};

template <typename In, typename Op>
void split_taps_transposed(const WeightTaps<In>& src, Op* dst, int64_t r_begin, int64_t r_end) {
  const int64_t R = src.R, Cc = src.Cc, T = src.T;
  for (int64_t r0 = r_begin; r0 < r_end; r0 += kBlock)
    for (int64_t c0 = 0; c0 < Cc; c0 += kBlock) {
      const int64_t re = std::min(r_end, r0 + kBlock), ce = std::min(Cc, c0 + kBlock);
      for (int64_t c = c0; c < ce; ++c)
        for (int64_t t = 0; t < T; ++t) {
          Op* d = dst + (t * Cc + c) * R;
          for (int64_t r = r0; r < re; ++r) d[r] = Op(src.at(r, c, t));
        }
    }
}

template <typename In, typename Op>
void split_taps(const WeightTaps<In>& src, Op* dst, int64_t r_begin, int64_t r_end) {
  const int64_t R = src.R, Cc = src.Cc, T = src.T;
  for (int64_t r = r_begin; r < r_end; ++r)
    for (int64_t t = 0; t < T; ++t) {
      Op* d = dst + (t * R + r) * Cc;
      for (int64_t c = 0; c < Cc; ++c) d[c] = Op(src.at(r, c, t));
    }
}

// Runs f(g, r_begin, r_end) in parallel over the rows [0, R) of each of `groups` groups, in
// chunks of whole kBlock-row blocks.
template <typename F>
void parallel_over_row_blocks(int64_t groups, int64_t R, const F& f) {
  const int64_t blocks = (R + kBlock - 1) / kBlock;
  at::parallel_for(0, groups * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / blocks, r0 = task % blocks * kBlock;
      f(g, r0, std::min(R, r0 + kBlock));
    }
  });
}

}  // namespace sep_conv
}  // namespace lowrank
