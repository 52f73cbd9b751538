"""Everything Megatron-Core 0.19 needs to run without CUDA, in one place.

Megatron-Core assumes a GPU in many places (device="cuda" factories, torch.cuda.current_device,
streams, events, CUDA RNG state). On a CPU-only machine (tests, the tiny quickstart) the
patches below make those calls fall back to the CPU. Each patch is a small function whose
docstring names the failure it fixes. `apply_cpu_patches()` applies them only when CUDA is
absent; on a GPU machine it does nothing, so no GPU run ever sees a patch.

Call `install_import_stubs()` before the first `import megatron.core` (the package's
`megatron_desmoe.compat.ensure_megatron_importable()` does both in the right order).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
import types
from typing import Callable

import torch

_APPLIED: list[str] = []


def cuda_absent() -> bool:
    return not torch.cuda.is_available()


def applied_patches() -> list[str]:
    """Names of the patches applied in this process (empty on GPU machines)."""
    return list(_APPLIED)


# --------------------------------------------------------------------------- import time


def install_import_stubs() -> None:
    """Failure: `import megatron.core` -> ModuleNotFoundError: No module named 'triton'.

    megatron/core/transformer/moe/ops/paged_stash.py imports triton unconditionally and is
    reached from pipeline_parallel.schedules. Paged stashing is a CUDA-graph feature we never
    use; a stub for that single module (not a fake global `triton`, which breaks
    torch._inductor) lets the import chain finish. Applied only where triton is missing.
    """
    name = "megatron.core.transformer.moe.ops.paged_stash"
    if name in sys.modules or importlib.util.find_spec("triton") is not None:
        return
    stub = types.ModuleType(name)
    stub.GLOBAL_BLOCK_SIZE = 1024

    def _needs_triton(*args, **kwargs):
        raise RuntimeError("paged stash kernels need triton and CUDA")

    stub.paged_stash_copy_kernel = _needs_triton
    stub.paged_stash_pop_kernel = _needs_triton
    sys.modules[name] = stub
    _APPLIED.append("paged_stash_import_stub")


# --------------------------------------------------------------------------- device mapping


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True  # torch reads a bare int device as cuda:<int>
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _to_cpu_device(device):
    return torch.device("cpu") if _is_cuda_device(device) else device


def _map_device_kwarg(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    wrapper.__desmoe_cpu_patch__ = True
    return wrapper


_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "linspace", "eye",
    "rand", "randn", "randint", "randperm", "empty_like", "zeros_like", "ones_like",
    "full_like", "rand_like", "randn_like", "empty_strided", "frombuffer",
)


def patch_tensor_factories() -> None:
    """Failure: RuntimeError: Torch not compiled with CUDA enabled / "Found no NVIDIA driver".

    DDP grad buffers, the optimizer, pipeline p2p, RoPE, causal masks, GlobalMemoryBuffer and
    router aux-loss trackers create tensors with device="cuda" or
    device=torch.cuda.current_device(). Factories map a CUDA device to the CPU instead.
    """
    # `with torch.device(...)` finds factories in a set it caches on first use; build it from
    # the original functions, or those contexts (transformers' meta init) stop applying.
    from torch.utils._device import _device_constructors

    _device_constructors()
    for name in _FACTORIES:
        fn = getattr(torch, name, None)
        if fn is not None and not getattr(fn, "__desmoe_cpu_patch__", False):
            setattr(torch, name, _map_device_kwarg(fn))


def patch_tensor_moves() -> None:
    """Failure: AssertionError "Torch not compiled with CUDA enabled" from Tensor.cuda(),
    Tensor.to("cuda"/int) and Module.cuda(), e.g. Router.gating moving its weight to
    torch.cuda.current_device(), batches moved with .cuda(non_blocking=True), and
    pin_memory in the data loader path.
    """
    original_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and _is_cuda_device(args[0]):
            args = (torch.device("cpu"),) + args[1:]
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return original_to(self, *args, **kwargs)

    torch.Tensor.to = to
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self


def patch_tensor_new_factories() -> None:
    """Failure: RuntimeError "Cannot access accelerator device when none is available" from
    `input.new_empty(..., device=torch.cuda.current_device())` in the uneven all-to-all of
    megatron.core.tensor_parallel.mappings._AllToAll (alltoall token dispatcher with EP > 1).
    Tensor.new_* map a CUDA device to the CPU like the torch.* factories.
    """
    for name in ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor"):
        fn = getattr(torch.Tensor, name)
        if not getattr(fn, "__desmoe_cpu_patch__", False):
            setattr(torch.Tensor, name, _map_device_kwarg(fn))


class _NoOpStream:
    """Stands in for torch.cuda.Stream / Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args):
        pass

    def wait_event(self, *args):
        pass

    def record_event(self, *args):
        return _NoOpStream()

    def record(self, *args):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def patch_cuda_runtime() -> None:
    """Failure: RuntimeError "torch.cuda.Stream requires CUDA support" (alltoall dispatcher
    and TransformerLayer constructors), "Torch not compiled with CUDA enabled" from
    torch.cuda.current_device / synchronize / memory queries used by the pipeline schedules,
    timers and the dispatcher's _maybe_dtoh_and_synchronize.
    """
    cuda = torch.cuda
    cuda.Stream = _NoOpStream
    cuda.Event = _NoOpStream
    cuda.current_stream = lambda *args, **kwargs: _NoOpStream()
    cuda.default_stream = lambda *args, **kwargs: _NoOpStream()
    cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    cuda.synchronize = lambda *args, **kwargs: None
    cuda.current_device = lambda: 0
    cuda.set_device = lambda *args, **kwargs: None
    cuda.empty_cache = lambda: None
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved",
                 "max_memory_reserved"):
        setattr(cuda, name, lambda *args, **kwargs: 0)
    cuda.reset_peak_memory_stats = lambda *args, **kwargs: None


