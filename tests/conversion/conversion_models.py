"""Tiny random Hugging Face checkpoints of every supported family, built from configs with
transformers' own model classes (no hub access)."""

from __future__ import annotations

from pathlib import Path

import torch

_COMMON = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=256, tie_word_embeddings=False)

CONFIGS = {
    "mixtral": dict(model_type="mixtral", num_key_value_heads=2, head_dim=16, intermediate_size=96,
                    num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "qwen2_moe": dict(model_type="qwen2_moe", num_key_value_heads=2, intermediate_size=96,
                      moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=False, qkv_bias=True, mlp_only_layers=[0],
                      num_hidden_layers=3, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "qwen3_moe": dict(model_type="qwen3_moe", num_key_value_heads=2, head_dim=24, intermediate_size=96,
                      moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "olmoe": dict(model_type="olmoe", num_key_value_heads=2, intermediate_size=32, num_experts=8,
                  num_experts_per_tok=2, norm_topk_prob=False, rms_norm_eps=1e-5, eos_token_id=2,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "deepseek_v2": dict(model_type="deepseek_v2", num_hidden_layers=4, intermediate_size=96,
                        moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=2,
                        num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=None,
                        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                        routed_scaling_factor=1.5,
                        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                         "original_max_position_embeddings": 64, "beta_fast": 32.0,
                                         "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}),
}
# DeepSeek-V2 (full size) compresses queries too (q_lora_rank); V2-Lite does not.
CONFIGS["deepseek_v2_qlora"] = dict(CONFIGS["deepseek_v2"], q_lora_rank=24, num_hidden_layers=2)
# Group-limited routing, in the one setting where HF and Megatron rank groups alike.
CONFIGS["deepseek_v2_grouped"] = dict(CONFIGS["deepseek_v2"], num_hidden_layers=2, n_group=4, topk_group=2,
                                      topk_method="group_limited_greedy")
FAMILIES = tuple(CONFIGS)  # the five families and two more DeepSeek-V2 variants


def hf_config(family: str, **overrides):
    from transformers import AutoConfig

    values = {**_COMMON, **CONFIGS[family], **overrides}
    return AutoConfig.for_model(values.pop("model_type"), **values)


def build_hf_model(family: str, seed: int = 0, **overrides):
    """A random HF model. Every weight is redrawn (norms around 1, not exactly 1) so that a
    wrong layout of any tensor, norms included, changes the logits."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **overrides), dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.1 * noise if param.dim() == 1 else 0.08 * noise)
    return model.eval()


def save_hf_model(family: str, directory: Path, seed: int = 0, dtype=torch.float32,
                  max_shard_size: str = "5GB", **overrides) -> Path:
    model = build_hf_model(family, seed, **overrides).to(dtype)
    model.save_pretrained(str(directory), max_shard_size=max_shard_size)
    return Path(directory)


def read_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the model*.safetensors files in `directory`."""
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(Path(directory).glob("model*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def tokens(batch: int = 2, seq: int = 24, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hf_logits(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def megatron_logits(megatron_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a Megatron checkpoint loaded at TP=EP=PP=1 (any saved layout)."""
    from megatron_desmoe.conversion import load_model_json
    from megatron_desmoe.models.builder import ParallelConfig, build_gpt_model, transformer_config
    from megatron_desmoe.parallel import init_model_parallel
    from megatron.core import dist_checkpointing

    model, _ = load_model_json(megatron_dir)
    init_model_parallel(ParallelConfig())
    gpt = build_gpt_model(model, transformer_config(model)).eval()
    gpt.load_state_dict(dist_checkpointing.load(gpt.sharded_state_dict(), str(megatron_dir)))
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return gpt(ids, positions, None)


def add_router_sidecar(hf_dir: Path, gate_names: list[str], adapter_width: int = 16,
                       scale: float = 0.2, seed: int = 1) -> dict[str, torch.Tensor]:
    """Give an HF checkpoint a DES-MoE router side file (frozen gate = the HF gate, random
    SiLU-MLP adapter), as `desmoe-convert megatron-to-hf` writes it; returns its tensors."""
    from safetensors.torch import save_file

    weights = read_safetensors_dir(hf_dir)
    generator = torch.Generator().manual_seed(seed)
    side = {}
    for layer, gate_name in enumerate(gate_names):
        gate = weights[gate_name]
        experts, hidden = gate.shape
        side[f"decoder.layers.{layer}.mlp.router.weight"] = gate
        side[f"decoder.layers.{layer}.mlp.router.adapter.fc1.weight"] = \
            scale * torch.randn(adapter_width, hidden, generator=generator)
        side[f"decoder.layers.{layer}.mlp.router.adapter.fc2.weight"] = \
            scale * torch.randn(experts, adapter_width, generator=generator)
    save_file(side, str(Path(hf_dir) / "desmoe_router.safetensors"))
    return side
