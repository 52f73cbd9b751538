"""desmoe-convert: checkpoint conversion between Hugging Face and Megatron-Core.

  desmoe-convert hf-to-megatron HF_DIR OUT_DIR [--tp 2 --pp 2 --ep 2]   (under torchrun for >1 rank)
  desmoe-convert megatron-to-hf MEGATRON_DIR OUT_DIR [--max-shard-size 5GB] [--router-export fit|keep]
  desmoe-convert show-config HF_DIR                                       (the MoEModelConfig it maps to)

Bad input (unknown architecture, config/weights mismatch, layout, existing output, truncated
files) exits with status 2 and one line naming the field or tensor. See docs/conversion.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from megatron_desmoe.conversion.errors import CheckpointError
from megatron_desmoe.errors import ConfigError

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="desmoe-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    to_mcore = commands.add_parser("hf-to-megatron", help="HF safetensors -> Megatron dist checkpoint")
    to_mcore.add_argument("hf_dir", type=Path)
    to_mcore.add_argument("out_dir", type=Path)
    to_mcore.add_argument("--tp", type=int, default=1, help="tensor parallel size of the saved layout")
    to_mcore.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    to_mcore.add_argument("--ep", type=int, default=1, help="expert parallel size")
    to_mcore.add_argument("--etp", type=int, default=1, help="expert tensor parallel size")
    to_mcore.add_argument("--dtype", default="auto", help="auto (the checkpoint's), fp32, bf16 or fp16")
    to_mcore.add_argument("--ignore-router-sidecar", action="store_true",
                          help="use the HF gate even if desmoe_router.safetensors is present")
    _common(to_mcore)

    to_hf = commands.add_parser("megatron-to-hf", help="Megatron dist checkpoint -> HF safetensors")
    to_hf.add_argument("megatron_dir", type=Path)
    to_hf.add_argument("out_dir", type=Path)
    to_hf.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (e.g. 5GB, 500MB)")
    to_hf.add_argument("--dtype", default=None, help="cast weights (fp32, bf16, fp16); default: keep")
    to_hf.add_argument("--router-export", choices=("fit", "keep"), default="fit",
                       help="DES-MoE checkpoints: fit a linear gate to the adapted router (default) "
                            "or keep the pretrained gate; the exact router goes to a side file either way")
    to_hf.add_argument("--calibration-tokens", type=Path, default=None,
                       help="token ids [N, S] (.pt/.npy/.json) for the gate fit; default random ids")
    to_hf.add_argument("--calibration-samples", type=int, default=32, help="random sequences if no file")
    to_hf.add_argument("--calibration-seq-len", type=int, default=128)
    to_hf.add_argument("--calibration-seed", type=int, default=0)
    to_hf.add_argument("--ridge", type=float, default=1e-3, help="shrinkage of the fit towards the pretrained gate")
    _common(to_hf)

    show = commands.add_parser("show-config", help="print the MoEModelConfig an HF checkpoint maps to")
    show.add_argument("hf_dir", type=Path)
    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or summary")


def run(args: argparse.Namespace) -> None:
    if args.command == "hf-to-megatron":
        from megatron_desmoe.conversion.hf_to_megatron import convert_hf_to_megatron
        from megatron_desmoe.models.builder import ParallelConfig

        parallel = ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp,
                                  expert_parallel=args.ep, expert_tensor_parallel=args.etp,
                                  sequence_parallel=args.tp > 1)
        convert_hf_to_megatron(args.hf_dir, args.out_dir, parallel, dtype=args.dtype,
                               overwrite=args.overwrite, use_router_sidecar=not args.ignore_router_sidecar,
                               progress=not args.no_progress)
    elif args.command == "megatron-to-hf":
        from megatron_desmoe.conversion.megatron_to_hf import convert_megatron_to_hf
        from megatron_desmoe.conversion.router_export import CalibrationSettings

        calibration = CalibrationSettings(
            tokens_path=args.calibration_tokens, num_sequences=args.calibration_samples,
            seq_len=args.calibration_seq_len, seed=args.calibration_seed, ridge=args.ridge)
        convert_megatron_to_hf(args.megatron_dir, args.out_dir, max_shard_size=args.max_shard_size,
                               dtype=args.dtype, router_export=args.router_export,
                               calibration=calibration, overwrite=args.overwrite,
                               progress=not args.no_progress)
    else:
        from megatron_desmoe.conversion.hf_to_megatron import hf_model_config
        from megatron_desmoe.conversion.model_json import model_to_dict

        print(json.dumps(model_to_dict(hf_model_config(args.hf_dir)), indent=2))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    had_process_group = _process_group_exists()
    try:
        run(args)
    except (ConfigError, CheckpointError) as err:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"{prefix}desmoe-convert: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        if not had_process_group and _process_group_exists():
            from megatron_desmoe.parallel import destroy_parallel

            destroy_parallel()  # the groups this command created
    return 0


def _process_group_exists() -> bool:
    if "torch.distributed" not in sys.modules:
        return False
    import torch.distributed as dist

    return dist.is_initialized()


if __name__ == "__main__":
    sys.exit(main())
