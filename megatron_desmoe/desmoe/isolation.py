"""Mechanism 2 (second half): per-token gradient isolation of the routed experts.

Expert e may learn from a token of domain d only when M[d, e] = 1 (affinity.py). The
forward pass is unchanged for every token; only the expert *weight* gradient is
restricted, so routing, the layers below and the loss all behave as without isolation.

Sign protocol (how the "allowed" bit reaches the experts)
---------------------------------------------------------
Each route (token t -> expert e) carries a routing probability probs[t, e] >= 0. Megatron's
token dispatcher permutes the probabilities together with the tokens (allgather, alltoall,
expert parallelism), and there is no other per-route channel through it. So the router
stores the bit in the sign:

    encode:  signed = +probs   where allowed      (sign bit clear)
             signed = -probs   where not allowed  (sign bit set; -0.0 for probs == 0)
    decode:  allowed = ~signbit(signed)
             probs   = signed * (+1 if allowed else -1)

The multipliers are constants (+-1), so values and gradients pass through exactly, both
ways (abs() would not do: its gradient at 0 is 0). signbit distinguishes -0.0 from +0.0,
so even a zero probability keeps its bit. encode first adds +0.0, which turns an incoming
-0.0 into +0.0 (and changes no other value), so the bit never depends on the sign of a
zero probability. Precondition: probs >= 0 (softmax/sigmoid scores, optionally scaled),
which every Megatron router produces.

Padding tokens (domain id < 0) are *not allowed* anywhere: they have no domain, carry no
loss, and must not count as evidence that an expert received gradient.
"""

from __future__ import annotations

from typing import Callable

import torch


def allowed_routes(domain_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """allowed[t, e] = mask[domain_ids[t], e]; False for padding tokens (domain < 0).

    domain_ids: [T] int; mask: [D, E] bool. Returns bool [T, E]."""
    domain_ids = domain_ids.to(torch.long)
    mask = mask.to(domain_ids.device)
    is_token = (domain_ids >= 0).unsqueeze(1)
    return mask[domain_ids.clamp_min(0)] & is_token


def _signs(allowed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    one = torch.ones((), dtype=like.dtype, device=like.device)
    return torch.where(allowed, one, -one)


def encode_allowed(probs: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Store `allowed` (bool, same shape) in the sign of `probs` (>= 0). Differentiable,
    gradient exactly +-1 per element."""
    return (probs + 0.0) * _signs(allowed, probs)


def decode_allowed(signed_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of encode_allowed: (probs, allowed). Exact value and exact gradient."""
    allowed = ~torch.signbit(signed_probs)
    return signed_probs * _signs(allowed, signed_probs), allowed


# ---------------------------------------------------------------------- expert MLP
Activation = Callable[[torch.Tensor], torch.Tensor]


def expert_forward_reference(hidden: torch.Tensor, probs: torch.Tensor,
                             fc1_weight: torch.Tensor, fc2_weight: torch.Tensor,
                             activation: Activation, gated: bool) -> torch.Tensor:
    """One bias-free expert MLP applied to its tokens, output scaled by the route's prob.

    hidden [N, H], probs [N], fc1_weight [F, H] (or [2F, H] when gated: gate rows first),
    fc2_weight [H, F]. Returns [N, H]. Same math as Megatron's MLP with the probability
    applied after the activation (moe_apply_probs_on_input=False).
    """
    intermediate = hidden @ fc1_weight.t()
    if gated:
        gate, linear = intermediate.chunk(2, dim=-1)
        intermediate = activation(gate) * linear
    else:
        intermediate = activation(intermediate)
    intermediate = intermediate * probs.unsqueeze(-1)
    return intermediate @ fc2_weight.t()


def isolated_expert_forward(hidden: torch.Tensor, probs: torch.Tensor, allowed: torch.Tensor,
                            fc1_weight: torch.Tensor, fc2_weight: torch.Tensor,
                            activation: Activation, gated: bool) -> torch.Tensor:
    """expert_forward_reference, but the weights learn from allowed rows only.

    Allowed rows use the live weights; the other rows use detached copies. Outputs, and
    the gradients to `hidden` and `probs`, are those of the reference for every row; the
    weight gradients equal the reference's gradients computed on the allowed rows alone.
    Rows come back in their original order.
    """
    allowed_rows = allowed.nonzero().squeeze(1)
    blocked_rows = (~allowed).nonzero().squeeze(1)
    live = expert_forward_reference(hidden.index_select(0, allowed_rows),
                                    probs.index_select(0, allowed_rows),
                                    fc1_weight, fc2_weight, activation, gated)
    blocked = expert_forward_reference(hidden.index_select(0, blocked_rows),
                                       probs.index_select(0, blocked_rows),
                                       fc1_weight.detach(), fc2_weight.detach(), activation, gated)
    output = live.new_zeros(hidden.shape[0], fc2_weight.shape[0])
    return output.index_copy(0, allowed_rows, live).index_copy(0, blocked_rows, blocked)
