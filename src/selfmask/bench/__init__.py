"""Benchmarks behind ``selfmask bench`` (figures go to BENCHMARKS.md, never to timed unit tests)."""

from selfmask.bench.augment import augment_throughput
from selfmask.bench.conditional import conditional_coding, synthetic_mask
from selfmask.bench.data import decode_vs_cache_throughput
from selfmask.bench.knn import knn_time
from selfmask.bench.step import fast_path_step_ratios, peak_memory_ratio, step_time_ratio
from selfmask.bench.storage import bank_mixed_throughput, bank_switch_time, mask_file_size
from selfmask.bench.threads import thread_step_times

__all__ = [
    "augment_throughput",
    "bank_mixed_throughput",
    "bank_switch_time",
    "conditional_coding",
    "decode_vs_cache_throughput",
    "fast_path_step_ratios",
    "knn_time",
    "mask_file_size",
    "peak_memory_ratio",
    "step_time_ratio",
    "synthetic_mask",
    "thread_step_times",
]
