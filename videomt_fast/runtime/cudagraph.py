"""CUDA graphs: capture on a device's own side stream, and the device time of a captured call.

Sessions, clip steps and EoMT predictors replay graphs (:mod:`videomt_fast.runtime.fast`), so what an op
costs in a planned frame is the GPU's time for it, not Python's time to launch it: plans time candidates
as calls captured back to back into one graph (:func:`graph_ms`).
"""

from __future__ import annotations

from typing import Callable

import torch


def capture_graph(fn: Callable, device: torch.device, pool=None):
    """``(graph, outputs, pool)``: ``fn()`` run twice on a side stream of ``device`` (kernels compile, the
    allocator and caches settle), then captured on that same stream into a CUDA graph drawing on ``pool``
    (a new one when None), whatever device is current."""
    with torch.cuda.device(device):
        if pool is None:
            pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            outputs = fn()
    return graph, outputs, pool


def graph_ms(fn: Callable, device: torch.device, calls: int = 8, repeats: int = 10) -> float:
    """Median milliseconds of one ``fn()`` on ``device``: ``calls`` calls captured back to back into one
    graph, replayed ``repeats`` times between CUDA events. Raises what capture raises (a call that cannot
    be captured cannot run in a graphed frame either)."""
    device = torch.device(device)

    def back_to_back():
        for _ in range(calls):
            fn()

    graph, _, _ = capture_graph(back_to_back, device)
    times = []
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device)
        graph.replay()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            graph.replay()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end) / calls)
    del graph
    times.sort()
    return times[len(times) // 2]
