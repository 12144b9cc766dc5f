#!/bin/sh
# The paper's fine-tuning input scale (--norm paper: ACDC's statistics x 255, (x - 17155) / 21589) against
# this project's (--norm published: (x - 67.27) / 84.66), on the phantom. Two study folders that differ only
# in the fine-tunings' --norm: random weights and one epoch of BYOL from scratch, label fractions 0.1, 0.5
# and 1, seeds 0 and 1. The pretraining has the same settings and seed in both folders (study.py passes it
# --norm published or data only), which on CPU gives bit-identical backbones. About 30 minutes on 2 CPU
# cores for both folders together. Run from the repository root.
set -e
python phantom.py data/acdc-synth  # the phantom (left as it is when already complete)

# the measurement: the two studies
python study.py run --study studies/norm-published --data data/acdc-synth --device cpu --strategies none,pretrain:none:1 --fractions 0.1,0.5,1 --seeds 0,1 --pretrain-args "--size 64 --batch-size 32 --warmup-epochs 1" -- --arch resnet18 --size 64 --batch-size 16 --epochs 8 --warmup-epochs 1 --lr 2e-3 --loss ce+dice --crop-scale 0.25 1 --norm published
python study.py run --study studies/norm-paper --data data/acdc-synth --device cpu --strategies none,pretrain:none:1 --fractions 0.1,0.5,1 --seeds 0,1 --pretrain-args "--size 64 --batch-size 32 --warmup-epochs 1" -- --arch resnet18 --size 64 --batch-size 16 --epochs 8 --warmup-epochs 1 --lr 2e-3 --loss ce+dice --crop-scale 0.25 1 --norm paper

# the tables and plots (seconds), copied here
for scale in published paper; do
    python study.py report --study studies/norm-$scale
    mkdir -p docs/norm-scale/$scale
    cp studies/norm-$scale/results.md studies/norm-$scale/results.csv studies/norm-$scale/*.svg docs/norm-scale/$scale/
done
