// Bilinear sampling with ATen's arithmetic (align_corners=False), shared by the post-processing kernels.
#pragma once

#include <cuda_runtime.h>

namespace videomt_fast {

// One axis of a bilinear tap: source indices and weights for output coordinate `dst`.
struct Tap {
  int i0;
  int i1;
  float l0;
  float l1;
};

// ATen: area_pixel_compute_scale = float(in) / out (host), area_pixel_compute_source_index =
// max(scale * (dst + 0.5) - 0.5, 0), truncation to int, the +1 neighbour clamped at the border.
__device__ __forceinline__ Tap make_tap(int dst, int in_size, float scale) {
  float src = scale * (dst + 0.5f) - 0.5f;
  src = src < 0.f ? 0.f : src;
  const int i0 = static_cast<int>(src);
  const int step = (i0 < in_size - 1) ? 1 : 0;
  Tap t;
  t.i0 = i0;
  t.i1 = i0 + step;
  t.l1 = src - i0;
  t.l0 = 1.f - t.l1;
  return t;
}

// The same expression, association and order as ATen's upsample_bilinear2d_out_frame.
__device__ __forceinline__ float sample(const float* __restrict__ plane, int w, const Tap& ty, const Tap& tx) {
  const float* r0 = plane + static_cast<long long>(ty.i0) * w;
  const float* r1 = plane + static_cast<long long>(ty.i1) * w;
  return ty.l0 * (tx.l0 * __ldg(r0 + tx.i0) + tx.l1 * __ldg(r0 + tx.i1)) +
         ty.l1 * (tx.l0 * __ldg(r1 + tx.i0) + tx.l1 * __ldg(r1 + tx.i1));
}

// torch's float sigmoid on CUDA: 1 / (1 + exp(-x)) with IEEE expf and division.
__device__ __forceinline__ float sigmoidf_exact(float x) { return 1.f / (1.f + expf(-x)); }

inline float host_scale(int in_size, int out_size) {
  return static_cast<float>(in_size) / static_cast<float>(out_size);
}

constexpr int kThreads = 256;

}  // namespace videomt_fast
