"""ESFT scores and expert selection against loops and hand-computed examples."""

import pytest
import torch

from megatron_desmoe.desmoe.esft import (
    ESFTScoreAccumulator,
    average_gate_score,
    select_experts,
    select_experts_per_layer,
    token_selection_ratio,
)


def _routing(seed, tokens=40, experts=6, topk=2):
    generator = torch.Generator().manual_seed(seed)
    softmax = torch.softmax(torch.randn(tokens, experts, generator=generator), dim=-1)
    chosen = softmax.topk(topk, dim=-1).indices
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool).scatter(1, chosen, True)
    valid = torch.rand(tokens, generator=generator) < 0.8
    domains = torch.randint(-1, 2, (tokens,), generator=generator)
    return softmax, routing_map, valid, domains


def _token_ratio_loop(routing_map, valid):
    counts, slots = [0.0] * routing_map.shape[1], 0.0
    for t in range(routing_map.shape[0]):
        if valid is not None and not valid[t]:
            continue
        for e in range(routing_map.shape[1]):
            if routing_map[t, e]:
                counts[e] += 1
                slots += 1
    return [c / slots for c in counts]


def _gate_score_loop(softmax, routing_map, valid):
    sums, tokens = [0.0] * softmax.shape[1], 0
    for t in range(softmax.shape[0]):
        if valid is not None and not valid[t]:
            continue
        tokens += 1
        for e in range(softmax.shape[1]):
            if routing_map[t, e]:  # ESFT's g: the gate value where e is in the top-k, else 0
                sums[e] += float(softmax[t, e])
    return [s / tokens for s in sums]


