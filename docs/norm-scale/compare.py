"""the two scales side by side: mean over seeds of each run's test figures, per strategy and label fraction"""
import csv
import sys
from collections import defaultdict

folder = sys.argv[1] if len(sys.argv) > 1 else "docs/norm-scale"
runs = {scale: list(csv.DictReader(open(f"{folder}/{scale}/results.csv"))) for scale in ("published", "paper")}
keys = ("test_iou_with_background", "test_iou_structures", "mean_dice")
means = defaultdict(dict)
for scale, rows in runs.items():
    groups = defaultdict(list)
    for r in rows:
        groups[(r["strategy"], float(r["fraction"]))].append(r)
    for g, rs in groups.items():
        means[g][scale] = ({k: sum(float(r[k]) for r in rs) / len(rs) for k in keys}, len(rs))
print("# The paper's fine-tuning input scale against this project's, on the phantom\n")
print("Test figures of each study (`published/results.md`, `paper/results.md`), means over the seeds; ResNet18 "
      "U-Nets at 64 px, 8 epochs, from random weights (`none`) or one epoch of BYOL (`pretrain:none:1`). "
      "Made by `commands.sh`.\n")
print("| strategy | fraction | seeds (published / paper) | test IoU with background: published, paper, difference "
      "| test IoU of the structures: published, paper, difference | Dice: published, paper, difference |")
print("| --- | --- | --- | --- | --- | --- |")
diffs = defaultdict(list)
for (s, f), by in sorted(means.items()):
    if len(by) < 2:
        continue
    (a, na), (b, nb) = by["published"], by["paper"]
    cells = []
    for k in keys:
        diffs[k].append(b[k] - a[k])
        cells.append(f"{a[k]:.3f}, {b[k]:.3f}, {b[k] - a[k]:+.3f}")
    print(f"| {s} | {f:g} | {na} / {nb} | " + " | ".join(cells) + " |")
print()
print("Mean difference (paper minus published) over the pairs above: "
      + ", ".join(f"{k} {sum(v) / len(v):+.3f}" for k, v in diffs.items()))
