"""Baselines ESFT-Token and ESFT-Gate (Wang et al. 2024, "Let the Expert Stick to His Last").

ESFT runs the pretrained model on a sample of each domain and scores each routed expert e
of each layer:

* Token Selection Ratio  r_e = (routes of the domain's tokens to e) / (all routes)
  i.e. the share of the domain's token slots (T tokens x top-k) that chose e; sums to 1.
* Average Gate Score     g_e = mean over the domain's tokens of the gate value of e, the
  value e's output is multiplied by: the routing probability where e is among the token's
  top-k, 0 elsewhere (ESFT's g_{i,t}; Megatron's router returns exactly these probs).

Per layer, experts are sorted by score (descending, ties -> lower index) and the smallest
prefix whose cumulative normalised score reaches p is selected. Only the selected experts
train (router and everything else frozen). ESFT fine-tunes one model per domain; here one
model is fine-tuned on all domains together, so we train the union of the domains'
selections.

Scores are normalised to sum 1 per layer before selection (a no-op for the token ratio;
for the gate score p becomes a share of the layer's gate mass rather than an absolute
mass, which makes p comparable across routers that do or do not renormalise top-k).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

# Cumulative sums of normalised float64 scores that reach p up to rounding count as
# reaching it (e.g. 0.1 + 0.1 + 0.1 for p = 0.3).
_CUMSUM_TOLERANCE = 1e-12
ESFT_SCORES = ("token", "gate")


def _valid_rows(num_tokens: int, valid: Optional[torch.Tensor], device) -> torch.Tensor:
    if valid is None:
        return torch.ones(num_tokens, dtype=torch.float64, device=device)
    return valid.to(device=device, dtype=torch.float64)


@torch.no_grad()
def token_selection_ratio(routing_map: torch.Tensor,
                          valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Share of the valid tokens' routes that go to each expert. float64 [E].

    routing_map: [T, E] bool; valid: [T] bool (False = padding) or None."""
    weights = _valid_rows(routing_map.shape[0], valid, routing_map.device)
    routes = weights @ routing_map.to(torch.float64)
    return routes / routes.sum().clamp_min(1.0)


@torch.no_grad()
def average_gate_score(probs: torch.Tensor, valid: Optional[torch.Tensor] = None,
                       routing_map: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean gate value of each expert over the valid tokens. float64 [E].

    probs: [T, E] gate values. Pass the router's top-k-masked probs (ESFT's definition),
    or a full softmax together with `routing_map` [T, E] bool to zero the unselected
    experts. valid: [T] bool or None."""
    gate_values = probs.to(torch.float64)
    if routing_map is not None:
        gate_values = gate_values * routing_map.to(torch.float64)
    weights = _valid_rows(probs.shape[0], valid, probs.device)
    return (weights @ gate_values) / weights.sum().clamp_min(1.0)


def select_experts(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Smallest set of experts whose normalised scores sum to >= p. bool [E].

    Experts are taken by descending score, ties by lower expert index."""
    if not 0 < p <= 1:
        raise ValueError(f"ESFT threshold p must lie in (0, 1], got {p}")
    scores = scores.detach().to(torch.float64)
    if scores.dim() != 1 or bool((scores < 0).any()) or not float(scores.sum()) > 0:
        raise ValueError("ESFT scores must be a non-negative [E] vector with a positive sum "
                         "(did the sample contain tokens of this domain?)")
    normalised = scores / scores.sum()
    order = torch.sort(normalised, descending=True, stable=True).indices
    cumulative = normalised[order].cumsum(0)
    count = int((cumulative < p - _CUMSUM_TOLERANCE).sum()) + 1
    selected = torch.zeros_like(scores, dtype=torch.bool)
    selected[order[: min(count, scores.numel())]] = True
    return selected


def select_experts_per_layer(scores: torch.Tensor, p: float) -> torch.Tensor:
    """select_experts on every row of scores [L, E] (or [L, D, E], rows per domain).
    Returns bool of the same shape."""
    flat = scores.reshape(-1, scores.shape[-1])
    return torch.stack([select_experts(row, p) for row in flat]).reshape(scores.shape)


