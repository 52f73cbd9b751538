"""Parallel-equivalence worker: one training step at a parallel layout vs. one rank.

Two phases, each a separate process group:

* `reference` (plain `python worker.py reference ...`, a world of one): builds the preset
  on one rank, saves its initial weights with `dist_checkpointing.save`, runs one
  train_step over the whole global batch and saves (again with dist_checkpointing, keyed
  like the model's own sharded state dict) every parameter's final gradient (main_grad,
  after finalize_model_grads) and every parameter/buffer after the optimizer step, plus
  loss / grad norm / token count as JSON.
* `layouts` (under torchrun, N ranks): for each named layout, builds the same preset at that
  layout, `dist_checkpointing.load`s the initial weights (Megatron reshards them), runs
  the same step with this data-parallel rank's share of the global batch, then loads the
  reference gradients and parameters *into this rank's own layout* (Megatron reshards
  them again) and compares them tensor by tensor with its own local gradients / parameters.
  Every rank checks every local tensor, replicas included (a replica that diverged on one
  rank only is caught). Rank 0 writes `results/<layout>.json`.

Layout `*_sabotaged` perturbs one expert weight on one rank after loading: its report must
show mismatches (proves the harness can fail). `dp2_distopt_skip` checks
`optimizer_step_skipping` under the distributed optimizer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_desmoe.compat import ensure_megatron_importable

ensure_megatron_importable()

from megatron.core import dist_checkpointing, parallel_state  # noqa: E402
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory  # noqa: E402
from megatron.core.distributed.param_and_grad_buffer import shard_buffer  # noqa: E402

from megatron_desmoe.models.builder import ParallelConfig  # noqa: E402
from megatron_desmoe.models.presets import get_preset  # noqa: E402
from megatron_desmoe.parallel import init_distributed, init_model_parallel  # noqa: E402
from megatron_desmoe.training import (  # noqa: E402
    TrainHooks,
    build_optimizer,
    build_training_model,
    main_params_of,
    train_step,
    unwrap_model,
)

SEED = 1234
MICRO_BATCHES = 4  # global batch: 4 micro-batches of 2 sequences of 32 tokens
MICRO_BATCH_SIZE = 2
SEQ_LENGTH = 32
# Adam's first step is lr * g / (|g| + eps): for entries with |g| near the default eps (1e-8)
# it flips between 0 and +-lr on 1e-7 relative gradient noise (measured: 1.8e-4 relative
# parameter differences under TP=2 with eps=1e-8 and gradients equal to 5e-7). eps=1e-4
# keeps the update smooth in g (Lipschitz lr/eps), so parameters after the step can be
# held to the same 1e-5 tolerance as the gradients while updates stay ~lr in size.
OPTIMIZER = dict(lr=1e-3, weight_decay=0.1, clip_grad=1.0, adam_eps=1e-4)
RTOL = 1e-5  # max |got - ref| <= RTOL * max |ref| + ATOL, per tensor
ATOL = 1e-8


@dataclass(frozen=True)
class Layout:
    parallel: ParallelConfig
    world_size: int
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    sabotage: bool = False
    skip_check: bool = False
    extra: dict = field(default_factory=dict)


def _p(**kwargs) -> ParallelConfig:
    return ParallelConfig(**kwargs)


LAYOUTS: dict[str, Layout] = {
    "tp2_sp": Layout(_p(tensor_parallel=2, sequence_parallel=True), 2),
    "ep2_allgather": Layout(_p(expert_parallel=2, dispatcher="allgather"), 2),
    "ep2_alltoall": Layout(_p(expert_parallel=2, dispatcher="alltoall"), 2),
    "pp2": Layout(_p(pipeline_parallel=2), 2),
    "dp2_distopt": Layout(_p(), 2, use_distributed_optimizer=True),
    "dp2_overlap": Layout(_p(), 2, overlap_grad_reduce=True, extra=dict(bucket_size=4096)),
    "ep2_alltoall_sabotaged": Layout(_p(expert_parallel=2, dispatcher="alltoall"), 2, sabotage=True),
    "dp2_distopt_skip": Layout(_p(), 2, use_distributed_optimizer=True, skip_check=True),
    "pp2_ep2_distopt": Layout(_p(pipeline_parallel=2, expert_parallel=2), 4,
                              use_distributed_optimizer=True),
    "tp2_sp_pp2": Layout(_p(tensor_parallel=2, sequence_parallel=True, pipeline_parallel=2), 4),
}


def log(msg: str) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    print(f"[rank {rank}] {msg}", flush=True)


# ------------------------------------------------------------------------------ data


def global_batch(vocab_size: int) -> list[dict]:
    """The same MICRO_BATCHES micro-batches in every process; some loss tokens masked."""
    generator = torch.Generator().manual_seed(SEED + 1)
    batches = []
    for index in range(MICRO_BATCHES):
        tokens = torch.randint(0, vocab_size, (MICRO_BATCH_SIZE, SEQ_LENGTH + 1), generator=generator)
        loss_mask = torch.ones(MICRO_BATCH_SIZE, SEQ_LENGTH)
        loss_mask[index % MICRO_BATCH_SIZE, : 3 + index] = 0.0  # different counts per micro-batch
        batches.append(dict(tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(),
                            loss_mask=loss_mask,
                            position_ids=torch.arange(SEQ_LENGTH).expand(MICRO_BATCH_SIZE, -1)))
    return batches


def my_share(batches: list[dict]) -> list[dict]:
    """This data-parallel rank's contiguous share of the global batch."""
    dp = parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_data_parallel_rank()
    per_rank = len(batches) // dp
    return batches[rank * per_rank:(rank + 1) * per_rank]


