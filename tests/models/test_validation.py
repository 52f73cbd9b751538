"""Bad model / layout configurations fail early with a ConfigError naming the field."""

from __future__ import annotations

import pytest

from megatron_desmoe.errors import ConfigError
from megatron_desmoe.models.presets import get_preset


def _layout_error(preset: str, world_size: int, **parallel) -> ConfigError:
    from megatron_desmoe.models.builder import ParallelConfig, validate_layout

    with pytest.raises(ConfigError) as caught:
        validate_layout(get_preset(preset), ParallelConfig(**parallel), world_size)
    return caught.value


def _assert_names(error: ConfigError, field: str) -> None:
    assert error.field == field
    assert str(error).startswith(f"{field}: ")
    assert "Fix: " in str(error)


# ------------------------------------------------------------------------- model fields


@pytest.mark.parametrize("topk", [0, 5])
def test_topk_outside_one_to_num_experts(topk):
    with pytest.raises(ConfigError) as caught:
        get_preset("mixtral-tiny", topk=topk)  # 4 experts
    _assert_names(caught.value, "topk")
    assert "at most 4" in str(caught.value)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError) as caught:
        get_preset("mixtral-huge")
    _assert_names(caught.value, "preset")
    assert "mixtral-tiny" in str(caught.value)


def test_unknown_override_field():
    with pytest.raises(ConfigError) as caught:
        get_preset("mixtral-tiny", num_expert=8)
    _assert_names(caught.value, "num_expert")


@pytest.mark.parametrize("changes,field", [
    (dict(num_query_groups=3), "num_query_groups"),  # 4 heads
    (dict(first_k_dense=2), "first_k_dense"),  # 2 layers: no MoE layer left
    (dict(score_function="relu"), "score_function"),
    (dict(num_groups=2), "group_topk"),  # group_topk missing
    (dict(num_groups=3, group_topk=1), "num_groups"),  # 4 experts
    (dict(family="gpt2"), "family"),
])
def test_inconsistent_architecture(changes, field):
    with pytest.raises(ConfigError) as caught:
        get_preset("mixtral-tiny", **changes)
    _assert_names(caught.value, field)


# ------------------------------------------------------------------------ layout fields


def test_experts_not_divisible_by_ep():
    error = _layout_error("mixtral-tiny", 3, expert_parallel=3)  # 4 experts
    _assert_names(error, "expert_parallel")
    assert "4 experts" in str(error)


def test_ep_must_fit_in_tp_times_dp():
    error = _layout_error("mixtral-tiny", 2, expert_parallel=4)  # 4 experts, only 2 ranks
    _assert_names(error, "expert_parallel")


@pytest.mark.parametrize("tp,world", [(3, 3), (4, 4)])  # 4 heads, 2 query groups
def test_heads_or_query_groups_not_divisible_by_tp(tp, world):
    error = _layout_error("mixtral-tiny", world, tensor_parallel=tp, sequence_parallel=True)
    _assert_names(error, "tensor_parallel")


def test_layers_not_divisible_by_pp():
    error = _layout_error("deepseek-v2-tiny", 2, pipeline_parallel=2)  # 3 layers
    _assert_names(error, "pipeline_parallel")
    assert "3 layers" in str(error)


def test_tp_without_sequence_parallel():
    error = _layout_error("mixtral-tiny", 2, tensor_parallel=2)
    _assert_names(error, "sequence_parallel")


@pytest.mark.parametrize("world,parallel", [
    (3, dict(tensor_parallel=2, sequence_parallel=True)),
    (6, dict(tensor_parallel=2, sequence_parallel=True, pipeline_parallel=2)),
    (1, dict(pipeline_parallel=2)),
])
def test_world_size_not_a_multiple_of_tp_times_pp(world, parallel):
    _assert_names(_layout_error("mixtral-tiny", world, **parallel), "world_size")


@pytest.mark.parametrize("parallel,field", [
    (dict(tensor_parallel=0), "tensor_parallel"),
    (dict(expert_parallel=0), "expert_parallel"),
    (dict(dispatcher="ring"), "dispatcher"),
])
def test_invalid_layout_values(parallel, field):
    _assert_names(_layout_error("mixtral-tiny", 1, **parallel), field)


def test_valid_layouts_pass():
    from megatron_desmoe.models.builder import ParallelConfig, validate_layout

    model = get_preset("mixtral-tiny")
    for world, parallel in [
        (1, ParallelConfig()),
        (2, ParallelConfig(tensor_parallel=2, sequence_parallel=True)),
        (2, ParallelConfig(expert_parallel=2, dispatcher="allgather")),
        (4, ParallelConfig(pipeline_parallel=2, expert_parallel=2)),
        (8, ParallelConfig(tensor_parallel=2, sequence_parallel=True, expert_parallel=4)),
    ]:
        validate_layout(model, parallel, world)


@pytest.mark.parametrize("kwargs,field", [
    (dict(backend="triton"), "backend"),
    (dict(dtype="fp64"), "dtype"),
])
def test_transformer_config_rejects_unknown_backend_and_dtype(kwargs, field):
    from megatron_desmoe.models.builder import transformer_config

    with pytest.raises(ConfigError) as caught:
        transformer_config(get_preset("mixtral-tiny"), **kwargs)
    _assert_names(caught.value, field)


def test_training_model_checks_the_layout_before_building():
    """build_training_model refuses a layout the running world cannot hold (a world of one)."""
    from megatron_desmoe.models.builder import ParallelConfig
    from megatron_desmoe.parallel import init_model_parallel
    from megatron_desmoe.training import build_training_model

    init_model_parallel(ParallelConfig())
    with pytest.raises(ConfigError) as caught:
        build_training_model(get_preset("mixtral-tiny"),
                             ParallelConfig(tensor_parallel=2, sequence_parallel=True))
    _assert_names(caught.value, "world_size")
