"""A small, explicit training-step engine on Megatron-Core's own pieces.

Used by the trainer, the tests and the benchmarks. Everything here is what Megatron-LM's
`megatron/training/training.py` does for one step, written out without its global `args`:

* `build_training_model`: the GPT model for this rank's pipeline stage, wrapped like
  Megatron-LM's `get_model` (Float16Module for bf16/fp16, then Megatron-Core
  `DistributedDataParallel`), with `config.finalize_model_grads_func`, `no_sync_func` and
  `grad_sync_func` set the way Megatron-LM sets them.
* `build_optimizer` / `build_lr_scheduler`: `get_megatron_optimizer` (a ChainedOptimizer of
  the dense and the expert-parallel optimizer, plain or distributed) and Megatron-Core's
  `OptimizerParamScheduler`, counted in optimizer steps.
* `gpt_forward_step`: Megatron-LM's `pretrain_gpt.forward_step` for batches
  `{tokens, labels, loss_mask, position_ids[, attention_mask, domain_ids]}`, with an optional
  context entered around the model call (DES-MoE publishes domain ids to its router there).
* `train_step`: zero grad buffers, `get_forward_backward_func()` (1F1B under PP; it runs
  `finalize_model_grads`, which also updates the router expert bias), the
  `hooks.before_optimizer_step` hook, the optimizer step (optionally skipping parameters,
  see `optimizer_step_skipping`), the LR scheduler, and the loss dict reduced over DP and
  broadcast over PP so every rank returns the same numbers.

One model chunk per rank (no virtual pipeline stages).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, ContextManager, Iterable, Iterator, Mapping, Optional

import torch
import torch.distributed as dist

from megatron_desmoe.compat import cuda_absent, ensure_megatron_importable

ensure_megatron_importable()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.distributed import (  # noqa: E402
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer  # noqa: E402
from megatron.core.optimizer.optimizer import (  # noqa: E402
    ChainedOptimizer,
    Float16OptimizerWithFloat16Params,
    FP32Optimizer,
    MegatronOptimizer,
)
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.transformer.module import Float16Module  # noqa: E402
from megatron.core.utils import get_model_config  # noqa: E402

from megatron_desmoe.errors import ConfigError  # noqa: E402
from megatron_desmoe.models.builder import (  # noqa: E402
    DTYPES,
    ParallelConfig,
    build_gpt_model,
    transformer_config,
    validate_layout,
)
from megatron_desmoe.models.presets import MoEModelConfig  # noqa: E402
from megatron_desmoe.models.spec import MoEClasses  # noqa: E402
from megatron_desmoe.parallel.setup import init_model_parallel  # noqa: E402

__all__ = [
    "StepResult",
    "TrainHooks",
    "build_lr_scheduler",
    "build_optimizer",
    "build_training_model",
    "gpt_forward_step",
    "loss_is_finite",
    "main_params_of",
    "make_forward_step",
    "masked_token_loss",
    "optimizer_step_skipping",
    "train_step",
    "unwrap_model",
]

ParamFilter = Callable[[str, torch.nn.Parameter], bool]


# ------------------------------------------------------------------------------- model


def _check_process_groups(parallel: ParallelConfig) -> None:
    actual = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_expert_model_parallel_world_size(),
        parallel_state.get_expert_tensor_parallel_world_size(),
    )
    wanted = (parallel.tensor_parallel, parallel.pipeline_parallel, parallel.expert_parallel,
              parallel.expert_tensor_parallel)
    if actual != wanted:
        raise ConfigError(
            "parallel", f"process groups are initialised for TP/PP/EP/ETP={actual}, the layout "
            f"asks for {wanted}", "call init_model_parallel(parallel) with the same layout",
        )


def build_training_model(
    model_cfg: MoEModelConfig,
    parallel: ParallelConfig = ParallelConfig(),
    *,
    dtype: str = "fp32",
    seed: int = 1234,
    moe_classes: MoEClasses = MoEClasses(),
    backend: str = "local",
    overlap_grad_reduce: bool = False,
    use_distributed_optimizer: bool = False,
    bucket_size: Optional[int] = None,
    grad_reduce_in_fp32: Optional[bool] = None,
    check_for_nan_in_grad: bool = False,
    trainable: Optional[ParamFilter] = None,
    **config_overrides: Any,
) -> list[DistributedDataParallel]:
    """This rank's model chunk, ready for `train_step`: a one-element list of DDP modules.

    Process groups are created (`init_model_parallel(parallel, seed)`) unless they exist;
    existing ones must match `parallel`. `config_overrides` go to TransformerConfig
    (e.g. `moe_aux_loss_coeff=0.0`, `calculate_per_token_loss=True`,
    `recompute_granularity="selective"`).

    `trainable(name, param) -> bool`: parameters it rejects are frozen before wrapping
    (requires_grad=False): they get no gradient buffer and no optimizer state. This is the
    way to train a subset with the distributed optimizer.
    """
    if dtype not in DTYPES:
        raise ConfigError("dtype", f"unknown dtype {dtype!r}", f"use one of {sorted(DTYPES)}")
    if not parallel_state.model_parallel_is_initialized():
        init_model_parallel(parallel, seed)
    world_size = dist.get_world_size()
    validate_layout(model_cfg, parallel, world_size)
    _check_process_groups(parallel)
    if parallel.pipeline_parallel > 1:
        config_overrides.setdefault("pipeline_dtype", DTYPES[dtype])
    config = transformer_config(model_cfg, parallel, backend=backend, dtype=dtype, **config_overrides)
    module = build_gpt_model(model_cfg, config, moe_classes=moe_classes, seed=seed)
    if trainable is not None:
        for name, param in module.named_parameters():
            if not trainable(name, param):
                param.requires_grad_(False)
        if not any(param.requires_grad for param in module.parameters()):
            raise ConfigError("trainable", "freezes every parameter of this stage",
                              "let at least one parameter train")
    _mark_sequence_parallel_norms(module, config)
    if config.fp16 or config.bf16:
        module = Float16Module(config, module)
    if not cuda_absent():
        module.cuda(torch.cuda.current_device())
    if grad_reduce_in_fp32 is None:
        grad_reduce_in_fp32 = dtype != "fp32"
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer,
        bucket_size=bucket_size,
        check_for_nan_in_grad=check_for_nan_in_grad,
    )
    chunks = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=module)]
    _set_schedule_hooks(chunks, config, ddp_config)
    return chunks


def _mark_sequence_parallel_norms(module: torch.nn.Module, config) -> None:
    """Norm weights replicated over TP see only this rank's sequence slice under SP.

    Megatron's own norms (FusedLayerNorm, TENorm, SequenceParallelTorchNorm from our spec)
    mark their parameters `.sequence_parallel`, so finalize_model_grads all-reduces their
    gradients over TP. A torch norm that reached the model some other way would silently
    get partial gradients: mark it too. TP-sharded weights (e.g. OLMoE's full-width q/k
    norm) are already complete per rank and stay unmarked.
    """
    if not config.sequence_parallel:
        return
    for sub in module.modules():
        if isinstance(sub, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
            for param in sub.parameters(recurse=False):
                if not getattr(param, "tensor_model_parallel", False):
                    param.sequence_parallel = True


def _set_schedule_hooks(chunks, config, ddp_config) -> None:
    """What Megatron-LM's training.setup_model_and_optimizer/train put on the config."""
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = None
    config.grad_sync_func = None
    if ddp_config.overlap_grad_reduce:
        no_sync = [chunk.no_sync for chunk in chunks]
        grad_sync = [chunk.start_grad_sync for chunk in chunks]
        config.no_sync_func = no_sync[0] if len(chunks) == 1 else no_sync
        config.grad_sync_func = grad_sync[0] if len(chunks) == 1 else grad_sync