# ------------------------------------------------------------------- sharded tensors


def tensor_entries(model) -> dict:
    """The model's sharded state dict restricted to tensor entries (params and buffers)."""
    sharded = unwrap_model(model).sharded_state_dict()
    return {key: entry for key, entry in sharded.items()
            if isinstance(entry, (ShardedTensor, ShardedTensorFactory))}


def param_entries(model) -> dict:
    """{key: (entry, param)} for every trainable parameter, matched by identity."""
    params = {id(param): param for param in unwrap_model(model).parameters() if param.requires_grad}
    found = {}
    for key, entry in tensor_entries(model).items():
        if id(entry.data) in params:
            found[key] = (entry, params[id(entry.data)])
    matched = {id(param) for _, param in found.values()}
    missing = [name for name, param in unwrap_model(model).named_parameters()
               if param.requires_grad and id(param) not in matched]
    if missing:
        raise RuntimeError(f"parameters without a sharded state-dict entry: {missing}")
    return found


def with_data(entries: dict, data_of) -> dict:
    """Copies of the entries whose data is data_of(key, entry)."""
    return {key: dataclasses.replace(entry, data=data_of(key, entry)) for key, entry in entries.items()}


def gather_distributed_grads(model_chunks) -> None:
    """With the distributed optimizer each rank holds only its reduced shard of main_grad:
    all-gather the shards so every main_grad is the full reduced gradient (test-only)."""
    for chunk in model_chunks:
        if not chunk.ddp_config.use_distributed_optimizer:
            continue
        for group in chunk.bucket_groups + chunk.expert_parallel_bucket_groups:
            size = group.intra_distributed_optimizer_instance_size
            if size == 1:
                continue
            rank = group.intra_distributed_optimizer_instance_rank
            for bucket in group.buckets:
                shards = shard_buffer(bucket.grad_data, size)
                mine = shards[rank].clone()
                dist.all_gather(list(shards), mine, group=group.intra_distributed_optimizer_instance_group)


class CaptureGrads(TrainHooks):
    def __init__(self):
        self.grads: dict[int, torch.Tensor] = {}

    def before_optimizer_step(self, model_chunks, optimizer):
        gather_distributed_grads(model_chunks)
        for chunk in model_chunks:
            for param in unwrap_model(chunk).parameters():
                if param.requires_grad:
                    self.grads[id(param)] = param.main_grad.detach().clone().float()
        return None


def compare(got: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float]:
    """(within tolerance, max abs difference relative to max |ref|)."""
    if got.shape != ref.shape:
        return False, float("inf")
    got, ref = got.detach().float().cpu(), ref.detach().float().cpu()
    diff = (got - ref).abs().max().item() if got.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    ok = diff <= RTOL * scale + ATOL and bool(torch.isfinite(got).all())
    return ok, diff / scale if scale > 0 else diff


# ---------------------------------------------------------------------------- phases


def _build(preset: str, layout: Layout):
    model_cfg = get_preset(preset)
    chunks = build_training_model(
        model_cfg, layout.parallel, seed=SEED,
        use_distributed_optimizer=layout.use_distributed_optimizer,
        overlap_grad_reduce=layout.overlap_grad_reduce, **layout.extra,
    )
    return model_cfg, chunks


