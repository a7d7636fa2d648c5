"""Arguments shared by the ``bloodray`` subcommands."""

from __future__ import annotations

import argparse

from bloodray.config import StorageConfig


def add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    """``--endpoint-url``: the only storage setting on the command line (credentials come from the AWS chain)."""
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (credentials: AWS chain)")


def storage_options(args: argparse.Namespace) -> dict:
    """fsspec storage options from the parsed ``--endpoint-url``."""
    return StorageConfig(endpoint_url=args.endpoint_url).storage_options()
