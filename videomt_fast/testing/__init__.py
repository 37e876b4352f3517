"""Test tools (not runtime code): kernel error measures and the ahead-of-time Triton compile check."""
