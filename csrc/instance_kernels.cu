// Instance segmentation: per-query mask statistics and last-kept-query painting, both straight from
// the low-resolution logits; the (Q, H, W) upsampled stack never exists.
#include "postprocess.h"
#include "upsample.cuh"

namespace videomt_fast {
namespace {

// grid (tiles, Q), block kThreads. Block (t, q) covers target rows [t*kStatsRows, (t+1)*kStatsRows).
__global__ void instance_stats_kernel(const float* __restrict__ masks, int h, int w, int H, int W, float scale_h,
                                      float scale_w, const uint8_t* __restrict__ candidate,
                                      int32_t* __restrict__ part_count, float* __restrict__ part_sum) {
  const int tile = blockIdx.x;
  const int q = blockIdx.y;
  const int tiles = gridDim.x;
  if (!candidate[q]) {
    if (threadIdx.x == 0) {
      part_count[static_cast<long long>(q) * tiles + tile] = 0;
      part_sum[static_cast<long long>(q) * tiles + tile] = 0.f;
    }
    return;
  }
  const float* plane = masks + static_cast<long long>(q) * h * w;
  int count = 0;
  float sum = 0.f;
  const int y_end = min(H, (tile + 1) * kStatsRows);
  for (int y = tile * kStatsRows; y < y_end; ++y) {
    const Tap ty = make_tap(y, h, scale_h);
    for (int x = threadIdx.x; x < W; x += blockDim.x) {
      const float v = sample(plane, w, ty, make_tap(x, w, scale_w));
      if (v > 0.f) {
        ++count;
        sum += sigmoidf_exact(v);
      }
    }
  }
  // block reduction: warps by shuffle, then the first warp over the warp partials
  __shared__ int s_count[kThreads / 32];
  __shared__ float s_sum[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) {
    count += __shfl_down_sync(0xffffffffu, count, off);
    sum += __shfl_down_sync(0xffffffffu, sum, off);
  }
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) {
    s_count[warp] = count;
    s_sum[warp] = sum;
  }
  __syncthreads();
  if (warp == 0) {
    const int nwarps = blockDim.x >> 5;
    count = lane < nwarps ? s_count[lane] : 0;
    sum = lane < nwarps ? s_sum[lane] : 0.f;
    for (int off = 16; off > 0; off >>= 1) {
      count += __shfl_down_sync(0xffffffffu, count, off);
      sum += __shfl_down_sync(0xffffffffu, sum, off);
    }
    if (lane == 0) {
      part_count[static_cast<long long>(q) * tiles + tile] = count;
      part_sum[static_cast<long long>(q) * tiles + tile] = sum;
    }
  }
}

// grid (ceil(W / kThreads), H), block kThreads; dynamic shared memory: Q int32 (the kept list).
__global__ void instance_paint_kernel(const float* __restrict__ masks, int Q, int h, int w, int H, int W,
                                      float scale_h, float scale_w, const int32_t* __restrict__ kept,
                                      const int32_t* __restrict__ num_kept, const int32_t* __restrict__ ids,
                                      int64_t* __restrict__ out) {
  extern __shared__ int32_t s_kept[];
  const int n = min(*num_kept, Q);
  for (int k = threadIdx.x; k < n; k += blockDim.x) s_kept[k] = kept[k];
  __syncthreads();
  const int y = blockIdx.y;
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  if (x >= W) return;
  const Tap ty = make_tap(y, h, scale_h);
  const Tap tx = make_tap(x, w, scale_w);
  long long id = -1;
  for (int k = n - 1; k >= 0; --k) {  // the last kept query that covers the pixel wins
    const int q = s_kept[k];
    if (sample(masks + static_cast<long long>(q) * h * w, w, ty, tx) > 0.f) {
      id = ids[q];
      break;
    }
  }
  out[static_cast<long long>(y) * W + x] = id;
}

}  // namespace

cudaError_t launch_instance_stats(const float* masks, int Q, int h, int w, int H, int W, const uint8_t* candidate,
                                  int32_t* part_count, float* part_sum, cudaStream_t stream) {
  if (Q == 0 || H == 0 || W == 0) return cudaSuccess;
  dim3 grid(stats_tiles(H), Q);
  instance_stats_kernel<<<grid, kThreads, 0, stream>>>(masks, h, w, H, W, host_scale(h, H), host_scale(w, W),
                                                       candidate, part_count, part_sum);
  return cudaGetLastError();
}

cudaError_t launch_instance_paint(const float* masks, int Q, int h, int w, int H, int W, const int32_t* kept,
                                  const int32_t* num_kept, const int32_t* ids, int64_t* out, cudaStream_t stream) {
  if (H == 0 || W == 0) return cudaSuccess;
  dim3 grid((W + kThreads - 1) / kThreads, H);
  const size_t shared = sizeof(int32_t) * (Q > 0 ? Q : 1);
  instance_paint_kernel<<<grid, kThreads, shared, stream>>>(masks, Q, h, w, H, W, host_scale(h, H),
                                                            host_scale(w, W), kept, num_kept, ids, out);
  return cudaGetLastError();
}

}  // namespace videomt_fast
