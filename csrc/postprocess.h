// Launchers of the fused mask-upsampling post-processing kernels.
//
// Plain C++ over raw device pointers and a cudaStream_t, so the .cu files need only CUDA headers;
// bindings.cpp checks the tensors and calls these. Every launcher returns the launch's cudaError_t.
//
// Shapes: a frame's mask logits are (Q, h, w) float32, contiguous; the target is (H, W). Upsampling
// is transformers' F.interpolate(mode="bilinear", align_corners=False) with the scale in/out computed
// in float, exactly as ATen's CUDA kernel does, so every upsampled value has ATen's bits.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace videomt_fast {

// Rows of the target covered by one block of instance_stats; partial buffers are (Q, tiles).
constexpr int kStatsRows = 4;
inline int stats_tiles(int H) { return (H + kStatsRows - 1) / kStatsRows; }

// Per candidate query q: number of upsampled pixels with logit > 0 and the sum of their sigmoids,
// as per-tile partials. Non-candidates get zeros and cost nothing.
//   masks       (Q, h, w)      float32
//   candidate   (Q,)           uint8, 1 = the query can still be kept
//   part_count  (Q, tiles)     int32, out
//   part_sum    (Q, tiles)     float32, out
cudaError_t launch_instance_stats(const float* masks, int Q, int h, int w, int H, int W, const uint8_t* candidate,
                                  int32_t* part_count, float* part_sum, cudaStream_t stream);

// Painting: each pixel takes ids[q] of the last kept query q whose upsampled logit is > 0, else -1.
//   kept        (Q,)  int32, kept query indices ascending in the first *num_kept entries
//   num_kept    (1,)  int32 (device)
//   ids         (Q,)  int32, segment id of each query
//   out         (H, W) int64
cudaError_t launch_instance_paint(const float* masks, int Q, int h, int w, int H, int W, const int32_t* kept,
                                  const int32_t* num_kept, const int32_t* ids, int64_t* out, cudaStream_t stream);

// Semantic: per pixel argmax over classes of the upsampled class maps (first max wins).
//   mixed  (C, h, w) float32;  out (H, W) int64;  scores (C, H, W) float32 or nullptr
cudaError_t launch_semantic_argmax(const float* mixed, int C, int h, int w, int H, int W, int64_t* out, float* scores,
                                   cudaStream_t stream);

// Panoptic pass: per pixel the kept query with the largest score[q] * sigmoid(logit) (first max wins);
// code = that query if its probability >= mask_threshold, else -1 (-1 too when nothing is kept).
// Per query (accumulated with atomics; the caller zeroes them): original_area = #pixels with its
// probability >= mask_threshold, assigned_area = #pixels it wins, final_area = #pixels it wins with
// probability >= mask_threshold.
//   kept, num_kept as above;  scores (Q,) float32;  code (H, W) int32
cudaError_t launch_panoptic_assign(const float* masks, int Q, int h, int w, int H, int W, const int32_t* kept,
                                   const int32_t* num_kept, const float* scores, float mask_threshold, int32_t* code,
                                   int32_t* original_area, int32_t* assigned_area, int32_t* final_area,
                                   cudaStream_t stream);

// out[i] = code[i] >= 0 ? id_of_query[code[i]] : -1, for n pixels.
cudaError_t launch_panoptic_paint(const int32_t* code, int64_t n, const int64_t* id_of_query, int64_t* out,
                                  cudaStream_t stream);

}  // namespace videomt_fast
