"""Megatron-Core glue for DES-MoE: router / experts subclasses plugged in through specs,
the domain-id channel, affinity synchronisation and the per-step controller."""
