"""``bloodray config --reference`` and ``bloodray docs``: the references generated from the code."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_config(args) -> int:
    from bloodray.reference import JOBS, config_reference

    jobs = [args.job] if args.job else list(JOBS)
    print("\n".join(config_reference(job) for job in jobs))
    return 0


def cmd_docs(args) -> int:
    from bloodray.reference import REGENERATE, stale_files, write_files

    root = Path(args.root)
    if not (root / "docs").is_dir():
        print(f"bloodray docs: error: {root.resolve()}: no docs/ folder here (run it from the repository root, "
              "or pass --root)", file=sys.stderr)
        return 2
    if args.check:
        stale = stale_files(root, args.root_parser)
        for path in stale:
            print(f"{path}: stale; regenerate with `{REGENERATE}`", file=sys.stderr)
        return 1 if stale else 0
    for path in write_files(root, args.root_parser):
        print(f"wrote {path}")
    return 0


def add_docs_parsers(sub, root_parser: argparse.ArgumentParser) -> None:
    """``config`` and ``docs``; ``root_parser`` is the whole ``bloodray`` parser (docs/cli.md is made from it)."""
    from bloodray.reference import JOBS

    p = sub.add_parser("config", help="print every config key of a job with its type, default and meaning")
    p.add_argument("--reference", action="store_true", required=True,
                   help="print the key reference (markdown), as in docs/config.md")
    p.add_argument("job", nargs="?", choices=list(JOBS), help="one job (default: every job)")
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("docs", help="regenerate docs/config.md, docs/cli.md and docs/tables.md from the code")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 naming each generated file that is stale")
    p.add_argument("--root", default=".", help="repository root holding docs/")
    p.set_defaults(func=cmd_docs, root_parser=root_parser)
