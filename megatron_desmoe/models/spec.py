"""The one place that builds Megatron layer specs for the project's MoE models.

Later components (the DES-MoE router, experts and layer) are plugged in here through
Megatron's submodule specs: `MoEClasses` names the classes that replace TopKRouter,
SequentialMLP and MoELayer inside every MoE layer's spec. Nothing is monkeypatched.

Backends: "local" (pure Megatron-Core modules, runs on CPU) and "te" (Transformer Engine,
GPU; needed for FP8).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from functools import partial
from typing import Optional

import torch

from megatron_desmoe.compat import ensure_megatron_importable

ensure_megatron_importable()

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec  # noqa: E402
from megatron.core.tensor_parallel.mappings import (  # noqa: E402
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.dot_product_attention import DotProductAttention  # noqa: E402
from megatron.core.transformer.identity_op import IdentityOp  # noqa: E402
from megatron.core.transformer.moe.experts import SequentialMLP  # noqa: E402
from megatron.core.transformer.multi_latent_attention import MLASelfAttention  # noqa: E402
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules  # noqa: E402
from megatron.core.transformer.moe.router import TopKRouter  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402
from megatron.core.transformer.torch_norm import WrappedTorchNorm  # noqa: E402
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402
from megatron.core.utils import divide  # noqa: E402

from megatron_desmoe.errors import ConfigError  # noqa: E402

BACKENDS = ("local", "te")


@dataclass(frozen=True)
class MoEClasses:
    """Classes placed into every MoE layer's spec (stock Megatron by default)."""

    router: type = TopKRouter
    experts: type = SequentialMLP
    layer: type = MoELayer


class LocalMLACoreAttention(DotProductAttention):
    """Megatron's local core attention, accepting multi-latent attention's head widths.

    MLASelfAttention passes k_channels / v_channels (query-key and value widths differ,
    192 and 128 for DeepSeek-V2); the local DotProductAttention takes neither and sizes its
    output by kv_channels. Only the TE backend handles this upstream.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, k_channels=None,
                 v_channels=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        if v_channels is not None:
            tp_size = config.tensor_model_parallel_size
            self.hidden_size_per_partition = divide(v_channels * config.num_attention_heads, tp_size)


class LocalMLASelfAttention(MLASelfAttention):
    """MLA with local (non-TE) linears when queries have no LoRA (DeepSeek-V2-Lite).

    With qk_layernorm on and q_lora_rank None, Megatron 0.19.2's QKNormConfigResolver asks
    for a fused norm+linear `linear_q_proj`, which only TE provides (RuntimeError
    "qk_layernorm requires TransformerEngine ..."), although DeepSeek-V2-Lite has no query
    norm at all, only the norm on the compressed key/value latent. Here: plain q projection,
    no q norm, a standalone kv norm followed by a plain kv up-projection.
    """

    def _qkv_down_projection(self, hidden_states):
        """Make the TP-split kv down projection look like a plain Linear, as 0.19.2 already
        does for the q down projection: gather the output width, re-scatter the sequence.

        Without this, under TP > 1 with sequence parallelism Megatron 0.19.2 gathers the
        width inside get_query_key_value_tensors and keeps k_pos_emb at full sequence length:
        the backward of that gather keeps only this rank's width slice of the gradient, so
        the rotary key's gradient counts only the heads of the rank owning that slice. Loss
        matched one rank exactly while gradients upstream of every MLA layer were off by
        up to 2% (tests/parallel, deepseek-v2-tiny, TP=2). With kv_combined as
        [s/TP, b, kv_lora_rank + rope] the else-branch gathers k_pos_emb with
        gather_from_sequence_parallel_region, whose reduce-scatter backward sums all heads.
        """
        q_compressed, kv_combined = super()._qkv_down_projection(hidden_states)
        full_width = self.config.kv_lora_rank + self.config.qk_pos_emb_head_dim
        if kv_combined.size(-1) != full_width and self.config.sequence_parallel:
            kv_combined = gather_from_tensor_model_parallel_region(kv_combined, group=self.tp_group)
            kv_combined = scatter_to_sequence_parallel_region(kv_combined, group=self.tp_group)
        return q_compressed, kv_combined

    def _resolve_qk_norm_config(self, submodules):
        if self.config.q_lora_rank is not None:
            return super()._resolve_qk_norm_config(submodules)
        return dict(
            linear_q_proj=submodules.linear_q_proj,
            linear_q_up_proj=IdentityOp,
            linear_kv_up_proj=submodules.linear_kv_up_proj,
            q_layernorm=IdentityOp,
            kv_layernorm=submodules.kv_layernorm,
        )


class SequenceParallelTorchNorm:
    """The local spec's torch RMSNorm/LayerNorm, usable with sequence parallelism.

    Megatron 0.19.2's local spec uses WrappedTorchNorm (no apex on CPU), which asserts
    `not config.sequence_parallel`, so MoE models (which need SP with TP > 1) could not use
    TP on the local backend. Same module and state-dict keys; its parameters are marked
    `.sequence_parallel` (as FusedLayerNorm/TENorm do) so finalize_model_grads all-reduces
    their gradients over the TP group.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                persist_layer_norm: bool = False, zero_centered_gamma: bool = False,
                normalization: str = "LayerNorm"):
        norms = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in norms or config.layernorm_zero_centered_gamma:
            raise ConfigError("normalization", f"{config.normalization!r} (zero-centred gamma: "
                              f"{config.layernorm_zero_centered_gamma}) has no local SP norm",
                              "use RMSNorm or LayerNorm without zero-centred gamma")
        norm = norms[config.normalization](hidden_size, eps=eps)
        for param in norm.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)
        return norm


