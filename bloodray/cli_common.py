"""Arguments shared by the ``bloodray`` subcommands."""

from __future__ import annotations

import argparse

from bloodray.config import StorageConfig


def add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    """``--endpoint-url``: the only storage setting on the command line (credentials come from the AWS chain)."""
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (credentials: AWS chain)")


def run_date_argument(text: str) -> str:
    """``--date`` of ``report`` and ``review``: a run date, ``YYYY-MM-DD`` (argparse names the option on error).

    Checked here because the views' ``run_date`` is a date: a word would otherwise fail deep in SQL.
    """
    from bloodray.nightly.contract import run_day  # here: the CLI starts without pyarrow

    try:
        return run_day(text).isoformat()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def storage_options(args: argparse.Namespace) -> dict:
    """fsspec storage options from the parsed ``--endpoint-url``."""
    return StorageConfig(endpoint_url=args.endpoint_url).storage_options()