def run_reference(preset: str, workdir: Path) -> None:
    init_model_parallel(ParallelConfig(), seed=SEED)
    model_cfg, chunks = _build(preset, Layout(ParallelConfig(), 1))
    model = chunks[0]
    dist_checkpointing.save(unwrap_model(model).sharded_state_dict(), str(_fresh(workdir / "w0")))
    optimizer = build_optimizer(chunks, **OPTIMIZER)
    capture = CaptureGrads()
    result = train_step(chunks, optimizer, iter(global_batch(model_cfg.vocab_size)),
                        num_microbatches=MICRO_BATCHES, micro_batch_size=MICRO_BATCH_SIZE,
                        seq_length=SEQ_LENGTH, hooks=capture)
    params = param_entries(model)
    grads = with_data({k: e for k, (e, _) in params.items()},
                      lambda key, entry: capture.grads[id(params[key][1])])
    dist_checkpointing.save(grads, str(_fresh(workdir / "ref_grads")))
    dist_checkpointing.save(tensor_entries(model), str(_fresh(workdir / "ref_params")))
    (workdir / "reference.json").write_text(json.dumps(dict(
        loss=result.losses["lm loss"], grad_norm=result.grad_norm, num_tokens=result.num_tokens,
        num_params=len(params), param_keys=sorted({entry.key for entry, _ in params.values()}),
    )))
    log(f"{preset} reference: loss {result.losses['lm loss']:.6f} grad norm {result.grad_norm:.6f}")


def _fresh(path: Path) -> Path:
    if dist.get_rank() == 0:
        if path.exists():
            import shutil
            shutil.rmtree(path)
        path.mkdir(parents=True)
    dist.barrier()
    return path


def run_layout(preset: str, name: str, workdir: Path) -> dict:
    layout = LAYOUTS[name]
    if dist.get_world_size() != layout.world_size:
        raise RuntimeError(f"{name} needs {layout.world_size} ranks, got {dist.get_world_size()}")
    init_model_parallel(layout.parallel, seed=SEED)
    start = time.time()
    model_cfg, chunks = _build(preset, layout)
    model = chunks[0]
    gpt = unwrap_model(model)
    gpt.load_state_dict(dist_checkpointing.load(gpt.sharded_state_dict(), str(workdir / "w0")))
    if layout.sabotage and dist.get_rank() == 1:
        expert_weight = next(p for n, p in gpt.named_parameters() if "local_experts.0.linear_fc2" in n)
        with torch.no_grad():
            expert_weight.add_(1e-3)
    optimizer = build_optimizer(chunks, **OPTIMIZER)
    if layout.skip_check:
        return skip_check(chunks, optimizer, model_cfg)
    share = my_share(global_batch(model_cfg.vocab_size))
    capture = CaptureGrads()
    result = train_step(chunks, optimizer, iter(share), num_microbatches=len(share),
                        micro_batch_size=MICRO_BATCH_SIZE, seq_length=SEQ_LENGTH, hooks=capture)
    step_seconds = time.time() - start

    mismatches, worst = [], {"grads": 0.0, "params": 0.0}
    params = param_entries(model)
    template = with_data({k: e for k, (e, _) in params.items()},
                         lambda key, entry: torch.empty_like(entry.data))
    ref_grads = dist_checkpointing.load(template, str(workdir / "ref_grads"))
    for key, (entry, param) in params.items():
        ok, rel = compare(capture.grads[id(param)], ref_grads[key])
        worst["grads"] = max(worst["grads"], rel)
        if not ok:
            mismatches.append(f"grad {key} (rank {dist.get_rank()}): rel err {rel:.3g}")
    live = tensor_entries(model)
    ref_params = dist_checkpointing.load(
        with_data(live, lambda key, entry: torch.empty_like(entry.data)), str(workdir / "ref_params"))
    for key, entry in live.items():
        ok, rel = compare(entry.data, ref_params[key])
        worst["params"] = max(worst["params"], rel)
        if not ok:
            mismatches.append(f"param {key} (rank {dist.get_rank()}): rel err {rel:.3g}")

    reference = json.loads((workdir / "reference.json").read_text())
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(mismatches=mismatches, worst=worst,
                                          compared_grads=len(params), compared_tensors=len(live),
                                          keys=sorted({entry.key for entry, _ in params.values()})))
    covered = set().union(*(g["keys"] for g in gathered))
    report = dict(
        layout=name, preset=preset, world_size=dist.get_world_size(),
        loss=result.losses["lm loss"], ref_loss=reference["loss"],
        grad_norm=result.grad_norm, ref_grad_norm=reference["grad_norm"],
        num_tokens=result.num_tokens, ref_num_tokens=reference["num_tokens"],
        mismatches=[m for g in gathered for m in g["mismatches"]],
        worst_rel_grad=max(g["worst"]["grads"] for g in gathered),
        worst_rel_param=max(g["worst"]["params"] for g in gathered),
        compared_grads_per_rank=[g["compared_grads"] for g in gathered],
        compared_tensors_per_rank=[g["compared_tensors"] for g in gathered],
        ref_num_params=reference["num_params"],
        uncovered_param_keys=sorted(set(reference["param_keys"]) - covered),
        step_seconds=step_seconds,
    )
    return report


