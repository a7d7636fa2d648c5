"""Nightly classification job: classify a slide archive into Parquet predictions, errors and differentials.

Local:   python jobs/classify.py --config configs/classify/nightly.yaml --date 2026-11-24 [--incremental] [--set k=v]
Cluster: ray job submit --working-dir . -- python jobs/classify.py --config configs/classify/nightly.yaml --date ...
Exit codes: 0 committed, 2 the run could not start or failed (the message names the field, URI or checkpoint).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bloodray.cli import run  # noqa: E402
from bloodray.logs import exit_on_sigterm  # noqa: E402

if __name__ == "__main__":
    exit_on_sigterm()  # SIGTERM (a cancelled job) stops the local Ray cluster too
    sys.exit(run(["classify", *sys.argv[1:]]))
