"""Parameter and FLOP counts, throughput and MFU measurement."""

from .flops import count_flops, count_params

__all__ = ["count_flops", "count_params"]
