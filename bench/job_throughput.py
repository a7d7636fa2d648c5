"""Steady throughput of the classify job, before and after a change, measured side by side (issue 20).

The steady throughput is the difference between a ``--factor``x and a 1x archive of real PBC cells divided
by the difference of their job wall times (list, read, decode, infer, write, aggregate, commit: fixed costs cancel
out). Each configuration runs in its own process (a fresh local Ray cluster of all CPUs, as a user runs the job),
interleaved -- before 1x, after 1x, before 3x, after 3x, ... -- so that the shared machine's load falls on both
alike; ``--repeats`` rounds, medians reported. Also measures each side's predictor ceiling: read + decode +
``CellPredictor`` in one process with one torch thread, times the number of cores.

"Before" is another checkout of the repository (e.g. ``git worktree add /tmp/base 233367d``), "after" this one::

    .venv/bin/python bench/job_throughput.py --before /tmp/base --base 512 --factor 3 [--set KEY=VALUE]

Writes ``bench/results/job_throughput.json`` and ``.md`` (``--name``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def _use_repo(repo: str) -> None:
    """Import bloodray from ``repo`` (the before or after checkout), not from this file's."""
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _common.REPO.resolve()]
    sys.path.insert(0, repo)


def child_job(repo: str, images: int, sets: list[str]) -> dict:
    _use_repo(repo)
    import ray

    from bloodray.nightly.pipeline import run_classification

    layout = _common.archive_layout(_common.pbc_images()[:images]) if images <= 9932 else None
    with tempfile.TemporaryDirectory() as tmp:
        archive = _common.link_archive(Path(tmp) / "archive", layout)
        cfg = _common.classify_config(str(archive), str(Path(tmp) / "out"), {}, None, sets)
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False)
        try:
            start = time.perf_counter()
            result = run_classification(cfg)
            seconds = time.perf_counter() - start
        finally:
            ray.shutdown()
    return {"images": result.n_inputs, "seconds": seconds, "timings": result.timings}


def child_ceiling(repo: str, images: int) -> dict:
    _use_repo(repo)
    import numpy as np
    import torch

    from bloodray.predict import CellPredictor

    torch.set_num_threads(1)
    predictor = CellPredictor(None, device="cpu")
    files = _common.pbc_images(images)
    predictor({"image": np.stack([predictor.preset.load(f.read_bytes()) for f in files[:64]])})  # warm-up
    start = time.process_time()
    for i in range(0, len(files), 64):
        batch = np.stack([predictor.preset.load(f.read_bytes()) for f in files[i:i + 64]])
        predictor({"image": batch})
    cpu = time.process_time() - start
    return {"images": len(files), "cpu_seconds": cpu, "images_per_s_per_core": len(files) / cpu,
            "precision": getattr(predictor, "precision", "fp32"), "micro_batch": predictor.micro_batch}


def run_child(args: list[str], attempts: int = 8) -> dict:
    for attempt in range(attempts):
        out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
        if not out.returncode:
            return json.loads(out.stdout.strip().splitlines()[-1])
        # A loaded shared machine can time Ray's start-up out; that run measured nothing, so it is run again.
        print(f"child {args} failed (attempt {attempt + 1}): {out.stderr.strip().splitlines()[-1:]}", flush=True)
    raise SystemExit(f"child {args} failed:\n{out.stderr[-4000:]}")


