"""Fixed cost of one ``bloodray classify`` run on a local cluster: where the seconds go (issue 20 item 5).

Each run is a fresh process, as the nightly CronJob starts one: ``python bench/fixed_cost.py --child ...`` imports
the CLI, starts a local Ray cluster (no ``RAY_ADDRESS``) and classifies a tiny date of real PBC cells
(``--n``, default 16, so the per-image work is well under a second), with the job's functions wrapped in timers:

- ``interpreter+imports``: process start to the CLI module imported;
- ``plan``: lease, pending-commit check, checkpoint load and seal check, flag rules, listing, resume check;
- ``ray_init``: starting (or joining) the cluster;
- ``first_result``: Ray Data planning, actor start (imports, model load), the first block back;
- ``rest_of_classify``: the remaining images (per-image work);
- ``aggregate``: DuckDB over the staged rows, staged tables and differentials;
- ``commit``: accounting check, files in place, manifest, intent, one Delta commit per table, cleanup;
- ``exit``: from the run's end to the process exit (Ray shut down by its atexit hook).

Two scenarios, each ``--repeat`` times: ``first`` (a new, empty output root) and ``rerun`` (the same date again
into an output whose tables exist: the nightly steady state). The parent reports the median wall seconds per
phase and per scenario. Results go to ``bench/results/fixed_cost.json`` and ``.md``.

    PYTHONPATH=. python bench/fixed_cost.py                 # about 2-4 minutes on 2 cores
    git archive <rev> | tar -x -C /tmp/before && PYTHONPATH=. python bench/fixed_cost.py --before /tmp/before
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

HERE = Path(__file__).resolve().parent


def _process_start() -> float:
    """Unix time this process was started (from /proc), so interpreter start-up is counted too."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, IndexError, ValueError):
        return time.time()


def _ray_starter(pipeline, spans):
    """Start Ray the way this tree's job does (``init_ray(dashboard=False)`` where it has the flag), retried:
    Ray gives a node 30 s to come up, which a loaded shared machine can exceed. The job's own ``init_ray`` call
    then finds Ray running; the time is counted as ``ray_init`` either way."""
    import inspect

    from bloodray import logs

    def start() -> None:
        import ray

        kwargs = {"dashboard": False} if "dashboard" in inspect.signature(logs.init_ray).parameters else {}
        for attempt in range(6):
            t = time.monotonic()
            try:
                logs.init_ray(**kwargs)
                spans["ray_init"] = spans.get("ray_init", 0.0) + time.monotonic() - t
                return
            except Exception as exc:  # noqa: BLE001 - Ray's start-up timeout is a bare Exception
                ray.shutdown()
                if "timed out during startup" not in str(exc) or attempt == 5:
                    raise
                time.sleep(10)
                spans["ray_start_retries"] = spans.get("ray_start_retries", 0.0) + time.monotonic() - t
    return start


def child(args) -> None:
    started = _process_start()
    marks: dict[str, float] = {}
    t0 = time.time()
    from bloodray import cli
    from bloodray.nightly import aggregate, pipeline

    marks["interpreter+imports"] = time.time() - started
    marks["import_cpu"] = time.process_time()
    spans: dict[str, float] = {}

    def timed(module, name, label):
        inner = getattr(module, name)

        def wrapper(*a, **k):
            t = time.monotonic()
            try:
                return inner(*a, **k)
            finally:
                spans[label] = spans.get(label, 0.0) + time.monotonic() - t
        setattr(module, name, wrapper)

    timed(pipeline, "plan_run", "plan")
    timed(pipeline, "init_ray", "ray_init")
    start_ray = _ray_starter(pipeline, spans)
    timed(pipeline, "commit_run", "commit")
    timed(pipeline, "staging_connection", "aggregate")
    timed(pipeline, "write_image_tables", "aggregate")
    timed(pipeline, "write_differentials", "aggregate")
    # The results writer of this checkout (write_results; write_table before issue 20).
    writer_name = "write_results" if hasattr(pipeline, "write_results") else "write_table"
    inner_write = getattr(pipeline, writer_name)
    first: dict[str, float] = {}

    def write_results(batches, *a, **k):
        start = time.monotonic()

        def watch():
            for i, b in enumerate(batches):
                if i == 0:
                    first["first_result"] = time.monotonic() - start
                yield b
        out = inner_write(watch(), *a, **k)
        first["all_results"] = time.monotonic() - start
        return out
    setattr(pipeline, writer_name, write_results)
    del aggregate

    argv = ["classify", "--config", str(Path(cli.__file__).resolve().parents[1] / "configs/classify/nightly.yaml"),
            "--set", f"input.uri={args.archive}", "--set", f"output.uri={args.out}", "--set", f"run.date={args.date}",
            "--set", "inference.num_gpus=0"]
    for s in args.set:
        argv += ["--set", s]
    sys.path.insert(0, str(HERE))
    from _common import TreeMonitor

    # CPU seconds per process of the job (driver, GCS, raylet, dashboard, workers, actors): on a shared machine
    # wall seconds mostly measure the other tenants, CPU seconds what this run itself costs.
    monitor = TreeMonitor(interval=0.2, memory=False)
    monitor.start()
    run_started = time.time()
    start_ray()
    code = cli.run(["-q", *argv])
    run_wall = time.time() - run_started
    cpu = monitor.stop()
    phases = {"interpreter+imports": marks["interpreter+imports"], **{k: spans.get(k, 0.0) for k in
              ("ray_start_retries", "plan", "ray_init")}}
    phases["first_result"] = first.get("first_result", 0.0)
    phases["rest_of_classify"] = first.get("all_results", 0.0) - phases["first_result"]
    phases["aggregate"] = spans.get("aggregate", 0.0)
    phases["commit"] = spans.get("commit", 0.0)
    phases["other_in_run"] = run_wall - sum(v for k, v in phases.items() if k != "interpreter+imports")
    Path(args.report).write_text(json.dumps({"code": code, "phases": phases, "run_wall": run_wall,
                                             "cpu_seconds": cpu["cpu_seconds"] + marks["import_cpu"],
                                             "cpu_seconds_by_process": cpu["cpu_seconds_by_process"],
                                             "t_child_end": time.time(), "t_child_start": started, "t0": t0}))


