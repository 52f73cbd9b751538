"""HF -> Megatron -> HF for every family, checked against transformers' own model code:
same logits (fp32, relative error < 1e-4) and a bit-exact round trip of every tensor."""

from __future__ import annotations

import json

import pytest
import torch

from conversion_models import (
    FAMILIES, hf_config, hf_logits, megatron_logits, read_safetensors_dir, save_hf_model, tokens,
)


def _relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float((reference - other).norm() / reference.norm())


@pytest.mark.parametrize("family", FAMILIES)
def test_megatron_logits_match_transformers(family, hf_zoo, megatron_zoo):
    ids = tokens()
    assert _relative_error(hf_logits(hf_zoo[family], ids), megatron_logits(megatron_zoo[family], ids)) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_megatron_hf_is_bit_exact(family, hf_zoo, megatron_zoo, tmp_path):
    from megatron_desmoe.conversion import convert_megatron_to_hf

    convert_megatron_to_hf(megatron_zoo[family], tmp_path / "hf", progress=False)
    original, back = read_safetensors_dir(hf_zoo[family]), read_safetensors_dir(tmp_path / "hf")
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    ids = tokens()  # and transformers loads it with stock code, to the same logits
    assert torch.equal(hf_logits(tmp_path / "hf", ids), hf_logits(hf_zoo[family], ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_config_round_trip(family):
    from megatron_desmoe.conversion import adapter_for_model_type

    source = hf_config(family)
    adapter = adapter_for_model_type(source.model_type)
    model = adapter.model_config(source, "tiny").validate()
    again = adapter.hf_config(model)
    fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "vocab_size", "rms_norm_eps", "num_experts_per_tok", "max_position_embeddings")
    assert {f: getattr(again, f) for f in fields} == {f: getattr(source, f) for f in fields}
    assert again.rope_parameters == source.rope_parameters
    assert adapter.model_config(again, "tiny") == model


def test_sharded_checkpoints_in_and_out(tmp_path, world):
    """Several input shards (index) and a max shard size on output that transformers loads."""
    from megatron_desmoe.conversion import convert_hf_to_megatron, convert_megatron_to_hf

    source = save_hf_model("qwen2_moe", tmp_path / "hf", max_shard_size="150KB")
    assert len(list(source.glob("model-*.safetensors"))) > 1
    convert_hf_to_megatron(source, tmp_path / "megatron", progress=False)
    convert_megatron_to_hf(tmp_path / "megatron", tmp_path / "back", max_shard_size="100KB", progress=False)
    shards = sorted((tmp_path / "back").glob("model-*-of-*.safetensors"))
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert all(p.stat().st_size < 100_000 + 140_000 for p in shards)  # a shard exceeds the limit by at most one tensor
    original, back = read_safetensors_dir(source), read_safetensors_dir(tmp_path / "back")
    assert sorted(original) == sorted(back) and all(torch.equal(original[k], back[k]) for k in original)
    ids = tokens()
    assert torch.equal(hf_logits(tmp_path / "back", ids), hf_logits(source, ids))


def test_bf16_stays_bf16_bit_exact(tmp_path, world):
    from megatron_desmoe.conversion import convert_hf_to_megatron, convert_megatron_to_hf, load_model_json

    source = save_hf_model("mixtral", tmp_path / "hf", dtype=torch.bfloat16)
    convert_hf_to_megatron(source, tmp_path / "megatron", progress=False)
    assert load_model_json(tmp_path / "megatron")[1]["dtype"] == "bf16"
    convert_megatron_to_hf(tmp_path / "megatron", tmp_path / "back", progress=False)
    original, back = read_safetensors_dir(source), read_safetensors_dir(tmp_path / "back")
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], original[k]) for k in original)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "bfloat16"


def test_tokenizer_files_and_token_ids_travel(tmp_path, world):
    from megatron_desmoe.conversion import convert_hf_to_megatron, convert_megatron_to_hf

    source = save_hf_model("qwen3_moe", tmp_path / "hf", bos_token_id=7, eos_token_id=9)
    (source / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    convert_hf_to_megatron(source, tmp_path / "megatron", progress=False)
    convert_megatron_to_hf(tmp_path / "megatron", tmp_path / "back", progress=False)
    assert (tmp_path / "back" / "tokenizer.json").read_text() == '{"fake": "tokenizer"}'
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (7, 9)
    assert json.loads((tmp_path / "back" / "generation_config.json").read_text())["eos_token_id"] == 9


def test_tied_embeddings(tmp_path, world):
    from megatron_desmoe.conversion import convert_hf_to_megatron, convert_megatron_to_hf, load_model_json

    source = save_hf_model("qwen3_moe", tmp_path / "hf", tie_word_embeddings=True)
    convert_hf_to_megatron(source, tmp_path / "megatron", progress=False)
    assert load_model_json(tmp_path / "megatron")[0].tie_word_embeddings
    ids = tokens()
    assert _relative_error(hf_logits(source, ids), megatron_logits(tmp_path / "megatron", ids)) < 1e-4
    convert_megatron_to_hf(tmp_path / "megatron", tmp_path / "back", progress=False)
    original, back = read_safetensors_dir(source), read_safetensors_dir(tmp_path / "back")
    assert "lm_head.weight" not in back and all(torch.equal(back[k], original[k]) for k in back)
    assert torch.equal(hf_logits(tmp_path / "back", ids), hf_logits(source, ids))
