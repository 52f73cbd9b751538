"""The training-step engine on one rank (in-process, CPU, gloo world of one).

References are independent of the code under test: the loss is recomputed from the model's
logits with torch's cross-entropy; skipping is judged by bit-comparing parameters and Adam
moments; the expert-bias rule is Megatron's documented sign update.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_desmoe.errors import ConfigError
from megatron_desmoe.models.builder import ParallelConfig
from megatron_desmoe.models.presets import get_preset
from megatron_desmoe.parallel import init_model_parallel
from megatron_desmoe.training import (
    TrainHooks,
    build_lr_scheduler,
    build_optimizer,
    build_training_model,
    main_params_of,
    make_forward_step,
    optimizer_step_skipping,
    train_step,
    unwrap_model,
)
from megatron_desmoe.training.engine import _inner_torch_optimizers

SEQ, MBS, MICRO = 16, 2, 2


@pytest.fixture(scope="module", autouse=True)
def single_rank():
    init_model_parallel(ParallelConfig())


def _batches(vocab: int, count: int, seed: int = 0, domains: bool = False):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for index in range(count):
        tokens = torch.randint(0, vocab, (MBS, SEQ + 1), generator=generator)
        mask = torch.ones(MBS, SEQ)
        mask[0, : 2 + index] = 0.0
        batch = dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=mask)
        if domains:
            batch["domain_ids"] = torch.tensor([index % 3, (index + 1) % 3])
        out.append(batch)
    return out


def _step(chunks, optimizer, batches, **kwargs):
    return train_step(chunks, optimizer, iter(batches), num_microbatches=len(batches),
                      micro_batch_size=MBS, seq_length=SEQ, **kwargs)


def test_loss_is_the_token_weighted_masked_cross_entropy():
    model_cfg = get_preset("mixtral-tiny")
    chunks = build_training_model(model_cfg, seed=5, moe_aux_loss_coeff=0.0,
                                  moe_router_load_balancing_type="none")
    optimizer = build_optimizer(chunks, lr=0.0, weight_decay=0.0)
    batches = _batches(model_cfg.vocab_size, MICRO)
    gpt = unwrap_model(chunks[0])
    total, tokens = 0.0, 0.0
    with torch.no_grad():
        for batch in batches:
            logits = gpt(batch["tokens"], torch.arange(SEQ).expand(MBS, SEQ), None)
            ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                 batch["labels"].reshape(-1), reduction="none")
            total += (ce * batch["loss_mask"].reshape(-1)).sum().item()
            tokens += batch["loss_mask"].sum().item()
    result = _step(chunks, optimizer, batches)
    assert result.num_tokens == int(tokens)
    assert result.losses["lm loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert result.update_successful and result.grad_norm > 0


def test_training_reduces_the_loss_with_warmup_and_cosine_schedule():
    model_cfg = get_preset("mixtral-tiny")
    chunks = build_training_model(model_cfg, seed=1)
    optimizer = build_optimizer(chunks, lr=3e-3, min_lr=3e-4, weight_decay=0.01)
    scheduler = build_lr_scheduler(optimizer, warmup_steps=2, decay_steps=12)
    batches = _batches(model_cfg.vocab_size, MICRO, seed=3)
    seen_steps, rates, losses = [], [], []

    class Record(TrainHooks):
        def after_step(self, step):
            seen_steps.append(step)

    for step in range(12):
        result = _step(chunks, optimizer, batches, lr_scheduler=scheduler, hooks=Record(), step=step)
        rates.append(result.learning_rate)
        losses.append(result.losses["lm loss"])
    assert seen_steps == list(range(12))
    assert rates[:3] == pytest.approx([0.0, 1.5e-3, 3e-3])  # linear warm-up from 0
    assert rates[3] < rates[2] and rates[-1] == pytest.approx(3e-4 + 2.7e-3 * 0.5 * (1 + math.cos(math.pi * 9 / 10)))  # cosine
    assert losses[-1] < losses[0] - 0.5  # memorises the two micro-batches


def test_forward_context_wraps_each_model_call_and_sees_domain_ids():
    model_cfg = get_preset("mixtral-tiny")
    chunks = build_training_model(model_cfg, seed=2)
    optimizer = build_optimizer(chunks)
    active, seen, inside = [False], [], []

    @contextlib.contextmanager
    def domains_published(batch):
        seen.append(batch["domain_ids"].tolist())
        active[0] = True
        try:
            yield
        finally:
            active[0] = False

    handle = unwrap_model(chunks[0]).decoder.register_forward_hook(
        lambda module, args, output: inside.append(active[0]))
    try:
        _step(chunks, optimizer, _batches(model_cfg.vocab_size, 3, domains=True),
              forward_step_func=make_forward_step(domains_published))
    finally:
        handle.remove()
    assert seen == [[0, 1], [1, 2], [2, 0]]
    assert inside == [True, True, True]


def test_router_expert_bias_is_updated_once_per_step():
    model_cfg = get_preset("mixtral-tiny", expert_bias=True, score_function="sigmoid")
    chunks = build_training_model(model_cfg, seed=4)
    optimizer = build_optimizer(chunks)
    routers = [m for m in unwrap_model(chunks[0]).modules() if getattr(m, "expert_bias", None) is not None]
    assert routers
    rate = chunks[0].config.moe_router_bias_update_rate
    before = [r.expert_bias.detach().float().clone() for r in routers]
    _step(chunks, optimizer, _batches(model_cfg.vocab_size, MICRO))
    for router, old in zip(routers, before):
        change = router.expert_bias.detach().float() - old
        # Megatron's rule: bias += rate * sign(mean load - expert load), once per step
        assert torch.all(torch.isclose(change.abs(), torch.tensor(rate)) | (change == 0)), change
        assert change.abs().sum() > 0
        assert torch.all(router.local_tokens_per_expert == 0)  # counts reset for the next step


# ------------------------------------------------------------------ optimizer skipping


def _adam_state(optimizer, model_param):
    for model, main in main_params_of(optimizer):
        if model is model_param:
            for inner in _inner_torch_optimizers(optimizer):
                if main in inner.state:
                    return {k: v.clone() for k, v in inner.state[main].items() if torch.is_tensor(v)}
    return None


class _SkipAndCheck(TrainHooks):
    def __init__(self, skipped):
        self.skipped = skipped

    def before_optimizer_step(self, model_chunks, optimizer):
        for param in self.skipped:  # the skip is meaningful: these would have moved
            assert param.main_grad.abs().sum() > 0
        return self.skipped


@pytest.mark.parametrize("dtype,distributed", [("fp32", False), ("fp32", True), ("bf16", False)],
                         ids=["fp32-plain", "fp32-distributed", "bf16-master-weights"])
def test_skipped_parameters_and_their_adam_state_stay_bit_identical(dtype, distributed):
    model_cfg = get_preset("mixtral-tiny")
    chunks = build_training_model(model_cfg, seed=6, dtype=dtype, use_distributed_optimizer=distributed)
    optimizer = build_optimizer(chunks, lr=1e-2, weight_decay=0.1)
    named = dict(unwrap_model(chunks[0]).named_parameters())
    skip_names = ["decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight",
                  "decoder.layers.1.mlp.router.weight", "decoder.final_layernorm.weight"]
    skipped = [named[n] for n in skip_names]
    batches = _batches(model_cfg.vocab_size, MICRO)
    _step(chunks, optimizer, batches)  # every parameter gets Adam state first
    params_before = {n: p.detach().clone() for n, p in named.items()}
    state_before = {n: _adam_state(optimizer, named[n]) for n in skip_names}
    assert all(state is not None for state in state_before.values())
    for step in range(3):
        result = _step(chunks, optimizer, batches, hooks=_SkipAndCheck(skipped), step=step)
        assert result.skipped_params == len(skipped) and result.update_successful
    for name in skip_names:
        assert torch.equal(named[name], params_before[name]), name
        state = _adam_state(optimizer, named[name])
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], state_before[name][key]), (name, key)
    moved = [n for n in named if n not in skip_names and not torch.equal(named[n], params_before[n])]
    assert len(moved) == len(named) - len(skip_names)
    # step counters stay aligned, so Megatron can still checkpoint the optimizer
    steps = {float(s["step"]) for inner in _inner_torch_optimizers(optimizer)
             for s in inner.state.values()}
    assert steps == {4.0}
    if not distributed:
        optimizer.sharded_state_dict(unwrap_model(chunks[0]).sharded_state_dict())


def test_skipping_nothing_is_a_plain_step():
    model_cfg = get_preset("mixtral-tiny")
    results = []
    for skip in (False, True):
        chunks = build_training_model(model_cfg, seed=8)
        optimizer = build_optimizer(chunks, lr=1e-2)
        hooks = _SkipAndCheck([]) if skip else None
        _step(chunks, optimizer, _batches(model_cfg.vocab_size, MICRO), hooks=hooks)
        results.append([p.detach().clone() for p in unwrap_model(chunks[0]).parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_optimizer_step_skipping_restores_the_optimizer():
    model_cfg = get_preset("mixtral-tiny")
    chunks = build_training_model(model_cfg, seed=9)
    optimizer = build_optimizer(chunks)
    _step(chunks, optimizer, _batches(model_cfg.vocab_size, 1))
    optimizer_step_skipping(optimizer, [next(unwrap_model(chunks[0]).parameters())])
    assert "prepare_grads" not in vars(optimizer)  # the per-call override is gone


# ------------------------------------------------------------------------ configuration


def test_frozen_parameters_get_no_update_and_no_optimizer_state():
    model_cfg = get_preset("mixtral-tiny")
    trainable = lambda name, param: ".mlp." in name  # noqa: E731 -- experts and routers only
    chunks = build_training_model(model_cfg, seed=10, trainable=trainable)
    optimizer = build_optimizer(chunks, lr=1e-2, weight_decay=0.1)
    named = dict(unwrap_model(chunks[0]).named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    _step(chunks, optimizer, _batches(model_cfg.vocab_size, MICRO))
    in_optimizer = {id(model) for model, _ in main_params_of(optimizer)}
    for name, param in named.items():
        assert (id(param) in in_optimizer) == (".mlp." in name), name
        assert torch.equal(param, before[name]) != (".mlp." in name), name


def test_param_filter_freezes_after_wrapping_only_without_the_distributed_optimizer():
    model_cfg = get_preset("mixtral-tiny")
    keep = lambda name, param: "embedding" not in name  # noqa: E731
    chunks = build_training_model(model_cfg, seed=11)
    optimizer = build_optimizer(chunks, param_filter=keep)
    embedding = unwrap_model(chunks[0]).embedding.word_embeddings.weight
    assert not embedding.requires_grad
    assert all(model is not embedding for model, _ in main_params_of(optimizer))
    chunks = build_training_model(model_cfg, seed=11, use_distributed_optimizer=True)
    with pytest.raises(ConfigError) as caught:
        build_optimizer(chunks, param_filter=keep)
    assert caught.value.field == "param_filter"
    with pytest.raises(ConfigError) as caught:
        build_optimizer(chunks, use_distributed_optimizer=False)
    assert caught.value.field == "use_distributed_optimizer"


def test_schedule_hooks_follow_megatron_lm():
    from megatron.core.distributed import finalize_model_grads

    model_cfg = get_preset("mixtral-tiny")
    plain = build_training_model(model_cfg)
    assert plain[0].config.finalize_model_grads_func is finalize_model_grads
    assert plain[0].config.no_sync_func is None and plain[0].config.grad_sync_func is None
    overlap = build_training_model(model_cfg, overlap_grad_reduce=True)
    config = overlap[0].config
    assert config.no_sync_func == overlap[0].no_sync
    assert config.grad_sync_func == overlap[0].start_grad_sync
    optimizer = build_optimizer(overlap)
    assert config.grad_scale_func == optimizer.scale_loss
    result = _step(overlap, optimizer, _batches(model_cfg.vocab_size, MICRO))
    assert result.update_successful


def test_lr_scheduler_rejects_bad_ranges():
    chunks = build_training_model(get_preset("mixtral-tiny"))
    optimizer = build_optimizer(chunks, lr=1e-3)
    with pytest.raises(ConfigError) as caught:
        build_lr_scheduler(optimizer, warmup_steps=10, decay_steps=10)
    assert caught.value.field == "decay_steps"
    with pytest.raises(ConfigError) as caught:
        build_lr_scheduler(optimizer, init_lr=1e-2, decay_steps=10)
    assert caught.value.field == "init_lr"
    with pytest.raises(ConfigError) as caught:
        build_optimizer(chunks, lr=1e-3, min_lr=1e-2)
    assert caught.value.field == "min_lr"
