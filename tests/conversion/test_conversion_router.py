"""DES-MoE router export: the gate fit as pure functions on synthetic data, and the fit / keep
exports of a Megatron checkpoint holding router adapters, re-imported bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conversion_models import add_router_sidecar, read_safetensors_dir, save_hf_model


def _synthetic(num_tokens=2000, hidden=32, experts=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=generator)
    frozen = 0.2 * torch.randn(experts, hidden, generator=generator)
    return generator, x, frozen


def test_fit_recovers_a_linear_target():
    from megatron_desmoe.conversion import fit_linear_gate, topk_agreement

    generator, x, frozen = _synthetic()
    target_gate = frozen + 0.1 * torch.randn(frozen.shape, generator=generator)
    fitted = fit_linear_gate(x, x @ target_gate.T, frozen, ridge=1e-9)
    torch.testing.assert_close(fitted, target_gate, rtol=1e-4, atol=1e-5)
    agreement = topk_agreement(x @ target_gate.T, x @ fitted.T, k=2)
    assert agreement.exact == 1.0 and agreement.overlap == 1.0


def test_fit_keeps_the_pretrained_gate_where_calibration_has_no_data():
    from megatron_desmoe.conversion import fit_linear_gate

    generator, x, frozen = _synthetic()
    x[:, 16:] = 0  # calibration inputs span only the first 16 directions
    target = x @ (frozen + torch.randn(frozen.shape, generator=generator)).T
    fitted = fit_linear_gate(x, target, frozen, ridge=1e-6)
    torch.testing.assert_close(fitted[:, 16:], frozen[:, 16:])


def test_fit_beats_the_frozen_gate_on_a_nonlinear_adapter():
    from megatron_desmoe.conversion import fit_linear_gate, topk_agreement

    generator, x, frozen = _synthetic()
    fc1 = 0.3 * torch.randn(16, 32, generator=generator)
    fc2 = 0.3 * torch.randn(8, 16, generator=generator)
    adapted = x @ frozen.T + F.linear(F.silu(F.linear(x, fc1)), fc2)
    fitted = fit_linear_gate(x[:1500], adapted[:1500], frozen)
    held_out = topk_agreement(adapted[1500:], x[1500:] @ fitted.T, k=2)
    frozen_agreement = topk_agreement(adapted[1500:], x[1500:] @ frozen.T, k=2)
    assert held_out.overlap > frozen_agreement.overlap + 0.1


def test_topk_agreement_counts_sets_not_order():
    from megatron_desmoe.conversion import topk_agreement

    reference = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    candidate = torch.tensor([[2.0, 3.0, 0.0, 1.0], [3.0, 1.0, 2.0, 0.0]])
    agreement = topk_agreement(reference, candidate, k=2)
    assert (agreement.exact, agreement.overlap) == (0.5, 0.75)


# ------------------------------------------------------------------ checkpoint export
@pytest.fixture(scope="module")
def desmoe_checkpoint(tmp_path_factory, world):
    """A Megatron checkpoint with DES-MoE router adapters (qwen3_moe tiny), made by importing
    an HF checkpoint plus a router side file; returns (hf dir, megatron dir, side tensors)."""
    from megatron_desmoe.conversion import convert_hf_to_megatron

    root = tmp_path_factory.mktemp("desmoe")
    hf_dir = save_hf_model("qwen3_moe", root / "hf")
    side = add_router_sidecar(hf_dir, [f"model.layers.{layer}.mlp.gate.weight" for layer in range(2)])
    convert_hf_to_megatron(hf_dir, root / "megatron", progress=False)
    return hf_dir, root / "megatron", side


def _checkpoint_tensors(directory):
    from megatron_desmoe.conversion.megatron_to_hf import load_full_tensors, tensors_metadata

    metadata = tensors_metadata(directory)
    return load_full_tensors(directory, list(metadata), metadata)


def _calibration(**changes):
    from megatron_desmoe.conversion import CalibrationSettings

    return CalibrationSettings(num_sequences=8, seq_len=32, **changes)


def test_adapters_are_imported_under_their_megatron_names(desmoe_checkpoint):
    _, megatron_dir, side = desmoe_checkpoint
    tensors = _checkpoint_tensors(megatron_dir)
    for name, tensor in side.items():
        assert torch.equal(tensors[name], tensor), name


def test_fit_export_reports_agreement_and_reimports_exactly(desmoe_checkpoint, tmp_path):
    from megatron_desmoe.conversion import convert_hf_to_megatron, convert_megatron_to_hf

    hf_dir, megatron_dir, side = desmoe_checkpoint
    convert_megatron_to_hf(megatron_dir, tmp_path / "fit", calibration=_calibration(), progress=False)
    report = json.loads((tmp_path / "fit" / "desmoe_router.json").read_text())
    assert report["mode"] == "fit" and [fit["layer"] for fit in report["agreement"]] == [0, 1]
    for fit in report["agreement"]:
        assert fit["tokens"] == 8 * 32 and fit["fitted"]["overlap"] >= fit["frozen"]["overlap"]
    exported = read_safetensors_dir(tmp_path / "fit")
    assert not torch.equal(exported["model.layers.0.mlp.gate.weight"], side["decoder.layers.0.mlp.router.weight"])
    # the side file brings back the exact DES-MoE state
    convert_hf_to_megatron(tmp_path / "fit", tmp_path / "again", progress=False)
    original, again = _checkpoint_tensors(megatron_dir), _checkpoint_tensors(tmp_path / "again")
    assert sorted(original) == sorted(again)
    assert all(torch.equal(original[k], again[k]) for k in original)


def test_keep_export_holds_the_pretrained_gate(desmoe_checkpoint, tmp_path):
    from megatron_desmoe.conversion import convert_megatron_to_hf

    hf_dir, megatron_dir, side = desmoe_checkpoint
    convert_megatron_to_hf(megatron_dir, tmp_path / "keep", router_export="keep", progress=False)
    exported = read_safetensors_dir(tmp_path / "keep")
    for layer in range(2):
        assert torch.equal(exported[f"model.layers.{layer}.mlp.gate.weight"],
                           side[f"decoder.layers.{layer}.mlp.router.weight"])
    assert json.loads((tmp_path / "keep" / "desmoe_router.json").read_text())["mode"] == "keep"


def test_ignoring_the_side_file_imports_the_fitted_gate_as_a_stock_router(desmoe_checkpoint, tmp_path):
    from megatron_desmoe.conversion import convert_hf_to_megatron, convert_megatron_to_hf

    _, megatron_dir, _ = desmoe_checkpoint
    convert_megatron_to_hf(megatron_dir, tmp_path / "fit", calibration=_calibration(), progress=False)
    convert_hf_to_megatron(tmp_path / "fit", tmp_path / "stock", use_router_sidecar=False, progress=False)
    tensors = _checkpoint_tensors(tmp_path / "stock")
    assert not any(".router.adapter." in name for name in tensors)
    assert torch.equal(tensors["decoder.layers.1.mlp.router.weight"],
                       read_safetensors_dir(tmp_path / "fit")["model.layers.1.mlp.gate.weight"])


def test_custom_adapted_logits_callable(desmoe_checkpoint, tmp_path):
    """Any router can be exported by passing its logits function; a linear one fits exactly."""
    from megatron_desmoe.conversion import convert_megatron_to_hf

    _, megatron_dir, side = desmoe_checkpoint
    shift = {layer: 0.05 * torch.randn(8, 64, generator=torch.Generator().manual_seed(layer)) for layer in range(2)}

    def adapted(layer, hidden):
        return hidden @ (side[f"decoder.layers.{layer}.mlp.router.weight"] + shift[layer]).T

    convert_megatron_to_hf(megatron_dir, tmp_path / "hf", adapted_logits=adapted,
                           calibration=_calibration(ridge=1e-9), progress=False)
    report = json.loads((tmp_path / "hf" / "desmoe_router.json").read_text())
    assert all(fit["fitted"]["exact"] == 1.0 for fit in report["agreement"])


def test_imported_adapters_load_into_the_desmoe_router(desmoe_checkpoint, world):
    """The trainer's DESMoERouter loads the imported checkpoint, and its adapted logits are
    the function the export fits (skipped while megatron_desmoe.megatron is unavailable)."""
    try:
        from megatron_desmoe.desmoe.config import DESMoEConfig
        from megatron_desmoe.megatron.router import DESMoERouter
        from megatron_desmoe.megatron.spec import desmoe_moe_classes
    except ImportError as err:
        pytest.skip(f"DES-MoE router not importable: {err}")
    from megatron.core import dist_checkpointing

    from megatron_desmoe.conversion import load_model_json
    from megatron_desmoe.conversion.router_export import adapters_by_layer, mlp_adapted_logits
    from megatron_desmoe.models.builder import ParallelConfig, build_gpt_model, transformer_config
    from megatron_desmoe.parallel import init_model_parallel

    _, megatron_dir, side = desmoe_checkpoint
    model, _ = load_model_json(megatron_dir)
    init_model_parallel(ParallelConfig())
    classes = desmoe_moe_classes(DESMoEConfig(num_domains=2, adapter_hidden_size=16))
    gpt = build_gpt_model(model, transformer_config(model), moe_classes=classes)
    gpt.load_state_dict(dist_checkpointing.load(gpt.sharded_state_dict(), str(megatron_dir)))
    frozen = {layer: side[f"decoder.layers.{layer}.mlp.router.weight"] for layer in range(2)}
    expected = mlp_adapted_logits(frozen, adapters_by_layer(side))
    hidden = torch.randn(10, model.hidden_size, generator=torch.Generator().manual_seed(3))
    routers = [m for m in gpt.modules() if isinstance(m, DESMoERouter)]
    assert [router.layer_number - 1 for router in routers] == [0, 1]
    with torch.no_grad():
        for router in routers:
            torch.testing.assert_close(router.gating(hidden), expected(router.layer_number - 1, hidden))
