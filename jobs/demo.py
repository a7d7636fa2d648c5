"""`make demo`: the whole pipeline on synthetic data (see configs/demo.yaml)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bloodray.cli import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(["demo", *sys.argv[1:]]))
