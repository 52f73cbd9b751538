#!/usr/bin/env bash
# Qwen3-30B-A3B (30.5B, 128 experts top-8, 48 layers). One node: PP 2 x DP 4, EP 4.
# 2 nodes: PP 2 x DP 8 with EP 8. Fine-grained experts favour EP over TP.
source "$(dirname "$0")/_launch.sh"
if [ "$NNODES" -ge 2 ]; then EP=8; else EP=4; fi
launch --config "$REPO/examples/configs/qwen3_30b_a3b.yaml" \
  --tensor-model-parallel-size 1 --pipeline-model-parallel-size 2 \
  --expert-model-parallel-size "$EP" --moe-token-dispatcher-type alltoall \
  --use-distributed-optimizer --overlap-grad-reduce --bf16 \
  --transformer-impl transformer_engine --fp8-format hybrid --fp8-recipe blockwise "$@"
