"""FP8 training through Transformer Engine: recipe settings and up-front support checks.

Megatron-Core 0.19.2 accepts `TransformerConfig.fp8` in {"e4m3", "hybrid"} and
`fp8_recipe` in {"delayed", "tensorwise", "blockwise", "mxfp8", "custom"}; its
`fp8_utils.get_fp8_recipe` maps them to Transformer Engine recipes:

| recipe     | TE recipe             | TE (Megatron's gate) | hardware (TE's own check)                 | GEMM row alignment |
|------------|-----------------------|----------------------|-------------------------------------------|-----|
| delayed    | DelayedScaling        | >= 1.7 (MoE FP8)     | compute capability >= 8.9 (Ada: CUDA >= 12.1) | 16 |
| tensorwise | Float8CurrentScaling  | >= 2.2.0.dev0        | compute capability >= 8.9                  | 16 |
| blockwise  | Float8BlockScaling    | >= 2.3.0.dev0        | compute capability >= 9.0 and CUDA >= 12.9 | 16 |
| mxfp8      | MXFP8BlockScaling     | >= 2.1.0             | compute capability 10.x/11.x (Blackwell; not 12.x) | 32 |

"custom" needs a user quantizer factory and is not offered here.

DES-MoE specifics:
  * the router (frozen gate and adapter) computes in fp32: `moe_router_dtype="fp32"` is set by
    `transformer_config`, and the adapter casts its weights to fp32 and uses plain
    `torch.nn.functional.linear`, which TE's fp8_autocast does not touch;
  * routed experts stay SequentialMLP (no grouped GEMM, see `validate_megatron_config`);
    each expert's rows are padded to the recipe's alignment inside the experts
    (`SequentialMLP._pad_tensor_for_quantization`, also used by DES-MoE's live rows), so
    router-side padding (`moe_router_padding_for_quantization`) stays off; it would add
    zero-probability pseudo-routes after the router, which are harmless but pointless here;
  * `fp8_param` stays off: DES-MoE's blocked rows read the expert weights directly
    (`_detached_expert_mlp`), which must be high-precision tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_desmoe.errors import ConfigError

FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
FP8_FORMATS = ("e4m3", "hybrid")

_DETECT = object()  # sentinel: read the value from this machine


@dataclass(frozen=True)
class RecipeRequirements:
    recipe: str
    min_te: str  # lowest Transformer Engine version Megatron-Core 0.19.2 builds the recipe with
    min_capability: tuple[int, int]
    below_capability: Optional[tuple[int, int]]  # exclusive upper bound, None = none
    min_cuda: Optional[tuple[int, int]]  # CUDA toolkit torch was built with
    default_format: str
    alignment: int  # rows/columns of every FP8 GEMM operand must be a multiple of this
    hardware: str  # in words, for messages

    def describe(self) -> str:
        return (f"{self.recipe}: {self.hardware}, transformer-engine >= {self.min_te}, "
                f"GEMM dims multiple of {self.alignment}")


REQUIREMENTS: dict[str, RecipeRequirements] = {
    "delayed": RecipeRequirements(
        "delayed", "1.7.0", (8, 9), None, None, "hybrid", 16,
        "compute capability >= 8.9 (Ada, Hopper, Blackwell)"),
    "tensorwise": RecipeRequirements(
        "tensorwise", "2.2.0.dev0", (8, 9), None, None, "hybrid", 16,
        "compute capability >= 8.9 (Ada, Hopper, Blackwell)"),
    "blockwise": RecipeRequirements(
        "blockwise", "2.3.0.dev0", (9, 0), None, (12, 9), "e4m3", 16,
        "compute capability >= 9.0 (Hopper or newer) and CUDA >= 12.9"),
    "mxfp8": RecipeRequirements(
        "mxfp8", "2.1.0", (10, 0), (12, 0), None, "e4m3", 32,
        "compute capability 10.x/11.x (Blackwell data-centre GPUs)"),
}


def fp8_settings(recipe: str, fp8_format: Optional[str] = None) -> dict:
    """`transformer_config` keyword arguments that turn on FP8 with `recipe`.

    Pass them as `transformer_config(model, parallel, backend="te", dtype="bf16",
    **fp8_settings(recipe))`. Pure: checks nothing about the machine (see
    `check_fp8_supported`).
    """
    requirements = _requirements(recipe)
    fmt = fp8_format or requirements.default_format
    if fmt not in FP8_FORMATS:
        raise ConfigError("fp8_format", f"unknown FP8 format {fmt!r}", f"use one of {FP8_FORMATS}")
    settings = dict(
        fp8=fmt,
        fp8_recipe=recipe,
        fp8_param=False,  # DES-MoE's blocked expert rows read the weights in high precision
        moe_router_padding_for_quantization=False,  # experts pad their own rows
        moe_router_dtype="fp32",
    )
    if recipe == "delayed":
        # Megatron-LM's FP8 example settings for delayed scaling.
        settings.update(fp8_amax_history_len=1024, fp8_amax_compute_algo="max")
    return settings


def check_fp8_supported(
    recipe: str,
    *,
    capability=_DETECT,
    te_version=_DETECT,
    cuda_version=_DETECT,
) -> RecipeRequirements:
    """Raise ConfigError unless `recipe` can run here; return its requirements.

    Checks, in order: a known recipe, a CUDA GPU, Transformer Engine installed, TE new
    enough for the recipe, compute capability and CUDA version, then (where TE is present
    and nothing was injected) TE's own availability check. The keyword arguments override
    what is read from this machine (tests): capability (major, minor) or None for no GPU,
    te_version "x.y.z" or None for no TE, cuda_version "12.4" or None.
    """
    requirements = _requirements(recipe)
    injected = not (capability is _DETECT and te_version is _DETECT and cuda_version is _DETECT)
    if capability is _DETECT:
        capability = detect_capability()
    if te_version is _DETECT:
        te_version = detect_te_version()
    if cuda_version is _DETECT:
        cuda_version = torch.version.cuda
    if capability is None:
        raise ConfigError(
            "fp8", f"FP8 ({recipe}) needs a CUDA GPU and none is visible",
            "run on a GPU machine (compute capability >= 8.9), or profile bf16/fp32 only",
        )
    if te_version is None:
        raise ConfigError(
            "fp8", f"FP8 ({recipe}) runs through Transformer Engine, which is not installed "
            "or does not import here",
            "install it on the GPU machine (tools/setup_env.sh installs requirements-gpu.txt "
            "where nvidia-smi finds a GPU), or drop FP8",
        )
    if _version(te_version) < _version(requirements.min_te):
        raise ConfigError(
            "fp8_recipe", f"{recipe} needs transformer-engine >= {requirements.min_te} with "
            f"Megatron-Core 0.19.2, found {te_version}",
            "upgrade Transformer Engine or use fp8_recipe='delayed'",
        )
    capability = tuple(capability)
    cc = f"{capability[0]}.{capability[1]}"
    if capability < requirements.min_capability or (
        requirements.below_capability is not None and capability >= requirements.below_capability
    ):
        raise ConfigError(
            "fp8_recipe", f"{recipe} needs {requirements.hardware}; this GPU has compute "
            f"capability {cc}", _fallback_advice(capability),
        )
    if capability == (8, 9) and cuda_version and _cuda(cuda_version) < (12, 1):
        raise ConfigError("fp8", f"FP8 on Ada (8.9) needs CUDA >= 12.1, torch was built with "
                          f"CUDA {cuda_version}", "use a CUDA 12.1+ build of torch")
    if requirements.min_cuda and (not cuda_version or _cuda(cuda_version) < requirements.min_cuda):
        need = ".".join(map(str, requirements.min_cuda))
        raise ConfigError(
            "fp8_recipe", f"{recipe} needs CUDA >= {need}, torch was built with CUDA "
            f"{cuda_version}", f"use a CUDA {need}+ build (NGC PyTorch 25.06 or newer) or "
            "fp8_recipe='tensorwise'/'delayed'",
        )
    if not injected:
        _te_says_supported(recipe)
    return requirements


def check_fp8_shapes(model, recipe: str, *, seq_len: int, micro_batch: int,
                     tensor_parallel: int = 1, sequence_parallel: bool = False) -> None:
    """Refuse shapes TE's FP8 GEMMs reject: every GEMM dimension of the dense and attention
    layers (per TP shard) and the token count per micro-batch must be a multiple of the
    recipe's alignment. Routed-expert row counts are padded by the experts themselves."""
    align = _requirements(recipe).alignment
    tp = tensor_parallel
    dims = {
        "hidden_size": model.hidden_size,
        "moe_ffn_hidden_size / TP": model.moe_ffn_hidden_size // tp,
        "num_attention_heads * head_dim / TP": model.num_attention_heads * model.head_dim // tp,
    }
    if model.first_k_dense:
        dims["ffn_hidden_size / TP"] = model.ffn_hidden_size // tp
    if model.shared_expert_hidden_size:
        dims["shared_expert_hidden_size / TP"] = model.shared_expert_hidden_size // tp
    for name, value in dims.items():
        if value % align:
            raise ConfigError(
                name, f"{value} is not a multiple of {align}, which FP8 ({recipe}) GEMMs need",
                f"use a multiple of {align} or profile bf16",
            )
    tokens = seq_len * micro_batch // (tp if sequence_parallel else 1)
    if tokens % align:
        raise ConfigError(
            "seq_len", f"{tokens} tokens per micro-batch (per TP rank) is not a multiple of "
            f"{align}, which FP8 ({recipe}) GEMMs need", f"pick seq_len * micro_batch divisible "
            f"by {align * (tp if sequence_parallel else 1)}",
        )


