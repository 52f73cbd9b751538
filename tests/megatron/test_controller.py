"""The phase controller driving a real Megatron training loop (DDP + Megatron AdamW, 1 rank)."""

import pytest
import torch

from megatron_desmoe.desmoe.config import DESMoEConfig
from megatron_desmoe.desmoe.phases import Phase
from megatron_desmoe.megatron.controller import DESMoEController, ever_trainable, parameter_group
from megatron_desmoe.megatron.domain_context import domain_ids_context
from megatron_desmoe.megatron.router import DESMoERouter
from megatron_desmoe.megatron.spec import desmoe_moe_classes
from megatron_desmoe.models.builder import ParallelConfig
from megatron_desmoe.models.presets import get_preset
from megatron_desmoe.parallel import init_model_parallel
from megatron_desmoe.training.engine import (
    TrainHooks,
    build_optimizer,
    build_training_model,
    make_forward_step,
    train_step,
)

NUM_DOMAINS, SEQ, MICRO, TOTAL = 3, 16, 3, 10
# domain 0 -> experts {0, 1}, domain 1 -> {1, 2}, domain 2 -> {1}; expert 3 serves nobody
MASK = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 1, 0, 0]], dtype=torch.bool)


class Hooks(TrainHooks):
    def __init__(self, controller):
        self.controller = controller

    def before_optimizer_step(self, model_chunks, optimizer):
        return self.controller.params_to_skip()

    def after_step(self, step):
        self.controller.end_step(step)


def _batches(vocab, seed):
    generator = torch.Generator().manual_seed(seed)
    while True:
        tokens = torch.randint(0, vocab, (MICRO, SEQ + 1), generator=generator)
        yield {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
               "loss_mask": torch.ones(MICRO, SEQ), "domain_ids": torch.arange(MICRO) % NUM_DOMAINS}


@pytest.fixture(scope="module")
def run():
    init_model_parallel(ParallelConfig())
    model_cfg = get_preset("mixtral-tiny")
    desmoe = DESMoEConfig(num_domains=NUM_DOMAINS, adapter_hidden_size=16,
                          affinity_update_interval=1000).validate()
    chunks = build_training_model(
        model_cfg, moe_classes=desmoe_moe_classes(desmoe), trainable=ever_trainable(desmoe),
        moe_aux_loss_coeff=0.0, moe_router_load_balancing_type="none")
    optimizer = build_optimizer(chunks, lr=1e-2, weight_decay=0.1)
    controller = DESMoEController(chunks, desmoe, TOTAL)
    for router in controller.routers:
        with torch.no_grad():
            router.adapter.fc2.weight.normal_(0, 0.1)  # a non-zero adapter: KD has work to do
    forward_step = make_forward_step(lambda batch: domain_ids_context(batch["domain_ids"], NUM_DOMAINS))
    data = _batches(model_cfg.vocab_size, seed=3)
    history = []

    def step(index):
        phase = controller.begin_step(index)
        if index == 2:  # as if the affinity refresh had produced MASK
            for router in controller.routers:
                router.affinity.mask = MASK.clone()
        before = _snapshot(chunks, optimizer)
        result = train_step(chunks, optimizer, data, num_microbatches=2, micro_batch_size=MICRO,
                            seq_length=SEQ, forward_step_func=forward_step,
                            hooks=Hooks(controller), step=index)
        history.append((phase, before, _snapshot(chunks, optimizer), result, controller.kd_weight))

    for index in range(TOTAL):
        step(index)
    return chunks, controller, history


def _named(chunks):
    return {name: param for name, param in chunks[0].named_parameters()}


def _snapshot(chunks, optimizer):
    params = {name: p.detach().clone() for name, p in _named(chunks).items()}
    states = {}
    for name, param in _named(chunks).items():
        for inner in _torch_optimizers(optimizer):
            if param in inner.state:
                states[name] = {k: v.clone() for k, v in inner.state[param].items()
                                if torch.is_tensor(v) and v.dim() > 0}
    return params, states


def _torch_optimizers(optimizer):
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return [opt.optimizer for opt in chained]


def _moved(before, after, name):
    return not torch.equal(before[0][name], after[0][name])


def _expert_params(chunks, expert):
    return [name for name in _named(chunks) if f".local_experts.{expert}." in name]


