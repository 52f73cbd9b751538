"""Affinity counts, momentum refresh, mask and checkpoint round trip."""

import pytest
import torch

from megatron_desmoe.desmoe.affinity import (
    AffinityState,
    affinity_mask,
    count_domain_expert_tokens,
    count_domain_tokens,
)

D, E = 3, 4


def _random_routing(seed, tokens=50, experts=6, topk=2, domains=3):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, experts, generator=generator)
    chosen = scores.topk(topk, dim=1).indices
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool).scatter(1, chosen, True)
    domain_ids = torch.randint(-1, domains, (tokens,), generator=generator)  # -1 = padding
    return routing_map, domain_ids


def test_counts_match_a_loop_over_tokens():
    routing_map, domain_ids = _random_routing(0)
    expected = [[0.0] * 6 for _ in range(3)]
    tokens = [0.0] * 3
    for t in range(routing_map.shape[0]):
        d = int(domain_ids[t])
        if d < 0:
            continue
        tokens[d] += 1
        for e in range(6):
            if routing_map[t, e]:
                expected[d][e] += 1
    counts = count_domain_expert_tokens(routing_map, domain_ids, 3)
    assert counts.dtype == torch.float64 and counts.shape == (3, 6)
    assert counts.tolist() == expected
    assert count_domain_tokens(domain_ids, 3).tolist() == tokens
    assert (domain_ids < 0).any(), "the sample must contain padding for this test to bite"


def test_counts_do_not_track_gradients():
    routing_map, domain_ids = _random_routing(1)
    with torch.enable_grad():
        counts = count_domain_expert_tokens(routing_map, domain_ids, 3)
    assert not counts.requires_grad


def _window(routes_by_domain):
    """routing_map, domain_ids from {domain: [expert sets]}; plus a padding token to 0, 1."""
    rows, domains = [], []
    for domain, routes in routes_by_domain.items():
        for experts in routes:
            rows.append([e in experts for e in range(E)])
            domains.append(domain)
    rows.append([True, True, False, False])
    domains.append(-1)
    return torch.tensor(rows), torch.tensor(domains)


# Three windows; domain 2 is missing from the first, domain 1 from the second.
WINDOWS = [
    {0: [{0, 1}, {0, 2}], 1: [{3, 2}]},
    {0: [{1, 2}], 2: [{0, 3}, {0, 1}]},
    {0: [{3, 0}], 1: [{0, 1}], 2: [{3, 2}]},
]
# Hand computation, m = 0.9, phi = 0.6 (F = counts / tokens of the window):
#  w1: F0 = [1, .5, .5, 0], F1 = [0, 0, 1, 1]  -> A0 = F0, A1 = F1 (first windows), A2 = 0
#  w2: F0 = [0, 1, 1, 0],   F2 = [1, .5, 0, .5] -> A0 = .9 A0 + .1 F0 = [.9, .55, .55, 0]
#                                                   A1 kept, A2 = F2 (first window)
#  w3: F0 = [1, 0, 0, 1], F1 = [1, 1, 0, 0], F2 = [0, 0, 1, 1]
#      A0 = [.91, .495, .495, .1], A1 = [.1, .1, .9, .9], A2 = [.9, .45, .1, .55]
EXPECTED_AFFINITY = [
    [[1, .5, .5, 0], [0, 0, 1, 1], [0, 0, 0, 0]],
    [[.9, .55, .55, 0], [0, 0, 1, 1], [1, .5, 0, .5]],
    [[.91, .495, .495, .1], [.1, .1, .9, .9], [.9, .45, .1, .55]],
]
EXPECTED_MASK = [  # threshold .6 * row max
    [[1, 0, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]],      # unseen domain 2: all allowed
    [[1, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 0]],      # .55 >= .54
    [[1, 0, 0, 0], [0, 0, 1, 1], [1, 0, 0, 1]],      # .495 < .546; .55 >= .54
]
EXPECTED_INITIALIZED = [[1, 1, 0], [1, 1, 1], [1, 1, 1]]


