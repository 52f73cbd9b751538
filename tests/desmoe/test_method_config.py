"""DESMoEConfig: defaults, every validation error names its field, dict round trip."""

import pytest

from megatron_desmoe.desmoe.config import DESMoEConfig
from megatron_desmoe.errors import ConfigError


def test_defaults_are_the_paper_values_and_validate():
    config = DESMoEConfig(num_domains=3).validate()
    assert (config.method, config.kd_temperature, config.phi) == ("desmoe", 0.7, 0.6)
    assert (config.affinity_momentum, config.phase_boundaries) == (0.9, (0.2, 0.7))
    assert config.adapter_hidden_multiplier == 4.0
    assert config.esft_threshold == 0.2


@pytest.mark.parametrize("field, value", [
    ("phi", 0.0), ("phi", -0.1), ("phi", 1.0001), ("phi", float("nan")),
    ("kd_temperature", 0.0), ("kd_temperature", -0.7),
    ("affinity_momentum", 1.0), ("affinity_momentum", -0.01),
    ("phase_boundaries", (0.7, 0.2)), ("phase_boundaries", (0.0, 0.5)),
    ("phase_boundaries", (0.5, 1.0)), ("phase_boundaries", (0.3, 0.3)),
    ("phase_boundaries", (0.2,)), ("phase_boundaries", "0.2,0.7"),
    ("affinity_update_interval", 0), ("affinity_update_interval", 2.5),
    ("num_domains", 0), ("num_domains", True),
    ("method", "lora"), ("kd_schedule", "exponential"),
    ("warmup_trainable", ("router",)), ("stabilization_trainable", ("experts",)),
    ("consolidation_trainable", "associated_experts"),
    ("isolation_phases", ("warm-up",)),
    ("esft_threshold", 0.0), ("esft_threshold", 1.5),
    ("kd_end_progress", 0.0), ("kd_end_progress", 1.2), ("kd_initial_weight", -1.0),
    ("adapter_hidden_size", 0), ("adapter_hidden_multiplier", 0.0),
])
def test_every_invalid_value_is_a_config_error_naming_the_field(field, value):
    config = DESMoEConfig(num_domains=2)
    setattr(config, field, value)
    with pytest.raises(ConfigError) as error:
        config.validate()
    assert error.value.field == field
    assert str(error.value).startswith(f"{field}:")
    assert "Fix:" in str(error.value)


@pytest.mark.parametrize("field, value", [
    ("phi", 1.0), ("affinity_momentum", 0.0), ("esft_threshold", 1.0), ("kd_end_progress", 1.0),
    ("kd_initial_weight", 0.0), ("phase_boundaries", (0.01, 0.99)),
    ("isolation_phases", ()), ("warmup_trainable", ("router_adapter", "attention")),
])
def test_edge_values_inside_the_ranges_are_accepted(field, value):
    config = DESMoEConfig(num_domains=2)
    setattr(config, field, value)
    config.validate()


def test_parameter_groups_must_exist_for_the_method():
    with pytest.raises(ConfigError) as error:
        DESMoEConfig(num_domains=2, method="full", warmup_trainable=("router_adapter",)).validate()
    assert error.value.field == "warmup_trainable"
    with pytest.raises(ConfigError) as error:
        DESMoEConfig(num_domains=2, consolidation_trainable=("selected_experts",)).validate()
    assert error.value.field == "consolidation_trainable"
    DESMoEConfig(num_domains=2, method="esft_gate",
                 warmup_trainable=("selected_experts", "attention")).validate()


def test_from_dict_rejects_unknown_keys_by_name():
    with pytest.raises(ConfigError) as error:
        DESMoEConfig.from_dict({"num_domains": 2, "phii": 0.5})
    assert error.value.field == "phii"
    assert "did you mean 'phi'" in str(error.value)
    with pytest.raises(ConfigError) as error:
        DESMoEConfig.from_dict({"num_domains": 2, "zzzzzz": 1})
    assert error.value.field == "zzzzzz"


def test_from_dict_requires_num_domains_and_validates():
    with pytest.raises(ConfigError) as error:
        DESMoEConfig.from_dict({"phi": 0.5})
    assert error.value.field == "num_domains"
    with pytest.raises(ConfigError) as error:
        DESMoEConfig.from_dict({"num_domains": 2, "phi": 2.0})
    assert error.value.field == "phi"


def test_from_dict_turns_yaml_lists_into_tuples_and_round_trips():
    config = DESMoEConfig.from_dict({
        "num_domains": 4, "phase_boundaries": [0.1, 0.5],
        "stabilization_trainable": ["router_adapter", "associated_experts", "norms"],
        "isolation_phases": ["consolidation"], "kd_schedule": "linear",
    })
    assert config.phase_boundaries == (0.1, 0.5)
    assert config.stabilization_trainable == ("router_adapter", "associated_experts", "norms")
    assert DESMoEConfig.from_dict(config.to_dict()) == config


def test_derived_properties():
    assert DESMoEConfig(num_domains=1, method="esft_token").esft_score == "token"
    assert DESMoEConfig(num_domains=1, method="esft_gate").esft_score == "gate"
    assert DESMoEConfig(num_domains=1).esft_score is None
    assert DESMoEConfig(num_domains=1).uses_adapter
    assert not DESMoEConfig(num_domains=1, method="full").uses_adapter
    assert DESMoEConfig(num_domains=1).adapter_width(10) == 40
    assert DESMoEConfig(num_domains=1, adapter_hidden_multiplier=0.25).adapter_width(10) == 3
    assert DESMoEConfig(num_domains=1, adapter_hidden_size=7).adapter_width(10) == 7
