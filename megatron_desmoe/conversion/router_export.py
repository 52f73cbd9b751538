"""Exporting DES-MoE's adapted router, and re-importing it.

A DES-MoE Megatron checkpoint holds, per MoE layer, the frozen pretrained gate under the stock
name `...mlp.router.weight` plus the adapter under `...mlp.router.adapter.*`. Stock HF
architectures have only a linear gate, so the export offers two modes:

  fit  (default) the HF gate is a linear gate fitted to the adapted router's logits on
       calibration router inputs; per-layer top-k agreement is reported.
  keep the HF gate is the frozen pretrained gate (stock HF models then route like the
       pretrained model); nothing is approximated in the side file.

In both modes the exact router state (frozen gate + adapter tensors, Megatron names) is
written to `desmoe_router.safetensors` beside the HF weights, which `desmoe-convert
hf-to-megatron` re-imports, so HF -> Megatron gives back the DES-MoE checkpoint bit for bit.
HF stock code ignores the side file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from megatron_desmoe.conversion.errors import CheckpointError
from megatron_desmoe.conversion.hf_io import read_header, readable_by_all
from megatron_desmoe.conversion.router_fit import Agreement, fit_linear_gate, topk_agreement
from megatron_desmoe.errors import ConfigError

ROUTER_SIDECAR = "desmoe_router.safetensors"
ROUTER_SIDECAR_JSON = "desmoe_router.json"
ROUTER_EXPORT_MODES = ("fit", "keep")
DEFAULT_ROUTER_EXPORT = "fit"
ADAPTER_FORMULA = "logits = x @ router.weight^T + adapter.fc2.weight @ silu(adapter.fc1.weight @ x)"

_ADAPTER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.mlp\.router\.adapter\.(.+)$")

# (layer, router input [N, H] float32) -> adapted router logits [N, E]
AdaptedLogitsFn = Callable[[int, torch.Tensor], torch.Tensor]


def is_adapter_key(key: str) -> bool:
    return _ADAPTER_KEY.match(key) is not None


def router_weight_name(layer: int) -> str:
    return f"decoder.layers.{layer}.mlp.router.weight"


def adapters_by_layer(tensors: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """{layer: {"fc1.weight": ..., ...}} from adapter tensors under Megatron names."""
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _ADAPTER_KEY.match(key)
        if match:
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
    return layers


def mlp_adapted_logits(frozen_gates: dict[int, torch.Tensor],
                       adapters: dict[int, dict[str, torch.Tensor]]) -> AdaptedLogitsFn:
    """Adapted logits of DES-MoE's RouterAdapter (hidden -> a -> experts, SiLU, no bias).

    Pass your own `AdaptedLogitsFn` to the Python API for any other adapter structure.
    """
    for layer, params in adapters.items():
        if set(params) != {"fc1.weight", "fc2.weight"}:
            raise ConfigError(
                f"decoder.layers.{layer}.mlp.router.adapter", f"holds {sorted(params)}, not the "
                "fc1/fc2 SiLU MLP this export knows", "pass adapted_logits= to "
                "convert_megatron_to_hf, or export with --router-export keep")
    weights = {layer: (frozen_gates[layer].float(), p["fc1.weight"].float(), p["fc2.weight"].float())
               for layer, p in adapters.items()}

    def adapted(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        gate, fc1, fc2 = weights[layer]
        return F.linear(hidden, gate) + F.linear(F.silu(F.linear(hidden, fc1)), fc2)

    return adapted


@dataclass
class CalibrationSettings:
    """Where router inputs for the fit come from."""

    tokens_path: Optional[Path] = None  # .pt/.npy int tensor [N, S] or .json list of lists
    num_sequences: int = 32  # random-token fallback
    seq_len: int = 128
    batch_size: int = 4
    seed: int = 0
    ridge: float = 1e-3  # shrinkage towards the pretrained gate, relative to the mean eigenvalue
    heldout_fraction: float = 0.2  # tokens kept out of a first fit to report held-out agreement


def calibration_tokens(settings: CalibrationSettings, vocab_size: int) -> torch.Tensor:
    """Calibration token ids [N, S]: the user's file, or seeded uniform random ids."""
    if settings.tokens_path is None:
        generator = torch.Generator().manual_seed(settings.seed)
        return torch.randint(0, vocab_size, (settings.num_sequences, settings.seq_len), generator=generator)
    path = Path(settings.tokens_path)
    if path.suffix == ".npy":
        import numpy as np
        tokens = torch.from_numpy(np.load(path))
    elif path.suffix == ".json":
        tokens = torch.tensor(json.loads(path.read_text()))
    else:
        tokens = torch.load(path, weights_only=True)
    tokens = torch.as_tensor(tokens).long()
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2 or tokens.numel() == 0:
        raise ConfigError("calibration_tokens", f"{path} holds shape {list(tokens.shape)}", "store ids as [N, S]")
    if int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size:
        raise ConfigError("calibration_tokens", f"{path} has ids outside [0, {vocab_size})",
                          "tokenise with the model's tokenizer")
    return tokens


