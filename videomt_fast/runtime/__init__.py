"""The runtime: execution plans, CUDA graphs, sessions and ``optimize()``; it wraps the model."""
