"""Backward kernels (placeholder module, filled by the backward pass work)."""
