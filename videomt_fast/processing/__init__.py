"""Processing: pre-processors, post-processing and video-level tracks (built on ops)."""
