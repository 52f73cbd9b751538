"""DES-MoE (Dynamic Expert Specialization) for NVIDIA Megatron-Core MoE models.

Layout:
  desmoe/      the paper's mechanisms in plain PyTorch (one module per mechanism)
  megatron/    Megatron-Core glue: router / experts / layer subclasses, optimizer hooks
  models/      typed model presets, layer specs and the GPT model builder
  parallel/    process-group setup (model code stays free of parallelism)
  data/        preprocessing to indexed datasets with domain labels
  training/    the multi-domain fine-tuning trainer
  conversion/  Hugging Face <-> Megatron checkpoints
  profiling/   throughput / FP8 profiler
"""

__version__ = "0.1.0"