@pytest.mark.parametrize("use_valid", [False, True])
def test_token_selection_ratio_matches_a_loop(use_valid):
    _, routing_map, valid, _ = _routing(0)
    valid = valid if use_valid else None
    ratio = token_selection_ratio(routing_map, valid)
    assert ratio.tolist() == pytest.approx(_token_ratio_loop(routing_map, valid), abs=1e-15)
    assert float(ratio.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("use_valid", [False, True])
def test_average_gate_score_matches_a_loop(use_valid):
    softmax, routing_map, valid, _ = _routing(1)
    valid = valid if use_valid else None
    expected = _gate_score_loop(softmax, routing_map, valid)
    masked = softmax * routing_map  # what Megatron's router returns as probs
    assert average_gate_score(masked, valid).tolist() == pytest.approx(expected, abs=1e-7)
    assert average_gate_score(softmax, valid, routing_map).tolist() == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize("scores, p, expected", [
    ([0.1, 0.4, 0.2, 0.3], 0.5, [1, 3]),           # 0.4 + 0.3 >= 0.5
    ([0.1, 0.4, 0.2, 0.3], 0.4, [1]),              # reaching p exactly is enough
    ([0.1, 0.4, 0.2, 0.3], 0.41, [1, 3]),
    ([0.1, 0.4, 0.2, 0.3], 0.01, [1]),             # at least one expert
    ([0.1, 0.4, 0.2, 0.3], 1.0, [0, 1, 2, 3]),
    ([2.0, 8.0, 4.0, 6.0], 0.5, [1, 3]),           # scores are normalised first
    ([1.0, 3.0, 3.0, 1.0], 0.3, [1]),              # tie 1/2: lower index first
    ([1.0, 3.0, 3.0, 1.0], 0.5, [1, 2]),
    ([1.0, 3.0, 3.0, 1.0], 0.8, [0, 1, 2]),        # tie 0/3: lower index first
    ([0.0, 1.0, 1.0, 0.0], 1.0, [1, 2]),           # zero-score experts never needed
    ([5.0, 5.0, 5.0, 5.0], 0.25, [0]),
    ([5.0, 5.0, 5.0, 5.0], 0.26, [0, 1]),
])
def test_select_experts_hand_examples(scores, p, expected):
    selected = select_experts(torch.tensor(scores, dtype=torch.float64), p)
    assert selected.dtype == torch.bool
    assert selected.nonzero().squeeze(1).tolist() == expected


def test_select_experts_counts_rounding_ties_as_reaching_p():
    for k in range(1, 11):  # cumulative sums of 0.1 drift below k / 10 for some k
        assert int(select_experts(torch.ones(10), k / 10).sum()) == k


def test_select_experts_errors():
    for bad_p in (0.0, 1.1):
        with pytest.raises(ValueError):
            select_experts(torch.ones(3), bad_p)
    with pytest.raises(ValueError):
        select_experts(torch.zeros(3), 0.5)
    with pytest.raises(ValueError):
        select_experts(torch.tensor([1.0, -0.5, 0.5]), 0.5)


def test_select_experts_per_layer_is_row_wise():
    scores = torch.tensor([[0.1, 0.4, 0.2, 0.3], [1.0, 3.0, 3.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    selected = select_experts_per_layer(scores, 0.5)
    assert selected.tolist() == [select_experts(row, 0.5).tolist() for row in scores]
    assert selected.tolist() == [[False, True, False, True], [False, True, True, False],
                                 [False, False, False, True]]
    stacked = select_experts_per_layer(scores.reshape(1, 3, 4), 0.5)
    assert stacked.shape == (1, 3, 4) and torch.equal(stacked[0], selected)


def test_accumulator_scores_match_the_single_batch_functions():
    softmax_a, map_a, _, domains_a = _routing(2)
    softmax_b, map_b, _, domains_b = _routing(3)
    accumulator = ESFTScoreAccumulator(num_layers=2, num_domains=2, num_experts=6)
    accumulator.add(1, domains_a, map_a, softmax_a)  # full softmax: masked inside
    accumulator.add(1, domains_b, map_b, softmax_b * map_b)
    softmax = torch.cat([softmax_a, softmax_b])
    routing_map = torch.cat([map_a, map_b])
    domains = torch.cat([domains_a, domains_b])
    for domain in (0, 1):
        rows = domains == domain
        torch.testing.assert_close(accumulator.scores("token")[1, domain],
                                   token_selection_ratio(routing_map, rows))
        torch.testing.assert_close(accumulator.scores("gate")[1, domain],
                                   average_gate_score(softmax, rows, routing_map))
        assert accumulator.tokens[1, domain] == rows.sum()
    assert not accumulator.tokens[0].any()
    with pytest.raises(ValueError):  # layer 0 never sampled
        accumulator.selected_experts("token", 0.2)


def test_accumulator_selects_the_union_over_domains_and_reduces_like_ranks():
    # one layer, 4 experts, top-1: domain 0 -> expert 0 (3 of 4 tokens), domain 1 -> expert 3
    routing_map = torch.eye(4, dtype=torch.bool)[[0, 0, 0, 1, 3, 3, 3, 2]]
    probs = routing_map * 0.9
    domains = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    ranks = [ESFTScoreAccumulator(1, 2, 4) for _ in range(2)]
    ranks[0].add(0, domains[::2], routing_map[::2], probs[::2])
    ranks[1].add(0, domains[1::2], routing_map[1::2], probs[1::2])
    total = ESFTScoreAccumulator(1, 2, 4)
    total.add(0, domains, routing_map, probs)
    state = ranks[1].state_dict()
    ranks[0].reduce_(lambda tensor: tensor.add_(state[_name(ranks[0], tensor)]))
    for score in ("token", "gate"):
        torch.testing.assert_close(ranks[0].scores(score), total.scores(score))
        assert total.selected_experts(score, 0.5).tolist() == [[True, False, False, True]]
        assert total.selected_experts(score, 0.8).tolist() == [[True, True, True, True]]
    with pytest.raises(ValueError):
        total.scores("weights")


def _name(accumulator, tensor):
    for name in ("route_counts", "gate_sums", "tokens"):
        if getattr(accumulator, name) is tensor:
            return name
    raise AssertionError("unknown tensor")


def test_ties_go_to_the_lower_index_in_a_large_layer():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(1, 4, (5000,), generator=generator).to(torch.float64)
    p = 0.3
    # reference: plain Python, key (-score, index)
    order = sorted(range(5000), key=lambda e: (-scores[e].item(), e))
    total, running, expected = scores.sum().item(), 0.0, set()
    for expert in order:
        if running / total >= p - 1e-12:
            break
        expected.add(expert)
        running += scores[expert].item()
    assert set(select_experts(scores, p).nonzero().squeeze(1).tolist()) == expected
