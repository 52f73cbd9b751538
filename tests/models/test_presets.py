"""Model presets: analytic parameter counts vs. published sizes and vs. built models; every
tiny preset builds and trains one step on the CPU."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_desmoe.models.presets import PRESETS, count_active_parameters, count_parameters

REAL = sorted(name for name, cfg in PRESETS.items() if cfg.published_total_params)
TINY = sorted(name for name in PRESETS if name.endswith("-tiny"))


def test_every_family_has_a_real_and_a_tiny_preset():
    families = {cfg.family for cfg in PRESETS.values()}
    assert families == {PRESETS[name].family for name in REAL} == {PRESETS[name].family for name in TINY}


@pytest.mark.parametrize("name", REAL)
def test_real_size_parameter_count_matches_the_model_card(name):
    cfg = PRESETS[name]
    assert count_parameters(cfg) == pytest.approx(cfg.published_total_params, rel=0.01)
    assert 0 < count_active_parameters(cfg) < count_parameters(cfg)


@pytest.fixture(scope="module")
def single_rank():
    from megatron_desmoe.models.builder import ParallelConfig
    from megatron_desmoe.parallel import init_model_parallel

    init_model_parallel(ParallelConfig())


@pytest.mark.parametrize("name", TINY)
def test_analytic_count_equals_the_built_model(single_rank, name):
    from megatron_desmoe.models.builder import build_gpt_model, transformer_config

    cfg = PRESETS[name]
    model = build_gpt_model(cfg, transformer_config(cfg))
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)


@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_trains_one_step_with_finite_loss(single_rank, name):
    from megatron_desmoe.training import build_optimizer, build_training_model, train_step, unwrap_model

    cfg = PRESETS[name]
    chunks = build_training_model(cfg, seed=3)
    optimizer = build_optimizer(chunks, lr=1e-3)
    before = [p.detach().clone() for p in unwrap_model(chunks[0]).parameters()]
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 2, 17), generator=generator)
    batches = [dict(tokens=t[:, :-1], labels=t[:, 1:], loss_mask=torch.ones(2, 16)) for t in tokens]
    result = train_step(chunks, optimizer, iter(batches), num_microbatches=2, micro_batch_size=2,
                        seq_length=16)
    loss = result.losses["lm loss"]
    assert math.isfinite(loss) and abs(loss - math.log(cfg.vocab_size)) < 1.0  # near uniform
    assert result.update_successful and math.isfinite(result.grad_norm)
    after = list(unwrap_model(chunks[0]).parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
