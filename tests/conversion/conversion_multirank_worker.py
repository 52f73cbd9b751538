"""torchrun worker for tests/conversion/test_conversion_multirank.py.

usage: torchrun --nproc-per-node N conversion_multirank_worker.py OUT_ROOT TP,PP,EP,ETP=HF_DIR[,HF_DIR..] ...

1. converts each HF_DIR to OUT_ROOT/tp{TP}pp{PP}ep{EP}etp{ETP}/<its name> at that layout;
2. checks OLMoE's full-width q/k RMSNorm at TP=2 (outputs and gradients of every input)
   against the same norm at TP=1, and prints QK_NORM_TP2_OK.
"""

import sys
from pathlib import Path
from types import SimpleNamespace


def convert_all(out_root: Path, spec: str) -> None:
    from megatron_desmoe.conversion import convert_hf_to_megatron
    from megatron_desmoe.models.builder import ParallelConfig

    layout, hf_dirs = spec.split("=")
    tp, pp, ep, etp = (int(value) for value in layout.split(","))
    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep,
                              expert_tensor_parallel=etp, sequence_parallel=tp > 1)
    for hf_dir in hf_dirs.split(","):
        target = out_root / f"tp{tp}pp{pp}ep{ep}etp{etp}" / Path(hf_dir).name
        convert_hf_to_megatron(Path(hf_dir), target, parallel, progress=False)


def check_full_width_qk_norm_tp2() -> None:
    import torch
    from megatron.core import parallel_state

    from megatron_desmoe.models.builder import ParallelConfig
    from megatron_desmoe.models.qk_norm import FullWidthQKRMSNorm
    from megatron_desmoe.parallel import init_model_parallel

    init_model_parallel(ParallelConfig(tensor_parallel=2))
    rank = parallel_state.get_tensor_model_parallel_rank()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 4, 16, generator=generator)  # [s, b, heads, head_dim]
    upstream = torch.randn(5, 3, 4, 16, generator=generator)
    weight = 1 + 0.1 * torch.randn(4, 16, generator=generator)
    for heads, count in (("query", 4), ("key", 2)):
        full, full_x, full_out = _norm_run(FullWidthQKRMSNorm, heads, count, 1, weight[:count], x, upstream)
        local_heads = slice(rank * count // 2, (rank + 1) * count // 2)
        local, local_x, local_out = _norm_run(FullWidthQKRMSNorm, heads, count, 2, weight[local_heads],
                                              x[:, :, local_heads], upstream[:, :, local_heads])
        torch.testing.assert_close(local_out, full_out[:, :, local_heads])
        torch.testing.assert_close(local_x.grad, full_x.grad[:, :, local_heads])
        torch.testing.assert_close(local.weight.grad, full.weight.grad.view(count, 16)[local_heads].reshape(-1),
                                   rtol=1e-5, atol=1e-5)
    print("QK_NORM_TP2_OK", flush=True)


def _norm_run(norm_cls, heads, count, tp, weight, x, upstream):
    import torch

    config = SimpleNamespace(num_attention_heads=4, num_query_groups=2, tensor_model_parallel_size=tp,
                             params_dtype=torch.float32)
    norm = norm_cls(16, config, eps=1e-5, heads=heads)
    with torch.no_grad():
        norm.weight.copy_(weight.reshape(-1))
    inputs = x[:, :, :count].clone().requires_grad_() if tp == 1 else x.clone().requires_grad_()
    output = norm(inputs)
    (output * (upstream[:, :, :count] if tp == 1 else upstream)).sum().backward()
    return norm, inputs, output


def main() -> None:
    for spec in sys.argv[2:]:
        convert_all(Path(sys.argv[1]), spec)
    check_full_width_qk_norm_tp2()


if __name__ == "__main__":
    main()
