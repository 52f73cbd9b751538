"""Process-group setup. Model code never touches this: it reads parallel_state."""

from megatron_desmoe.parallel.setup import (
    destroy_parallel,
    init_distributed,
    init_model_parallel,
    is_rank0,
)

__all__ = ["destroy_parallel", "init_distributed", "init_model_parallel", "is_rank0"]
