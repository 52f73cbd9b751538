"""GPU-only checks (skipped without CUDA by tests/conftest.py): NCCL, the Transformer Engine
spec with bf16, and the parallel-equivalence harness on two GPUs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from multirank_launch import run

pytestmark = pytest.mark.cuda

WORKER = Path(__file__).with_name("equivalence_worker.py")


@pytest.fixture(scope="module")
def nccl_world_of_one():
    import torch.distributed as dist

    from megatron_desmoe.models.builder import ParallelConfig
    from megatron_desmoe.parallel import init_model_parallel

    init_model_parallel(ParallelConfig())
    assert dist.get_backend() == "nccl"


def _train(backend: str, dtype: str, steps: int = 4) -> list[float]:
    from megatron_desmoe.models.presets import get_preset
    from megatron_desmoe.training import build_optimizer, build_training_model, train_step

    cfg = get_preset("mixtral-tiny")
    chunks = build_training_model(cfg, backend=backend, dtype=dtype, seed=3)
    assert next(chunks[0].parameters()).is_cuda
    optimizer = build_optimizer(chunks, lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 4, 65), generator=generator)
    batches = [dict(tokens=t[:, :-1], labels=t[:, 1:], loss_mask=torch.ones(4, 64)) for t in tokens]
    losses = []
    for step in range(steps):
        result = train_step(chunks, optimizer, iter(batches), num_microbatches=2,
                            micro_batch_size=4, seq_length=64, step=step)
        assert result.update_successful
        losses.append(result.losses["lm loss"])
    return losses


def test_local_spec_bf16_trains_on_one_gpu(nccl_world_of_one):
    losses = _train("local", "bf16")
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


@pytest.mark.te
def test_transformer_engine_spec_bf16_trains_on_one_gpu(nccl_world_of_one):
    from megatron_desmoe.models.builder import transformer_config
    from megatron_desmoe.models.presets import get_preset

    assert transformer_config(get_preset("mixtral-tiny"), backend="te").transformer_impl == "transformer_engine"
    losses = _train("te", "bf16")
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


@pytest.mark.multirank
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_nccl_layouts_match_one_gpu(tmp_path):
    reference = run([WORKER, "reference", "--workdir", tmp_path, "--presets", "mixtral-tiny"], timeout=300)
    assert reference.returncode == 0, reference.tail()
    layouts = ["tp2_sp", "ep2_alltoall", "dp2_distopt"]
    launch = run([WORKER, "layouts", "--workdir", tmp_path,
                  "--runs", ",".join(f"mixtral-tiny:{name}" for name in layouts)], nproc=2, timeout=300)
    for name in layouts:
        path = tmp_path / "mixtral-tiny" / "results" / f"{name}.json"
        assert path.exists(), launch.tail()
        report = json.loads(path.read_text())
        assert "error" not in report, report["error"]
        assert not report["mismatches"], report["mismatches"][:20]
        assert report["loss"] == pytest.approx(report["ref_loss"], rel=1e-5)
