"""torchrun entry for tests: run_training(TrainConfig(**json)) and write the summary (rank 0).

The __main__ guard matters: Megatron's checkpoint writer starts a multiprocessing Manager
with the 'spawn' method, which re-imports the main module."""
import json
import sys
from dataclasses import asdict


def main() -> None:
    import torch.distributed as dist

    from megatron_desmoe.training.config import TrainConfig
    from megatron_desmoe.training.trainer import run_training

    summary = run_training(TrainConfig(**json.loads(sys.argv[1])))
    if dist.get_rank() == 0:
        with open(sys.argv[2], "w") as handle:
            json.dump(asdict(summary), handle)


if __name__ == "__main__":
    main()
