"""Resize a labelled image folder once into a Parquet pack for `jobs/train_packed.py` (= `bloodray pack`).

python jobs/pack.py --root ../shared/data/pbc --size 128 --output .devdata/pbc128.parquet
The split (70/10/20, stratified, deduplicated, seed 0) is the one `bloodray train` uses.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bloodray.cli import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(["pack", *sys.argv[1:]]))