def detect_capability() -> Optional[tuple[int, int]]:
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability())


def detect_te_version() -> Optional[str]:
    try:
        import transformer_engine
    except Exception:  # TE raises RuntimeError (not ImportError) where CUDA is missing
        return None
    version = getattr(transformer_engine, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version
        version = dist_version("transformer_engine")
    return version


# ----------------------------------------------------------------------------- helpers


def _requirements(recipe: str) -> RecipeRequirements:
    if recipe == "custom":
        raise ConfigError("fp8_recipe", "'custom' needs a user quantizer factory "
                          "(fp8_quantizer_factory), which the profiler does not take",
                          f"use one of {FP8_RECIPES}")
    if recipe not in REQUIREMENTS:
        raise ConfigError("fp8_recipe", f"unknown FP8 recipe {recipe!r}", f"use one of {FP8_RECIPES}")
    return REQUIREMENTS[recipe]


def _fallback_advice(capability: tuple[int, int]) -> str:
    usable = [r for r, req in REQUIREMENTS.items()
              if req.min_capability <= capability
              and (req.below_capability is None or capability < req.below_capability)]
    if usable:
        return f"use one of {usable} on this GPU"
    return "this GPU has no FP8 tensor cores: profile bf16"


def _te_says_supported(recipe: str) -> None:
    """Ask Transformer Engine itself (its check knows driver/cuBLAS limits we do not)."""
    try:
        from transformer_engine.pytorch.fp8 import FP8GlobalStateManager as manager
    except Exception:
        try:
            from transformer_engine.pytorch.quantization import FP8GlobalStateManager as manager
        except Exception:
            return
    probe = {
        "delayed": "is_fp8_available",
        "tensorwise": "is_fp8_available",
        "blockwise": "is_fp8_block_scaling_available",
        "mxfp8": "is_mxfp8_available",
    }[recipe]
    check = getattr(manager, probe, None)
    if check is None:
        return
    available, reason = check()
    if not available:
        raise ConfigError("fp8_recipe", f"Transformer Engine reports {recipe} unavailable on "
                          f"this GPU: {reason}", _fallback_advice(detect_capability() or (0, 0)))


def _version(text: str):
    from packaging.version import Version
    return Version(text)


def _cuda(text: str) -> tuple[int, int]:
    major, minor = (str(text).split(".") + ["0"])[:2]
    return int(major), int(minor)
