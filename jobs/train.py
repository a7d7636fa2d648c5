"""Train a blood-cell classifier with Ray Train.

Local:   python jobs/train.py --config configs/train/bloodnet.yaml --set data.root=../shared/data/pbc
Cluster: ray job submit --working-dir . -- python jobs/train.py --config configs/train/resnet50.yaml \
             --set data.root=s3://bucket/pbc --set run.storage_path=s3://bucket/runs
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bloodray.cli import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(["train", *sys.argv[1:]]))
