#!/bin/sh
# The paper's fine-tuning input scale (--norm paper: ACDC's statistics x 255, (x - 17155) / 21589) against
# this project's (--norm published: (x - 67.27) / 84.66), on the phantom. Two study folders that differ only
# in the fine-tunings' --norm: random weights and one epoch of BYOL from scratch, label fractions 0.1, 0.5
# and 1, seeds 0 and 1. The pretraining has the same settings and seed in both folders (study.py passes it
# --norm published or data only), which on CPU gives bit-identical backbones: the measurement ran it once,
# in norm-published, and copied its folder into norm-paper before that study's run (step 2 below).
# About 30 minutes on 2 idle CPU cores for both folders; it took longer here, sharing them. From the
# repository root.
set -e
python phantom.py data/acdc-synth  # the phantom (left as it is when already complete)

# 1. this project's scale
python study.py run --study studies/norm-published --data data/acdc-synth --device cpu --strategies none,pretrain:none:1 --fractions 0.1,0.5,1 --seeds 0,1 --pretrain-args "--size 64 --batch-size 32 --warmup-epochs 1" -- --arch resnet18 --size 64 --batch-size 16 --epochs 8 --warmup-epochs 1 --lr 2e-3 --loss ce+dice --crop-scale 0.25 1 --norm published
# 2. the paper's scale, with the same pretraining (copied: the same bits a rerun would give)
python study.py plan --study studies/norm-paper --data data/acdc-synth --device cpu --strategies none,pretrain:none:1 --fractions 0.1,0.5,1 --seeds 0,1 --pretrain-args "--size 64 --batch-size 32 --warmup-epochs 1" -- --arch resnet18 --size 64 --batch-size 16 --epochs 8 --warmup-epochs 1 --lr 2e-3 --loss ce+dice --crop-scale 0.25 1 --norm paper
mkdir -p studies/norm-paper/pretrain && cp -a studies/norm-published/pretrain/pretrain-none-1 studies/norm-paper/pretrain/
python study.py run --study studies/norm-paper

# 3. the tables and plots (seconds), copied here, and the two side by side
for scale in published paper; do
    python study.py report --study studies/norm-$scale
    mkdir -p docs/norm-scale/$scale
    cp studies/norm-$scale/results.md studies/norm-$scale/results.csv studies/norm-$scale/*.svg docs/norm-scale/$scale/
done
python docs/norm-scale/compare.py > docs/norm-scale/comparison.md
