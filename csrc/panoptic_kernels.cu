// Panoptic segmentation: one pass over the kept queries gives each pixel's winner (argmax of
// score * sigmoid) and every area the overlap rule needs; a second, trivial pass maps winners to ids.
#include "postprocess.h"
#include "upsample.cuh"

namespace videomt_fast {
namespace {

// grid (ceil(W / kThreads), H), block kThreads.
// dynamic shared memory: 4 * Q int32 = kept list, original, assigned and final areas of this block.
__global__ void panoptic_assign_kernel(const float* __restrict__ masks, int Q, int h, int w, int H, int W,
                                       float scale_h, float scale_w, const int32_t* __restrict__ kept,
                                       const int32_t* __restrict__ num_kept, const float* __restrict__ scores,
                                       float mask_threshold, int32_t* __restrict__ code,
                                       int32_t* __restrict__ original_area, int32_t* __restrict__ assigned_area,
                                       int32_t* __restrict__ final_area) {
  extern __shared__ int32_t s_mem[];
  int32_t* s_kept = s_mem;
  int32_t* s_original = s_mem + Q;
  int32_t* s_assigned = s_mem + 2 * Q;
  int32_t* s_final = s_mem + 3 * Q;
  const int n = min(*num_kept, Q);
  for (int k = threadIdx.x; k < n; k += blockDim.x) {
    s_kept[k] = kept[k];
    s_original[k] = 0;
    s_assigned[k] = 0;
    s_final[k] = 0;
  }
  __syncthreads();

  const int y = blockIdx.y;
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  const bool inside = x < W;
  const int lane = threadIdx.x & 31;
  const Tap ty = make_tap(y, h, scale_h);
  const Tap tx = make_tap(inside ? x : 0, w, scale_w);

  float best = 0.f;
  float best_prob = 0.f;
  int best_k = -1;
  for (int k = 0; k < n; ++k) {  // every thread runs every k: the ballot below needs the whole warp
    const int q = s_kept[k];
    const float prob = sigmoidf_exact(sample(masks + static_cast<long long>(q) * h * w, w, ty, tx));
    const float weighted = scores[q] * prob;
    if (inside && (best_k < 0 || weighted > best)) {  // first max wins, as torch.argmax
      best = weighted;
      best_prob = prob;
      best_k = k;
    }
    const unsigned hits = __ballot_sync(0xffffffffu, inside && prob >= mask_threshold);
    if (lane == 0 && hits) atomicAdd(&s_original[k], __popc(hits));
  }
  int32_t out_code = -1;
  if (inside && best_k >= 0) {
    atomicAdd(&s_assigned[best_k], 1);
    if (best_prob >= mask_threshold) {
      atomicAdd(&s_final[best_k], 1);
      out_code = s_kept[best_k];
    }
  }
  if (inside) code[static_cast<long long>(y) * W + x] = out_code;
  __syncthreads();
  for (int k = threadIdx.x; k < n; k += blockDim.x) {
    const int q = s_kept[k];
    if (s_original[k]) atomicAdd(&original_area[q], s_original[k]);
    if (s_assigned[k]) atomicAdd(&assigned_area[q], s_assigned[k]);
    if (s_final[k]) atomicAdd(&final_area[q], s_final[k]);
  }
}

__global__ void panoptic_paint_kernel(const int32_t* __restrict__ code, long long n,
                                      const int64_t* __restrict__ id_of_query, int64_t* __restrict__ out) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int32_t c = code[i];
    out[i] = c >= 0 ? id_of_query[c] : -1;
  }
}

}  // namespace

cudaError_t launch_panoptic_assign(const float* masks, int Q, int h, int w, int H, int W, const int32_t* kept,
                                   const int32_t* num_kept, const float* scores, float mask_threshold, int32_t* code,
                                   int32_t* original_area, int32_t* assigned_area, int32_t* final_area,
                                   cudaStream_t stream) {
  if (H == 0 || W == 0) return cudaSuccess;
  dim3 grid((W + kThreads - 1) / kThreads, H);
  const size_t shared = 4 * sizeof(int32_t) * (Q > 0 ? Q : 1);
  panoptic_assign_kernel<<<grid, kThreads, shared, stream>>>(masks, Q, h, w, H, W, host_scale(h, H),
                                                             host_scale(w, W), kept, num_kept, scores, mask_threshold,
                                                             code, original_area, assigned_area, final_area);
  return cudaGetLastError();
}

cudaError_t launch_panoptic_paint(const int32_t* code, int64_t n, const int64_t* id_of_query, int64_t* out,
                                  cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  long long blocks = (n + kThreads - 1) / kThreads;
  if (blocks > 65535LL * 8) blocks = 65535LL * 8;
  panoptic_paint_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(code, n, id_of_query, out);
  return cudaGetLastError();
}

}  // namespace videomt_fast
