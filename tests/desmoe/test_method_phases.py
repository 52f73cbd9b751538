"""Phase boundaries, progress, and what each method trains in each phase."""

import pytest

from megatron_desmoe.desmoe.config import PARAM_GROUPS, DESMoEConfig
from megatron_desmoe.desmoe.phases import (
    Phase,
    isolation_active,
    kd_active,
    phase_at,
    progress,
    trainable_expert_group,
    trainable_groups,
)

W, S, C = Phase.WARMUP, Phase.STABILIZATION, Phase.CONSOLIDATION


def test_progress_is_the_fraction_done_after_the_step():
    assert progress(0, 10) == 0.1
    assert progress(9, 10) == 1.0
    assert progress(0, 1) == 1.0
    for bad in ((-1, 10), (10, 10), (0, 0)):
        with pytest.raises(ValueError):
            progress(*bad)


def test_default_boundaries_are_inclusive_at_exactly_02T_and_07T():
    # T = 10: t = step + 1; warm-up t <= 2, stabilisation t <= 7.
    assert [phase_at(step, 10) for step in range(10)] == [W, W, S, S, S, S, S, C, C, C]
    # T = 100: step 19 is t = 20 = 0.2 T, step 69 is t = 70 = 0.7 T.
    assert (phase_at(19, 100), phase_at(20, 100)) == (W, S)
    assert (phase_at(69, 100), phase_at(70, 100)) == (S, C)
    # T = 7: 0.2 T = 1.4 and 0.7 T = 4.9 are not integers.
    assert [phase_at(step, 7) for step in range(7)] == [W, S, S, S, C, C, C]


def test_boundaries_are_exact_decimals_not_rounded_floats():
    # 0.29 * 100 == 28.999999999999996 in floating point: t = 29 must still be warm-up.
    assert phase_at(28, 100, (0.29, 0.57)) == W
    assert phase_at(29, 100, (0.29, 0.57)) == S
    # 0.57 * 100 == 56.99999999999999: t = 57 is the last stabilisation step.
    assert (phase_at(56, 100, (0.29, 0.57)), phase_at(57, 100, (0.29, 0.57))) == (S, C)


def test_custom_boundaries():
    assert [phase_at(step, 8, (0.25, 0.5)) for step in range(8)] == [W, W, S, S, C, C, C, C]
    assert [phase_at(step, 4, (0.5, 0.75)) for step in range(4)] == [W, W, S, C]
    with pytest.raises(ValueError):
        phase_at(8, 8)


# ---------------------------------------------------------------------- presets
def _config(method="desmoe", **fields):
    return DESMoEConfig(num_domains=2, method=method, **fields).validate()


def test_desmoe_default_trainable_sets():
    config = _config()
    assert trainable_groups(config, W) == {"router_adapter", "routed_experts"}
    assert trainable_groups(config, S) == {"router_adapter", "associated_experts"}
    assert trainable_groups(config, C) == {"associated_experts"}
    assert [isolation_active(config, p) for p in (W, S, C)] == [False, True, True]
    assert [kd_active(config, p) for p in (W, S, C)] == [True, True, False]
    assert [trainable_expert_group(config, p) for p in (W, S, C)] == [
        "routed_experts", "associated_experts", "associated_experts"]


def test_full_fine_tuning_trains_everything_without_isolation_or_kd():
    config = _config("full")
    expected = {"router_gate", "routed_experts", "shared_experts", "attention", "embeddings",
                "norms", "output_layer", "dense_mlp"}
    for phase in (W, S, C):
        assert trainable_groups(config, phase) == expected
        assert not isolation_active(config, phase)
        assert not kd_active(config, phase)


@pytest.mark.parametrize("method", ["esft_token", "esft_gate"])
def test_esft_trains_only_the_selected_experts(method):
    config = _config(method)
    for phase in (W, S, C):
        assert trainable_groups(config, phase) == {"selected_experts"}
        assert trainable_expert_group(config, phase) == "selected_experts"
        assert not isolation_active(config, phase)
        assert not kd_active(config, phase)


def test_every_preset_uses_known_group_names():
    for method in ("desmoe", "full", "esft_token", "esft_gate"):
        for phase in (W, S, C):
            assert trainable_groups(_config(method), phase) <= set(PARAM_GROUPS)


def test_config_overrides_replace_the_preset_per_phase():
    config = _config(stabilization_trainable=("router_adapter", "associated_experts", "attention"),
                     consolidation_trainable=("router_adapter", "routed_experts", "associated_experts"),
                     isolation_phases=("warmup",))
    assert trainable_groups(config, W) == {"router_adapter", "routed_experts"}  # preset kept
    assert trainable_groups(config, S) == {"router_adapter", "associated_experts", "attention"}
    assert trainable_expert_group(config, C) == "routed_experts"  # broadest group wins
    assert [isolation_active(config, p) for p in (W, S, C)] == [True, False, False]
    assert kd_active(config, C)  # the adapter trains in consolidation now
    assert trainable_expert_group(_config(consolidation_trainable=("norms",)), C) is None
