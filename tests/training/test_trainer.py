"""The multi-domain trainer end to end on one CPU rank: logging, checkpoints, exact resume in
every phase, method switch, and bad input refused before work starts."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_desmoe.errors import ConfigError
from megatron_desmoe.training import checkpoint as ckpt
from megatron_desmoe.training.config import TrainConfig, config_from_dict, parse_args
from megatron_desmoe.training.trainer import run_training

FINE_TUNE = ["math", "code", "law"]


def _config(blend, save=None, **changes):
    values = dict(preset="mixtral-tiny", data_blend=str(blend), domains=FINE_TUNE, seq_length=32,
                  micro_batch_size=2, global_batch_size=4, train_iters=10, lr=3e-3,
                  eval_iters=2, log_interval=5, save=str(save) if save else None,
                  desmoe={"adapter_hidden_size": 16, "affinity_update_interval": 3})
    values.update(changes)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def reference_run(tiny_blend, tmp_path_factory):
    save = tmp_path_factory.mktemp("reference")
    summary = run_training(_config(tiny_blend, save, save_interval=1))
    return save, summary


def test_run_reports_domains_logs_and_checkpoints(reference_run):
    save, summary = reference_run
    assert summary.steps == 10 and len(summary.losses) == 10
    assert all(torch.isfinite(torch.tensor(summary.losses)))
    assert set(summary.validation_after) == {"general", *FINE_TUNE}  # general: forgetting
    assert summary.validation_after["math"] < summary.validation_before["math"]
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "phase" in r]
    assert [r["phase"] for r in steps] == ["warmup"] * 2 + ["stabilization"] * 5 + ["consolidation"] * 3
    assert any(key.startswith("loss/") for key in steps[0])
    assert "desmoe_kd_loss" in steps[0] and "desmoe_kd_loss" not in steps[-1] or steps[-1].get("desmoe_kd_loss", 0) == 0
    assert list((save / "tensorboard").iterdir())
    assert (save / "affinity.png").stat().st_size > 10_000
    assert ckpt.latest_iteration(save) == 10


@pytest.mark.parametrize("resume_at", [2, 5, 7])  # warm-up end, stabilisation, consolidation start
def test_resume_continues_the_exact_trajectory(reference_run, tiny_blend, tmp_path, resume_at):
    save, summary = reference_run
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(ckpt.iteration_dir(save, resume_at), ckpt.iteration_dir(resumed_dir, resume_at))
    (resumed_dir / ckpt.LATEST).write_text(str(resume_at))
    resumed = run_training(_config(tiny_blend, resumed_dir, load=str(resumed_dir)))
    assert resumed.steps == 10 - resume_at
    assert resumed.losses == summary.losses[resume_at:]  # bit-identical on CPU
    assert resumed.validation_after == summary.validation_after


def test_interrupted_run_resumes_to_the_same_result(reference_run, tiny_blend, tmp_path):
    _, summary = reference_run
    first = run_training(_config(tiny_blend, tmp_path, exit_interval=4))
    assert first.steps == 4 and ckpt.latest_iteration(tmp_path) == 4
    second = run_training(_config(tiny_blend, tmp_path, load=str(tmp_path)))
    assert first.losses + second.losses == summary.losses


@pytest.mark.parametrize("method, trains", [
    ("full", {"router_gate", "routed_experts", "shared_experts", "attention", "embeddings",
              "norms", "output_layer", "dense_mlp"}),
    ("esft_token", {"routed_experts"}),
    ("desmoe", {"router_adapter", "routed_experts"}),
])
def test_method_switch_sets_exactly_its_trainable_parameters(tiny_blend, method, trains):
    from megatron_desmoe.megatron.controller import parameter_group
    from megatron_desmoe.training import trainer

    captured = {}
    original = trainer._train_loop

    def spy(plan, chunks, *args):
        captured["params"] = {name: p.requires_grad for name, p in chunks[0].named_parameters()}
        captured["esft"] = args[2].esft_selected
        return original(plan, chunks, *args)

    trainer._train_loop = spy
    try:
        desmoe = {} if method != "desmoe" else {"adapter_hidden_size": 16}
        run_training(_config(tiny_blend, train_iters=2, method=method, desmoe=desmoe))
    finally:
        trainer._train_loop = original
    for name, requires_grad in captured["params"].items():
        assert requires_grad == (parameter_group(name) in trains), name
    if method == "esft_token":
        assert captured["esft"] and all(0 < int(m.sum()) < m.numel() for m in captured["esft"].values())


def test_bad_inputs_are_refused_before_work_starts(tiny_blend, tmp_path):
    with pytest.raises(ConfigError, match="global_batch_size"):
        run_training(_config(tiny_blend, global_batch_size=3))
    with pytest.raises(ConfigError, match="domains"):
        run_training(_config(tiny_blend, domains=["math", "astrology"]))
    with pytest.raises(ConfigError, match="blend"):
        run_training(_config(tmp_path / "missing" / "blend.json"))
    with pytest.raises(ConfigError, match="is not a training option"):
        config_from_dict({"learning_rate": 1.0})
    with pytest.raises(ConfigError, match="phi"):
        run_training(_config(tiny_blend, desmoe={"phi": 1.5}))


def test_checkpoint_of_another_domain_set_is_refused(reference_run, tiny_blend):
    save, _ = reference_run
    with pytest.raises(ConfigError, match="num_domains|domain_names"):
        run_training(_config(tiny_blend, load=str(save), domains=["math", "code"]))


def test_megatron_style_flags_and_yaml(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("lr: 0.5\nmicro_batch_size: 2\ndesmoe:\n  phi: 0.5\n")
    config, _ = parse_args(["--config", str(yaml_file), "--tensor-model-parallel-size", "2",
                            "--sequence-parallel", "--lr", "0.1", "--desmoe", "kd_temperature=0.9"])
    assert config.tensor_model_parallel_size == 2 and config.sequence_parallel
    assert config.lr == 0.1 and config.micro_batch_size == 2  # flag beats YAML
    assert config.desmoe == {"phi": 0.5, "kd_temperature": 0.9}


def test_failed_save_keeps_the_previous_checkpoint(tiny_blend, tmp_path, monkeypatch):
    save = tmp_path / "run"
    run_training(_config(tiny_blend, save, train_iters=4, save_interval=2, exit_interval=2))
    assert ckpt.latest_iteration(save) == 2

    def out_of_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.dist_checkpointing, "save", out_of_disk)
    with pytest.raises(OSError, match="previous checkpoint is intact"):
        run_training(_config(tiny_blend, save, train_iters=4, save_interval=2, load=str(save)))
    assert ckpt.latest_iteration(save) == 2
    assert sorted(p.name for p in save.iterdir() if p.name.startswith((".tmp", "iter_"))) == ["iter_0000002"]
    monkeypatch.undo()
    resumed = run_training(_config(tiny_blend, save, train_iters=4, load=str(save)))
    assert resumed.steps == 2


def test_blend_naming_a_missing_file_is_refused(tiny_blend, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(Path(tiny_blend).parent, copy)
    next(copy.glob("code/train_text_document.bin")).unlink()
    with pytest.raises(Exception, match="train_text_document"):
        run_training(_config(copy / "blend.json"))


def test_olmoe_training_with_tensor_parallelism_is_refused(tiny_blend):
    from megatron_desmoe.training.trainer import plan_run

    config = _config(tiny_blend, preset="olmoe-tiny", tensor_model_parallel_size=2,
                     sequence_parallel=True, global_batch_size=2)
    with pytest.raises(ConfigError, match="tensor_model_parallel_size"):
        plan_run(config, world_size=2, domain_names=FINE_TUNE)