class ESFTScoreAccumulator:
    """ESFT statistics per (layer, domain, expert), summed over sampled batches.

    route_counts [L, D, E] float64  routes of domain-d tokens to expert e in layer l
    gate_sums    [L, D, E] float64  sum of e's gate value over domain-d tokens
    tokens       [L, D]    float64  domain-d tokens seen by layer l

    `layer` is a 0-based index into the accumulator (map Megatron layer numbers yourself).
    Tokens with domain id < 0 (padding) are ignored. Before selecting, sum the three
    tensors over data-parallel ranks, e.g. `acc.reduce_(lambda t: dist.all_reduce(t))`.
    """

    def __init__(self, num_layers: int, num_domains: int, num_experts: int,
                 device: Optional[torch.device] = None):
        self.num_layers, self.num_domains, self.num_experts = num_layers, num_domains, num_experts
        shape = (num_layers, num_domains, num_experts)
        self.route_counts = torch.zeros(shape, dtype=torch.float64, device=device)
        self.gate_sums = torch.zeros(shape, dtype=torch.float64, device=device)
        self.tokens = torch.zeros(num_layers, num_domains, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, layer: int, domain_ids: torch.Tensor, routing_map: torch.Tensor,
            probs: torch.Tensor) -> None:
        """Add one batch of layer `layer`: domain_ids [T], routing_map [T, E] bool, probs
        [T, E] gate values (masked to routing_map here, so a full softmax is fine too)."""
        device = self.tokens.device
        domains = domain_ids.to(device=device, dtype=torch.long)
        one_hot = _domain_one_hot(domains, self.num_domains)             # [T, D]
        routes = routing_map.to(device=device, dtype=torch.float64)       # [T, E]
        gate_values = probs.to(device=device, dtype=torch.float64) * routes
        self.route_counts[layer] += one_hot.t() @ routes
        self.gate_sums[layer] += one_hot.t() @ gate_values
        self.tokens[layer] += one_hot.sum(0)

    def reduce_(self, reduce_in_place: Callable[[torch.Tensor], object]) -> None:
        """Apply an in-place reduction (e.g. all_reduce) to every statistic tensor."""
        for tensor in (self.route_counts, self.gate_sums, self.tokens):
            reduce_in_place(tensor)

    def scores(self, score: str) -> torch.Tensor:
        """[L, D, E] token selection ratios ("token") or average gate scores ("gate")."""
        if score == "token":
            return self.route_counts / self.route_counts.sum(-1, keepdim=True).clamp_min(1.0)
        if score == "gate":
            return self.gate_sums / self.tokens.clamp_min(1.0).unsqueeze(-1)
        raise ValueError(f"unknown ESFT score {score!r}; use one of {list(ESFT_SCORES)}")

    def selected_experts(self, score: str, p: float) -> torch.Tensor:
        """bool [L, E]: experts selected for at least one domain (union over domains)."""
        missing = (self.tokens == 0).nonzero().tolist()
        if missing:
            raise ValueError(f"no sampled tokens for (layer, domain) pairs {missing}; sample "
                             f"every domain before selecting ESFT experts")
        return select_experts_per_layer(self.scores(score), p).any(dim=1)

    def state_dict(self) -> dict:
        return {"route_counts": self.route_counts.cpu().clone(),
                "gate_sums": self.gate_sums.cpu().clone(), "tokens": self.tokens.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        for name in ("route_counts", "gate_sums", "tokens"):
            getattr(self, name).copy_(state[name])


def _domain_one_hot(domain_ids: torch.Tensor, num_domains: int) -> torch.Tensor:
    """[T, D] float64 one-hot of the domain; all-zero rows for padding (id < 0)."""
    rows = torch.where(domain_ids >= 0, domain_ids, torch.full_like(domain_ids, num_domains))
    return torch.nn.functional.one_hot(rows, num_domains + 1)[:, :num_domains].to(torch.float64)