def unwrap_model(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while isinstance(chunk, (DistributedDataParallel, Float16Module)):
        chunk = chunk.module
    return chunk


# --------------------------------------------------------------------------- optimizer


def build_optimizer(
    model_chunks: list[DistributedDataParallel],
    *,
    lr: float = 1e-4,
    min_lr: float = 0.0,
    weight_decay: float = 0.01,
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.999,
    adam_eps: float = 1e-8,
    clip_grad: float = 1.0,
    use_distributed_optimizer: Optional[bool] = None,
    param_filter: Optional[ParamFilter] = None,
    config_overrides: Optional[dict] = None,
) -> MegatronOptimizer:
    """Megatron-Core's AdamW over the model chunks (`get_megatron_optimizer`).

    Returns a ChainedOptimizer (dense + expert-parallel parameters). The distributed
    optimizer is used when the DDP wrappers were built with it (`use_distributed_optimizer`
    may only repeat that choice). Biases and 1-D parameters get no weight decay
    (Megatron's standard overrides). `config_overrides` is get_megatron_optimizer's
    {ParamKey: ParamGroupOverride} (e.g. a different max_lr for router adapters); it
    replaces the standard ones when given.

    `param_filter(name, param) -> bool`: parameters it rejects are frozen
    (requires_grad=False) and left out of the optimizer. Under the distributed optimizer
    they must be frozen before DDP wrapping: pass `trainable=` to build_training_model.
    """
    ddp_config = model_chunks[0].ddp_config
    if use_distributed_optimizer is None:
        use_distributed_optimizer = ddp_config.use_distributed_optimizer
    if use_distributed_optimizer != ddp_config.use_distributed_optimizer:
        raise ConfigError(
            "use_distributed_optimizer", f"{use_distributed_optimizer} but the model was wrapped "
            f"with use_distributed_optimizer={ddp_config.use_distributed_optimizer}",
            "pass the same value to build_training_model",
        )
    if not 0.0 <= min_lr <= lr:
        raise ConfigError("min_lr", f"need 0 <= min_lr ({min_lr}) <= lr ({lr})", "lower min_lr")
    if param_filter is not None:
        _freeze_rejected(model_chunks, param_filter, use_distributed_optimizer)
    config = get_model_config(model_chunks[0])
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        min_lr=min_lr,
        weight_decay=weight_decay,
        adam_beta1=adam_beta1,
        adam_beta2=adam_beta2,
        adam_eps=adam_eps,
        clip_grad=clip_grad,
        use_distributed_optimizer=use_distributed_optimizer,
        bf16=config.bf16,
        fp16=config.fp16,
        params_dtype=config.params_dtype,
    )
    optimizer = get_megatron_optimizer(opt_config, model_chunks, config_overrides=config_overrides)
    config.grad_scale_func = optimizer.scale_loss  # as Megatron-LM's train() does
    return optimizer


