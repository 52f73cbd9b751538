"""The trainer under torchrun with 2 gloo ranks (EP=2) against the same run on one rank."""

import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from megatron_desmoe.errors import ConfigError
from megatron_desmoe.training.trainer import run_training

pytestmark = pytest.mark.multirank
SCRIPT = Path(__file__).with_name("run_training_script.py")


def _config(blend, **changes):
    values = dict(preset="mixtral-tiny", data_blend=str(blend), domains=["math", "code", "law"],
                  seq_length=32, micro_batch_size=2, global_batch_size=4, train_iters=6,
                  lr=3e-3, eval_iters=2, log_interval=3,
                  desmoe={"adapter_hidden_size": 16, "affinity_update_interval": 2})
    values.update(changes)
    return values


def _torchrun(config: dict, output: Path, nproc: int) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={port}", str(SCRIPT), json.dumps(config), str(output)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads(output.read_text())


@pytest.fixture(scope="module")
def pretrained_base(tiny_blend, tmp_path_factory):
    """Both layouts fine-tune the same base (a layout draws its initial expert weights in
    its own order, as Megatron does, so only loaded weights are layout-independent)."""
    from megatron_desmoe.training.config import TrainConfig

    base = tmp_path_factory.mktemp("base")
    run_training(TrainConfig(**_config(tiny_blend, domains=["general"], method="full",
                                       desmoe={}, train_iters=2, save=str(base))))
    return str(base)


@pytest.fixture(scope="module")
def expert_parallel_run(tiny_blend, pretrained_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("ep2")
    config = _config(tiny_blend, expert_model_parallel_size=2, save=str(root / "ckpt"),
                     pretrained=pretrained_base)
    return root, _torchrun(config, root / "summary.json", nproc=2)


def test_two_rank_expert_parallel_run_matches_one_rank(expert_parallel_run, tiny_blend,
                                                      pretrained_base):
    _, parallel = expert_parallel_run
    from megatron_desmoe.training.config import TrainConfig

    single = asdict(run_training(TrainConfig(**_config(tiny_blend, pretrained=pretrained_base))))
    assert len(parallel["losses"]) == len(single["losses"]) == 6
    for got, want in zip(parallel["losses"], single["losses"]):
        assert got == pytest.approx(want, rel=2e-4)
    for name, want in single["validation_after"].items():
        assert parallel["validation_after"][name] == pytest.approx(want, rel=2e-4)


def test_checkpoint_saved_at_ep2_loads_at_ep1_with_identical_outputs(expert_parallel_run, tiny_blend,
                                                                    pretrained_base):
    root, parallel = expert_parallel_run
    from megatron_desmoe.training.config import TrainConfig

    with pytest.raises(ConfigError, match="no-load-optim"):
        run_training(TrainConfig(**_config(tiny_blend, load=str(root / "ckpt"),
                                           pretrained=pretrained_base)))
    loaded = run_training(TrainConfig(**_config(tiny_blend, load=str(root / "ckpt"),
                                                 pretrained=pretrained_base, no_load_optim=True)))
    assert loaded.steps == 0
    for name, want in parallel["validation_after"].items():
        assert loaded.validation_after[name] == pytest.approx(want, rel=1e-5, abs=1e-6)
