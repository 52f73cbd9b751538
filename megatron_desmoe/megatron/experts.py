"""DESMoESequentialMLP: Megatron's SequentialMLP with exact per-token gradient isolation.

While isolation is active the DES-MoE router marks each route allowed or not in the sign of
its probability (see megatron_desmoe.desmoe.isolation). Here each local expert splits its
tokens: allowed rows run through the expert module as usual; the other rows run the same
MLP math with detached weights. Hence

  * the expert's weight gradient comes from allowed tokens only (exactly what it would be
    if the expert had seen the allowed tokens alone),
  * the gradient to the expert input and to the routing probabilities is unchanged for
    every token (so the router and the layers below are not affected),
  * forward outputs are unchanged.

The detached rows never touch `main_grad`, so this also holds with Megatron's
gradient-accumulation fusion. With FP8 the detached rows run in the module's parameter
dtype rather than FP8 (documented in docs/method.md).

The number of allowed tokens each local expert saw since the last optimizer step is kept in
`allowed_tokens`, so that experts reached by no allowed token can be skipped by the
optimizer (no Adam momentum drift, no weight decay).
"""

from __future__ import annotations

import torch

from megatron_desmoe.compat import ensure_megatron_importable

ensure_megatron_importable()

from megatron.core.transformer.moe.experts import SequentialMLP  # noqa: E402

from megatron_desmoe.desmoe.isolation import decode_allowed  # noqa: E402
from megatron_desmoe.errors import ConfigError  # noqa: E402


class DESMoESequentialMLP(SequentialMLP):
    def __init__(self, num_local_experts, config, submodules, pg_collection=None, name=None):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection,
                         name=name)
        _check_supported(self.config)
        self.isolation_active = False
        self.register_buffer(
            "allowed_tokens", torch.zeros(num_local_experts, dtype=torch.float64), persistent=False
        )

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        if not self.isolation_active:
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        probs, allowed = decode_allowed(permuted_probs)
        counts = tokens_per_expert.tolist()
        outputs = []
        for index, (expert, tokens, expert_probs, expert_allowed) in enumerate(zip(
            self.local_experts, torch.split(permuted_local_hidden_states, counts),
            torch.split(probs, counts), torch.split(allowed, counts),
        )):
            outputs.append(self._isolated_expert(expert, tokens, expert_probs, expert_allowed))
            if torch.is_grad_enabled():
                self.allowed_tokens[index] += float(expert_allowed.sum())
        output = torch.cat(outputs, dim=0) if outputs else permuted_local_hidden_states
        return output, None

    def _isolated_expert(self, expert, tokens, probs, allowed) -> torch.Tensor:
        if tokens.shape[0] == 0 or bool(allowed.all()):
            return self._live_expert(expert, tokens, probs)
        allowed_rows = allowed.nonzero().squeeze(1)
        blocked_rows = (~allowed).nonzero().squeeze(1)
        output = tokens.new_zeros(tokens.shape[0], self.config.hidden_size)
        if allowed_rows.numel():
            live = self._live_expert(expert, tokens.index_select(0, allowed_rows),
                                     probs.index_select(0, allowed_rows))
            output = output.index_copy(0, allowed_rows, live.to(output.dtype))
        blocked = _detached_expert_mlp(expert, tokens.index_select(0, blocked_rows),
                                       probs.index_select(0, blocked_rows), self.config)
        return output.index_copy(0, blocked_rows, blocked.to(output.dtype))

    def _live_expert(self, expert, tokens, probs) -> torch.Tensor:
        if self.config.fp8 or self.config.fp4:  # FP8 GEMMs need row counts padded to 16/32
            padded_tokens, padded_probs = self._pad_tensor_for_quantization(tokens, probs)
            return expert(padded_tokens, padded_probs)[0][: tokens.shape[0]]
        return expert(tokens, probs)[0]

    def reset_allowed_tokens(self) -> None:
        self.allowed_tokens.zero_()


def _detached_expert_mlp(expert, tokens, probs, config) -> torch.Tensor:
    """The expert MLP (as megatron.core.transformer.mlp.MLP computes it, without bias)
    with detached weights: gradient flows to tokens and probs, never to the weights."""
    fc1_weight = expert.linear_fc1.weight.detach()
    fc2_weight = expert.linear_fc2.weight.detach()
    intermediate = torch.nn.functional.linear(tokens, fc1_weight.to(tokens.dtype))
    if config.gated_linear_unit:
        gate, linear = torch.chunk(intermediate, 2, dim=-1)
        intermediate = config.activation_func(gate) * linear
    else:
        intermediate = config.activation_func(intermediate)
    intermediate = (intermediate * probs.unsqueeze(-1)).to(tokens.dtype)
    return torch.nn.functional.linear(intermediate, fc2_weight.to(tokens.dtype))


def _check_supported(config) -> None:
    if config.add_bias_linear:
        raise ConfigError("add_bias_linear", "DES-MoE isolation experts support bias-free "
                          "experts only (all supported families are bias-free)", "set it False")
    if config.moe_apply_probs_on_input:
        raise ConfigError("moe_apply_probs_on_input", "probabilities must reach the experts "
                          "untouched to carry the isolation bit", "set it False")
    if getattr(config, "activation_func_clamp_value", None) is not None:
        raise ConfigError("activation_func_clamp_value", "not supported by DES-MoE experts",
                          "leave it unset")
