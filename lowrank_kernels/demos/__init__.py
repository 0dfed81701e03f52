"""Runnable demonstrations (`python -m lowrank_kernels.demos.<name>`)."""