def parent(args) -> None:
    sys.path.insert(0, str(HERE))
    from _common import archive_layout, facts_markdown, link_archive, machine_facts, pbc_images, run_facts, save
    from _common import table as md_table

    # Code trees measured side by side, interleaved run by run: this checkout, and --before (e.g. an export of
    # main before a change: `git archive <rev> | tar -x -C /tmp/before`).
    trees = {"after": HERE.parent}
    if args.before:
        trees = {"before": Path(args.before).resolve(), **trees}
    result = {"machine": machine_facts(), "run": run_facts(),
              "settings": {"n": args.n, "repeat": args.repeat, "trees": {k: str(v) for k, v in trees.items()}},
              "trees": {}}
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-fixed-cost-") as tmp:
        date = "2026-01-01"
        archive = link_archive(Path(tmp) / "archive" / date, archive_layout(pbc_images(args.n), per_sample=8)).parent
        for k in range(args.repeat):
            for label, tree in trees.items():
                env = {**os.environ, "PYTHONPATH": str(tree)}
                env.pop("RAY_ADDRESS", None)  # a local cluster, started by the run itself
                for scenario in args.scenarios.split(","):
                    out = Path(tmp) / label / (f"out-first-{k}" if scenario == "first" else "out-rerun")
                    if scenario == "rerun" and k == 0:  # the output's tables exist before the measured reruns
                        _run_child(args, env, archive, out, date, Path(tmp) / f"warm-{label}.json")
                    report = Path(tmp) / f"{label}-{scenario}-{k}.json"
                    wall = _run_child(args, env, archive, out, date, report)
                    child_report = json.loads(report.read_text())
                    phases = child_report["phases"]
                    phases["exit"] = wall["end"] - child_report["t_child_end"]
                    runs.setdefault((label, scenario), []).append(
                        {"wall_seconds": wall["end"] - wall["start"], "phases": phases,
                         "load_average": [round(x, 2) for x in os.getloadavg()]})
                    print(f"{label} {scenario} {k}: {wall['end'] - wall['start']:.1f} s  "
                          + "  ".join(f"{p} {v:.2f}" for p, v in phases.items()), flush=True)
    columns = []
    for (label, scenario), found in runs.items():
        names = list(found[0]["phases"])
        result["trees"].setdefault(label, {})[scenario] = {
            "wall_seconds_median": statistics.median(r["wall_seconds"] for r in found),
            "phases_median": {p: statistics.median(r["phases"][p] for r in found) for p in names},
            "runs": found}
        columns.append((label, scenario))
    names = list(next(iter(result["trees"]["after"].values()))["phases_median"])
    rows = [[p] + [result["trees"][t][s]["phases_median"].get(p, float("nan")) for t, s in columns] for p in names]
    rows.append(["**wall (process start to exit)**"] + [result["trees"][t][s]["wall_seconds_median"]
                                                         for t, s in columns])
    md = (f"# Fixed cost of a `bloodray classify` run on a local cluster ({args.n} images, median of "
          f"{args.repeat}, interleaved)\n\n" + facts_markdown(result) + "\n"
          + md_table(["phase (s)"] + [f"{t}: {'first run (new output)' if s == 'first' else 'rerun (tables exist)'}"
                                      for t, s in columns], rows))
    save(args.name, result, md)
    print(md)


def _run_child(args, env, archive, out, date, report) -> dict[str, float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--archive", str(archive), "--out", str(out),
           "--date", date, "--report", str(report)] + [a for s in args.set for a in ("--set", s)]
    start = time.time()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    end = time.time()
    if done.returncode != 0:
        raise SystemExit(f"child failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return {"start": start, "end": end}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--name", default="fixed_cost")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--scenarios", default="first,rerun")
    parser.add_argument("--before", help="another code tree (e.g. main before a change) measured side by side")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--archive", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--date", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