@dataclass
class LayerFit:
    """Routing agreement with the adapted router, per MoE layer (top-k sets)."""

    layer: int
    tokens: int
    fitted: Agreement  # fitted gate on all calibration tokens (what fit exports)
    heldout: Optional[Agreement]  # gate fitted without the held-out tokens, measured on them
    frozen: Agreement  # pretrained gate (what keep mode's HF weights route with)

    def as_dict(self) -> dict:
        return dict(layer=self.layer, tokens=self.tokens, fitted=self.fitted.as_dict(),
                    heldout=self.heldout.as_dict() if self.heldout else None,
                    frozen=self.frozen.as_dict())


def fit_router_gates(hidden_by_layer: dict[int, torch.Tensor], adapted_logits: AdaptedLogitsFn,
                     frozen_gates: dict[int, torch.Tensor], topk: int,
                     settings: CalibrationSettings) -> tuple[dict[int, torch.Tensor], list[LayerFit]]:
    """Fitted linear gate per MoE layer, and how well each reproduces the adapted routing."""
    gates, fits = {}, []
    for layer in sorted(hidden_by_layer):
        hidden = hidden_by_layer[layer].float()
        target = adapted_logits(layer, hidden).float()
        frozen = frozen_gates[layer]
        gate = fit_linear_gate(hidden, target, frozen, settings.ridge)
        gates[layer] = gate
        fits.append(LayerFit(
            layer=layer, tokens=hidden.shape[0],
            fitted=topk_agreement(target, hidden @ gate.float().T, topk),
            heldout=_heldout_agreement(hidden, target, frozen, topk, settings),
            frozen=topk_agreement(target, hidden @ frozen.float().T, topk),
        ))
    return gates, fits


def _heldout_agreement(hidden, target, frozen, topk, settings) -> Optional[Agreement]:
    count = hidden.shape[0]
    held = int(count * settings.heldout_fraction)
    if held < 1 or held >= count:
        return None
    order = torch.randperm(count, generator=torch.Generator().manual_seed(settings.seed))
    test, train = order[:held], order[held:]
    gate = fit_linear_gate(hidden[train], target[train], frozen, settings.ridge)
    return topk_agreement(target[test], hidden[test] @ gate.float().T, topk)


def agreement_table(fits: list[LayerFit]) -> str:
    lines = ["layer  tokens  fitted exact/overlap  held-out exact/overlap  frozen-gate exact/overlap"]
    for fit in fits:
        held = f"{fit.heldout.exact:6.3f} / {fit.heldout.overlap:6.3f}" if fit.heldout else "     n/a       "
        lines.append(f"{fit.layer:5d}  {fit.tokens:6d}  {fit.fitted.exact:6.3f} / {fit.fitted.overlap:6.3f}"
                     f"        {held}          {fit.frozen.exact:6.3f} / {fit.frozen.overlap:6.3f}")
    return "\n".join(lines)


# ------------------------------------------------------------------ side file
def write_router_sidecar(directory: Path, tensors: dict[str, torch.Tensor], info: dict) -> None:
    """Exact router state (Megatron names) + a JSON note saying what the HF gate holds."""
    path = Path(directory) / ROUTER_SIDECAR
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(path),
              metadata={"format": "pt", "content": "desmoe-router"})
    readable_by_all(path)
    payload = dict(format_version=1, formula=ADAPTER_FORMULA,
                   loader="desmoe-convert hf-to-megatron re-imports this file "
                          "(megatron_desmoe.conversion.convert_hf_to_megatron)", **info)
    (Path(directory) / ROUTER_SIDECAR_JSON).write_text(json.dumps(payload, indent=2) + "\n")


def check_router_sidecar(tensors: dict[str, torch.Tensor], model) -> None:
    """Side-file tensors must be frozen gates or adapters of MoE layers; gates [experts, hidden]."""
    moe_layers = {layer for layer, moe in enumerate(model.moe_layer_pattern) if moe}
    for name, tensor in tensors.items():
        match = re.match(r"^decoder\.layers\.(\d+)\.mlp\.router\.(weight|adapter\..+)$", name)
        if match is None or int(match.group(1)) not in moe_layers:
            raise CheckpointError(f"{ROUTER_SIDECAR}:{name}", "is not a router tensor of an MoE layer "
                                  "of this model", f"remove {ROUTER_SIDECAR} or use --ignore-router-sidecar")
        if match.group(2) == "weight" and tuple(tensor.shape) != (model.num_experts, model.hidden_size):
            raise CheckpointError(f"{ROUTER_SIDECAR}:{name}", f"shape {list(tensor.shape)}, the model "
                                  f"needs {[model.num_experts, model.hidden_size]}", "use the side file "
                                  "written with these weights")


def read_router_sidecar(directory: Path) -> Optional[dict[str, torch.Tensor]]:
    path = Path(directory) / ROUTER_SIDECAR
    if not path.exists():
        return None
    read_header(path)  # raises on truncation, naming the file
    return load_file(str(path))
