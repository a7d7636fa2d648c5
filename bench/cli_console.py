"""What a user sees on the console during `bloodray classify`: lines by origin, per verbosity.

Runs the command as a user would (a subprocess, working directory outside the
repository, its own local Ray via RAY_TMPDIR) on a small synthetic archive, and
counts the stderr lines that come from bloodray, from Ray's Python loggers,
from Ray's C++ core (``core_worker.cc ... E``), from Ray Data's progress output,
and anything else. ``--repo`` points at another checkout to compare (its CLI is
started through ``bloodray.cli.main``, with its configs given explicitly).

    python bench/cli_console.py                      # this checkout: default, --quiet, --verbose
    python bench/cli_console.py --repo /work/main --label before --modes default

Prints a table and writes bench/results/cli_console_<label>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
DATE = "2026-01-01"

KINDS = [
    ("bloodray", re.compile(r"^(\[bloodray\]|bloodray[ :])")),
    ("ray_data_progress", re.compile(r"(logging_progress\.py|Running Dataset|Total Progress|Progress bars|"
                                     r"streaming_executor\.py|it/s\]|row/s\])")),
    ("ray_cxx", re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+ [EWI] \d+ \d+\]")),
    ("ray_python", re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+\s+(INFO|WARNING|ERROR)\s")),
    ("ray_worker_forwarded", re.compile(r"^\x1b?\[?3?\d?m?\((raylet|pid=|MapWorker|_MapWorker|.*pid=\d+)")),
]


def classify(line: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(line):
            return kind
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=str(HERE), help="checkout whose bloodray to run")
    parser.add_argument("--label", default="after")
    parser.add_argument("--modes", default="default,quiet,verbose")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--cells", type=int, default=20)
    args = parser.parse_args()

    repo = Path(args.repo).resolve()
    work = Path(tempfile.mkdtemp(prefix="bench-cli-"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(repo)
    entry = [sys.executable, "-c", "import sys; sys.argv[0] = 'bloodray'; from bloodray.cli import main; main()"]
    subprocess.run(entry + ["synth", "archive", "--out", f"archive/{DATE}", "--samples", str(args.samples),
                            "--cells", str(args.cells), "--size", "64"], cwd=work, env=env, check=True,
                   capture_output=True)
    results = {}
    for mode in args.modes.split(","):
        flags = {"default": [], "quiet": ["--quiet"], "verbose": ["--verbose"]}[mode]
        env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="brb", dir="/tmp")
        command = entry + flags + ["classify", "--config", str(repo / "configs" / "classify" / "nightly.yaml"),
                                   "--set", "flags.reference_ranges=null", "--set", "input.uri=archive",
                                   "--set", f"output.uri=out-{mode}", "--set", "inference.num_gpus=0", "--date", DATE]
        start = time.monotonic()
        proc = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        counts: dict[str, int] = {}
        for line in lines:
            counts[classify(line)] = counts.get(classify(line), 0) + 1
        results[mode] = {"exit": proc.returncode, "seconds": round(time.monotonic() - start, 1),
                         "stderr_lines": len(lines), "stdout_lines": len(proc.stdout.splitlines()),
                         "by_origin": counts, "stderr": lines}
        (work / f"stderr-{mode}.txt").write_text(proc.stderr)
    print(f"{'mode':<9}{'exit':>5}{'stderr':>8}{'stdout':>8}  by origin")
    for mode, r in results.items():
        print(f"{mode:<9}{r['exit']:>5}{r['stderr_lines']:>8}{r['stdout_lines']:>8}  {json.dumps(r['by_origin'])}")
    out = HERE / "bench" / "results" / f"cli_console_{args.label}.json"
    out.write_text(json.dumps({"repo": str(repo), "archive": f"{args.samples} samples x {args.cells} cells",
                               "results": results}, indent=1))
    print(f"saved {out}; raw stderr in {work}")


if __name__ == "__main__":
    main()
