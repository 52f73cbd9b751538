"""desmoe-profile: training throughput, MFU and memory of a model and layout, per precision,
stock router vs DES-MoE.

Examples
  # CPU smoke run (fp32, stock vs DES-MoE)
  desmoe-profile --preset mixtral-tiny --seq-len 64 --warmup 1 --steps 2 --out-dir prof/

  # one H100: BF16 and every FP8 recipe on a 2-layer Mixtral-8x7B slice
  desmoe-profile --preset mixtral-8x7b --set num_layers=2 --seq-len 4096 --out-dir prof/

  # 8 GPUs, EP=8
  torchrun --nproc-per-node 8 -m megatron_desmoe.profiling.cli --preset qwen3-30b-a3b \\
      --set num_layers=8 --ep 8 --seq-len 4096 --out-dir prof/

Writes <out-dir>/profile.json and <out-dir>/profile.png (rank 0) and prints the table.
Exit status 0 when at least one run was measured, 2 for a configuration error (message
names the field), 3 when every requested precision was skipped (reasons printed).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from megatron_desmoe.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="desmoe-profile", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default="mixtral-tiny",
                        help="model preset (megatron_desmoe.models.presets), default mixtral-tiny")
    source.add_argument("--hf-config", type=Path,
                        help="a Hugging Face config.json (or its directory) instead of a preset")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a model field, e.g. --set num_layers=2 (repeatable)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--num-microbatches", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    parser.add_argument("--ep", type=int, default=1, help="expert parallel size")
    parser.add_argument("--etp", type=int, default=1, help="expert tensor parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    parser.add_argument("--sequence-parallel", action="store_true",
                        help="sequence parallelism (required with --tp > 1)")
    parser.add_argument("--dispatcher", default="alltoall", choices=("alltoall", "allgather"))
    parser.add_argument("--precisions", default="auto",
                        help="comma list of fp32,bf16,fp16,fp8-delayed,fp8-tensorwise,"
                             "fp8-blockwise,fp8-mxfp8; auto = bf16 + all FP8 on a GPU, fp32 on CPU")
    parser.add_argument("--fp8-format", choices=("e4m3", "hybrid"),
                        help="FP8 format (default: hybrid for delayed/tensorwise, e4m3 otherwise)")
    parser.add_argument("--routers", default="stock,desmoe", help="comma list of stock,desmoe")
    parser.add_argument("--backend", default="auto", choices=("auto", "local", "te"))
    parser.add_argument("--num-domains", type=int, default=4)
    parser.add_argument("--kd-weight", type=float, default=1.0,
                        help="distillation weight during the DES-MoE run")
    parser.add_argument("--mask-alpha", type=float, default=0.3,
                        help="Dirichlet concentration of the random affinity behind the mask")
    parser.add_argument("--desmoe", action="append", default=[], metavar="FIELD=VALUE",
                        help="DESMoEConfig field, e.g. --desmoe adapter_hidden_size=512")
    parser.add_argument("--peak-tflops", type=float,
                        help="device peak TFLOP/s for MFU when the device is not in the table")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out-dir", type=Path, default=Path("profile_out"),
                        help="where profile.json and profile.png go")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--fp8-support", action="store_true",
                        help="only print which FP8 recipes this machine supports, then exit")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.fp8_support:
        print(fp8_support_report())
        return 0
    try:
        spec = spec_from_args(args)
    except ConfigError as error:
        print(f"desmoe-profile: {error}", file=sys.stderr)
        return 2
    from megatron_desmoe.parallel.setup import destroy_parallel, is_rank0
    from megatron_desmoe.profiling.profiler import run_profile
    from megatron_desmoe.profiling.report import format_table, plot, write_json

    try:
        result = run_profile(spec, log=lambda msg: is_rank0() and print(msg, flush=True))
    except ConfigError as error:
        print(f"desmoe-profile: {error}", file=sys.stderr)
        destroy_parallel()
        return 2
    if is_rank0():
        print()
        print(format_table(result))
        json_path = write_json(result, args.out_dir / "profile.json")
        print(f"\nwrote {json_path}")
        if not args.no_plot:
            png = plot(result, args.out_dir / "profile.png")
            if png:
                print(f"wrote {png}")
    destroy_parallel()
    return 0 if result["runs"] else 3


def spec_from_args(args):
    from megatron_desmoe.models.builder import ParallelConfig
    from megatron_desmoe.profiling.profiler import ProfileSpec

    model = resolve_model(args.preset, args.hf_config, _assignments(args.set, "--set"))
    parallel = ParallelConfig(
        tensor_parallel=args.tp, pipeline_parallel=args.pp, expert_parallel=args.ep,
        expert_tensor_parallel=args.etp, sequence_parallel=args.sequence_parallel,
        dispatcher=args.dispatcher)
    precisions = () if args.precisions == "auto" else _names(args.precisions)
    return ProfileSpec(
        model=model, parallel=parallel, seq_len=args.seq_len, micro_batch=args.micro_batch,
        num_microbatches=args.num_microbatches, warmup_steps=args.warmup,
        timed_steps=args.steps, precisions=precisions, routers=_names(args.routers),
        backend=args.backend, fp8_format=args.fp8_format, num_domains=args.num_domains,
        kd_weight=args.kd_weight, mask_alpha=args.mask_alpha,
        desmoe_options=_assignments(args.desmoe, "--desmoe"), peak_tflops=args.peak_tflops,
        seed=args.seed,
    ).validate()


def resolve_model(preset: Optional[str], hf_config: Optional[Path], overrides: dict):
    from megatron_desmoe.models.presets import get_preset

    if hf_config is not None:
        model = model_from_hf_config(hf_config)
        return model.replace(**overrides).validate() if overrides else model.validate()
    return get_preset(preset or "mixtral-tiny", **overrides)


def model_from_hf_config(path: Path):
    """MoEModelConfig of a Hugging Face config.json through the conversion adapters."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError("hf_config", f"{path} does not exist", "pass a config.json or its folder")
    try:
        from megatron_desmoe.conversion.adapters import adapter_for_model_type
        from transformers import AutoConfig
    except ImportError as error:
        raise ConfigError("hf_config", f"Hugging Face configs need the conversion package and "
                          f"transformers ({error})", "use --preset instead") from error
    values = json.loads(path.read_text())
    model_type = values.pop("model_type", None)
    if model_type is None:
        raise ConfigError("config.json:model_type", "missing", "pass a Hugging Face model config")
    adapter = adapter_for_model_type(model_type)
    hf = AutoConfig.for_model(model_type, **values)
    return adapter.model_config(hf, path.parent.name or model_type)


def fp8_support_report() -> str:
    from megatron_desmoe.profiling.fp8 import FP8_RECIPES, REQUIREMENTS, check_fp8_supported

    lines = []
    for recipe in FP8_RECIPES:
        try:
            check_fp8_supported(recipe)
            lines.append(f"fp8-{recipe}: supported ({REQUIREMENTS[recipe].describe()})")
        except ConfigError as error:
            lines.append(f"fp8-{recipe}: NOT supported: {error}")
    return "\n".join(lines)


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _assignments(items: Sequence[str], flag: str) -> dict:
    values = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(flag, f"{item!r} is not FIELD=VALUE", f"write e.g. {flag} num_layers=2")
        key, raw = item.split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare string, e.g. method=full
        values[key.strip()] = value
    return values


if __name__ == "__main__":
    sys.exit(main())
