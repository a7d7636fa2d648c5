"""Nightly classification job: classify a slide archive into Parquet predictions, errors and differentials.

Local:   python jobs/classify.py --config configs/classify/nightly.yaml --date 2026-11-24 [--incremental] [--set k=v]
Cluster: ray job submit --working-dir . -- python jobs/classify.py --config configs/classify/nightly.yaml --date ...
Exit codes (bloodray/exit_codes.py): 0 committed, 2 refused (the message names the field, URI or checkpoint),
3 nothing to do, 4 committed under the domain-shift alarm, 5 cluster or storage failure, 6 alarm, nothing published.
--json prints the run summary as one JSON object on stdout.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bloodray.cli import run  # noqa: E402
from bloodray.logs import exit_on_sigterm, own_process_output  # noqa: E402

if __name__ == "__main__":
    exit_on_sigterm()  # SIGTERM (a cancelled job) stops the local Ray cluster too
    own_process_output()  # -q: Ray's native stderr lines go to its log directory
    sys.exit(run(["classify", *sys.argv[1:]]))
