"""Helpers of benchmarks/write_overhead.py (not part of the asyncckpt package)."""