def skip_check(chunks, optimizer, model_cfg) -> dict:
    """optimizer_step_skipping under the distributed optimizer: skipped parameters (whole
    tensors, sharded across both ranks) and their Adam state stay bit-identical over three
    steps with weight decay on, while the other parameters move."""
    gpt = unwrap_model(chunks[0])
    named = dict(gpt.named_parameters())
    skip_names = [n for n in named if n.endswith("embedding.word_embeddings.weight")
                  or "layers.0.mlp.router.weight" in n or "local_experts.0.linear_fc1" in n
                  or n.endswith("final_layernorm.weight")]
    # and one parameter whose distributed-optimizer shard is split across both ranks
    name_of = {id(p): n for n, p in named.items()}
    mine = sorted(name_of[id(mp)] for mp, _ in main_params_of(optimizer))
    owners = [None] * dist.get_world_size()
    dist.all_gather_object(owners, mine)
    spanning = sorted(set.intersection(*(set(o) for o in owners)))
    skip_names += [n for n in spanning if n not in skip_names][:1]
    skipped = [named[n] for n in skip_names]

    class Skip(TrainHooks):
        def before_optimizer_step(self, model_chunks, optimizer_):
            return skipped

    batches = global_batch(model_cfg.vocab_size)
    kwargs = dict(micro_batch_size=MICRO_BATCH_SIZE, seq_length=SEQ_LENGTH)
    share = my_share(batches)
    train_step(chunks, optimizer, iter(share), num_microbatches=len(share), **kwargs)  # Adam state exists

    def main_state():
        states = {}
        for model_param, main_param in main_params_of(optimizer):
            for inner in _inner(optimizer):
                if main_param in inner.state:
                    st = inner.state[main_param]
                    states[id(model_param)] = {k: v.clone() for k, v in st.items() if torch.is_tensor(v)}
        return states

    before_params = {n: p.detach().clone() for n, p in named.items()}
    before_state = main_state()
    for _ in range(3):
        share = my_share(batches)
        result = train_step(chunks, optimizer, iter(share), num_microbatches=len(share),
                            hooks=Skip(), **kwargs)
    after_state = main_state()
    problems = []
    for n in skip_names:
        if not torch.equal(before_params[n], named[n]):
            problems.append(f"skipped {n} moved")
        pid = id(named[n])
        if pid in before_state:
            for k in ("exp_avg", "exp_avg_sq"):
                if not torch.equal(before_state[pid][k], after_state[pid][k]):
                    problems.append(f"skipped {n} {k} changed")
    moved = [n for n in named if n not in skip_names and not torch.equal(before_params[n], named[n])]
    if len(moved) != len(named) - len(skip_names):
        problems.append(f"only {len(moved)} of {len(named) - len(skip_names)} others moved")
    shard_owners = sum(1 for mp, _ in main_params_of(optimizer) if id(mp) in {id(p) for p in skipped})
    steps = {float(s["step"]) for inner in _inner(optimizer) for s in inner.state.values()}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(problems=problems, shards=shard_owners,
                                          states=sum(1 for n in skip_names if id(named[n]) in before_state),
                                          steps=sorted(steps)))
    return dict(layout="dp2_distopt_skip", skipped=skip_names, spanning=spanning, per_rank=gathered,
                mismatches=[p for g in gathered for p in g["problems"]],
                skipped_params=result.skipped_params)


def _inner(optimizer):
    from megatron_desmoe.training.engine import _inner_torch_optimizers
    return _inner_torch_optimizers(optimizer)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=["reference", "layouts"])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--presets", default="mixtral-tiny", help="reference: comma-separated")
    parser.add_argument("--runs", default="", help="layouts: comma-separated preset:layout")
    args = parser.parse_args()
    if args.phase == "reference":
        for preset in args.presets.split(","):
            run_reference(preset, args.workdir / preset)
        return 0
    init_distributed()
    failed = False
    for run in [r for r in args.runs.split(",") if r]:
        preset, name = run.split(":")
        try:
            report = run_layout(preset, name, args.workdir / preset)
        except Exception:  # noqa: BLE001 -- reported in the layout's JSON
            report = dict(layout=name, preset=preset, error=traceback.format_exc())
            log(f"{run} failed:\n{report['error']}")
            failed = True
        if dist.get_rank() == 0:
            results = args.workdir / preset / "results"
            results.mkdir(parents=True, exist_ok=True)
            (results / f"{name}.json").write_text(json.dumps(report, indent=1))
            log(f"{run}: {len(report.get('mismatches', []))} mismatches"
                f"{' ERROR' if 'error' in report else ''}")
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if failed:  # a failed collective may leave the ranks out of step: stop here
            break
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