def _freeze_rejected(model_chunks, param_filter: ParamFilter, distributed: bool) -> None:
    for chunk in model_chunks:
        for name, param in unwrap_model(chunk).named_parameters():
            if param.requires_grad and not param_filter(name, param):
                if distributed:
                    raise ConfigError(
                        "param_filter", f"would freeze {name} after DDP wrapping, which the "
                        "distributed optimizer cannot handle",
                        "pass trainable= to build_training_model instead",
                    )
                param.requires_grad_(False)


def build_lr_scheduler(
    optimizer: MegatronOptimizer,
    *,
    warmup_steps: int = 0,
    decay_steps: int,
    decay_style: str = "cosine",
    init_lr: float = 0.0,
) -> OptimizerParamScheduler:
    """Megatron-Core's OptimizerParamScheduler, counted in optimizer steps.

    Peak and final learning rate and the weight decay come from the optimizer
    (`build_optimizer(lr=, min_lr=, weight_decay=)`): Megatron stores them on every param
    group (max_lr / min_lr, per-group overrides included) and the scheduler reads them
    there. Linear warm-up from `init_lr` over `warmup_steps`, then `decay_style` ("cosine",
    "linear", "constant", "inverse-square-root") down to min_lr at `decay_steps`.
    It sets the learning rate of every param group now; `train_step(lr_scheduler=...)`
    advances it by one after each successful update. Its state_dict goes in checkpoints.
    """
    config = optimizer.config
    lr, min_lr = config.lr, config.min_lr or 0.0
    if decay_steps <= warmup_steps:
        raise ConfigError("decay_steps", f"{decay_steps} must exceed warmup_steps={warmup_steps}",
                          f"use at least {warmup_steps + 1}")
    if not 0.0 <= init_lr <= lr:
        raise ConfigError("init_lr", f"need 0 <= init_lr ({init_lr}) <= lr ({lr})",
                          "lower init_lr")
    return OptimizerParamScheduler(
        optimizer,
        init_lr=init_lr,
        max_lr=lr,
        min_lr=min_lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=decay_style,
        start_wd=config.weight_decay,
        end_wd=config.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )


