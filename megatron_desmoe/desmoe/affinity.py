"""Mechanism 2 (first half): the expert-domain affinity matrix and its mask, per MoE layer.

During training every router reports which experts each token chose (routing_map) and the
domain of each token. Over a window of T_update optimizer steps we count

    counts[d, e] = number of domain-d tokens that chose expert e
    tokens[d]    = number of domain-d tokens

and at the end of the window refresh the running affinity A_hat with the window's selection
frequencies F[d, e] = counts[d, e] / tokens[d] (the share of domain-d tokens that chose e;
a row sums to top-k):

    A_hat[d] = F[d]                               first window in which domain d appears
    A_hat[d] = m * A_hat[d] + (1 - m) * F[d]      later windows in which d appears
    A_hat[d]   unchanged                          windows without domain-d tokens

    M[d, e] = A_hat[d, e] >= phi * max_e' A_hat[d, e']        (expert e serves domain d)

Choices (docs/method.md): the first window initialises a row directly (blending with an
all-zero start would only scale the row, and the mask is scale-free, but A_hat would no
longer be a frequency); a domain with no evidence yet has an all-True mask row (no
evidence, no isolation); tokens with domain id < 0 (padding) are not counted.

Counts are float64 (exact integers up to 2^53) so that they can be all-reduced across
ranks by the glue (`window_counts` -> all_reduce -> `refresh(counts, tokens)`).
"""

from __future__ import annotations

from typing import Optional

import torch

_STATE_TENSORS = ("counts", "tokens", "affinity", "mask", "initialized")


def _domain_rows(domain_ids: torch.Tensor, num_domains: int) -> torch.Tensor:
    """Row index per token: its domain, or the extra row `num_domains` for padding (< 0).
    Sending padding to a spare row avoids boolean indexing (a host sync on GPU)."""
    domain_ids = domain_ids.to(torch.long)
    return torch.where(domain_ids >= 0, domain_ids, torch.full_like(domain_ids, num_domains))


@torch.no_grad()
def count_domain_expert_tokens(routing_map: torch.Tensor, domain_ids: torch.Tensor,
                               num_domains: int) -> torch.Tensor:
    """counts[d, e] = number of tokens of domain d routed to expert e. float64 [D, E].

    routing_map: [T, E] bool, True where the token chose the expert. domain_ids: [T] int,
    values in [0, D) or < 0 for padding (ignored).
    """
    _check_token_shapes(routing_map, domain_ids)
    rows = _domain_rows(domain_ids, num_domains)
    counts = torch.zeros(num_domains + 1, routing_map.shape[1], dtype=torch.float64,
                         device=routing_map.device)
    counts.index_add_(0, rows, routing_map.to(torch.float64))
    return counts[:num_domains]


@torch.no_grad()
def count_domain_tokens(domain_ids: torch.Tensor, num_domains: int) -> torch.Tensor:
    """tokens[d] = number of tokens of domain d (padding ignored). float64 [D]."""
    rows = _domain_rows(domain_ids, num_domains)
    tokens = torch.zeros(num_domains + 1, dtype=torch.float64, device=domain_ids.device)
    tokens.index_add_(0, rows, torch.ones_like(rows, dtype=torch.float64))
    return tokens[:num_domains]


def affinity_mask(affinity: torch.Tensor, phi: float) -> torch.Tensor:
    """M[d, e] = affinity[d, e] >= phi * max_e' affinity[d, e'].  bool [D, E].

    Equality counts as associated. A row that is all zero (domain never seen) is all True:
    with no evidence we do not isolate that domain's tokens from any expert.
    """
    row_max = affinity.max(dim=1, keepdim=True).values
    return affinity >= phi * row_max  # an all-zero row gives 0 >= 0: all True


