"""Peak table lookup by CUDA device name."""

import pytest

from megatron_desmoe.profiling.devices import lookup_peak, peak_table


@pytest.mark.parametrize("device_name, canonical, bf16, fp8", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4, 1978.9),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.5, 1513.0),
    ("NVIDIA H100 NVL", "H100 NVL", 835.5, 1670.5),
    ("NVIDIA H200", "H200 SXM", 989.4, 1978.9),
    ("NVIDIA GH200 480GB", "GH200", 989.4, 1978.9),
    ("NVIDIA B200", "B200", 2250.0, 4500.0),
    ("NVIDIA GB200", "GB200", 2500.0, 5000.0),
    ("NVIDIA A100-SXM4-80GB", "A100", 312.0, None),
])
def test_known_devices(device_name, canonical, bf16, fp8):
    peak = lookup_peak(device_name)
    assert peak.name == canonical
    assert peak.peak_for("bf16") == bf16
    assert peak.peak_for("fp8-delayed") == fp8
    assert peak.peak_for("fp32") is None


def test_unknown_device_has_no_peak():
    assert lookup_peak("Tesla T4") is None
    assert lookup_peak("AMD Instinct MI300X") is None


def test_fp8_peak_is_twice_bf16_where_present():
    for peak in peak_table():
        if peak.fp8_tflops is not None:
            assert peak.fp8_tflops == pytest.approx(2 * peak.bf16_tflops, rel=0.02)
