"""Routing distillation loss and lambda schedule against hand-written references."""

import math

import pytest
import torch

from megatron_desmoe.desmoe.distillation import DistillationSchedule, routing_distillation_loss
from megatron_desmoe.errors import ConfigError


def _softmax_by_hand(row, tau):
    scaled = [value / tau for value in row]
    top = max(scaled)
    log_norm = top + math.log(sum(math.exp(value - top) for value in scaled))
    return [value - log_norm for value in scaled]  # log-probabilities


def _kd_by_hand(adapted, frozen, tau, valid=None):
    """tau^2 * mean over valid tokens of sum_e p (log p - log q), explicit loops."""
    total, count = 0.0, 0
    for t, (row_q, row_p) in enumerate(zip(adapted.tolist(), frozen.tolist())):
        if valid is not None and not bool(valid[t]):
            continue
        log_q, log_p = _softmax_by_hand(row_q, tau), _softmax_by_hand(row_p, tau)
        kl = 0.0
        for e in range(len(row_q)):
            p = math.exp(log_p[e])
            kl += p * (log_p[e] - log_q[e])
        total, count = total + kl, count + 1
    return tau * tau * total / max(count, 1)


def _logits(seed, tokens=7, experts=5, scale=2.0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, experts, generator=generator, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("tau", [0.7, 1.0, 2.5])
def test_loss_matches_per_token_kl_with_tau_squared(tau):
    adapted, frozen = _logits(0), _logits(1)
    loss = routing_distillation_loss(adapted, frozen, tau)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(_kd_by_hand(adapted, frozen, tau), rel=1e-12)


def test_valid_mask_averages_over_valid_tokens_only():
    adapted, frozen = _logits(2), _logits(3)
    valid = torch.tensor([True, False, True, True, False, False, True])
    loss = routing_distillation_loss(adapted, frozen, 0.7, valid_mask=valid)
    assert loss.item() == pytest.approx(_kd_by_hand(adapted, frozen, 0.7, valid), rel=1e-12)
    assert loss.item() != pytest.approx(_kd_by_hand(adapted, frozen, 0.7), rel=1e-6)


def test_no_valid_token_gives_zero_and_zero_gradient():
    adapted = _logits(4).requires_grad_()
    loss = routing_distillation_loss(adapted, _logits(5), 0.7, torch.zeros(7, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(adapted.grad) == 0


def test_identical_logits_give_zero_loss_and_large_logits_stay_finite():
    frozen = _logits(6)
    assert routing_distillation_loss(frozen.clone(), frozen, 0.7).item() == pytest.approx(0, abs=1e-15)
    adapted, frozen = _logits(7, scale=3e3), _logits(8, scale=3e3)
    loss = routing_distillation_loss(adapted, frozen, 0.7)
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(_kd_by_hand(adapted, frozen, 0.7), rel=1e-9)


def test_low_precision_inputs_are_computed_in_fp32():
    adapted, frozen = _logits(9, dtype=torch.bfloat16), _logits(10, dtype=torch.bfloat16)
    loss = routing_distillation_loss(adapted, frozen, 0.7)
    assert loss.dtype == torch.float32
    reference = _kd_by_hand(adapted.double(), frozen.double(), 0.7)
    assert loss.item() == pytest.approx(reference, rel=1e-5)


def test_gradient_matches_gradcheck_and_the_analytic_form():
    frozen = _logits(11)
    valid = torch.tensor([True, True, False, True, True, True, False])
    adapted = _logits(12).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: routing_distillation_loss(z, frozen, 0.7, valid), (adapted,))
    routing_distillation_loss(adapted, frozen, 0.7, valid).backward()
    # d/dz [tau^2 * mean_t KL] = tau * (q - p) / N_valid on valid rows, 0 elsewhere.
    q = torch.softmax(adapted.detach() / 0.7, -1)
    p = torch.softmax(frozen / 0.7, -1)
    expected = 0.7 * (q - p) / valid.sum() * valid.unsqueeze(1)
    torch.testing.assert_close(adapted.grad, expected, rtol=1e-10, atol=1e-14)


def test_no_gradient_reaches_the_frozen_logits():
    adapted = _logits(13).requires_grad_()
    frozen = _logits(14).requires_grad_()
    routing_distillation_loss(adapted, frozen, 0.7).backward()
    assert frozen.grad is None
    assert adapted.grad is not None and torch.count_nonzero(adapted.grad) > 0


def test_shape_and_temperature_errors():
    with pytest.raises(ValueError):
        routing_distillation_loss(_logits(0, experts=4), _logits(1, experts=5), 0.7)
    with pytest.raises(ValueError):
        routing_distillation_loss(_logits(0), _logits(1), 0.0)


# ---------------------------------------------------------------------- schedule
@pytest.mark.parametrize("kind, initial, end, progress, expected", [
    ("cosine", 1.0, 1.0, 0.0, 1.0),
    ("cosine", 1.0, 1.0, 0.5, 0.5),
    ("cosine", 2.0, 1.0, 0.25, 2.0 * (0.5 + math.sqrt(2) / 4)),
    ("cosine", 1.0, 1.0, 1.0, 0.0),
    ("cosine", 1.0, 0.5, 0.25, 0.5),
    ("cosine", 1.0, 0.5, 0.5, 0.0),
    ("cosine", 1.0, 0.5, 0.75, 0.0),
    ("linear", 2.0, 0.8, 0.2, 1.5),
    ("linear", 2.0, 0.8, 0.0, 2.0),
    ("linear", 2.0, 0.8, 0.8, 0.0),
    ("linear", 2.0, 0.8, 0.9, 0.0),
    ("constant", 0.3, 0.5, 0.0, 0.3),
    ("constant", 0.3, 0.5, 0.5, 0.3),
    ("constant", 0.3, 0.5, 0.51, 0.0),
    ("constant", 0.3, 1.0, 1.0, 0.3),
])
def test_schedule_values_at_hand_computed_points(kind, initial, end, progress, expected):
    schedule = DistillationSchedule(kind, initial, end)
    assert schedule.weight(progress) == pytest.approx(expected, abs=1e-15)


def test_schedule_is_non_increasing():
    for kind in ("cosine", "linear", "constant"):
        schedule = DistillationSchedule(kind, 1.0, 0.9)
        weights = [schedule.weight(i / 100) for i in range(101)]
        assert all(a >= b for a, b in zip(weights, weights[1:]))


def test_schedule_errors():
    with pytest.raises(ConfigError) as error:
        DistillationSchedule("exponential", 1.0, 1.0)
    assert error.value.field == "kd_schedule"
    with pytest.raises(ConfigError) as error:
        DistillationSchedule("cosine", -1.0, 1.0)
    assert error.value.field == "kd_initial_weight"
    with pytest.raises(ConfigError) as error:
        DistillationSchedule("cosine", 1.0, 0.0)
    assert error.value.field == "kd_end_progress"
    with pytest.raises(ValueError):
        DistillationSchedule().weight(1.01)
    with pytest.raises(ValueError):
        DistillationSchedule().weight(-0.01)
