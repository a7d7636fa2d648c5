"""Train a list of models on one de-duplicated split and write our version of the paper's Table 2.

Local:   python jobs/compare.py --config configs/compare/cpu.yaml --set data.root=../shared/data/pbc \
             --set output.path=/tmp/compare/cpu
Cluster: ray job submit --working-dir . -- python jobs/compare.py --config configs/compare/gpu.yaml \
             --set data.root=s3://bucket/pbc --set output.path=s3://bucket/compare/gpu
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bloodray.cli import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(["compare", *sys.argv[1:]]))
