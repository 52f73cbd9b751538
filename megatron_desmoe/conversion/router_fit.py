"""Fitting a stock linear gate to an adapted (DES-MoE) router. Pure tensor functions.

The adapted router computes logits = W0 x + adapter(x). Stock HF architectures only hold a
linear gate W, so the export finds the W whose logits are closest in least squares on
calibration router inputs, shrunk towards the pretrained W0 (ridge) so that directions the
calibration data never visits keep their pretrained routing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


def fit_linear_gate(hidden: torch.Tensor, adapted_logits: torch.Tensor,
                    frozen_gate_weight: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """argmin_W ||hidden W^T - adapted_logits||^2 + lam ||W - W0||^2, lam = ridge * mean eig.

    hidden [N, H], adapted_logits [N, E], frozen_gate_weight W0 [E, H] -> W [E, H] (W0's dtype).
    Solved in float64 through the H x H normal equations (memory O(H^2), not O(N H)).
    """
    x = hidden.reshape(-1, hidden.shape[-1]).double()
    w0 = frozen_gate_weight.double()
    residual = adapted_logits.reshape(-1, w0.shape[0]).double() - x @ w0.T
    gram = x.T @ x
    lam = ridge * max(float(gram.diagonal().mean()), 1e-12)
    gram.diagonal().add_(lam)
    delta_t = torch.linalg.solve(gram, x.T @ residual)  # [H, E]
    return (w0 + delta_t.T).to(frozen_gate_weight.dtype)


@dataclass(frozen=True)
class Agreement:
    """How often two routers pick the same experts."""

    exact: float  # fraction of tokens whose top-k expert sets are identical
    overlap: float  # mean |topk_a ∩ topk_b| / k

    def as_dict(self) -> dict:
        return asdict(self)


def topk_agreement(reference_logits: torch.Tensor, candidate_logits: torch.Tensor, k: int) -> Agreement:
    """Top-k routing agreement of candidate vs reference logits ([N, E] each).

    Softmax and sigmoid scores are monotone in the logits, so top-k on logits is top-k routing.
    """
    num_experts = reference_logits.shape[-1]
    ref = torch.zeros(reference_logits.reshape(-1, num_experts).shape, dtype=torch.bool)
    cand = torch.zeros_like(ref)
    ref.scatter_(1, reference_logits.reshape(-1, num_experts).topk(k, dim=-1).indices, True)
    cand.scatter_(1, candidate_logits.reshape(-1, num_experts).topk(k, dim=-1).indices, True)
    shared = (ref & cand).sum(-1).double()
    return Agreement(exact=float((shared == k).double().mean()), overlap=float((shared / k).mean()))
