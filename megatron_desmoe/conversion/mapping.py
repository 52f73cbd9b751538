"""Declarative name mapping between Hugging Face and Megatron-Core state dicts.

A family adapter lists `Rule`s: one Megatron tensor, the HF tensors it is made of, the
transform between them and where the rule applies (once per model, per layer, per dense or
MoE layer, per routed expert). `StateDictAdapter` expands the rules for one model config into
concrete name pairs, in both directions.

Megatron names here are *canonical*: the names of a TP=EP=PP=1 local-backend state dict with
global layer and expert numbers (`decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight`).
Megatron's distributed checkpoints use slightly different keys (fused-norm TE names, one
stacked tensor per expert weight); `canonical_name` translates those.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

from megatron_desmoe.models.presets import MoEModelConfig

SCOPES = ("model", "layer", "dense", "moe", "expert")


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor <- HF tensors. `{L}` is the layer, `{E}` the routed expert."""

    mcore: str
    hf: tuple[str, ...]
    transform: str = "copy"  # key into the adapter's transforms: copy, gate_up, qkv
    scope: str = "layer"  # model, layer, dense (non-MoE layers), moe, expert


@dataclass(frozen=True)
class Mapping:
    """A concrete rule: canonical Megatron name, HF names, and the transform object."""

    mcore: str
    hf: tuple[str, ...]
    transform: object
    layer: Optional[int]  # None for embedding, final norm, output layer


class StateDictAdapter:
    """All name pairs of one model, looked up from either side."""

    def __init__(self, rules: Iterable[Rule], model: MoEModelConfig, transforms: dict):
        self.model = model
        self.mappings: list[Mapping] = [m for rule in rules for m in _expand(rule, model, transforms)]
        self.by_mcore = {m.mcore: m for m in self.mappings}
        self.by_hf = {name: m for m in self.mappings for name in m.hf}
        if len(self.by_mcore) != len(self.mappings):
            raise ValueError("adapter rules map two HF sources onto one Megatron tensor")

    def hf_names(self) -> set[str]:
        return set(self.by_hf)

    def mcore_names(self) -> set[str]:
        return set(self.by_mcore)


def _expand(rule: Rule, model: MoEModelConfig, transforms: dict) -> list[Mapping]:
    if rule.scope not in SCOPES:
        raise ValueError(f"unknown rule scope {rule.scope!r}")
    transform = transforms[rule.transform]
    if rule.scope == "model":
        return [Mapping(rule.mcore, rule.hf, transform, None)]
    pattern = model.moe_layer_pattern
    layers = {
        "layer": range(model.num_layers),
        "dense": [i for i, moe in enumerate(pattern) if not moe],
        "moe": [i for i, moe in enumerate(pattern) if moe],
        "expert": [i for i, moe in enumerate(pattern) if moe],
    }[rule.scope]
    experts = range(model.num_experts) if rule.scope == "expert" else [None]
    return [
        Mapping(_fill(rule.mcore, layer, expert), tuple(_fill(h, layer, expert) for h in rule.hf),
                transform, layer)
        for layer in layers for expert in experts
    ]


def _fill(template: str, layer: int, expert: Optional[int]) -> str:
    name = template.replace("{L}", str(layer))
    return name.replace("{E}", str(expert)) if expert is not None else name


# ------------------------------------------------------------------ checkpoint keys

# Megatron's sharded state dict stores some norms under the key of the TE linear they are
# fused into, whatever the backend; both spellings mean the same tensor.
_FUSED_NORM_KEYS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "self_attention.linear_q_up_proj.layer_norm_weight": "self_attention.q_layernorm.weight",
    "self_attention.linear_kv_up_proj.layer_norm_weight": "self_attention.kv_layernorm.weight",
}
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_STACKED_EXPERT = re.compile(r"^mlp\.experts\.experts\.(linear_fc[12]\.weight)$")


def canonical_name(checkpoint_key: str, expert: Optional[int] = None) -> str:
    """Canonical Megatron name of a checkpoint key (plus the expert index on its stacked axis)."""
    match = _LAYER_KEY.match(checkpoint_key)
    if match is None:
        return checkpoint_key
    layer, rest = match.groups()
    rest = _FUSED_NORM_KEYS.get(rest, rest)
    stacked = _STACKED_EXPERT.match(rest)
    if stacked is not None:
        if expert is None:
            raise ValueError(f"{checkpoint_key} is stacked over experts; an expert index is needed")
        rest = f"mlp.experts.local_experts.{expert}.{stacked.group(1)}"
    return f"decoder.layers.{layer}.{rest}"


def layer_of(name: str) -> Optional[int]:
    """Layer number of a canonical or checkpoint name, None outside the decoder layers."""
    match = _LAYER_KEY.match(name)
    return int(match.group(1)) if match else None