class AffinityState:
    """Affinity bookkeeping of one MoE layer (plain tensors, no parameters, no autograd).

    counts [D, E] float64   routing counts of the current window
    tokens [D] float64      tokens per domain in the current window
    affinity [D, E] float64 A_hat, the running selection frequency
    mask [D, E] bool        M, recomputed at each refresh (all True before any evidence)
    initialized [D] bool    whether domain d has been seen in some refreshed window
    num_refreshes int       refreshes so far

    The tensors follow the device of the routing maps given to `accumulate` (they are
    moved there on first use), so accumulation never syncs with the host.
    """

    def __init__(self, num_domains: int, num_experts: int, *, phi: float = 0.6,
                 momentum: float = 0.9, device: Optional[torch.device] = None):
        if num_domains < 1 or num_experts < 1:
            raise ValueError(f"need >= 1 domain and expert, got {num_domains}, {num_experts}")
        self.num_domains = num_domains
        self.num_experts = num_experts
        self.phi = phi
        self.momentum = momentum
        shape = (num_domains, num_experts)
        self.counts = torch.zeros(shape, dtype=torch.float64, device=device)
        self.tokens = torch.zeros(num_domains, dtype=torch.float64, device=device)
        self.affinity = torch.zeros(shape, dtype=torch.float64, device=device)
        self.mask = torch.ones(shape, dtype=torch.bool, device=device)
        self.initialized = torch.zeros(num_domains, dtype=torch.bool, device=device)
        self.num_refreshes = 0

    # ------------------------------------------------------------------ window
    def to(self, device: torch.device | str) -> "AffinityState":
        for name in _STATE_TENSORS:
            setattr(self, name, getattr(self, name).to(device))
        return self

    @torch.no_grad()
    def accumulate(self, routing_map: torch.Tensor, domain_ids: torch.Tensor) -> None:
        """Add one micro-batch's routing ([T, E] bool, [T] domain ids) to the window."""
        if routing_map.shape[-1] != self.num_experts:
            raise ValueError(f"routing_map has {routing_map.shape[-1]} experts, "
                             f"state has {self.num_experts}")
        if self.counts.device != routing_map.device:
            self.to(routing_map.device)
        domain_ids = domain_ids.to(routing_map.device)
        self.counts += count_domain_expert_tokens(routing_map, domain_ids, self.num_domains)
        self.tokens += count_domain_tokens(domain_ids, self.num_domains)

    def window_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(counts [D, E], tokens [D]) of the current window; the live tensors, so clone
        before reducing them in place."""
        return self.counts, self.tokens

    # ------------------------------------------------------------------ refresh
    @torch.no_grad()
    def refresh(self, counts: Optional[torch.Tensor] = None,
                tokens: Optional[torch.Tensor] = None) -> None:
        """End the window: update A_hat from the window frequencies, recompute the mask,
        clear the window. Pass (counts, tokens) summed over ranks to use those instead of
        this rank's own window."""
        if (counts is None) != (tokens is None):
            raise ValueError("pass both counts and tokens, or neither")
        if counts is None:
            counts, tokens = self.counts, self.tokens
        counts = counts.to(self.affinity.device, torch.float64)
        tokens = tokens.to(self.affinity.device, torch.float64)
        if counts.shape != self.affinity.shape or tokens.shape != self.tokens.shape:
            raise ValueError(f"expected counts {tuple(self.affinity.shape)} and tokens "
                             f"{tuple(self.tokens.shape)}, got {tuple(counts.shape)} and "
                             f"{tuple(tokens.shape)}")
        seen = (tokens > 0).unsqueeze(1)
        frequency = counts / tokens.clamp_min(1.0).unsqueeze(1)
        blended = self.momentum * self.affinity + (1.0 - self.momentum) * frequency
        updated = torch.where(self.initialized.unsqueeze(1), blended, frequency)
        self.affinity.copy_(torch.where(seen, updated, self.affinity))
        self.initialized |= seen.squeeze(1)
        self.mask.copy_(affinity_mask(self.affinity, self.phi))
        self.counts.zero_()
        self.tokens.zero_()
        self.num_refreshes += 1

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """CPU copies of every tensor plus num_refreshes (phi, momentum come from config)."""
        state = {name: getattr(self, name).detach().cpu().clone() for name in _STATE_TENSORS}
        state["num_refreshes"] = self.num_refreshes
        return state

    def load_state_dict(self, state: dict) -> None:
        expected = set(_STATE_TENSORS) | {"num_refreshes"}
        if set(state) != expected:
            raise KeyError(f"affinity state keys {sorted(state)} != {sorted(expected)}")
        for name in _STATE_TENSORS:
            current = getattr(self, name)
            if tuple(state[name].shape) != tuple(current.shape):
                raise ValueError(f"affinity {name}: checkpoint shape {tuple(state[name].shape)}"
                                 f" != {tuple(current.shape)} (num_domains/num_experts differ)")
            current.copy_(state[name].to(current.device, current.dtype))
        self.num_refreshes = int(state["num_refreshes"])


def _check_token_shapes(routing_map: torch.Tensor, domain_ids: torch.Tensor) -> None:
    if routing_map.dim() != 2 or domain_ids.dim() != 1 or routing_map.shape[0] != domain_ids.shape[0]:
        raise ValueError(f"expected routing_map [T, E] and domain_ids [T], got "
                         f"{tuple(routing_map.shape)} and {tuple(domain_ids.shape)}")