# ------------------------------------------------------------- skipping optimizer updates


def _leaf_optimizers(optimizer: MegatronOptimizer) -> list[MegatronOptimizer]:
    if isinstance(optimizer, ChainedOptimizer):
        return [leaf for sub in optimizer.chained_optimizers for leaf in _leaf_optimizers(sub)]
    return [optimizer]


def main_params_of(optimizer: MegatronOptimizer) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(model parameter, the main parameter the inner torch optimizer updates) pairs.

    FP32Optimizer: the model parameter itself. Float16OptimizerWithFloat16Params: its fp32
    master copy (fp32 model params: themselves). DistributedOptimizer: this rank's fp32
    shard of the parameter (parameters with no shard on this rank are absent).
    """
    pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    for leaf in _leaf_optimizers(optimizer):
        if getattr(leaf, "is_stub_optimizer", False):
            continue
        if isinstance(leaf, DistributedOptimizer):
            precision_aware = leaf.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
            float16_mains = (leaf.shard_float16_groups if precision_aware
                             else leaf.shard_fp32_from_float16_groups)
            for models, mains in ((leaf.model_float16_groups, float16_mains),
                                  (leaf.model_fp32_groups, leaf.shard_fp32_groups)):
                for model_group, main_group in zip(models, mains):
                    pairs.extend(zip(model_group, main_group))
        elif isinstance(leaf, Float16OptimizerWithFloat16Params):
            for model_group, main_group in zip(leaf.float16_groups, leaf.fp32_from_float16_groups):
                pairs.extend(zip(model_group, main_group))
            for group in leaf.fp32_from_fp32_groups:
                pairs.extend((param, param) for param in group)
        elif isinstance(leaf, FP32Optimizer):
            for group in leaf.optimizer.param_groups:
                pairs.extend((param, param) for param in group["params"])
        else:
            raise TypeError(f"optimizer_step_skipping does not know {type(leaf).__name__}")
    return pairs


def _inner_torch_optimizers(optimizer: MegatronOptimizer) -> list[torch.optim.Optimizer]:
    return [leaf.optimizer for leaf in _leaf_optimizers(optimizer)
            if not getattr(leaf, "is_stub_optimizer", False) and leaf.optimizer is not None]


def _align_adam_step_counts(optimizer: MegatronOptimizer) -> None:
    """Give every Adam state of an inner torch optimizer the same `step` (the largest).

    torch's Adam/AdamW count steps per parameter, so a parameter whose update was skipped
    falls behind, and Megatron refuses to checkpoint such an optimizer ("The optimizer step
    differs per parameter" / DistributedOptimizer's `assert len(steps) == 1`). TE/apex
    FusedAdam (GPU) count per param group and already behave like this: a skipped
    parameter's bias correction continues from the group's step when it resumes.
    """
    for inner in _inner_torch_optimizers(optimizer):
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        steps = [state["step"] for state in inner.state.values() if "step" in state]
        if not steps:
            continue
        top = max(float(s) for s in steps)
        for state in inner.state.values():
            if "step" in state and float(state["step"]) != top:
                if torch.is_tensor(state["step"]):
                    state["step"].fill_(top)
                else:
                    state["step"] = top


def optimizer_step_skipping(
    optimizer: MegatronOptimizer,
    skip_params: Iterable[torch.nn.Parameter],
    *,
    align_step_counts: bool = True,
) -> tuple[bool, Optional[float], Optional[float]]:
    """`optimizer.step()`, leaving `skip_params` (model parameters) completely untouched.

    Runs Megatron's own `step()` (grad copy to main params, loss-scale check, grad-norm,
    clipping, skip-threshold, inner step, copy back / param all-gather) with one change:
    right after `prepare_grads()` has copied the model gradients into the main parameters,
    the main parameters of `skip_params` get `.grad = None`. Torch/TE/apex Adam skip
    parameters without a gradient, so they get no update, no weight decay and no change
    to their moments; they are also left out of the gradient norm and clipping.
    Works for FP32Optimizer, Float16OptimizerWithFloat16Params, DistributedOptimizer (this
    rank's shard) and ChainedOptimizer. Returns step()'s (success, grad_norm, num_zeros).

    Every rank must skip the same logical parameters (each passing its local tensors).
    `align_step_counts` keeps torch Adam's per-parameter step counters equal afterwards
    (see `_align_adam_step_counts`); exp_avg / exp_avg_sq of skipped parameters stay
    bit-identical either way.
    """
    skip_ids = {id(param) for param in skip_params}
    if not skip_ids:
        return optimizer.step()
    original_prepare = optimizer.prepare_grads

    def prepare_then_drop() -> bool:
        found_inf = original_prepare()
        for model_param, main_param in main_params_of(optimizer):
            if id(model_param) in skip_ids:
                main_param.grad = None
                if hasattr(main_param, "decoupled_grad"):  # precision-aware optimizer
                    main_param.decoupled_grad = None
        return found_inf

    optimizer.prepare_grads = prepare_then_drop  # instance attribute, removed below
    try:
        result = optimizer.step()
    finally:
        del optimizer.prepare_grads
    if align_step_counts:
        _align_adam_step_counts(optimizer)
    return result


# ------------------------------------------------------------------------ forward step


def masked_token_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron-LM 0.19 pretrain_gpt.loss_func: summed masked loss, its token count, report.

    The schedule divides the sum by the token count and the number of micro-batches when
    `config.calculate_per_token_loss` is False (the default), or lets finalize_model_grads
    divide the gradients by the global token count when it is True.
    """
    losses = output_tensor.view(-1).float()
    mask = loss_mask.reshape(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = torch.cat([loss.clone().detach().view(1), num_tokens.float().view(1)])
    return loss, num_tokens, {"lm loss": report}


def _to_device(value):
    if torch.is_tensor(value) and not cuda_absent():
        return value.cuda(non_blocking=True)
    return value


def gpt_forward_step(
    data_iterator: Iterator[Mapping[str, torch.Tensor]],
    model: torch.nn.Module,
    *,
    forward_context: Optional[Callable[[Mapping[str, torch.Tensor]], ContextManager]] = None,
):
    """One micro-batch: `model(tokens, position_ids, attention_mask, labels=labels)`.

    Batches are dicts with tokens, labels, loss_mask [b, s] and optionally position_ids
    (default 0..s-1), attention_mask (default None: causal) and domain_ids [b]. Every
    pipeline stage reads the same micro-batches (only the first uses tokens, only the last
    labels/loss_mask). `forward_context(batch)` is entered around the model call.
    """
    batch = {key: _to_device(value) for key, value in next(data_iterator).items()}
    tokens = batch["tokens"]
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    context = forward_context(batch) if forward_context is not None else contextlib.nullcontext()
    with context:
        output = model(tokens, position_ids, batch.get("attention_mask"), labels=batch["labels"])
    return output, partial(masked_token_loss, batch["loss_mask"])


def make_forward_step(
    forward_context: Optional[Callable[[Mapping[str, torch.Tensor]], ContextManager]] = None,
) -> Callable:
    """`gpt_forward_step` with `forward_context` bound, in the schedule's signature."""
    return partial(gpt_forward_step, forward_context=forward_context)


# -------------------------------------------------------------------------- train step


class TrainHooks:
    """Extension points of `train_step` (subclass and override; defaults do nothing)."""

    def before_optimizer_step(
        self, model_chunks: list[DistributedDataParallel], optimizer: MegatronOptimizer
    ) -> Optional[Iterable[torch.nn.Parameter]]:
        """Called after the gradients are final (DP-reduced, in `param.main_grad`), before
        the optimizer step. May edit main_grad in place (e.g. multiply by a mask; with the
        distributed optimizer only this rank's shard of the grad buffer is reduced, and only
        that shard is read). Returns model parameters whose update must be skipped this step
        (see `optimizer_step_skipping`), or None. Every rank must skip the same logical
        parameters."""
        return None

    def after_step(self, step: int) -> None:
        """Called at the end of every train_step with the step number."""


@dataclass
class StepResult:
    """What one train_step did; identical on every rank."""

    step: int
    losses: dict[str, float]  # token-weighted over the global batch, e.g. {"lm loss": 2.3}
    num_tokens: int  # loss tokens in the global batch
    grad_norm: Optional[float]  # before clipping, over the updated parameters
    update_successful: bool  # False when fp16 found inf/nan or the grad norm was too large
    learning_rate: float
    skipped_params: int = 0  # parameters (local tensors) whose update was skipped


def _reduce_losses(losses_reduced: list[dict]) -> tuple[dict[str, float], int]:
    """Megatron-LM's train_step reduction on the last stage, then broadcast over PP."""
    result: dict[str, float] = {}
    num_tokens = 0
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and losses_reduced:
        dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        for key in losses_reduced[0]:
            values = [entry[key].float().view(-1) for entry in losses_reduced]
            if values[0].numel() == 2:  # [loss sum, tokens]: token-weighted mean
                total = torch.vstack(values).sum(dim=0)
                dist.all_reduce(total, group=dp_group)
                result[key] = (total[0] / total[1].clamp(min=1)).item()
                num_tokens = max(num_tokens, int(total[1].item()))
            else:  # legacy: mean over micro-batches and DP ranks
                mean = torch.cat(values).mean()
                dist.all_reduce(mean, group=dp_group)
                result[key] = (mean / dist.get_world_size(dp_group)).item()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        payload = [(result, num_tokens)]
        dist.broadcast_object_list(
            payload, src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
        result, num_tokens = payload[0]
    return result, num_tokens


def _current_lr(optimizer: MegatronOptimizer) -> float:
    for group in optimizer.param_groups:
        if group.get("default_config", True):
            lr = group["lr"]
            return float(lr.item() if torch.is_tensor(lr) else lr)
    return float("nan")


def train_step(
    model_chunks: list[DistributedDataParallel],
    optimizer: MegatronOptimizer,
    data_iterator: Iterator[Mapping[str, torch.Tensor]],
    *,
    num_microbatches: int,
    micro_batch_size: int,
    seq_length: int,
    forward_step_func: Callable = gpt_forward_step,
    hooks: Optional[TrainHooks] = None,
    lr_scheduler: Optional[OptimizerParamScheduler] = None,
    step: int = 0,
) -> StepResult:
    """One optimizer step over `num_microbatches` micro-batches from `data_iterator`.

    Each data-parallel rank passes its own micro-batches (the global batch is
    num_microbatches * micro_batch_size * DP sequences); tensor- and pipeline-parallel
    peers pass the same ones. Order: zero grad buffers -> forward/backward schedule (1F1B
    under PP), whose finalize_model_grads reduces the gradients over DP, all-reduces
    sequence-parallel and embedding gradients and updates the router expert bias (when
    `moe_router_enable_expert_bias`) -> `hooks.before_optimizer_step` -> optimizer step
    (skipping what the hook returned) -> LR scheduler -> `hooks.after_step(step)`.
    """
    hooks = hooks or TrainHooks()
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    forward_backward = get_forward_backward_func()
    losses_reduced = forward_backward(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=model_chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        decoder_seq_length=seq_length,
        forward_only=False,
    )
    skip = hooks.before_optimizer_step(model_chunks, optimizer)
    skip = list(skip) if skip is not None else []
    learning_rate = _current_lr(optimizer)
    if skip:
        success, grad_norm, _ = optimizer_step_skipping(optimizer, skip)
    else:
        success, grad_norm, _ = optimizer.step()
    if success and lr_scheduler is not None:
        lr_scheduler.step(increment=1)
    losses, num_tokens = _reduce_losses(losses_reduced)
    if grad_norm is not None:
        grad_norm = float(grad_norm)
    hooks.after_step(step)
    return StepResult(
        step=step, losses=losses, num_tokens=num_tokens, grad_norm=grad_norm,
        update_successful=bool(success), learning_rate=learning_rate,
        skipped_params=len(skip),
    )


def loss_is_finite(result: StepResult) -> bool:
    return all(math.isfinite(value) for value in result.losses.values())
