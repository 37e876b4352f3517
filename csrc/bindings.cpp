// Python bindings of the post-processing kernels: tensor checks, then the raw-pointer launchers.
//
// Compiled by the host compiler against torch's headers and the CUDA runtime headers only (no
// ATen/cuda or c10/cuda), so it builds against any torch; the caller passes the CUDA stream as an
// integer (torch.cuda.current_stream(device).cuda_stream). Every entry point makes its tensors' device
// current for the launch (c10::DeviceGuard, restored on return), whatever device the caller had current.
//
// Errors name the kernel: a CUDA error already pending before a launch (left by an earlier kernel or
// call, ours or not) is reported as such, not as this kernel's failure; a failed launch names this
// kernel. With VIDEOMT_FAST_CHECK_LAUNCHES=1 every launch is also synchronized (unless its stream is
// capturing a CUDA graph), so an error while the kernel runs is reported with the kernel's name.
#include <torch/extension.h>

#include <c10/core/DeviceGuard.h>
#include <cuda_runtime_api.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "postprocess.h"

namespace {

using videomt_fast::stats_tiles;

void check_cuda_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", c10::toString(dtype), ", got ",
              c10::toString(t.scalar_type()));
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* name) {
  TORCH_CHECK(a.device() == b.device(), name, " must be on ", a.device(), ", got ", b.device());
}

bool sync_after_launch() {
  static const bool on = [] {
    const char* v = std::getenv("VIDEOMT_FAST_CHECK_LAUNCHES");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return on;
}

cudaStream_t as_stream(int64_t stream) { return reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(stream)); }

// Before a launch: an error the runtime already holds came from earlier work, not from `what`.
void check_pending(const char* what) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "videomt_fast._C.", what, ": a CUDA error was already pending before this kernel ",
              "was launched, raised by an earlier kernel or CUDA call (not by ", what, "): ", cudaGetErrorName(err),
              ": ", cudaGetErrorString(err), ". Rerun with CUDA_LAUNCH_BLOCKING=1 to find the kernel that raised it.");
}

// After a launch: `err` is the launcher's cudaGetLastError(); optionally wait for the kernel to finish.
void check_launch(cudaError_t err, const char* what, int64_t stream) {
  TORCH_CHECK(err == cudaSuccess, "videomt_fast._C.", what, ": launching the kernel failed: ", cudaGetErrorName(err),
              ": ", cudaGetErrorString(err));
  if (!sync_after_launch()) return;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  err = cudaStreamIsCapturing(as_stream(stream), &capture);
  if (err == cudaSuccess && capture != cudaStreamCaptureStatusNone) return;  // no sync inside a graph capture
  if (err == cudaSuccess) err = cudaStreamSynchronize(as_stream(stream));
  TORCH_CHECK(err == cudaSuccess, "videomt_fast._C.", what, ": the kernel failed while running ",
              "(VIDEOMT_FAST_CHECK_LAUNCHES=1): ", cudaGetErrorName(err), ": ", cudaGetErrorString(err));
}

int to_int(int64_t v, const char* name) {
  TORCH_CHECK(v >= 0 && v <= INT32_MAX, name, " out of range: ", v);
  return static_cast<int>(v);
}

// masks (Q, h, w) float32; candidate (Q,) uint8; part_count (Q, tiles) int32; part_sum (Q, tiles) float32
void instance_stats(const at::Tensor& masks, const at::Tensor& candidate, int64_t H, int64_t W,
                    const at::Tensor& part_count, const at::Tensor& part_sum, int64_t stream) {
  check_cuda_tensor(masks, "masks", at::kFloat, 3);
  const int64_t Q = masks.size(0);
  check_cuda_tensor(candidate, "candidate", at::kByte, 1);
  TORCH_CHECK(candidate.size(0) == Q, "candidate must have ", Q, " entries, got ", candidate.size(0));
  const int tiles = stats_tiles(to_int(H, "H"));
  check_cuda_tensor(part_count, "part_count", at::kInt, 2);
  check_cuda_tensor(part_sum, "part_sum", at::kFloat, 2);
  TORCH_CHECK(part_count.size(0) == Q && part_count.size(1) == tiles, "part_count must be (", Q, ", ", tiles,
              "), got ", part_count.sizes());
  TORCH_CHECK(part_sum.sizes() == part_count.sizes(), "part_sum must be (", Q, ", ", tiles, "), got ",
              part_sum.sizes());
  for (const auto* t : {&candidate, &part_count, &part_sum}) check_same_device(masks, *t, "every tensor");
  const c10::DeviceGuard device_guard(masks.device());
  check_pending("instance_stats");
  check_launch(videomt_fast::launch_instance_stats(masks.data_ptr<float>(), to_int(Q, "Q"), to_int(masks.size(1), "h"),
                                                   to_int(masks.size(2), "w"), to_int(H, "H"), to_int(W, "W"),
                                                   candidate.data_ptr<uint8_t>(), part_count.data_ptr<int32_t>(),
                                                   part_sum.data_ptr<float>(), as_stream(stream)),
               "instance_stats", stream);
}

