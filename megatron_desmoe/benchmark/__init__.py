"""Multi-domain benchmark: forgetting, domain quality, time-to-target and step-time
overhead of DES-MoE against full fine-tuning and ESFT (docs/benchmark.md)."""

from megatron_desmoe.benchmark.runner import BenchmarkSettings, fast_settings, full_settings, run_benchmark

__all__ = ["BenchmarkSettings", "fast_settings", "full_settings", "run_benchmark"]
