"""Applications: offline segmentation, the benchmark, the profiler, video IO and the command line."""
