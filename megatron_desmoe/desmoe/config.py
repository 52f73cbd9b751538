"""DES-MoE configuration: one dataclass, every field documented where it is defined.

`DESMoEConfig.validate()` refuses bad values with a `ConfigError` naming the field;
`DESMoEConfig.from_dict()` is the entry point for YAML/JSON configs (unknown keys are an
error, lists become tuples, the result is validated).

Paper values (DES-MoE, EMNLP 2025): tau = 0.7, phi = 0.6, momentum 0.9, phase boundaries
0.2 T / 0.7 T, adapter width 4 x hidden. Everything else is our choice; docs/method.md
gives the reasons.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from megatron_desmoe.errors import ConfigError

METHODS = ("desmoe", "full", "esft_token", "esft_gate")
KD_SCHEDULES = ("cosine", "linear", "constant")
PHASE_NAMES = ("warmup", "stabilization", "consolidation")

# Parameter groups a phase can train. The glue maps every model parameter to one group.
PARAM_GROUPS = (
    "router_adapter",      # the trainable adapter added to the frozen gate (DES-MoE only)
    "router_gate",         # the pretrained gate weight (and expert bias)
    "routed_experts",      # every routed expert of every MoE layer
    "associated_experts",  # routed experts associated with >= 1 domain by the affinity mask
    "selected_experts",    # routed experts selected by ESFT (esft_* methods only)
    "shared_experts",      # always-on shared experts (DeepSeek, Qwen-MoE)
    "attention",           # self-attention projections
    "embeddings",          # input token (and position) embeddings
    "norms",               # every layer norm / RMS norm, including the final one
    "output_layer",        # LM head (when not tied to the embeddings)
    "dense_mlp",           # MLPs of dense (non-MoE) layers, e.g. DeepSeek's first layer
)
# Expert groups, broadest first: when several are trainable the broadest wins.
EXPERT_GROUPS = ("routed_experts", "associated_experts", "selected_experts")

_ESFT_SCORES = {"esft_token": "token", "esft_gate": "gate"}


@dataclass
class DESMoEConfig:
    """What the DES-MoE algorithm (or one of its baselines) does during fine-tuning."""

    # Number of fine-tuning domains D (rows of the affinity matrix). Domain ids are 0..D-1.
    num_domains: int
    # Which method trains: "desmoe" (this paper), "full" (full fine-tuning baseline),
    # "esft_token" / "esft_gate" (ESFT, Wang et al. 2024, with the Token Selection Ratio or
    # the Average Gate Score). Default "desmoe".
    method: str = "desmoe"
    # Hidden width of the router adapter (units). None: adapter_hidden_multiplier x hidden.
    adapter_hidden_size: Optional[int] = None
    # Adapter width as a multiple of the model's hidden size when adapter_hidden_size is
    # None. Default 4.0, the paper's choice (a 4d hidden layer).
    adapter_hidden_multiplier: float = 4.0
    # Softmax temperature tau of the routing distillation (dimensionless, > 0). Default 0.7
    # (paper). Below 1 it sharpens both routing distributions before comparing them.
    kd_temperature: float = 0.7
    # Shape of the distillation weight lambda(progress): "cosine" (default; smooth decay,
    # strong early when the adapter is untrained), "linear", or "constant" (until
    # kd_end_progress, then 0).
    kd_schedule: str = "cosine"
    # lambda at progress 0 (dimensionless, >= 0). Default 1.0: the KD term starts on the
    # same footing as the language-model loss.
    kd_initial_weight: float = 1.0
    # Training progress in (0, 1] at which lambda reaches 0 and stays there. Default 1.0
    # (the end of training), so lambda is high early and 0 at the end as the paper asks.
    kd_end_progress: float = 1.0
    # Affinity threshold phi in (0, 1]: expert e is associated with domain d when
    # A_hat[d, e] >= phi * max_e' A_hat[d, e']. Default 0.6 (paper).
    phi: float = 0.6
    # Momentum m in [0, 1) of the affinity update A_hat = m A_hat + (1 - m) F. Default 0.9
    # (paper): the mask follows routing drift over ~10 refreshes, not single batches.
    affinity_momentum: float = 0.9
    # T_update: optimizer steps between affinity refreshes (>= 1). Default 50, long enough
    # for every domain to appear in each window of a usual multi-domain blend.
    affinity_update_interval: int = 50
    # Progress at which warm-up ends and stabilisation ends, strictly increasing inside
    # (0, 1). Default (0.2, 0.7) (paper). Inclusive: a step at progress exactly 0.2 is the
    # last warm-up step (see phases.phase_at).
    phase_boundaries: tuple[float, float] = (0.2, 0.7)
    # Parameter groups (PARAM_GROUPS names) trained in each phase. None: the method's preset
    # (phases.METHOD_PRESETS), for "desmoe" warm-up = adapter + all routed experts,
    # stabilisation = adapter + associated experts, consolidation = associated experts.
    warmup_trainable: Optional[tuple[str, ...]] = None
    stabilization_trainable: Optional[tuple[str, ...]] = None
    consolidation_trainable: Optional[tuple[str, ...]] = None
    # Phases (PHASE_NAMES) in which gradient isolation is on. None: the method's preset
    # ("desmoe": stabilization and consolidation; warm-up only collects affinity; the
    # baselines: none).
    isolation_phases: Optional[tuple[str, ...]] = None
    # ESFT threshold p in (0, 1]: per layer, the smallest set of experts whose normalised
    # score sums to >= p is trained. Default 0.2, the value ESFT's released scripts use
    # (with the token score); ESFT tuned p per score function, so set it for esft_gate.
    esft_threshold: float = 0.2

    # ------------------------------------------------------------------ derived
    @property
    def esft_score(self) -> Optional[str]:
        """"token" or "gate" for the ESFT baselines, None otherwise."""
        return _ESFT_SCORES.get(self.method)

    @property
    def uses_adapter(self) -> bool:
        """Only DES-MoE adds the router adapter (and hence the distillation loss)."""
        return self.method == "desmoe"

    def adapter_width(self, hidden_size: int) -> int:
        """Adapter hidden width for a model of width `hidden_size`."""
        if self.adapter_hidden_size is not None:
            return self.adapter_hidden_size
        return max(1, math.ceil(self.adapter_hidden_multiplier * hidden_size))

    # ------------------------------------------------------------------ checks
    def validate(self) -> "DESMoEConfig":
        """Raise ConfigError (naming the field) for the first invalid value; return self."""
        _check_int(self, "num_domains", minimum=1)
        _check_choice(self, "method", METHODS)
        if self.adapter_hidden_size is not None:
            _check_int(self, "adapter_hidden_size", minimum=1)
        _check_range(self, "adapter_hidden_multiplier", 0.0, math.inf, low_open=True,
                     fix="a positive multiple of the hidden size, e.g. 4.0")
        _check_range(self, "kd_temperature", 0.0, math.inf, low_open=True,
                     fix="a positive temperature, e.g. 0.7")
        _check_choice(self, "kd_schedule", KD_SCHEDULES)
        _check_range(self, "kd_initial_weight", 0.0, math.inf, fix="a weight >= 0, e.g. 1.0")
        _check_range(self, "kd_end_progress", 0.0, 1.0, low_open=True,
                     fix="a training progress in (0, 1], e.g. 1.0")
        _check_range(self, "phi", 0.0, 1.0, low_open=True, fix="a threshold in (0, 1], e.g. 0.6")
        _check_range(self, "affinity_momentum", 0.0, 1.0, high_open=True,
                     fix="a momentum in [0, 1), e.g. 0.9")
        _check_int(self, "affinity_update_interval", minimum=1)
        _check_boundaries(self.phase_boundaries)
        for phase in PHASE_NAMES:
            _check_groups(self, f"{phase}_trainable")
        _check_names(self, "isolation_phases", PHASE_NAMES)
        _check_range(self, "esft_threshold", 0.0, 1.0, low_open=True,
                     fix="a cumulative score share in (0, 1], e.g. 0.2")
        return self

    # ------------------------------------------------------------------ (de)serialise
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DESMoEConfig":
        """Build and validate a config from a plain mapping (YAML/JSON). Unknown keys are
        an error naming the key; lists are turned into tuples."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(str(key), sorted(known), n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"use one of {sorted(known)}"
                raise ConfigError(str(key), "unknown DES-MoE option", hint)
        if "num_domains" not in values:
            raise ConfigError("num_domains", "missing (required)",
                              "set it to the number of fine-tuning domains")
        return cls(**{key: _tuples(value) for key, value in values.items()}).validate()

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping with lists for tuples; from_dict(to_dict()) round-trips."""
        return {key: _lists(value) for key, value in dataclasses.asdict(self).items()}


# ---------------------------------------------------------------------- helpers
def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(item) for item in value)
    return value


def _lists(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_lists(item) for item in value]
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(config: DESMoEConfig, field: str, minimum: int) -> None:
    value = getattr(config, field)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(field, f"must be an integer >= {minimum}, got {value!r}",
                          f"set an integer >= {minimum}")


def _check_range(config: DESMoEConfig, field: str, low: float, high: float, *, fix: str,
                 low_open: bool = False, high_open: bool = False) -> None:
    value = getattr(config, field)
    if not _is_number(value) or math.isnan(value):
        raise ConfigError(field, f"must be a number, got {value!r}", fix)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(field, f"must lie in {interval}, got {value!r}", fix)


def _check_choice(config: DESMoEConfig, field: str, choices: tuple[str, ...]) -> None:
    value = getattr(config, field)
    if value not in choices:
        raise ConfigError(field, f"unknown value {value!r}", f"use one of {list(choices)}")


def _check_names(config: DESMoEConfig, field: str, choices: tuple[str, ...]) -> None:
    names = getattr(config, field)
    if names is None:
        return
    if isinstance(names, str) or not isinstance(names, (tuple, list, frozenset, set)):
        raise ConfigError(field, f"must be a list of names, got {names!r}",
                          f"use a list drawn from {list(choices)}")
    for name in names:
        if name not in choices:
            raise ConfigError(field, f"unknown name {name!r}", f"use names from {list(choices)}")


def _check_groups(config: DESMoEConfig, field: str) -> None:
    _check_names(config, field, PARAM_GROUPS)
    groups = getattr(config, field) or ()
    if "router_adapter" in groups and not config.uses_adapter:
        raise ConfigError(field, f"'router_adapter' exists only for method 'desmoe', "
                          f"not {config.method!r}", "remove 'router_adapter'")
    if "selected_experts" in groups and config.esft_score is None:
        raise ConfigError(field, f"'selected_experts' needs an ESFT method, not "
                          f"{config.method!r}", "use 'associated_experts' or 'routed_experts'")


def _check_boundaries(boundaries: Any) -> None:
    field = "phase_boundaries"
    fix = "two progress values 0 < b1 < b2 < 1, e.g. [0.2, 0.7]"
    if not isinstance(boundaries, (tuple, list)) or len(boundaries) != 2:
        raise ConfigError(field, f"must be two numbers, got {boundaries!r}", fix)
    first, second = boundaries
    if not (_is_number(first) and _is_number(second)) or not 0 < first < second < 1:
        raise ConfigError(field, f"must be strictly increasing inside (0, 1), got "
                          f"{tuple(boundaries)!r}", fix)
