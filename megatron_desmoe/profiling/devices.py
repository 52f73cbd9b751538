"""Peak dense tensor-core throughput of the GPUs MFU is reported against.

Figures are NVIDIA's datasheet numbers *without* structured sparsity (datasheets print the
2:4-sparsity figure with an asterisk; the dense figure is half of it), per GPU, TFLOP/s.

| device            | BF16 dense | FP8 dense | source |
|-------------------|-----------:|----------:|--------|
| A100 SXM/PCIe     |      312   |       -   | A100 datasheet (no FP8 tensor cores) |
| L40S              |      362.05|     733   | L40S datasheet |
| H100 SXM          |      989.4 |    1978.9 | H100 datasheet (1,979 / 3,958 with sparsity) |
| H100 PCIe         |      756.5 |    1513   | H100 datasheet (1,513 / 3,026 with sparsity) |
| H100 NVL          |      835.5 |    1670.5 | H100 NVL datasheet (1,671 / 3,341 with sparsity) |
| H200 SXM          |      989.4 |    1978.9 | H200 datasheet (same tensor cores as H100 SXM) |
| H200 NVL          |      835.5 |    1670.5 | H200 datasheet |
| B200              |     2250   |    4500   | HGX B200 datasheet (36 / 72 PFLOPS per 8 GPUs, sparse) |
| GB200 (per GPU)   |     2500   |    5000   | GB200 NVL72 datasheet (5 / 10 PFLOPS sparse per GPU) |
| GH200             |      989.4 |    1978.9 | as H100 SXM (same Hopper GPU) |

A device not in the table gets no MFU (the profiler prints "n/a" rather than guess);
`--peak-tflops` supplies a figure by hand. Names are matched on `torch.cuda.get_device_name()`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class DevicePeak:
    name: str  # canonical device name
    bf16_tflops: float  # dense BF16 tensor-core peak, TFLOP/s per GPU
    fp8_tflops: Optional[float]  # dense FP8 peak, None where the device has no FP8 tensor cores
    source: str

    def peak_for(self, precision: str) -> Optional[float]:
        """Peak for a profiler precision label ("bf16", "fp8-delayed", ...)."""
        if precision.startswith("fp8"):
            return self.fp8_tflops
        if precision in ("bf16", "fp16"):
            return self.bf16_tflops
        return None  # fp32 runs have no tensor-core peak worth comparing with


_H100 = "NVIDIA H100 datasheet, dense = half the sparsity figure"
_H200 = "NVIDIA H200 datasheet, dense = half the sparsity figure"

# (pattern on the lower-cased device name, peak). First match wins: specific before generic.
_TABLE: list[tuple[str, DevicePeak]] = [
    (r"gb200", DevicePeak("GB200", 2500.0, 5000.0, "NVIDIA GB200 NVL72 datasheet, dense")),
    (r"b200", DevicePeak("B200", 2250.0, 4500.0, "NVIDIA HGX B200 datasheet, dense")),
    (r"gh200", DevicePeak("GH200", 989.4, 1978.9, _H100)),  # Hopper GPU of Grace Hopper
    (r"h200.*nvl", DevicePeak("H200 NVL", 835.5, 1670.5, _H200)),
    (r"h200", DevicePeak("H200 SXM", 989.4, 1978.9, _H200)),
    (r"h100.*nvl", DevicePeak("H100 NVL", 835.5, 1670.5, _H100)),
    (r"h100.*pcie", DevicePeak("H100 PCIe", 756.5, 1513.0, _H100)),
    (r"h100", DevicePeak("H100 SXM", 989.4, 1978.9, _H100)),  # "NVIDIA H100 80GB HBM3"
    (r"l40s", DevicePeak("L40S", 362.05, 733.0, "NVIDIA L40S datasheet, dense")),
    (r"a100", DevicePeak("A100", 312.0, None, "NVIDIA A100 datasheet, dense")),
]


def lookup_peak(device_name: str) -> Optional[DevicePeak]:
    """Peak figures for a CUDA device name, or None for an unknown device."""
    lowered = device_name.lower()
    for pattern, peak in _TABLE:
        if re.search(pattern, lowered):
            return peak
    return None


def peak_table() -> list[DevicePeak]:
    return [peak for _, peak in _TABLE]