def test_phases_follow_the_schedule(run):
    _, _, history = run
    phases = [entry[0] for entry in history]
    assert phases == [Phase.WARMUP] * 2 + [Phase.STABILIZATION] * 5 + [Phase.CONSOLIDATION] * 3
    kd = [entry[4] for entry in history]
    assert kd[0] > kd[1] > 0 and all(w == 0 for w in kd[7:])  # decays; off with a frozen adapter


def test_never_trainable_parameters_have_no_grad_and_no_optimizer_state(run):
    chunks, _, history = run
    for name, param in _named(chunks).items():
        group = parameter_group(name)
        trains = group in ("router_adapter", "routed_experts")
        assert param.requires_grad == trains, name
        if not trains:
            assert name not in history[-1][2][1]  # no Adam state
            assert not _moved(history[0][1], history[-1][2], name)


def test_warmup_trains_every_expert_and_the_adapter(run):
    chunks, _, history = run
    _, before, after, _, _ = history[0]
    for expert in range(4):
        assert all(_moved(before, after, n) for n in _expert_params(chunks, expert))
    assert all(_moved(before, after, n) for n in _named(chunks) if ".router.adapter." in n)


def test_unassociated_expert_is_bit_identical_through_stabilisation_and_consolidation(run):
    chunks, controller, history = run
    start, end = history[2][1], history[-1][2]
    for name in _expert_params(chunks, 3):
        assert torch.equal(start[0][name], end[0][name]), name
        for key, value in start[1][name].items():
            assert torch.equal(value, end[1][name][key]), (name, key)
    for expert in (0, 1, 2):  # associated experts keep training (weight decay alone moves them)
        assert all(_moved(start, end, n) for n in _expert_params(chunks, expert))


def test_adapter_freezes_in_consolidation(run):
    chunks, _, history = run
    adapter = [n for n in _named(chunks) if ".router.adapter." in n]
    assert all(_moved(history[3][1], history[3][2], n) for n in adapter)  # stabilisation
    start, end = history[7][1], history[-1][2]
    for name in adapter:
        assert torch.equal(start[0][name], end[0][name])
        for key, value in start[1][name].items():
            assert torch.equal(value, end[1][name][key])


def test_isolation_counts_only_allowed_tokens(run):
    _, controller, _ = run
    for block in controller.expert_blocks:
        assert block.allowed_tokens[3] == 0  # nobody's domain may train expert 3
        assert block.allowed_tokens[1] > 0   # every domain may train expert 1


def test_affinity_refresh_builds_the_mask_from_routing():
    """end_step refreshes every T_update steps from the counts gathered in forward."""
    init_model_parallel(ParallelConfig())
    model_cfg = get_preset("mixtral-tiny")
    desmoe = DESMoEConfig(num_domains=2, adapter_hidden_size=8, affinity_update_interval=2)
    chunks = build_training_model(model_cfg, moe_classes=desmoe_moe_classes(desmoe),
                                  trainable=ever_trainable(desmoe), moe_aux_loss_coeff=0.0,
                                  moe_router_load_balancing_type="none")
    controller = DESMoEController(chunks, desmoe, total_steps=4)
    routing = []
    for router in controller.routers:
        router.register_forward_hook(lambda m, i, out: routing.append(out[1].detach()))
    tokens = torch.randint(0, model_cfg.vocab_size, (2, SEQ))
    domains = torch.tensor([0, 1])
    for step in range(2):
        controller.begin_step(step)
        with domain_ids_context(domains, 2):
            chunks[0](tokens, torch.arange(SEQ).expand(2, SEQ), None, labels=tokens).sum().backward()
        assert controller.end_step(step) == (step == 1)
    token_domain = domains.view(1, -1).expand(SEQ, -1).reshape(-1)
    num_layers = len(controller.routers)
    for layer, router in enumerate(controller.routers):
        maps = routing[layer::num_layers]
        counts = torch.zeros(2, 4, dtype=torch.float64)
        for routing_map in maps:  # a plain loop over tokens
            for t in range(routing_map.shape[0]):
                for e in range(4):
                    counts[token_domain[t], e] += float(routing_map[t, e])
        frequency = counts / (SEQ * len(maps))
        torch.testing.assert_close(router.affinity.affinity, frequency)
        expected_mask = frequency >= 0.6 * frequency.max(dim=1, keepdim=True).values
        assert torch.equal(router.affinity.mask.cpu(), expected_mask)
