"""The declarative tables against the real thing: shapes and names of built Megatron models,
Megatron's checkpoint keys, the q/k/v interleave, and every preset's HF export."""

from __future__ import annotations

import pytest
import torch

from conversion_models import FAMILIES, hf_config


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_tables_cover_the_megatron_model_with_the_right_shapes(family, world):
    from megatron_desmoe.conversion import adapter_for_model_type
    from megatron_desmoe.conversion.hf_to_megatron import sharded_tensors
    from megatron_desmoe.conversion.mapping import canonical_name
    from megatron_desmoe.conversion.shapes import expected_shape
    from megatron_desmoe.models.builder import ParallelConfig, build_gpt_model, transformer_config
    from megatron_desmoe.parallel import init_model_parallel

    source = hf_config(family)
    adapter = adapter_for_model_type(source.model_type)
    model = adapter.model_config(source, "tiny")
    init_model_parallel(ParallelConfig())
    gpt = build_gpt_model(model, transformer_config(model))
    shapes = {}
    for tensor in sharded_tensors(gpt.sharded_state_dict()):
        expert = tensor.global_offset[0] if tensor.prepend_axis_num else None
        full = tensor.global_shape[tensor.prepend_axis_num:]
        shapes[canonical_name(tensor.key, expert)] = tuple(full)
    assert set(shapes) == adapter.state_dict_adapter(model).mcore_names()
    assert {name: expected_shape(name, model) for name in shapes} == shapes


def test_checkpoint_keys_become_canonical_names():
    from megatron_desmoe.conversion.mapping import canonical_name

    assert canonical_name("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight") == \
        "decoder.layers.3.input_layernorm.weight"
    assert canonical_name("decoder.layers.3.mlp.linear_fc1.layer_norm_weight") == \
        "decoder.layers.3.pre_mlp_layernorm.weight"
    assert canonical_name("decoder.layers.0.self_attention.linear_q_up_proj.layer_norm_weight") == \
        "decoder.layers.0.self_attention.q_layernorm.weight"
    assert canonical_name("decoder.layers.2.mlp.experts.experts.linear_fc2.weight", 5) == \
        "decoder.layers.2.mlp.experts.local_experts.5.linear_fc2.weight"
    assert canonical_name("output_layer.weight") == "output_layer.weight"
    with pytest.raises(ValueError, match="expert index"):
        canonical_name("decoder.layers.2.mlp.experts.experts.linear_fc1.weight")


def test_qkv_rows_are_interleaved_per_query_group():
    from megatron_desmoe.conversion.transforms import InterleavedQKV

    qkv = InterleavedQKV(num_heads=4, num_groups=2, head_dim=1)
    q, k, v = torch.tensor([[0.], [1.], [2.], [3.]]), torch.tensor([[10.], [11.]]), torch.tensor([[20.], [21.]])
    fused = qkv.to_mcore([q, k, v])
    assert fused.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]  # q0 q1 k0 v0 | q2 q3 k1 v1
    assert all(torch.equal(a, b) for a, b in zip(qkv.to_hf(fused), (q, k, v)))
    bias = qkv.to_mcore([q.flatten(), k.flatten(), v.flatten()])
    assert bias.tolist() == [0, 1, 10, 20, 2, 3, 11, 21]


def test_every_preset_exports_to_an_hf_config_with_the_same_parameter_count():
    from transformers import AutoModelForCausalLM

    from megatron_desmoe.conversion import adapter_for_family
    from megatron_desmoe.models.presets import PRESETS, count_parameters

    for name, preset in PRESETS.items():
        config = adapter_for_family(preset.family).hf_config(preset)
        with torch.device("meta"):
            hf_model = AutoModelForCausalLM.from_config(config)
        assert sum(p.numel() for p in hf_model.parameters()) == count_parameters(preset), name


def test_model_config_that_a_family_cannot_hold_is_refused():
    from megatron_desmoe.conversion import adapter_for_family
    from megatron_desmoe.errors import ConfigError
    from megatron_desmoe.models.presets import get_preset

    with pytest.raises(ConfigError, match=r"^shared_expert_hidden_size: 64 cannot be represented by "
                                          r"Hugging Face MixtralForCausalLM"):
        adapter_for_family("mixtral").state_dict_adapter(get_preset("mixtral-tiny", shared_expert_hidden_size=64))
    with pytest.raises(ConfigError, match=r"^expert_bias: True cannot be represented"):
        adapter_for_family("deepseek_v2").state_dict_adapter(get_preset("deepseek-v2-tiny", expert_bias=True))


def test_deepseek_group_routing_that_megatron_ranks_differently_is_refused():
    from megatron_desmoe.conversion import adapter_for_model_type
    from megatron_desmoe.errors import ConfigError

    grouped = hf_config("deepseek_v2", topk_method="group_limited_greedy", n_group=4, topk_group=2,
                        num_experts_per_tok=4)
    with pytest.raises(ConfigError, match=r"config.json:topk_group"):
        adapter_for_model_type("deepseek_v2").model_config(grouped, "x")
    same = hf_config("deepseek_v2", topk_method="group_limited_greedy", n_group=4, topk_group=2)
    model = adapter_for_model_type("deepseek_v2").model_config(same, "x")
    assert (model.num_groups, model.group_topk) == (4, 2)


@pytest.mark.parametrize("text,size", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30),
                                       ("100KB", 10**5), ("1234", 1234)])
def test_parse_size(text, size):
    from megatron_desmoe.conversion.hf_io import parse_size

    assert parse_size(text) == size