def patch_cuda_rng() -> None:
    """Failure: RuntimeError from torch.cuda.get_rng_state / set_rng_state in
    megatron.core.tensor_parallel.random (CudaRNGStatesTracker.add, fork, and
    _get/_set_cuda_rng_state used by checkpointed recompute and model-parallel seeding).

    Without CUDA the "CUDA RNG" of a tracker is the CPU generator state: forking saves the
    CPU state, seeds it, and restores it afterwards, which keeps TP-rank dropout streams
    distinct just as on GPU.
    """
    from megatron.core.tensor_parallel import random as mrandom

    def _get_cuda_rng_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def _set_cuda_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = _get_cuda_rng_state
    mrandom._set_cuda_rng_state = _set_cuda_rng_state
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    # The tracker seeds "the CUDA generator" and snapshots it: seed the CPU one instead.
    # (torch.manual_seed itself calls torch.cuda.manual_seed_all: that one stays a no-op.)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: None


def patch_clip_grads_type_check() -> None:
    """Failure: AssertionError in megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32
    / get_grad_norm_fp32, which assert `grad.type() == 'torch.cuda.FloatTensor'`.

    The fp32 check is kept, only the device part is relaxed: CPU float grads pass.
    """
    original_type = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None:
            name = original_type(self)
            return name.replace("torch.", "torch.cuda.", 1) if self.device.type == "cpu" else name
        return original_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_


def patch_alltoall_split_sizes() -> None:
    """Failure: TypeError "all_to_all_single(): incompatible function arguments" from the
    alltoall token dispatcher with EP > 1: its _maybe_dtoh_and_synchronize turns the split
    sizes into numpy arrays through moe_utils.maybe_move_tensor_to_cpu, which converts only
    CUDA tensors, so on the CPU they stay tensors. CPU tensors are converted the same way.
    """
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu
    if getattr(original, "__desmoe_cpu_patch__", False):
        return

    @functools.wraps(original)
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.detach().numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    maybe_move_tensor_to_cpu.__desmoe_cpu_patch__ = True
    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def patch_yarn_rope_device() -> None:
    """Failure: RuntimeError "Cannot access accelerator device when none is available" when
    MLASelfAttention builds YarnRotaryEmbedding: it is not passed use_cpu_initialization and
    enters `with torch.device(torch.cuda.current_device())`. Forces CPU construction.
    """
    from megatron.core.models.common.embeddings import yarn_rotary_pos_embedding as yarn

    original_init = yarn.YarnRotaryEmbedding.__init__

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        kwargs["use_cpu_initialization"] = True
        original_init(self, *args, **kwargs)

    yarn.YarnRotaryEmbedding.__init__ = __init__


def silence_rng_fork_warning() -> None:
    """Not a failure: CudaRNGStatesTracker.fork logs "CPU RNG state changed within GPU RNG
    context" on every dropout-carrying forward, because without CUDA the tracker's streams
    *are* the CPU generator (patch_cuda_rng). The message is expected here, so it is filtered.
    """
    import logging

    class _DropForkWarning(logging.Filter):
        def filter(self, record):
            return "CPU RNG state changed within GPU RNG context" not in record.getMessage()

    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_DropForkWarning())


_PATCHES: tuple[Callable[[], None], ...] = (
    patch_tensor_factories,
    patch_tensor_moves,
    patch_tensor_new_factories,
    patch_cuda_runtime,
    patch_cuda_rng,
    patch_clip_grads_type_check,
    patch_alltoall_split_sizes,
    patch_yarn_rope_device,
    silence_rng_fork_warning,
)


def apply_cpu_patches() -> list[str]:
    """Apply every CPU patch once, only when CUDA is absent. Returns the applied names."""
    install_import_stubs()
    if not cuda_absent():
        return applied_patches()
    for patch in _PATCHES:
        if patch.__name__ not in _APPLIED:
            patch()
            _APPLIED.append(patch.__name__)
    return applied_patches()