def _with_sequence_parallel_norms(spec):
    """`spec` with every WrappedTorchNorm replaced by SequenceParallelTorchNorm (recursive)."""
    if spec is WrappedTorchNorm:
        return SequenceParallelTorchNorm
    if isinstance(spec, list):
        return [_with_sequence_parallel_norms(item) for item in spec]
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        changes = {}
        for field_ in dataclasses.fields(spec):
            if field_.init:
                value = getattr(spec, field_.name)
                new_value = _with_sequence_parallel_norms(value)
                if new_value is not value:
                    changes[field_.name] = new_value
        return replace(spec, **changes) if changes else spec
    return spec


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # TE raises RuntimeError (not ImportError) without CUDA
        return False
    return True


def backend_of(config: TransformerConfig) -> str:
    return "te" if config.transformer_impl == "transformer_engine" else "local"


def build_block_spec(
    config: TransformerConfig,
    backend: str = "local",
    moe_classes: MoEClasses = MoEClasses(),
    pp_rank: Optional[int] = None,
    vp_stage: Optional[int] = None,
) -> TransformerBlockSubmodules:
    """Layer specs for this pipeline stage, with `moe_classes` in every MoE layer."""
    if backend not in BACKENDS:
        raise ConfigError("backend", f"unknown backend {backend!r}", f"use one of {BACKENDS}")
    if backend == "te" and not te_available():
        raise ConfigError(
            "backend", "the Transformer Engine backend needs transformer_engine (and CUDA)",
            "install requirements-gpu.txt on a GPU machine, or use backend='local'",
        )
    block = get_gpt_decoder_block_spec(
        config, use_transformer_engine=backend == "te", normalization=config.normalization,
        pp_rank=pp_rank, vp_stage=vp_stage,
    )
    layers = [_customise_layer(spec, config, backend, moe_classes) for spec in block.layer_specs]
    block = TransformerBlockSubmodules(layer_specs=layers, layer_norm=block.layer_norm)
    if backend == "local" and config.sequence_parallel:
        block = _with_sequence_parallel_norms(block)
    return block


def _customise_layer(spec: ModuleSpec, config, backend: str, moe_classes: MoEClasses) -> ModuleSpec:
    submodules = spec.submodules
    if backend == "local" and config.multi_latent_attention:
        submodules = _local_mla_fixes(submodules, config)
    mlp = submodules.mlp
    if isinstance(mlp, partial) and isinstance(mlp.func, type) and issubclass(mlp.func, MoELayer):
        submodules = replace(submodules, mlp=_inject_moe_classes(mlp, moe_classes))
    return ModuleSpec(module=spec.module, params=spec.params, submodules=submodules)


def _inject_moe_classes(mlp: partial, classes: MoEClasses) -> partial:
    moe_submodules: MoESubmodules = mlp.keywords["submodules"]
    experts = moe_submodules.experts
    if isinstance(experts, partial) and experts.func is SequentialMLP:
        experts = partial(classes.experts, *experts.args, **experts.keywords)
    new_submodules = replace(moe_submodules, router=classes.router, experts=experts)
    keywords = dict(mlp.keywords, submodules=new_submodules)
    return partial(classes.layer, *mlp.args, **keywords)


def _local_mla_fixes(submodules, config):
    """Local-backend MLA: core attention with MLA head widths; no q norm without q LoRA.

    The local spec always puts a q layernorm in MLA layers, which MLA rejects when
    q_lora_rank is None ("q_layernorm ... is non-trivial"), as in DeepSeek-V2-Lite.
    """
    attention = submodules.self_attention
    attn_sub = replace(attention.submodules, core_attention=LocalMLACoreAttention)
    if config.q_lora_rank is None:
        attn_sub = replace(attn_sub, q_layernorm=IdentityOp)
    new_attention = ModuleSpec(module=LocalMLASelfAttention, params=attention.params, submodules=attn_sub)
    return replace(submodules, self_attention=new_attention)
