#!/usr/bin/env bash
# The paper's setting: DeepSeek-V2-Lite (15.7B, 64 routed + 2 shared experts, MLA) on
# 16 GPUs (2 nodes x 8), six domains. 27 layers do not split into 2 or 4 pipeline stages,
# so the model is spread by expert parallelism: EP 8 x DP 16, distributed optimizer.
# FP8 (hybrid, blockwise scaling) on Hopper; drop the two fp8 flags for BF16.
#   NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node0> bash examples/deepseek_v2_lite_16gpu.sh
NNODES=${NNODES:-2}
source "$(dirname "$0")/_launch.sh"
launch --config "$REPO/examples/configs/deepseek_v2_lite.yaml" \
  --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 \
  --expert-model-parallel-size 8 --moe-token-dispatcher-type alltoall \
  --use-distributed-optimizer --overlap-grad-reduce --bf16 \
  --transformer-impl transformer_engine --fp8-format hybrid --fp8-recipe blockwise "$@"
