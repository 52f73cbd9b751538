"""The CPU compatibility patches: applied only without CUDA, and each fixes its failure."""

import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_desmoe.compat import applied_patches, ensure_megatron_importable

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")


def test_every_patch_is_applied_once_on_cpu():
    names = ensure_megatron_importable()
    assert ensure_megatron_importable() == names  # idempotent
    assert len(names) == len(set(names))
    assert {"patch_tensor_factories", "patch_cuda_runtime", "patch_cuda_rng"} <= set(names)


def test_cuda_device_requests_land_on_cpu():
    ensure_megatron_importable()
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.empty(3, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.ones(1).to("cuda").device.type == "cpu"
    assert torch.ones(1).cuda().device.type == "cpu"
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    torch.cuda.synchronize()


def test_clip_grads_fp32_check_passes_for_cpu_float_and_still_rejects_half():
    ensure_megatron_importable()
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1, dtype=torch.half).type() != "torch.cuda.FloatTensor"
    assert torch.ones(1).type(torch.float64).dtype == torch.float64


def test_megatron_rng_tracker_forks_distinct_reproducible_streams():
    from megatron_desmoe.models.builder import ParallelConfig
    from megatron_desmoe.parallel import init_model_parallel

    init_model_parallel(ParallelConfig())
    from megatron.core.tensor_parallel.random import (
        get_cuda_rng_tracker,
        model_parallel_cuda_manual_seed,
    )

    def draws():
        model_parallel_cuda_manual_seed(123)
        outside = torch.rand(3)
        with get_cuda_rng_tracker().fork():
            inside = torch.rand(3)
        return outside, inside, torch.rand(3)

    first, second = draws(), draws()
    for a, b in zip(first, second):
        assert torch.equal(a, b)  # reproducible
    assert not torch.equal(first[0], first[1])  # the forked stream differs
    # forking restores the default stream: the draw after the fork continues it
    model_parallel_cuda_manual_seed(123)
    expected = torch.rand(6)[3:]
    assert torch.equal(first[2], expected)


def test_nothing_is_patched_when_cuda_is_present():
    script = textwrap.dedent("""
        import torch
        torch.cuda.is_available = lambda: True
        original = torch.zeros
        from megatron_desmoe.compat.cpu import apply_cpu_patches
        applied = apply_cpu_patches()
        assert torch.zeros is original, "factories patched on a GPU machine"
        assert all(name.endswith("import_stub") for name in applied), applied
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
