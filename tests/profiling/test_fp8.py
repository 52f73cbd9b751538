"""FP8 settings and support checks. The refusals are tested on CPU (this machine has no GPU
and no Transformer Engine, so the real checks must fire); recipe/capability rules with
injected machine facts; a real FP8 step only where CUDA and TE exist."""

import dataclasses
import typing

import pytest
import torch

from megatron_desmoe.errors import ConfigError
from megatron_desmoe.models.presets import get_preset
from megatron_desmoe.profiling.fp8 import (
    FP8_RECIPES,
    REQUIREMENTS,
    check_fp8_shapes,
    check_fp8_supported,
    detect_te_version,
    fp8_settings,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ----------------------------------------------------------------------------- settings


def test_settings_are_transformer_config_fields_with_valid_values():
    from megatron_desmoe.compat import ensure_megatron_importable

    ensure_megatron_importable()
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = {f.name: f for f in dataclasses.fields(TransformerConfig)}
    allowed_recipes = typing.get_args(typing.get_args(fields["fp8_recipe"].type)[0])
    allowed_formats = typing.get_args(typing.get_args(fields["fp8"].type)[0])
    for recipe in FP8_RECIPES:
        settings = fp8_settings(recipe)
        assert set(settings) <= set(fields), set(settings) - set(fields)
        assert settings["fp8_recipe"] == recipe and recipe in allowed_recipes
        assert settings["fp8"] in allowed_formats
        assert settings["moe_router_dtype"] == "fp32"  # router math stays fp32
        assert settings["fp8_param"] is False
        assert settings["moe_router_padding_for_quantization"] is False


def test_default_formats_and_override():
    assert fp8_settings("delayed")["fp8"] == "hybrid"
    assert fp8_settings("mxfp8")["fp8"] == "e4m3"
    assert fp8_settings("blockwise", "hybrid")["fp8"] == "hybrid"
    assert fp8_settings("delayed")["fp8_amax_history_len"] == 1024


@pytest.mark.parametrize("recipe, field", [("custom", "fp8_recipe"), ("fp4", "fp8_recipe")])
def test_unknown_or_custom_recipe_is_refused(recipe, field):
    with pytest.raises(ConfigError) as error:
        fp8_settings(recipe)
    assert error.value.field == field and "delayed" in str(error.value)


def test_unknown_format_is_refused():
    with pytest.raises(ConfigError, match="fp8_format"):
        fp8_settings("delayed", "e5m2")


# ----------------------------------------------------------------------------- this machine


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_fp8_is_refused_here_without_gpu(recipe):
    with pytest.raises(ConfigError) as error:
        check_fp8_supported(recipe)
    assert error.value.field == "fp8"
    assert "GPU" in str(error.value) and "Fix:" in str(error.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="TE needs CUDA")
def test_transformer_engine_is_absent_here():
    assert detect_te_version() is None


# ----------------------------------------------------------------------------- rules


def test_no_gpu_message():
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        check_fp8_supported("delayed", capability=None, te_version="2.8.0", cuda_version="12.9")


def test_no_transformer_engine_message():
    with pytest.raises(ConfigError, match="Transformer Engine, which is not installed") as error:
        check_fp8_supported("delayed", capability=(9, 0), te_version=None, cuda_version="12.9")
    assert error.value.field == "fp8"


@pytest.mark.parametrize("recipe, capability, words", [
    ("delayed", (8, 0), "capability 8.0"),        # A100: no FP8 tensor cores
    ("tensorwise", (8, 6), "capability 8.6"),
    ("blockwise", (8, 9), "9.0"),                 # Ada lacks block scaling
    ("mxfp8", (9, 0), "Blackwell"),               # Hopper lacks MXFP8
    ("mxfp8", (12, 0), "10.x/11.x"),              # consumer Blackwell: not yet in TE
])
def test_capability_without_recipe_is_refused(recipe, capability, words):
    with pytest.raises(ConfigError) as error:
        check_fp8_supported(recipe, capability=capability, te_version="2.8.0", cuda_version="12.9")
    assert error.value.field == "fp8_recipe" and words in str(error.value)


def test_advice_names_the_recipes_this_gpu_has():
    with pytest.raises(ConfigError) as error:
        check_fp8_supported("mxfp8", capability=(9, 0), te_version="2.8.0", cuda_version="12.9")
    assert "['delayed', 'tensorwise', 'blockwise']" in str(error.value)
    with pytest.raises(ConfigError, match="no FP8 tensor cores"):
        check_fp8_supported("delayed", capability=(8, 0), te_version="2.8.0", cuda_version="12.9")


def test_cuda_and_te_versions():
    with pytest.raises(ConfigError, match="CUDA >= 12.9"):
        check_fp8_supported("blockwise", capability=(9, 0), te_version="2.8.0", cuda_version="12.4")
    with pytest.raises(ConfigError, match="transformer-engine >= 2.2.0.dev0"):
        check_fp8_supported("tensorwise", capability=(9, 0), te_version="2.1.0", cuda_version="12.4")
    with pytest.raises(ConfigError, match="Ada"):
        check_fp8_supported("delayed", capability=(8, 9), te_version="2.8.0", cuda_version="12.0")


@pytest.mark.parametrize("capability, supported", [
    ((8, 9), {"delayed", "tensorwise"}),
    ((9, 0), {"delayed", "tensorwise", "blockwise"}),
    ((10, 0), set(FP8_RECIPES)),
])
def test_supported_matrix(capability, supported):
    found = set()
    for recipe in FP8_RECIPES:
        try:
            assert check_fp8_supported(recipe, capability=capability, te_version="2.8.0",
                                       cuda_version="12.9") is REQUIREMENTS[recipe]
            found.add(recipe)
        except ConfigError:
            pass
    assert found == supported


def test_shapes_need_alignment():
    model = get_preset("mixtral-tiny")  # hidden 64, expert width 128
    check_fp8_shapes(model, "delayed", seq_len=64, micro_batch=1)
    check_fp8_shapes(model, "mxfp8", seq_len=64, micro_batch=1)
    with pytest.raises(ConfigError, match="hidden_size"):
        check_fp8_shapes(model.replace(hidden_size=72, kv_channels=18), "delayed", seq_len=64,
                         micro_batch=1)
    with pytest.raises(ConfigError, match="multiple of 32"):
        check_fp8_shapes(model.replace(moe_ffn_hidden_size=48), "mxfp8", seq_len=64, micro_batch=1)
    with pytest.raises(ConfigError, match="seq_len"):
        check_fp8_shapes(model, "delayed", seq_len=20, micro_batch=1)
    with pytest.raises(ConfigError, match="seq_len"):  # sequence parallel splits the tokens
        check_fp8_shapes(model, "delayed", seq_len=16, micro_batch=1, tensor_parallel=2,
                         sequence_parallel=True)


# ----------------------------------------------------------------------------- GPU only


def _te_present() -> bool:
    return detect_te_version() is not None


@pytest.mark.cuda
@pytest.mark.te
@needs_cuda
@pytest.mark.skipif(not _te_present(), reason="needs Transformer Engine")
@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_desmoe_fp8_training_step_on_gpu(recipe):
    """TE layer spec + DES-MoE router/experts under FP8: one training step runs, the router
    (frozen gate and adapter) computes in fp32, the loss is finite."""
    try:
        check_fp8_supported(recipe)
    except ConfigError as error:
        pytest.skip(str(error))
    from megatron_desmoe.desmoe.config import DESMoEConfig
    from megatron_desmoe.megatron.domain_context import domain_ids_context
    from megatron_desmoe.megatron.router import DESMoERouter
    from megatron_desmoe.megatron.spec import desmoe_moe_classes
    from megatron_desmoe.models.builder import ParallelConfig, build_gpt_model, transformer_config
    from megatron_desmoe.parallel import init_model_parallel

    init_model_parallel(ParallelConfig())
    model_cfg = get_preset("mixtral-tiny")
    config = transformer_config(model_cfg, backend="te", dtype="bf16", **fp8_settings(recipe))
    desmoe = DESMoEConfig(num_domains=2, adapter_hidden_size=64)
    model = build_gpt_model(model_cfg, config, moe_classes=desmoe_moe_classes(desmoe)).cuda()
    probs_dtypes = []
    half = model_cfg.num_experts // 2
    mask = torch.zeros(2, model_cfg.num_experts, dtype=torch.bool, device="cuda")
    mask[0, :half], mask[1, half:] = True, True  # each domain may train half the experts
    for router in (m for m in model.modules() if isinstance(m, DESMoERouter)):
        router.kd_weight, router.isolation_active = 1.0, True
        router.affinity.mask = mask.clone()
        router.register_forward_hook(lambda m, i, o: probs_dtypes.append(o[0].dtype))
    for block in model.modules():
        if hasattr(block, "isolation_active") and not isinstance(block, DESMoERouter):
            block.isolation_active = True
    tokens = torch.randint(0, model_cfg.vocab_size, (2, 64), device="cuda")
    positions = torch.arange(64, device="cuda").expand(2, 64)
    # TransformerBlock enters TE's fp8_autocast itself when config.fp8 is set
    with domain_ids_context(torch.tensor([0, 1], device="cuda"), 2):
        loss = model(tokens, positions, None, labels=tokens).float().mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert probs_dtypes and all(dtype == torch.float32 for dtype in probs_dtypes)
