// Semantic segmentation: upsample the (C, h, w) class maps and take the per-pixel argmax in one pass;
// the (C, H, W) scores are written only when asked for.
#include "postprocess.h"
#include "upsample.cuh"

namespace videomt_fast {
namespace {

// grid (ceil(W / kThreads), H), block kThreads.
__global__ void semantic_argmax_kernel(const float* __restrict__ mixed, int C, int h, int w, int H, int W,
                                       float scale_h, float scale_w, int64_t* __restrict__ out,
                                       float* __restrict__ scores) {
  const int y = blockIdx.y;
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  if (x >= W) return;
  const Tap ty = make_tap(y, h, scale_h);
  const Tap tx = make_tap(x, w, scale_w);
  const long long plane_in = static_cast<long long>(h) * w;
  const long long plane_out = static_cast<long long>(H) * W;
  const long long pixel = static_cast<long long>(y) * W + x;
  float best = 0.f;
  int best_c = 0;
  for (int c = 0; c < C; ++c) {
    const float v = sample(mixed + c * plane_in, w, ty, tx);
    if (scores != nullptr) scores[c * plane_out + pixel] = v;
    if (c == 0 || v > best || (v != v && best == best)) {  // first max wins; NaN is a max, as in torch.argmax
      best = v;
      best_c = c;
    }
  }
  out[pixel] = best_c;
}

}  // namespace

cudaError_t launch_semantic_argmax(const float* mixed, int C, int h, int w, int H, int W, int64_t* out, float* scores,
                                   cudaStream_t stream) {
  if (H == 0 || W == 0) return cudaSuccess;
  dim3 grid((W + kThreads - 1) / kThreads, H);
  semantic_argmax_kernel<<<grid, kThreads, 0, stream>>>(mixed, C, h, w, H, W, host_scale(h, H), host_scale(w, W), out,
                                                        scores);
  return cudaGetLastError();
}

}  // namespace videomt_fast
