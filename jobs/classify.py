#!/usr/bin/env python3
"""Nightly classification job: classify a slide archive, write predictions, errors and differentials.

    python jobs/classify.py --config configs/classify/nightly.yaml --date 2024-05-01 \
        [--incremental] [--set key=value ...]

Parses the arguments, builds the validated config and calls
:func:`bloodray.classify.run_classification`; prints the run summary as JSON.
Exit codes: 0 committed, 1 the run failed (storage, checkpoint, no inputs), 2 bad config.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from bloodray.checkpoint import CheckpointError
from bloodray.classify import ClassifyError, add_arguments, config_from_args, run_classification
from bloodray.config import ConfigError
from bloodray.storage import StorageError


def main(argv: list[str]) -> int:
    parser = add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
        result = run_classification(cfg)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except (StorageError, CheckpointError, ClassifyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
