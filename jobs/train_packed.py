"""Train one model in a single process from a pack, a lone GPU box without Ray (= `bloodray train-packed`).

python jobs/train_packed.py --set pack=.devdata/pbc128.parquet --set model=mobilenet_v2 \
    --set epochs=60 --set output=runs/packed/mobilenet_v2
Keys: see bloodray.train.pack.PackedTrainConfig. Writes <output>/checkpoint (a normal
bloodray checkpoint), result.json (val/test metrics, history, timings) and the
final config (config.yaml).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bloodray.cli import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(["train-packed", *sys.argv[1:]]))
