"""Compatibility layer: makes Megatron-Core importable and runnable where CUDA is absent."""

from megatron_desmoe.compat.cpu import apply_cpu_patches, applied_patches, cuda_absent


def ensure_megatron_importable() -> list[str]:
    """Call before importing megatron.core anywhere in the package. Idempotent."""
    return apply_cpu_patches()


__all__ = ["apply_cpu_patches", "applied_patches", "cuda_absent", "ensure_megatron_importable"]
