"""Bad input fails early with an error naming the field or tensor, and leaves no output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conversion_models import save_hf_model


@pytest.fixture
def hf_copy(hf_zoo, tmp_path) -> Path:
    """A private, editable copy of the tiny Mixtral checkpoint."""
    return Path(shutil.copytree(hf_zoo["mixtral"], tmp_path / "hf"))


def _rewrite_weights(hf_dir: Path, edit) -> None:
    path = hf_dir / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _nothing_written(target: Path) -> bool:
    return not target.exists() and not (target.parent / f".{target.name}.partial").exists()


def _to_megatron(hf_dir, target, **kwargs):
    from megatron_desmoe.conversion import convert_hf_to_megatron

    convert_hf_to_megatron(hf_dir, target, progress=False, **kwargs)


def test_unknown_architecture(hf_copy, tmp_path, world):
    from megatron_desmoe.errors import ConfigError

    config = json.loads((hf_copy / "config.json").read_text())
    (hf_copy / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    with pytest.raises(ConfigError, match=r"config.json:model_type: unknown architecture 'llama'.*mixtral"):
        _to_megatron(hf_copy, tmp_path / "out")
    assert _nothing_written(tmp_path / "out")


def test_missing_tensor_is_named(hf_copy, tmp_path, world):
    from megatron_desmoe.conversion import CheckpointError

    _rewrite_weights(hf_copy, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight"))
    with pytest.raises(CheckpointError, match=r"^model\.layers\.1\.block_sparse_moe\.experts\.3\.w2\.weight: missing"):
        _to_megatron(hf_copy, tmp_path / "out")
    assert _nothing_written(tmp_path / "out")


def test_unexpected_tensor_is_named(hf_copy, tmp_path, world):
    from megatron_desmoe.conversion import CheckpointError

    _rewrite_weights(hf_copy, lambda t: t.update({"model.layers.2.input_layernorm.weight": torch.ones(64)}))
    with pytest.raises(CheckpointError, match=r"^model\.layers\.2\.input_layernorm\.weight: .*no place"):
        _to_megatron(hf_copy, tmp_path / "out")


def test_wrong_shape_is_named(hf_copy, tmp_path, world):
    from megatron_desmoe.conversion import CheckpointError

    _rewrite_weights(hf_copy, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(48, 64)}))
    with pytest.raises(CheckpointError, match=r"^model\.layers\.0\.self_attn\.k_proj\.weight: shape \[48, 64\] "
                                              r"does not match the config, which needs \[32, 64\]"):
        _to_megatron(hf_copy, tmp_path / "out")


def test_config_the_weights_do_not_fit(hf_copy, tmp_path, world):
    from megatron_desmoe.conversion import CheckpointError

    config = json.loads((hf_copy / "config.json").read_text())
    (hf_copy / "config.json").write_text(json.dumps(dict(config, intermediate_size=80)))
    with pytest.raises(CheckpointError, match=r"experts\.0\.w1\.weight: shape \[96, 64\].*needs \[80, 64\]"):
        _to_megatron(hf_copy, tmp_path / "out")


def test_unsupported_hf_feature_names_the_field(hf_copy, tmp_path, world):
    from megatron_desmoe.errors import ConfigError

    config = json.loads((hf_copy / "config.json").read_text())
    (hf_copy / "config.json").write_text(json.dumps(dict(config, sliding_window=16)))
    with pytest.raises(ConfigError, match=r"config.json:sliding_window: 16 is not supported"):
        _to_megatron(hf_copy, tmp_path / "out")


def test_layout_that_does_not_divide_the_model(hf_zoo, tmp_path, world):
    from megatron_desmoe.errors import ConfigError
    from megatron_desmoe.models.builder import ParallelConfig

    with pytest.raises(ConfigError, match=r"expert_parallel: 4 experts are not divisible by EP=3"):
        _to_megatron(hf_zoo["mixtral"], tmp_path / "out", parallel=ParallelConfig(expert_parallel=3))
    assert _nothing_written(tmp_path / "out")


def test_existing_output_needs_overwrite(hf_zoo, megatron_zoo, tmp_path, world):
    from megatron_desmoe.conversion import convert_megatron_to_hf, load_model_json
    from megatron_desmoe.errors import ConfigError

    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"^out: .* already exists.*--overwrite"):
        _to_megatron(hf_zoo["mixtral"], target)
    with pytest.raises(ConfigError, match=r"^out: .* already exists"):
        convert_megatron_to_hf(megatron_zoo["mixtral"], target, progress=False)
    assert (target / "keep.txt").read_text() == "mine"
    _to_megatron(hf_zoo["mixtral"], target, overwrite=True)
    assert not (target / "keep.txt").exists() and load_model_json(target)[0].family == "mixtral"


@pytest.mark.parametrize("cut", ["data", "header"])
def test_truncated_safetensors_file(hf_copy, tmp_path, world, cut):
    from megatron_desmoe.conversion import CheckpointError

    path = hf_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000] if cut == "data" else data[:100])
    expected = r"ends at byte \d+ of the data section" if cut == "data" else r"the header declares"
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: truncated safetensors file: .*{expected}"):
        _to_megatron(hf_copy, tmp_path / "out")
    assert _nothing_written(tmp_path / "out")


def test_shard_missing_from_an_indexed_checkpoint(tmp_path, world):
    from megatron_desmoe.conversion import CheckpointError

    hf_dir = save_hf_model("mixtral", tmp_path / "hf", max_shard_size="150KB")
    victim = sorted(hf_dir.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"^{victim.name}: listed in model.safetensors.index.json"):
        _to_megatron(hf_dir, tmp_path / "out")


def test_failure_while_writing_leaves_no_output(hf_zoo, megatron_zoo, tmp_path, world, monkeypatch):
    from megatron_desmoe.conversion import convert_megatron_to_hf, hf_to_megatron, megatron_to_hf

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_to_megatron.dist_checkpointing, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        _to_megatron(hf_zoo["mixtral"], tmp_path / "megatron")
    assert _nothing_written(tmp_path / "megatron")

    calls = []
    real_load = megatron_to_hf.load_full_tensors

    def load_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("read error")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(megatron_to_hf, "load_full_tensors", load_then_fail)
    with pytest.raises(OSError, match="read error"):
        convert_megatron_to_hf(megatron_zoo["mixtral"], tmp_path / "hf", progress=False)
    assert _nothing_written(tmp_path / "hf")


def test_megatron_checkpoint_that_does_not_match_its_model_json(megatron_zoo, tmp_path, world):
    from megatron_desmoe.conversion import CheckpointError, convert_megatron_to_hf

    megatron_dir = Path(shutil.copytree(megatron_zoo["qwen3_moe"], tmp_path / "megatron"))
    payload = json.loads((megatron_dir / "desmoe_model.json").read_text())
    payload["model"]["moe_ffn_hidden_size"] = 40
    (megatron_dir / "desmoe_model.json").write_text(json.dumps(payload))
    with pytest.raises(CheckpointError, match=r"experts\.experts\.linear_fc1\.weight: shape \[64, 64\].*needs \[80, 64\]"):
        convert_megatron_to_hf(megatron_dir, tmp_path / "hf", progress=False)
    assert _nothing_written(tmp_path / "hf")


def test_not_a_megatron_checkpoint(tmp_path, world):
    from megatron_desmoe.conversion import CheckpointError, convert_megatron_to_hf, save_model_json
    from megatron_desmoe.models.presets import get_preset

    (tmp_path / "empty").mkdir()
    save_model_json(tmp_path / "empty", get_preset("mixtral-tiny"))
    with pytest.raises(CheckpointError, match=r"not a readable Megatron distributed checkpoint"):
        convert_megatron_to_hf(tmp_path / "empty", tmp_path / "hf", progress=False)


def test_cli_exits_2_with_one_line(hf_copy, tmp_path, world, capsys):
    from megatron_desmoe.conversion.cli import main

    _rewrite_weights(hf_copy, lambda t: t.pop("lm_head.weight"))
    assert main(["hf-to-megatron", str(hf_copy), str(tmp_path / "out"), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (
        "desmoe-convert: error: lm_head.weight: missing from the checkpoint (1 in all: lm_head.weight). "
        "Fix: the weights do not match config.json: check the config (layers, experts, widths) or "
        "re-download the checkpoint")


def _megatron_with_extra_tensor(hf_dir, target, key, monkeypatch):
    """A converted checkpoint that also holds `key` (as a trainer or another tool might add)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_desmoe.conversion import hf_to_megatron

    build = hf_to_megatron._filled_model_state

    def with_extra(*args, **kwargs):
        sharded = build(*args, **kwargs)
        sharded[key] = ShardedTensor.from_rank_offsets(key, torch.zeros(4))
        return sharded

    monkeypatch.setattr(hf_to_megatron, "_filled_model_state", with_extra)
    _to_megatron(hf_dir, target)
    monkeypatch.undo()


def test_unknown_megatron_tensor_is_named(hf_zoo, tmp_path, world, monkeypatch):
    from megatron_desmoe.conversion import CheckpointError, convert_megatron_to_hf

    key = "decoder.layers.0.mlp.router.expert_bias"
    _megatron_with_extra_tensor(hf_zoo["mixtral"], tmp_path / "megatron", key, monkeypatch)
    with pytest.raises(CheckpointError, match=rf"^{key}: is not part of a mixtral model"):
        convert_megatron_to_hf(tmp_path / "megatron", tmp_path / "hf", progress=False)
    assert _nothing_written(tmp_path / "hf")


def test_non_model_entries_are_skipped_and_reported(hf_zoo, tmp_path, world, monkeypatch, capsys):
    from megatron_desmoe.conversion import convert_megatron_to_hf

    _megatron_with_extra_tensor(hf_zoo["mixtral"], tmp_path / "megatron", "optimizer.state.step", monkeypatch)
    stats = convert_megatron_to_hf(tmp_path / "megatron", tmp_path / "hf")
    assert stats.notes == ["skipped 1 non-model entries (e.g. optimizer.state.step)"]
    assert "skipped 1 non-model entries" in capsys.readouterr().out
