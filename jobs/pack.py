"""Resize a labelled image folder once into a Parquet pack for `jobs/train_packed.py`.

python jobs/pack.py --root ../shared/data/pbc --size 128 --output .devdata/pbc128.parquet
The split (70/10/20, stratified, deduplicated, seed 0) is the one `bloodray train` uses.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bloodray.data.labelled import SplitFractions  # noqa: E402
from bloodray.train.pack import build_pack  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="labelled image folder (local path or s3:// URI)")
    p.add_argument("--output", required=True, help="pack file to write (.parquet)")
    p.add_argument("--size", type=int, required=True, help="square side in px the model will be trained at")
    p.add_argument("--format", default="WEBP", help="image format of the re-encoded images (WEBP, JPEG, PNG)")
    p.add_argument("--quality", type=int, default=90, help="quality of the re-encoded images")
    p.add_argument("--seed", type=int, default=0, help="split seed (must match the training config)")
    p.add_argument("--splits", default="train,val,test", help="which splits to include")
    args = p.parse_args(argv)
    summary = build_pack(args.root, args.output, args.size, image_format=args.format, quality=args.quality, seed=args.seed,
                         fractions=SplitFractions(), splits=args.splits.split(","))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
