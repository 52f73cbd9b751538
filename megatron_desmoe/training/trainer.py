"""The multi-domain fine-tuning loop: DES-MoE or a baseline on Megatron-Core.

`run_training(config)` validates everything, builds the parallel plan, the model (on this
rank's pipeline stage), optimizer, data and DES-MoE controller, resumes if asked, trains
with Megatron's forward-backward schedule, evaluates per domain, logs (console progress
line, TensorBoard, JSONL), checkpoints atomically and plots the affinity at the end.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from megatron_desmoe.compat import ensure_megatron_importable

ensure_megatron_importable()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker  # noqa: E402

from megatron_desmoe.desmoe.config import DESMoEConfig  # noqa: E402
from megatron_desmoe.desmoe.esft import ESFTScoreAccumulator  # noqa: E402
from megatron_desmoe.errors import ConfigError  # noqa: E402
from megatron_desmoe.megatron.controller import DESMoEController, ever_trainable  # noqa: E402
from megatron_desmoe.megatron.domain_context import domain_ids_context  # noqa: E402
from megatron_desmoe.megatron.spec import desmoe_moe_classes, validate_megatron_config  # noqa: E402
from megatron_desmoe.models.builder import ParallelConfig, transformer_config, validate_layout  # noqa: E402
from megatron_desmoe.models.presets import MoEModelConfig, count_parameters, get_preset  # noqa: E402
from megatron_desmoe.parallel.setup import init_distributed, init_model_parallel  # noqa: E402
from megatron_desmoe.training import checkpoint as ckpt  # noqa: E402
from megatron_desmoe.training.config import TrainConfig  # noqa: E402
from megatron_desmoe.training.data import DomainData, build_domain_data  # noqa: E402
from megatron_desmoe.training.engine import (  # noqa: E402
    TrainHooks,
    build_lr_scheduler,
    build_optimizer,
    build_training_model,
    loss_is_finite,
    train_step,
)
from megatron_desmoe.training.logging_utils import MetricsLogger  # noqa: E402

logger = logging.getLogger("megatron_desmoe.train")


@dataclass
class TrainSummary:
    """What a run did; identical on every rank."""

    steps: int
    final_step: int
    losses: list[float] = field(default_factory=list)  # training loss per step run here
    validation_before: dict[str, float] = field(default_factory=dict)
    validation_after: dict[str, float] = field(default_factory=dict)
    save_dir: Optional[str] = None
    plots: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- planning


@dataclass
class RunPlan:
    config: TrainConfig
    model: MoEModelConfig
    parallel: ParallelConfig
    desmoe: DESMoEConfig
    world_size: int
    domain_names: list[str]
    num_microbatches: int

    def describe(self) -> str:
        p, w = self.parallel, self.world_size
        dp = p.data_parallel(w)
        return "\n".join([
            f"model {self.model.name}: {count_parameters(self.model) / 1e9:.3f}B parameters, "
            f"{self.model.num_layers} layers, {self.model.num_experts} experts top-{self.model.topk}",
            f"world {w} = TP {p.tensor_parallel} x PP {p.pipeline_parallel} x DP {dp} "
            f"(EP {p.expert_parallel}, ETP {p.expert_tensor_parallel}, SP {p.sequence_parallel}, "
            f"dispatcher {p.dispatcher})",
            f"batch: global {self.config.global_batch_size} = micro {self.config.micro_batch_size}"
            f" x DP {dp} x {self.num_microbatches} micro-batches, seq {self.config.seq_length}",
            f"method {self.desmoe.method} on {len(self.domain_names)} domains: "
            f"{', '.join(self.domain_names)}",
            f"precision: {'bf16' if self.config.bf16 else 'fp32'}"
            f"{', fp8 ' + self.config.fp8_format + '/' + self.config.fp8_recipe if self.config.fp8_format else ''}"
            f", backend {self.config.backend}",
        ])


def plan_run(config: TrainConfig, world_size: int, domain_names: list[str],
             dry_run: bool = False) -> RunPlan:
    """Every check that needs no process group, model or data: run before anything starts.

    A dry run (no GPU at hand) validates the Megatron config without its FP8 fields, which
    Megatron only accepts with Transformer Engine installed; FP8 support itself is checked
    on the GPU at launch (megatron_desmoe.profiling.fp8.check_fp8_supported)."""
    config.validate(world_size)
    model = _fit_vocabulary(resolve_model(config), config)
    parallel = ParallelConfig(
        tensor_parallel=config.tensor_model_parallel_size,
        pipeline_parallel=config.pipeline_model_parallel_size,
        expert_parallel=config.expert_model_parallel_size,
        expert_tensor_parallel=config.expert_tensor_parallel_size,
        sequence_parallel=config.sequence_parallel,
        dispatcher=config.moe_token_dispatcher_type,
    )
    validate_layout(model, parallel, world_size)
    if model.qk_layernorm_full_width and parallel.tensor_parallel > 1:
        raise ConfigError(
            "tensor_model_parallel_size", "OLMoE's full-width q/k norm is split across TP "
            "ranks, and Megatron's finalize_model_grads sums every q/k-norm gradient over TP, "
            "which would corrupt those gradients", "train OLMoE with TP=1 (use EP/DP/PP)")
    desmoe = config.desmoe_config(len(domain_names)).validate()
    validate_megatron_config(_transformer_config(config, model, parallel, with_fp8=not dry_run),
                             desmoe)
    return RunPlan(config, model, parallel, desmoe, world_size, domain_names,
                   config.num_microbatches(world_size))


def resolve_model(config: TrainConfig) -> MoEModelConfig:
    """The preset, or the architecture recorded with the pretrained checkpoint: beside a
    converted one (desmoe_model.json) or inside one this trainer saved."""
    if config.pretrained:
        described = Path(config.pretrained) / "desmoe_model.json"
        if described.is_file():
            from megatron_desmoe.conversion.model_json import read_model_json

            return read_model_json(described)
        if ckpt.latest_iteration(config.pretrained) is not None:
            return model_from_dict(ckpt.read_common(config.pretrained)[1]["model"])
    return get_preset(config.preset, **config.model_overrides)


def model_from_dict(values: dict) -> MoEModelConfig:
    from megatron_desmoe.models.presets import MLAConfig, RopeScaling

    values = dict(values)
    if values.get("mla"):
        values["mla"] = MLAConfig(**values["mla"])
    if values.get("rope_scaling"):
        values["rope_scaling"] = RopeScaling(**values["rope_scaling"])
    return MoEModelConfig(**values)


def _fit_vocabulary(model: MoEModelConfig, config: TrainConfig) -> MoEModelConfig:
    """A model trained from scratch takes the data's vocabulary (padded to a multiple of
    128, as Megatron pads); a pretrained one must cover it."""
    if not (config.data_blend and Path(config.data_blend).exists()):
        return model
    from megatron_desmoe.training.data import blend_vocab_size

    data_vocab = blend_vocab_size(config)
    if config.pretrained is None:
        return model.replace(vocab_size=-(-data_vocab // 128) * 128)
    if data_vocab > model.vocab_size:
        raise ConfigError(
            "data_blend", f"the data's tokenizer has {data_vocab} tokens, the model only "
            f"{model.vocab_size}", "preprocess with the pretrained model's tokenizer (--hf-tokenizer)")
    return model


def _transformer_config(config: TrainConfig, model, parallel, with_fp8: bool = True):
    return transformer_config(model, parallel, **_model_kwargs(config, with_fp8))


def _model_kwargs(config: TrainConfig, with_fp8: bool = True) -> dict:
    kwargs = dict(backend=config.backend, dtype="bf16" if config.bf16 else "fp32")
    if config.fp8_format and with_fp8:
        from megatron_desmoe.profiling.fp8 import check_fp8_supported, fp8_settings

        check_fp8_supported(config.fp8_recipe)
        kwargs.update(fp8_settings(config.fp8_recipe, config.fp8_format))
    return kwargs


# --------------------------------------------------------------------------- hooks


class DESMoEHooks(TrainHooks):
    def __init__(self, controller: DESMoEController):
        self.controller = controller

    def before_optimizer_step(self, model_chunks, optimizer):
        return self.controller.params_to_skip()

    def after_step(self, step: int) -> None:
        self.controller.end_step(step)


# --------------------------------------------------------------------------- main loop


def run_training(config: TrainConfig, *, dry_run: bool = False) -> TrainSummary | RunPlan:
    rank, world_size = init_distributed()
    domain_names = _domain_names(config)
    plan = plan_run(config, world_size, domain_names)
    _check_resume_compatible(config, plan)
    if dry_run:
        return plan
    _log_rank0(plan.describe())
    init_model_parallel(plan.parallel, config.seed)
    chunks = build_training_model(
        plan.model, plan.parallel, seed=config.seed, moe_classes=desmoe_moe_classes(plan.desmoe),
        trainable=ever_trainable(plan.desmoe), overlap_grad_reduce=config.overlap_grad_reduce,
        use_distributed_optimizer=config.use_distributed_optimizer,
        **_model_kwargs(config),
    )
    for router in DESMoEController(chunks, plan.desmoe, config.train_iters).routers:
        router.reset_adapter_parameters(config.seed)
    if config.pretrained:
        ckpt.load_model_weights(config.pretrained, chunks)
    data = build_domain_data(config, domain_names, world_size)
    controller = DESMoEController(chunks, plan.desmoe, config.train_iters)
    optimizer = build_optimizer(
        chunks, lr=config.lr, min_lr=config.min_lr, weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1, adam_beta2=config.adam_beta2, clip_grad=config.clip_grad)
    scheduler = build_lr_scheduler(optimizer, warmup_steps=config.lr_warmup_iters,
                                   decay_steps=config.train_iters)
    start_step, consumed = 0, 0
    if config.load and ckpt.latest_iteration(config.load) is not None:
        common = ckpt.load_checkpoint(config.load, chunks,
                                      None if config.no_load_optim else optimizer,
                                      controller=controller, lr_scheduler=scheduler, expected=_run_identity(plan),
                                      per_rank_keys=("rng_state",))
        start_step, consumed = common["step"], common["consumed_samples"]
        controller.esft_selected = _esft_from_common(common)
        if "rng_state" in common:
            _restore_rng(common["rng_state"])
        _log_rank0(f"resumed from {config.load} at step {start_step}")
    elif plan.desmoe.esft_score:
        controller.esft_selected = select_esft_experts(chunks, data, plan, controller.routers)
    return _train_loop(plan, chunks, optimizer, scheduler, controller, data, start_step, consumed)


def _train_loop(plan: RunPlan, chunks, optimizer, scheduler, controller, data: DomainData,
                start_step: int, consumed: int) -> TrainSummary:
    config = plan.config
    metrics = MetricsLogger(config, plan, enabled=_is_logging_rank())
    summary = TrainSummary(steps=0, final_step=start_step, save_dir=config.save)
    if start_step == 0:
        summary.validation_before = evaluate(chunks, data, plan)
        metrics.validation(0, summary.validation_before, tag="before")
    train_iter = data.train_iterator(consumed)
    forward_step = data.forward_step(plan.desmoe.num_domains)
    hooks = DESMoEHooks(controller)
    started = time.perf_counter()
    for step in range(start_step, config.train_iters):
        phase = controller.begin_step(step)
        result = train_step(chunks, optimizer, train_iter, num_microbatches=plan.num_microbatches,
                            micro_batch_size=config.micro_batch_size, seq_length=config.seq_length,
                            forward_step_func=forward_step, hooks=hooks, lr_scheduler=scheduler,
                            step=step)
        if not loss_is_finite(result):
            raise FloatingPointError(f"loss is not finite at step {step}: {result.losses}; "
                                     f"lower --lr or check the data")
        consumed += config.global_batch_size
        moe_losses = _moe_losses(plan, step, metrics.writer)
        domain_losses = data.take_domain_losses()
        summary.losses.append(result.losses.get("lm loss", float("nan")))
        summary.steps += 1
        summary.final_step = step + 1
        metrics.step(step, result, phase, controller.kd_weight, moe_losses, domain_losses,
                     tokens=config.global_batch_size * config.seq_length,
                     elapsed=time.perf_counter() - started, steps_done=step + 1 - start_step)
        if config.eval_interval and (step + 1) % config.eval_interval == 0 and step + 1 < config.train_iters:
            metrics.validation(step + 1, evaluate(chunks, data, plan))
        if config.save and config.save_interval and (step + 1) % config.save_interval == 0:
            _save(config, step + 1, chunks, optimizer, scheduler, controller, plan, consumed)
        if config.exit_interval and (step + 1) % config.exit_interval == 0 and step + 1 < config.train_iters:
            if config.save and not (config.save_interval and (step + 1) % config.save_interval == 0):
                _save(config, step + 1, chunks, optimizer, scheduler, controller, plan, consumed)
            metrics.close()
            _log_rank0(f"exiting after step {step + 1} (--exit-interval)")
            return summary
    summary.validation_after = evaluate(chunks, data, plan)
    metrics.validation(summary.final_step, summary.validation_after, tag="after")
    if config.save:
        if not (config.save_interval and summary.final_step % config.save_interval == 0 and summary.steps):
            _save(config, summary.final_step, chunks, optimizer, scheduler, controller, plan, consumed)
        summary.plots = _plot_affinity(controller, plan, Path(config.save))
    metrics.close()
    return summary


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(chunks, data: DomainData, plan: RunPlan) -> dict[str, float]:
    """Mean token loss per validation domain (forward only, same micro-batches every time)."""
    for chunk in chunks:
        chunk.eval()
    results = {}
    forward_backward = get_forward_backward_func()
    for name in data.validation_domains():
        iterator = data.validation_iterator(name)
        losses = forward_backward(
            forward_step_func=data.forward_step(None), data_iterator=iterator, model=chunks,
            num_microbatches=plan.config.eval_iters // data.dp_size,
            seq_length=plan.config.seq_length,
            micro_batch_size=plan.config.micro_batch_size, decoder_seq_length=plan.config.seq_length,
            forward_only=True)
        results[name] = _token_mean(losses)
    data.take_domain_losses()  # evaluation must not leak into the training window
    for chunk in chunks:
        chunk.train()
    return results


def _token_mean(losses_reduced) -> float:
    total = torch.zeros(2, dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for entry in losses_reduced:
            total += entry["lm loss"].double().view(-1).cpu()
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(total, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return float(total[0] / total[1].clamp(min=1))


# --------------------------------------------------------------------------- ESFT


@torch.no_grad()
def select_esft_experts(chunks, data: DomainData, plan: RunPlan, routers) -> dict[int, torch.Tensor]:
    """ESFT: expert relevance on a sample of each fine-tuning domain, selected per layer."""
    layers = sorted(r.layer_number for r in routers)
    accumulator = ESFTScoreAccumulator(len(layers), plan.desmoe.num_domains, plan.model.num_experts)
    handles = []
    for router in routers:
        index = layers.index(router.layer_number)

        def hook(module, inputs, outputs, index=index):
            probs, routing_map = outputs
            domains = _current_token_domains(routing_map.shape[0])
            accumulator.add(index, domains, routing_map, probs.abs())
        handles.append(router.register_forward_hook(hook))
    for chunk in chunks:
        chunk.eval()
    forward_backward = get_forward_backward_func()
    forward_backward(
        forward_step_func=data.forward_step(plan.desmoe.num_domains),
        data_iterator=data.esft_sample_iterator(), model=chunks,
        num_microbatches=data.esft_sample_microbatches(), seq_length=plan.config.seq_length,
        micro_batch_size=plan.config.micro_batch_size, decoder_seq_length=plan.config.seq_length,
        forward_only=True)
    for chunk in chunks:
        chunk.train()
    for handle in handles:
        handle.remove()
    data.take_domain_losses()
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    accumulator.reduce_(lambda tensor: dist.all_reduce(tensor, group=group))
    selected = accumulator.selected_experts(plan.desmoe.esft_score, plan.desmoe.esft_threshold)
    return {layer: selected[i].cpu() for i, layer in enumerate(layers)}


def _current_token_domains(num_tokens: int) -> torch.Tensor:
    from megatron_desmoe.megatron.domain_context import current_domain_ids, token_domains

    domain_ids = current_domain_ids()
    return token_domains(domain_ids, num_tokens // domain_ids.numel())


def _esft_from_common(common: dict) -> dict[int, torch.Tensor]:
    return {int(k): torch.tensor(v, dtype=torch.bool) for k, v in common.get("esft_selected", {}).items()}


# --------------------------------------------------------------------------- checkpoints


def _run_identity(plan: RunPlan) -> dict:
    from megatron_desmoe.data.blend import load_blend

    return {"model": asdict(plan.model), "num_domains": plan.desmoe.num_domains,
            "domain_names": plan.domain_names, "method": plan.desmoe.method,
            "tokenizer": load_blend(plan.config.data_blend).tokenizer["fingerprint"]}


def _check_resume_compatible(config: TrainConfig, plan: RunPlan) -> None:
    if config.load and ckpt.latest_iteration(config.load) is not None:
        _, common = ckpt.read_common(config.load)
        ckpt.check_compatible(common, _run_identity(plan))


def _save(config, step, chunks, optimizer, scheduler, controller, plan, consumed) -> None:
    common = dict(_run_identity(plan), consumed_samples=consumed,
                  world_size=plan.world_size, config=asdict(config),
                  esft_selected={k: v.tolist() for k, v in controller.esft_selected.items()})
    path = ckpt.save_checkpoint(config.save, step, chunks, optimizer, controller=controller,
                                lr_scheduler=scheduler, common=common,
                                per_rank={"rng_state": _rng_state()})
    _log_rank0(f"saved checkpoint {path}")


def _rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}


def _restore_rng(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])


# --------------------------------------------------------------------------- misc


def _domain_names(config: TrainConfig) -> list[str]:
    if not config.data_blend:
        raise ConfigError("data_blend", "no data blend given",
                          "pass --data-blend <dir>/blend.json written by desmoe-preprocess")
    from megatron_desmoe.training.data import fine_tuning_domains

    return fine_tuning_domains(config)


def _moe_losses(plan: RunPlan, step: int, writer) -> dict[str, float]:
    totals: dict[str, torch.Tensor] = {}
    get_moe_metrics_tracker().report(
        loss_scale=1.0 / plan.num_microbatches, iteration=step, writer=writer,
        force_initialize=True, track_names=["load_balancing_loss", "desmoe_kd_loss"],
        num_layers=plan.model.num_layers, moe_layer_freq=plan.model.moe_layer_pattern,
        total_loss_dict=totals)
    return {name: float(value) for name, value in totals.items()}


def _plot_affinity(controller: DESMoEController, plan: RunPlan, save_dir: Path) -> list[str]:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, controller.affinity_by_layer())
    if dist.get_rank() != 0:
        return []
    by_layer = {}
    for part in gathered:
        by_layer.update(part or {})
    from megatron_desmoe.training.plots import plot_affinity

    path = save_dir / "affinity.png"
    plot_affinity(by_layer, plan.domain_names, path)
    return [str(path)]


def _is_logging_rank() -> bool:
    """The last pipeline stage's first TP/DP rank sees the losses."""
    return (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0)


def _log_rank0(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def summary_json(summary: TrainSummary) -> str:
    return json.dumps(asdict(summary), indent=2, default=str)
