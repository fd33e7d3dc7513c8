"""Fused Pallas kernels."""
