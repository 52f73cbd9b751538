"""Turn a model preset plus a parallel layout into Megatron-Core config and GPT model.

Model code stays free of parallelism: the layout lives in `ParallelConfig`, process groups
are created by `megatron_desmoe.parallel`, and this module only reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_desmoe.compat import cuda_absent, ensure_megatron_importable

ensure_megatron_importable()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker  # noqa: E402
from megatron.core.transformer.transformer_config import (  # noqa: E402
    MLATransformerConfig,
    TransformerConfig,
)

from megatron_desmoe.errors import ConfigError  # noqa: E402
from megatron_desmoe.models.presets import MoEModelConfig  # noqa: E402
from megatron_desmoe.models.qk_norm import with_full_width_qk_norm  # noqa: E402
from megatron_desmoe.models.spec import BACKENDS, MoEClasses, build_block_spec, backend_of  # noqa: E402

DISPATCHERS = ("alltoall", "allgather", "flex")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ParallelConfig:
    """A parallel layout. Data parallelism is whatever the world size leaves."""

    tensor_parallel: int = 1  # TP: attention/dense weights split across ranks
    pipeline_parallel: int = 1  # PP: layers split into stages (1F1B schedule)
    expert_parallel: int = 1  # EP: routed experts split across ranks
    expert_tensor_parallel: int = 1  # ETP: each expert's weights split across ranks
    sequence_parallel: bool = False  # required with TP > 1 for MoE layers
    dispatcher: str = "alltoall"  # token dispatcher: alltoall, allgather (flex needs DeepEP)

    def data_parallel(self, world_size: int) -> int:
        return world_size // (self.tensor_parallel * self.pipeline_parallel)


def validate_layout(model: MoEModelConfig, parallel: ParallelConfig, world_size: int) -> None:
    """Reject layouts Megatron would fail on later, naming the field and a valid value."""
    tp, pp, ep = parallel.tensor_parallel, parallel.pipeline_parallel, parallel.expert_parallel
    for field_name, value in (("tensor_parallel", tp), ("pipeline_parallel", pp),
                              ("expert_parallel", ep),
                              ("expert_tensor_parallel", parallel.expert_tensor_parallel)):
        if value < 1:
            raise ConfigError(field_name, f"must be >= 1, got {value}", "use 1 or more")
    if world_size % (tp * pp):
        raise ConfigError(
            "world_size", f"{world_size} ranks are not a multiple of TP*PP = {tp * pp}",
            f"launch a multiple of {tp * pp} processes or change TP/PP",
        )
    dp = parallel.data_parallel(world_size)
    if model.num_experts % ep:
        raise ConfigError(
            "expert_parallel", f"{model.num_experts} experts are not divisible by EP={ep}",
            f"use a divisor of {model.num_experts}",
        )
    if (tp * dp) % (ep * parallel.expert_tensor_parallel):
        raise ConfigError(
            "expert_parallel", f"EP*ETP={ep * parallel.expert_tensor_parallel} must divide "
            f"TP*DP={tp * dp}", "lower EP/ETP or launch more ranks",
        )
    if model.num_attention_heads % tp or model.num_query_groups % tp:
        raise ConfigError(
            "tensor_parallel", f"TP={tp} must divide heads ({model.num_attention_heads}) and "
            f"query groups ({model.num_query_groups})", f"use a divisor of {model.num_query_groups}",
        )
    if model.num_layers % pp:
        raise ConfigError(
            "pipeline_parallel", f"{model.num_layers} layers are not divisible by PP={pp}",
            f"use a divisor of {model.num_layers}",
        )
    if tp > 1 and not parallel.sequence_parallel:
        raise ConfigError(
            "sequence_parallel", "MoE layers with TP > 1 need sequence parallelism",
            "set sequence_parallel=True (--sequence-parallel)",
        )
    if parallel.dispatcher not in DISPATCHERS:
        raise ConfigError("dispatcher", f"unknown dispatcher {parallel.dispatcher!r}",
                          f"use one of {DISPATCHERS}")


def transformer_config(
    model: MoEModelConfig,
    parallel: ParallelConfig = ParallelConfig(),
    *,
    backend: str = "local",
    dtype: str = "fp32",
    dropout: float = 0.0,
    fp8: Optional[str] = None,
    fp8_recipe: str = "delayed",
    **overrides,
) -> TransformerConfig:
    """Megatron TransformerConfig for `model` under `parallel`.

    Fusions that need CUDA kernels are switched off where CUDA is absent; overrides go to
    TransformerConfig unchanged (e.g. recompute_granularity).
    """
    if backend not in BACKENDS:
        raise ConfigError("backend", f"unknown backend {backend!r}", f"use one of {BACKENDS}")
    if dtype not in DTYPES:
        raise ConfigError("dtype", f"unknown dtype {dtype!r}", f"use one of {sorted(DTYPES)}")
    on_gpu = not cuda_absent()
    kwargs = dict(
        transformer_impl="transformer_engine" if backend == "te" else "local",
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        ffn_hidden_size=model.ffn_hidden_size,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size,
        num_moe_experts=model.num_experts,
        moe_router_topk=model.topk,
        moe_layer_freq=model.moe_layer_pattern,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm or model.mla is not None,
        hidden_dropout=dropout,
        attention_dropout=dropout,
        moe_router_score_function=model.score_function,
        moe_router_pre_softmax=not model.norm_topk_prob and model.score_function == "softmax",
        moe_router_topk_scaling_factor=model.topk_scaling_factor,
        moe_router_num_groups=model.num_groups,
        moe_router_group_topk=model.group_topk,
        moe_router_enable_expert_bias=model.expert_bias,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss" if model.aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=model.aux_loss_coeff,
        moe_shared_expert_intermediate_size=model.shared_expert_hidden_size,
        moe_shared_expert_gate=model.shared_expert_gate,
        moe_token_dispatcher_type=parallel.dispatcher,
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        expert_model_parallel_size=parallel.expert_parallel,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=DTYPES[dtype],
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        use_cpu_initialization=not on_gpu,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        cross_entropy_loss_fusion=False,
    )
    if parallel.pipeline_parallel > 1:  # dtype of activations sent between stages
        kwargs.update(pipeline_dtype=DTYPES[dtype])
    if fp8:
        kwargs.update(fp8=fp8, fp8_recipe=fp8_recipe)
    if model.mla is not None:
        config_cls = MLATransformerConfig
        kwargs.update(_mla_kwargs(model))
    else:
        config_cls = TransformerConfig
    kwargs.update(overrides)
    return config_cls(**kwargs)


def _mla_kwargs(model: MoEModelConfig) -> dict:
    mla = model.mla
    kwargs = dict(
        q_lora_rank=mla.q_lora_rank,
        kv_lora_rank=mla.kv_lora_rank,
        qk_head_dim=mla.qk_head_dim,
        qk_pos_emb_head_dim=mla.qk_pos_emb_head_dim,
        v_head_dim=mla.v_head_dim,
        kv_channels=mla.v_head_dim,
        rotary_base=model.rope_theta,
    )
    if model.rope_scaling is None:
        kwargs.update(rope_type="rope")
    else:
        scaling = model.rope_scaling
        kwargs.update(
            rope_type="yarn",
            rotary_scaling_factor=scaling.factor,
            original_max_position_embeddings=scaling.original_max_position_embeddings,
            beta_fast=scaling.beta_fast,
            beta_slow=scaling.beta_slow,
            mscale=scaling.mscale,
            mscale_all_dim=scaling.mscale_all_dim,
        )
    return kwargs


def build_gpt_model(
    model: MoEModelConfig,
    config: TransformerConfig,
    *,
    moe_classes: MoEClasses = MoEClasses(),
    seed: int = 1234,
) -> GPTModel:
    """The GPT model for this rank's pipeline stage. Process groups must exist already.

    Seeding happens here so that every layout builds the same global weights: Megatron's CPU
    initialisation draws each full weight from the CPU generator and keeps this rank's slice.
    """
    # The MoE metrics tracker is process-global and sized by the first model that logs.
    destroy_moe_metrics_tracker()
    torch.manual_seed(seed)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    spec = build_block_spec(config, backend=backend_of(config), moe_classes=moe_classes, pp_rank=pp_rank)
    if model.qk_layernorm_full_width:  # OLMoE: one RMSNorm over all heads, not per head
        spec = with_full_width_qk_norm(spec)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=model.vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=pp_rank == 0,
        post_process=pp_rank == pp_size - 1,
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type="rope",  # MLA layers apply their own (YaRN) rotary
        rotary_base=int(model.rope_theta),
    )
    return gpt