void check_kept(const at::Tensor& masks, const at::Tensor& kept, const at::Tensor& num_kept) {
  const int64_t Q = masks.size(0);
  check_cuda_tensor(kept, "kept", at::kInt, 1);
  TORCH_CHECK(kept.size(0) == Q, "kept must have ", Q, " entries, got ", kept.size(0));
  check_cuda_tensor(num_kept, "num_kept", at::kInt, 1);
  TORCH_CHECK(num_kept.size(0) == 1, "num_kept must have one entry, got ", num_kept.size(0));
  check_same_device(masks, kept, "kept");
  check_same_device(masks, num_kept, "num_kept");
}

// masks (Q, h, w); kept (Q,) int32; num_kept (1,) int32; ids (Q,) int32; out (H, W) int64
void instance_paint(const at::Tensor& masks, const at::Tensor& kept, const at::Tensor& num_kept,
                    const at::Tensor& ids, const at::Tensor& out, int64_t stream) {
  check_cuda_tensor(masks, "masks", at::kFloat, 3);
  check_kept(masks, kept, num_kept);
  check_cuda_tensor(ids, "ids", at::kInt, 1);
  TORCH_CHECK(ids.size(0) == masks.size(0), "ids must have ", masks.size(0), " entries, got ", ids.size(0));
  check_cuda_tensor(out, "out", at::kLong, 2);
  check_same_device(masks, ids, "ids");
  check_same_device(masks, out, "out");
  const c10::DeviceGuard device_guard(masks.device());
  check_pending("instance_paint");
  check_launch(videomt_fast::launch_instance_paint(
                   masks.data_ptr<float>(), to_int(masks.size(0), "Q"), to_int(masks.size(1), "h"),
                   to_int(masks.size(2), "w"), to_int(out.size(0), "H"), to_int(out.size(1), "W"),
                   kept.data_ptr<int32_t>(), num_kept.data_ptr<int32_t>(), ids.data_ptr<int32_t>(),
                   out.data_ptr<int64_t>(), as_stream(stream)),
               "instance_paint", stream);
}

// mixed (C, h, w) float32; out (H, W) int64; scores (C, H, W) float32 or None
void semantic_argmax(const at::Tensor& mixed, const at::Tensor& out, const c10::optional<at::Tensor>& scores,
                     int64_t stream) {
  check_cuda_tensor(mixed, "mixed", at::kFloat, 3);
  check_cuda_tensor(out, "out", at::kLong, 2);
  check_same_device(mixed, out, "out");
  float* scores_ptr = nullptr;
  if (scores.has_value() && scores->defined()) {
    check_cuda_tensor(*scores, "scores", at::kFloat, 3);
    TORCH_CHECK(scores->size(0) == mixed.size(0) && scores->size(1) == out.size(0) && scores->size(2) == out.size(1),
                "scores must be (", mixed.size(0), ", ", out.size(0), ", ", out.size(1), "), got ", scores->sizes());
    check_same_device(mixed, *scores, "scores");
    scores_ptr = scores->data_ptr<float>();
  }
  const c10::DeviceGuard device_guard(mixed.device());
  check_pending("semantic_argmax");
  check_launch(videomt_fast::launch_semantic_argmax(mixed.data_ptr<float>(), to_int(mixed.size(0), "C"),
                                                    to_int(mixed.size(1), "h"), to_int(mixed.size(2), "w"),
                                                    to_int(out.size(0), "H"), to_int(out.size(1), "W"),
                                                    out.data_ptr<int64_t>(), scores_ptr, as_stream(stream)),
               "semantic_argmax", stream);
}