def test_refresh_applies_momentum_over_three_windows_with_missing_domains():
    state = AffinityState(D, E, phi=0.6, momentum=0.9)
    assert state.mask.all() and not state.initialized.any()
    for index, window in enumerate(WINDOWS):
        routing_map, domain_ids = _window(window)
        half = routing_map.shape[0] // 2  # two micro-batches per window
        state.accumulate(routing_map[:half], domain_ids[:half])
        state.accumulate(routing_map[half:], domain_ids[half:])
        state.refresh()
        torch.testing.assert_close(state.affinity, torch.tensor(EXPECTED_AFFINITY[index],
                                   dtype=torch.float64), rtol=0, atol=1e-12)
        assert state.mask.tolist() == [[bool(v) for v in row] for row in EXPECTED_MASK[index]]
        assert state.initialized.tolist() == [bool(v) for v in EXPECTED_INITIALIZED[index]]
        assert state.num_refreshes == index + 1
        assert not state.counts.any() and not state.tokens.any()


def test_refresh_with_counts_summed_over_ranks_equals_one_rank_seeing_everything():
    routing_map, domain_ids = _random_routing(2, experts=E, domains=D)
    single = AffinityState(D, E)
    single.accumulate(routing_map, domain_ids)
    single.refresh()
    ranks = [AffinityState(D, E) for _ in range(2)]
    ranks[0].accumulate(routing_map[:20], domain_ids[:20])
    ranks[1].accumulate(routing_map[20:], domain_ids[20:])
    windows = [rank.window_counts() for rank in ranks]
    counts = windows[0][0] + windows[1][0]  # what all_reduce(SUM) produces
    tokens = windows[0][1] + windows[1][1]
    for rank in ranks:
        rank.refresh(counts, tokens)
        assert torch.equal(rank.affinity, single.affinity)
        assert torch.equal(rank.mask, single.mask)
    with pytest.raises(ValueError):
        ranks[0].refresh(counts, None)
    with pytest.raises(ValueError):
        ranks[0].refresh(counts[:, :2], tokens)


def test_momentum_zero_follows_the_last_window():
    state = AffinityState(D, E, momentum=0.0)
    for window in WINDOWS[:2]:
        state.accumulate(*_window(window))
        state.refresh()
    assert state.affinity[0].tolist() == [0, 1, 1, 0]  # w2's F0 only


def test_mask_threshold_edges():
    affinity = torch.tensor([[0.75, 1.0, 0.5, 0.7499], [0, 0, 0, 0], [2, 2, 1, 0]],
                            dtype=torch.float64)
    mask = affinity_mask(affinity, 0.75)
    assert mask.tolist() == [[True, True, False, False],   # equal to phi * max: allowed
                             [True, True, True, True],     # no evidence: no isolation
                             [True, True, False, False]]
    assert affinity_mask(affinity, 1.0)[2].tolist() == [True, True, False, False]  # ties at max


def test_state_dict_round_trip_is_exact():
    state = AffinityState(D, E, phi=0.6, momentum=0.9)
    for window in WINDOWS[:2]:
        state.accumulate(*_window(window))
        state.refresh()
    state.accumulate(*_window(WINDOWS[2]))  # a half-full window is saved too
    saved = state.state_dict()
    assert all(t.device.type == "cpu" for k, t in saved.items() if k != "num_refreshes")
    restored = AffinityState(D, E, phi=0.6, momentum=0.9)
    restored.load_state_dict(saved)
    for name in ("counts", "tokens", "affinity", "mask", "initialized"):
        assert torch.equal(getattr(restored, name), getattr(state, name)), name
        assert getattr(restored, name).dtype == getattr(state, name).dtype
    assert restored.num_refreshes == state.num_refreshes == 2
    state.refresh()
    assert not torch.equal(saved["affinity"], state.affinity), "state_dict must hold copies"
    restored.refresh()
    assert torch.equal(restored.affinity, state.affinity)
    assert torch.equal(restored.mask, state.mask)


def test_load_state_dict_rejects_mismatches():
    saved = AffinityState(D, E).state_dict()
    with pytest.raises(ValueError):
        AffinityState(D, E + 1).load_state_dict(saved)
    del saved["mask"]
    with pytest.raises(KeyError):
        AffinityState(D, E).load_state_dict(saved)


def test_accumulate_rejects_wrong_expert_count():
    routing_map, domain_ids = _random_routing(3, experts=E + 1)
    with pytest.raises(ValueError):
        AffinityState(D, E).accumulate(routing_map, domain_ids)