def ceiling_only(args, sides: dict[str, str], result: dict) -> None:
    runs = {side: [] for side in sides}
    for _ in range(args.repeats):
        for side, repo in sides.items():
            runs[side].append(run_child(["ceiling", repo, str(args.ceiling_images)]))
            print(side, runs[side][-1], flush=True)
    result["ceiling_runs"] = runs
    best = {side: max(r["images_per_s_per_core"] for r in rs) for side, rs in runs.items()}
    result["summary"] = {"ceiling_images_per_s_per_core": best, "after_over_before": best["after"] / best["before"]}
    rows = [[side, f"{best[side]:.1f}", f"{best[side] * os.cpu_count():.0f}", runs[side][0]["precision"],
             runs[side][0]["micro_batch"]] for side in sides]
    md = (f"# Predictor ceiling, before vs after (bench/job_throughput.py --ceiling-only)\n\n"
          f"{_common.facts_markdown(result)}\nbefore: `{sides['before']}`; after: this checkout. Read + decode + "
          f"CellPredictor on {args.ceiling_images} real PBC cells, one process, 1 torch thread, CPU time; "
          f"{args.repeats} interleaved rounds, best.\n\n"
          + _common.table(["side", "img/s per core (CPU time)", "x cores", "precision", "micro-batch"], rows)
          + f"\nAfter / before: {result['summary']['after_over_before']:.2f}x.\n")
    _common.save(args.name, result, md)
    print(md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="checkout of the code to compare against (required)")
    parser.add_argument("--base", type=int, default=512, help="images of the 1x archive")
    parser.add_argument("--factor", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--ceiling-images", type=int, default=512)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config of the after side")
    parser.add_argument("--ceiling-only", action="store_true",
                        help="only the predictors' ceilings (no Ray), interleaved over --repeats rounds")
    parser.add_argument("--name", default="job_throughput")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        kind, repo, n, *sets = args.child
        print(json.dumps(child_job(repo, int(n), sets) if kind == "job" else child_ceiling(repo, int(n))))
        return
    if not args.before:
        parser.error("--before CHECKOUT is required")

    sides = {"before": str(Path(args.before).resolve()), "after": str(_common.REPO)}
    result = {"machine": _common.machine_facts(), "run": _common.run_facts(), "base": args.base,
              "factor": args.factor, "sets": args.set, "sides": sides, "jobs": [], "ceiling": {}}
    if args.ceiling_only:
        ceiling_only(args, sides, result)
        return
    for _ in range(args.repeats):
        for n in (args.base, args.base * args.factor):
            for side, repo in sides.items():
                job = run_child(["job", repo, str(n), *(args.set if side == "after" else [])])
                result["jobs"].append({"side": side, **job, "load": os.getloadavg()[0]})
                print(side, job["images"], f"{job['seconds']:.1f} s", flush=True)
    for side, repo in sides.items():
        result["ceiling"][side] = run_child(["ceiling", repo, str(args.ceiling_images)])
    summary = {}
    for side in sides:
        small = statistics.median(j["seconds"] for j in result["jobs"] if j["side"] == side and j["images"] == args.base)
        large = statistics.median(j["seconds"] for j in result["jobs"]
                                  if j["side"] == side and j["images"] == args.base * args.factor)
        steady = args.base * (args.factor - 1) / (large - small) if large > small else float("nan")
        ceiling = result["ceiling"][side]["images_per_s_per_core"] * os.cpu_count()
        summary[side] = {"steady_images_per_s": steady, "ceiling_images_per_s": ceiling,
                         "steady_over_ceiling": steady / ceiling, "seconds_1x": small, "seconds_nx": large}
    summary["after_over_before"] = summary["after"]["steady_images_per_s"] / summary["before"]["steady_images_per_s"]
    result["summary"] = summary
    rows = [[side, f"{s['seconds_1x']:.1f}", f"{s['seconds_nx']:.1f}", f"{s['steady_images_per_s']:.0f}",
             f"{s['ceiling_images_per_s']:.0f}", f"{s['steady_over_ceiling']:.2f}",
             result["ceiling"][side]["precision"], result["ceiling"][side]["micro_batch"]]
            for side, s in summary.items() if side in sides]
    md = (f"# Classify job steady throughput, before vs after (bench/job_throughput.py)\n\n"
          f"{_common.facts_markdown(result)}\nbefore: `{sides['before']}`; after: this checkout"
          f"{' with ' + ', '.join(args.set) if args.set else ''}. Archives of {args.base} and "
          f"{args.base * args.factor} real PBC cells, {args.repeats} interleaved round(s), medians.\n\n"
          + _common.table(["side", "1x job s", f"{args.factor}x job s", "steady img/s", "predictor ceiling img/s",
                           "steady / ceiling", "ceiling precision", "micro-batch"], rows)
          + f"\nAfter / before (steady throughput): {summary['after_over_before']:.2f}x.\n")
    _common.save(args.name, result, md)
    print(md)


if __name__ == "__main__":
    main()
