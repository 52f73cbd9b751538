"""Allowed routes, the sign protocol, and the isolated expert computation."""

import pytest
import torch
import torch.nn.functional as F

from megatron_desmoe.desmoe.isolation import (
    allowed_routes,
    decode_allowed,
    encode_allowed,
    expert_forward_reference,
    isolated_expert_forward,
)


def test_allowed_routes_match_a_loop_and_block_padding():
    mask = torch.tensor([[True, False, True], [False, False, True]])
    domain_ids = torch.tensor([0, 1, -1, 1, 0, -3])
    allowed = allowed_routes(domain_ids, mask)
    expected = [[bool(mask[d, e]) if d >= 0 else False for e in range(3)] for d in domain_ids.tolist()]
    assert allowed.tolist() == expected


def _probs(seed, shape=(6, 5)):
    generator = torch.Generator().manual_seed(seed)
    probs = torch.rand(shape, generator=generator, dtype=torch.float64)
    probs[probs < 0.3] = 0.0  # unrouted entries and zero-probability routes
    allowed = torch.rand(shape, generator=generator) < 0.5
    return probs, allowed


def test_encode_decode_round_trip_is_exact():
    probs, allowed = _probs(0)
    signed = encode_allowed(probs, allowed)
    assert torch.equal(torch.signbit(signed), ~allowed)
    decoded, decoded_allowed = decode_allowed(signed)
    assert torch.equal(decoded_allowed, allowed)
    assert torch.equal(decoded, probs)
    assert not torch.signbit(decoded).any()


def test_zero_probabilities_keep_their_bit_including_negative_zero_inputs():
    probs = torch.tensor([0.0, 0.0, -0.0, -0.0])
    allowed = torch.tensor([True, False, True, False])
    signed = encode_allowed(probs, allowed)
    assert torch.signbit(signed).tolist() == [False, True, False, True]
    decoded, decoded_allowed = decode_allowed(signed)
    assert decoded_allowed.tolist() == allowed.tolist()
    assert decoded.tolist() == [0.0] * 4 and not torch.signbit(decoded).any()
    # -0.0 arriving at the experts means "not allowed"
    assert decode_allowed(torch.tensor([-0.0]))[1].tolist() == [False]


def test_gradients_pass_through_encode_and_decode_gradcheck():
    # Finite differences cannot step across zero (that flips the bit), so gradcheck runs on
    # probabilities away from zero; the exact test below covers zeros.
    probs, allowed = _probs(1)
    probs = (probs + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda p: encode_allowed(p, allowed), (probs,))
    assert torch.autograd.gradcheck(lambda p: decode_allowed(encode_allowed(p, allowed))[0], (probs,))
    signed = encode_allowed(probs, allowed).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda s: decode_allowed(s)[0], (signed,))


def test_gradients_are_exact_including_zero_probabilities():
    # d encode / d probs = +-1 and d (decode . encode) / d probs = 1, also at probs == 0
    # (abs() would give 0 there).
    probs, allowed = _probs(2)
    assert (probs == 0).any()
    probs.requires_grad_()
    weights = torch.randn(probs.shape, dtype=torch.float64)
    (decode_allowed(encode_allowed(probs, allowed))[0] * weights).sum().backward()
    assert torch.equal(probs.grad, weights)
    probs.grad = None
    (encode_allowed(probs, allowed) * weights).sum().backward()
    assert torch.equal(probs.grad, torch.where(allowed, weights, -weights))


# ---------------------------------------------------------------------- experts
N, H, FFN = 9, 6, 5


def _expert_inputs(seed, gated):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=generator, dtype=torch.float64)
    probs = torch.rand(N, generator=generator, dtype=torch.float64)
    fc1 = torch.randn((2 if gated else 1) * FFN, H, generator=generator, dtype=torch.float64)
    fc2 = torch.randn(H, FFN, generator=generator, dtype=torch.float64)
    upstream = torch.randn(N, H, generator=generator, dtype=torch.float64)
    return hidden, probs, fc1, fc2, upstream


def _leaves(*tensors):
    return [t.clone().requires_grad_() for t in tensors]


def _mlp_by_hand(hidden, probs, fc1, fc2, activation, gated):
    """Independent per-row reference (vector ops only, no shared code)."""
    rows = []
    for row, prob in zip(hidden, probs):
        pre = fc1 @ row
        act = activation(pre[:FFN]) * pre[FFN:] if gated else activation(pre)
        rows.append(fc2 @ (act * prob))
    return torch.stack(rows)


ALLOWED_PATTERNS = {
    "mixed": torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 0], dtype=torch.bool),
    "all": torch.ones(N, dtype=torch.bool),
    "none": torch.zeros(N, dtype=torch.bool),
    "one": torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1], dtype=torch.bool),
}


@pytest.mark.parametrize("gated, activation", [(True, F.silu), (False, F.gelu)])
def test_reference_expert_matches_per_row_math(gated, activation):
    hidden, probs, fc1, fc2, _ = _expert_inputs(0, gated)
    torch.testing.assert_close(expert_forward_reference(hidden, probs, fc1, fc2, activation, gated),
                               _mlp_by_hand(hidden, probs, fc1, fc2, activation, gated))


@pytest.mark.parametrize("pattern", sorted(ALLOWED_PATTERNS))
@pytest.mark.parametrize("gated, activation", [(True, F.silu), (False, F.gelu)])
def test_isolated_expert_outputs_and_gradients(pattern, gated, activation):
    allowed = ALLOWED_PATTERNS[pattern]
    hidden, probs, fc1, fc2, upstream = _expert_inputs(1, gated)

    iso = _leaves(hidden, probs, fc1, fc2)
    out = isolated_expert_forward(*iso[:2], allowed, *iso[2:], activation, gated)
    (out * upstream).sum().backward()

    ref = _leaves(hidden, probs, fc1, fc2)
    ref_out = expert_forward_reference(*ref, activation, gated)
    (ref_out * upstream).sum().backward()

    # forward and input gradients: those of the un-isolated expert, row by row
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(iso[0].grad, ref[0].grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(iso[1].grad, ref[1].grad, rtol=1e-12, atol=1e-12)

    # weight gradients: the reference run on the allowed rows alone
    sub = _leaves(hidden[allowed], probs[allowed], fc1, fc2)
    sub_out = expert_forward_reference(*sub, activation, gated)
    (sub_out * upstream[allowed]).sum().backward()
    for live, alone in ((iso[2], sub[2]), (iso[3], sub[3])):
        got = live.grad if live.grad is not None else torch.zeros_like(live)
        expected = alone.grad if alone.grad is not None else torch.zeros_like(alone)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    if pattern == "mixed":  # the isolation must actually change the weight gradient
        assert not torch.allclose(iso[2].grad, ref[2].grad)
