#!/usr/bin/env bash
# Mixtral-8x7B (46.7B, 8 experts top-2). One node: TP 2 (+SP) x PP 4, EP 2.
# SLURM, 4 nodes (32 GPUs): TP 2 x PP 4 x DP 4 with EP 8 (every expert on its own rank).
# FP8 delayed scaling (hybrid format) is the recipe Megatron-Core documents for Mixtral.
source "$(dirname "$0")/_launch.sh"
if [ "$NNODES" -ge 4 ]; then EP=8; else EP=2; fi
launch --config "$REPO/examples/configs/mixtral_8x7b.yaml" \
  --tensor-model-parallel-size 2 --sequence-parallel --pipeline-model-parallel-size 4 \
  --expert-model-parallel-size "$EP" --moe-token-dispatcher-type alltoall \
  --use-distributed-optimizer --overlap-grad-reduce --bf16 \
  --transformer-impl transformer_engine --fp8-format hybrid --fp8-recipe delayed "$@"
