#!/usr/bin/env bash
# OLMoE-1B-7B (6.9B, 64 experts top-8, 16 layers). One node: DP 8 with EP 8.
# Small enough that data parallelism alone carries it; the alltoall dispatcher moves tokens.
source "$(dirname "$0")/_launch.sh"
launch --config "$REPO/examples/configs/olmoe_1b_7b.yaml" \
  --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 \
  --expert-model-parallel-size 8 --moe-token-dispatcher-type alltoall \
  --use-distributed-optimizer --bf16 \
  --transformer-impl transformer_engine --fp8-format hybrid --fp8-recipe tensorwise "$@"
