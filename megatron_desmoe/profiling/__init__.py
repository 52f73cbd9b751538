"""Throughput / FP8 profiler (docs/performance.md).

* `flops`    model FLOPs of a training step (active experts only)
* `devices`  dense BF16/FP8 peaks of known GPUs, for MFU
* `fp8`      Transformer Engine FP8 recipe settings and support checks
* `profiler` step timing of stock vs DES-MoE routers per precision
* `report`   table, JSON, PNG
* `cli`      the `desmoe-profile` command

Submodules are imported on use: `flops`, `devices` and `fp8` do not import Megatron.
"""