// masks (Q, h, w); kept, num_kept; scores (Q,) float32; code (H, W) int32; areas (Q,) int32 (zeroed)
void panoptic_assign(const at::Tensor& masks, const at::Tensor& kept, const at::Tensor& num_kept,
                     const at::Tensor& scores, double mask_threshold, const at::Tensor& code,
                     const at::Tensor& original_area, const at::Tensor& assigned_area, const at::Tensor& final_area,
                     int64_t stream) {
  check_cuda_tensor(masks, "masks", at::kFloat, 3);
  const int64_t Q = masks.size(0);
  TORCH_CHECK(Q <= 2048, "panoptic_assign supports at most 2048 queries, got ", Q);
  check_kept(masks, kept, num_kept);
  check_cuda_tensor(scores, "scores", at::kFloat, 1);
  TORCH_CHECK(scores.size(0) == Q, "scores must have ", Q, " entries, got ", scores.size(0));
  check_cuda_tensor(code, "code", at::kInt, 2);
  const char* names[3] = {"original_area", "assigned_area", "final_area"};
  const at::Tensor* areas[3] = {&original_area, &assigned_area, &final_area};
  for (int i = 0; i < 3; ++i) {
    check_cuda_tensor(*areas[i], names[i], at::kInt, 1);
    TORCH_CHECK(areas[i]->size(0) == Q, names[i], " must have ", Q, " entries, got ", areas[i]->size(0));
    check_same_device(masks, *areas[i], names[i]);
  }
  check_same_device(masks, scores, "scores");
  check_same_device(masks, code, "code");
  const c10::DeviceGuard device_guard(masks.device());
  check_pending("panoptic_assign");
  check_launch(videomt_fast::launch_panoptic_assign(
                   masks.data_ptr<float>(), to_int(Q, "Q"), to_int(masks.size(1), "h"), to_int(masks.size(2), "w"),
                   to_int(code.size(0), "H"), to_int(code.size(1), "W"), kept.data_ptr<int32_t>(),
                   num_kept.data_ptr<int32_t>(), scores.data_ptr<float>(), static_cast<float>(mask_threshold),
                   code.data_ptr<int32_t>(), original_area.data_ptr<int32_t>(), assigned_area.data_ptr<int32_t>(),
                   final_area.data_ptr<int32_t>(), as_stream(stream)),
               "panoptic_assign", stream);
}

// code (H, W) int32; id_of_query (Q,) int64; out (H, W) int64
void panoptic_paint(const at::Tensor& code, const at::Tensor& id_of_query, const at::Tensor& out, int64_t stream) {
  check_cuda_tensor(code, "code", at::kInt, 2);
  check_cuda_tensor(id_of_query, "id_of_query", at::kLong, 1);
  check_cuda_tensor(out, "out", at::kLong, 2);
  TORCH_CHECK(out.sizes() == code.sizes(), "out must be ", code.sizes(), ", got ", out.sizes());
  check_same_device(code, id_of_query, "id_of_query");
  check_same_device(code, out, "out");
  const c10::DeviceGuard device_guard(code.device());
  check_pending("panoptic_paint");
  check_launch(videomt_fast::launch_panoptic_paint(code.data_ptr<int32_t>(), code.numel(),
                                                   id_of_query.data_ptr<int64_t>(), out.data_ptr<int64_t>(),
                                                   as_stream(stream)),
               "panoptic_paint", stream);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "videomt_fast fused mask-upsampling post-processing kernels";
  m.attr("STATS_ROWS") = videomt_fast::kStatsRows;
  m.def("instance_stats", &instance_stats, "per-query positive count / sigmoid sum partials", py::arg("masks"),
        py::arg("candidate"), py::arg("H"), py::arg("W"), py::arg("part_count"), py::arg("part_sum"),
        py::arg("stream"));
  m.def("instance_paint", &instance_paint, "last kept positive query id per pixel", py::arg("masks"), py::arg("kept"),
        py::arg("num_kept"), py::arg("ids"), py::arg("out"), py::arg("stream"));
  m.def("semantic_argmax", &semantic_argmax, "upsample class maps + argmax", py::arg("mixed"), py::arg("out"),
        py::arg("scores"), py::arg("stream"));
  m.def("panoptic_assign", &panoptic_assign, "winner query per pixel and per-query areas", py::arg("masks"),
        py::arg("kept"), py::arg("num_kept"), py::arg("scores"), py::arg("mask_threshold"), py::arg("code"),
        py::arg("original_area"), py::arg("assigned_area"), py::arg("final_area"), py::arg("stream"));
  m.def("panoptic_paint", &panoptic_paint, "segment id per pixel from winners", py::arg("code"),
        py::arg("id_of_query"), py::arg("out"), py::arg("stream"));
}
