"""`desmoe-train`: multi-domain fine-tuning, launched like Megatron-LM jobs.

    torchrun --nproc-per-node 8 -m megatron_desmoe.training.cli --config run.yaml \\
        --tensor-model-parallel-size 2 --expert-model-parallel-size 4 --sequence-parallel

`--dry-run` validates the configuration against the world size given by torchrun (or
--world-size without torchrun) and prints the parallel plan without building anything.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from megatron_desmoe.errors import ConfigError


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    world_size = _pop_world_size(argv)
    from megatron_desmoe.training.config import parse_args

    try:
        config, args = parse_args(argv)
        if args.dry_run:
            return _dry_run(config, world_size)
        from megatron_desmoe.training.trainer import run_training, summary_json

        summary = run_training(config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary_json(summary))
    return 0


def _pop_world_size(argv: list[str]) -> Optional[int]:
    if "--world-size" in argv:
        index = argv.index("--world-size")
        value = int(argv[index + 1])
        del argv[index:index + 2]
        return value
    return None


def _dry_run(config, world_size: Optional[int]) -> int:
    """Build the parallel plan and validate the config, without process groups or GPUs."""
    from megatron_desmoe.training.trainer import plan_run

    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    domains = config.domains or _blend_domains(config)
    plan = plan_run(config, world, domains, dry_run=True)
    print("dry run: configuration valid")
    print(plan.describe())
    return 0


def _blend_domains(config) -> list[str]:
    if config.data_blend and os.path.isfile(config.data_blend):
        from megatron_desmoe.training.data import fine_tuning_domains

        return fine_tuning_domains(config)
    return ["domain0"]  # dry runs of launch scripts without the data at hand


if __name__ == "__main__":
    sys.exit(main())
