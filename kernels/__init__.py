"""Gather/scatter between engine KV layouts and page-first blocks: torch reference (CPU path and oracle) and CUDA kernels."""
