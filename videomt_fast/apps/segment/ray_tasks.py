"""``--ray``: one Ray task per video, each running the one-device pipeline on its worker's GPU (or CPU)."""

from __future__ import annotations

from dataclasses import asdict

from videomt_fast.apps.segment.jobs import Job, result
from videomt_fast.apps.segment.pipeline import segment_videos
from videomt_fast.apps.segment.processes import package_env
from videomt_fast.apps.segment.settings import SegmentSettings


def _ray_segment_one(job: Job, settings: SegmentSettings) -> dict:
    """Body of a Ray task: one video on this worker's GPU (or CPU); same outputs and markers."""
    import torch

    device = "cpu"
    try:
        import ray

        if ray.get_gpu_ids() and torch.cuda.is_available():
            device = "cuda"
    except Exception:
        pass
    results: list[dict] = []
    settings = SegmentSettings(**{**asdict(settings), "decode_workers": 1})
    segment_videos([job], settings, device, lambda kind, payload: results.append(payload) if kind == "result" else None)
    if not results:
        return result(job, "failed", error="no result from the worker")
    return results[-1]


def run_ray(jobs: list[Job], settings: SegmentSettings, address: str, on_event) -> None:
    import ray

    started_here = False
    if not ray.is_initialized():
        ray.init(address=address or None, runtime_env={"env_vars": package_env()}, log_to_driver=False)
        started_here = True
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        task = ray.remote(_ray_segment_one).options(num_gpus=1 if gpus else 0, num_cpus=1, max_retries=1)
        pending = {task.remote(job, settings): job for job in jobs}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except Exception as exc:
                    outcome = result(job, "failed", error=f"Ray task failed: {type(exc).__name__}: {exc}")
                if outcome.get("frames"):
                    on_event("frames", outcome["frames"])
                on_event("result", outcome)
    finally:
        if started_here:
            ray.shutdown()
