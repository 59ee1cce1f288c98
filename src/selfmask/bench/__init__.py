"""Benchmarks behind ``selfmask bench`` (figures go to BENCHMARKS.md, never to timed unit tests)."""

from selfmask.bench.step import peak_memory_ratio, step_time_ratio

__all__ = ["peak_memory_ratio", "step_time_ratio"]
