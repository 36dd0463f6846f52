#!/usr/bin/env bash
# One device call (issue 18): continue the embedded toy base's transformer on a GPU with scenes
# weighted toward the tags the base cannot do (position, colour binding, counting, two objects),
# then score it without and with CFG on the machine's CPUs. Results land in $OUT/tagged/.
#   run with: flowrl's wheels on PYTHONPATH and this repository as the working directory
set -euo pipefail
OUT=${OUT:-outputs/gpu-toy-base}
MINUTES=${MINUTES:-5.5}
mkdir -p "$OUT/tagged"
nvidia-smi -L || true
start=$(date +%s)
python3 -m flowrl toy pretrain --init assets/toy-sd3 --out /tmp/toy-tagged --device cuda --workers 14 \
    --scenes 400000 --batch 2048 --lr 1e-3 --minutes "$MINUTES" \
    --tag-weights single_object=0.5,colors=0.5,two_object=1.5,counting=1.5,position=2.5,color_attr=2.5 2>&1 | tail -n 5
echo "pretrain: $(( $(date +%s) - start )) s"
python3 -m flowrl toy sample --model /tmp/toy-tagged --cfg 1 --cfg 4.5 --out /tmp/eval-tagged 2>&1 | tail -n 30
cp /tmp/toy-tagged/transformer/diffusion_pytorch_model.safetensors /tmp/toy-tagged/flowrl_toy.json \
   /tmp/toy-tagged/pretrain_log.jsonl /tmp/eval-tagged/summary.json "$OUT/tagged/"
echo "total: $(( $(date +%s) - start )) s"
