"""Scaling of the classify job: time per image and peak memory at 1x, 4x and 16x a base archive.

Run on a quiet machine, from the repository root::

    source .venv/bin/activate
    python bench/scale.py --base 250 --factors 1,4,16

Writes ``bench/results/scale.json`` and ``bench/results/scale.md``.

Each archive holds ``factor x base`` real PBC images (distinct images while
there are enough, then the same images again under distinct names), as samples
of 100 cells, as symlinks in a temp dir (``--source s3``: uploaded, untimed, to
a moto server on 127.0.0.1, ``_common.MotoS3``, a separate process that is left
out of the CPU and memory figures). Every factor runs in a fresh local Ray
cluster (``ray.init(address="local", num_cpus=os.cpu_count())``) after one untimed
warm-up run, through :func:`bloodray.nightly.pipeline.run_classification` with default
inference settings.

Reported per factor: wall time of the job, time and CPU (all processes of the
job) per image, the job's own stage timings, and the peak memory of the whole
job -- the driver and every Ray process (GCS, raylet, workers, actors), sampled
every ``--interval`` s in a background thread: the peak of the summed RSS and of
the summed PSS (proportional set size: shared pages such as torch's libraries
and the object store counted once across processes), and the largest single
process. Targets: time per image at 16x <= 1.15x that at 1x (linear growth);
peak memory at 16x <= 1.25x that at 1x.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import _common as common  # noqa: E402 (sets fake AWS credentials before Ray starts)

TARGET_TIME_RATIO = 1.15
TARGET_MEMORY_RATIO = 1.25


def make_layout(total: int, per_sample: int = 100) -> list:
    images = common.pbc_images()
    if total <= len(images):
        return common.archive_layout(images[:total], per_sample)
    copies = -(-total // len(images))
    return common.archive_layout(images, per_sample, copies)[:total]


def run_one(archive: str, out: str, so: dict, checkpoint: str | None, sets: list[str], interval: float,
            exclude: set[int]) -> dict[str, Any]:
    import ray

    from bloodray.nightly.pipeline import run_classification

    cfg = common.classify_config(archive, out, so, checkpoint, sets)
    monitor = common.TreeMonitor(interval, exclude)
    monitor.start()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False)
    try:
        cpu0 = monitor.cpu_seconds()
        start = time.perf_counter()
        result = run_classification(cfg)
        seconds = time.perf_counter() - start
        monitor.sample()
        cpu = monitor.cpu_seconds() - cpu0
    finally:
        ray.shutdown()
        memory = monitor.stop()
    memory.pop("cpu_seconds")
    n = result.n_inputs
    return {"images": n, "seconds": seconds, "seconds_per_image": seconds / n, "cpu_seconds": cpu,
            "cpu_ms_per_image": cpu / n * 1e3, "images_per_s": n / seconds, "timings": result.timings,
            "n_predictions": result.n_predictions, "n_errors": result.n_errors, "memory": memory}


def markdown(result: dict[str, Any]) -> str:
    runs = result["runs"]
    rows = []
    for r in runs:
        m = r["memory"]
        rows.append([f"{r['factor']}x", r["images"], f"{r['seconds']:.1f}", f"{r['seconds_per_image'] * 1e3:.2f}",
                     f"{r['time_per_image_ratio']:.2f}", f"{r['cpu_ms_per_image']:.2f}",
                     f"{r['timings'].get('list', 0):.2f}", f"{r['timings'].get('read_decode_infer', 0):.1f}",
                     f"{m['peak_pss_mib']:.0f}", f"{m['peak_rss_mib']:.0f}", f"{m['peak_driver_rss_mib']:.0f}",
                     f"{r['memory_ratio']:.2f}"])
    s = result["summary"]
    return (f"# Classify job scaling ({result['source']}, base {result['base']} images, {result['checkpoint']})\n\n"
            + common.facts_markdown(result) + "\n"
            + common.table(["archive", "images", "job s", "ms/image", "ms/image vs 1x (<= 1.15)",
                            "CPU ms/image (all processes)", "list s", "read_decode_infer s", "peak PSS MiB (all)",
                            "peak RSS MiB (sum)", "peak driver RSS MiB", "peak PSS vs 1x (<= 1.25)"], rows)
            + "\nMarginal time per image (slope between sizes, fixed costs cancel out): "
            + f"{', '.join(s['marginal_ms_per_image'])}"
            + (f"; last / first = {s['marginal_ratio']:.2f}" if s.get("marginal_ratio") else "") + ".\n"
            + f"\nTargets: time per image at {runs[-1]['factor']}x / 1x = {s['time_ratio']:.2f} (<= 1.15: "
            + f"{'met' if s['time_ratio_met'] else 'NOT met'}); peak memory (PSS) "
            + f"{runs[-1]['factor']}x / 1x = {s['memory_ratio']:.2f} (<= 1.25: "
            + f"{'met' if s['memory_ratio_met'] else 'NOT met'}).\n"
            + "\nMemory: the driver and every Ray process (GCS, raylet, workers, actors) summed, sampled every "
            + f"{result['interval_s']} s; PSS counts shared pages (torch libraries, object store) once.\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=int, default=250, help="images of the 1x archive (default 250)")
    parser.add_argument("--factors", default="1,4,16", help="archive sizes as multiples of --base")
    parser.add_argument("--source", choices=["local", "s3"], default="local")
    parser.add_argument("--checkpoint", default=None, help="checkpoint dir (default: the packaged model)")
    parser.add_argument("--interval", type=float, default=0.1, help="memory sampling interval, s")
    parser.add_argument("--warmup", type=int, default=128, help="images of the untimed warm-up run (0: none)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra classify config override, e.g. inference.batch_size=128")
    parser.add_argument("--name", default="scale", help="result file name under bench/results/")
    args = parser.parse_args()
    factors = [int(f) for f in args.factors.split(",")]

    from bloodray.checkpoint import read_metadata, resolve_checkpoint

    meta = read_metadata(resolve_checkpoint(args.checkpoint))
    result: dict[str, Any] = {"benchmark": "scale", "source": args.source, "base": args.base, "factors": factors,
                              "checkpoint": f"{args.checkpoint or 'packaged default'}: {meta.checkpoint_id}, "
                                            f"{meta.input_size} px",
                              "interval_s": args.interval, "machine": common.machine_facts(),
                              "run": common.run_facts(), "runs": []}
    s3 = common.MotoS3().start() if args.source == "s3" else None
    exclude = {s3.pid} if s3 else set()
    try:
        with tempfile.TemporaryDirectory(prefix="bloodray-scale-") as tmp:
            def archive_for(name: str, total: int) -> tuple[str, str, dict]:
                layout = make_layout(total)
                if s3 is None:
                    root = Path(tmp) / name
                    return str(common.link_archive(root / "archive", layout)), str(root / "out"), {}
                bucket = f"scale-{name}-{uuid.uuid4().hex[:6]}"
                return s3.upload(bucket, "archive", layout), f"s3://{bucket}/out", s3.storage_options

            if args.warmup:
                archive, out, so = archive_for("warmup", args.warmup)
                print(f"warm-up run ({args.warmup} images, not timed) ...", flush=True)
                run_one(archive, out, so, args.checkpoint, args.set, args.interval, exclude)
            for factor in factors:
                total = factor * args.base
                archive, out, so = archive_for(f"x{factor}", total)
                print(f"{factor}x: {total} images ...", flush=True)
                run = run_one(archive, out, so, args.checkpoint, args.set, args.interval, exclude)
                assert run["n_predictions"] == total, run
                run["factor"] = factor
                result["runs"].append(run)
                print(f"{factor}x: {run['seconds']:.1f}s, {run['seconds_per_image'] * 1e3:.2f} ms/image, "
                      f"peak PSS {run['memory']['peak_pss_mib']:.0f} MiB, RSS {run['memory']['peak_rss_mib']:.0f} MiB",
                      flush=True)
    finally:
        if s3 is not None:
            s3.stop()

    runs = result["runs"]
    first = runs[0]
    for r in runs:
        r["time_per_image_ratio"] = r["seconds_per_image"] / first["seconds_per_image"]
        r["memory_ratio"] = r["memory"]["peak_pss_mib"] / first["memory"]["peak_pss_mib"]
    slopes = [(b["seconds"] - a["seconds"]) / max(1, b["images"] - a["images"]) for a, b in zip(runs, runs[1:])]
    marginal = [f"{a['factor']}x->{b['factor']}x {m * 1e3:.2f} ms" for a, b, m in zip(runs, runs[1:], slopes)]
    last = runs[-1]
    result["summary"] = {"time_ratio": last["time_per_image_ratio"], "memory_ratio": last["memory_ratio"],
                         "time_ratio_met": last["time_per_image_ratio"] <= TARGET_TIME_RATIO,
                         "memory_ratio_met": last["memory_ratio"] <= TARGET_MEMORY_RATIO,
                         "marginal_ms_per_image": marginal,
                         # Fixed costs (cluster and actor start) cancel out of the slopes: the last one over the
                         # first is the linearity of the work itself.
                         "marginal_ratio": slopes[-1] / slopes[0] if len(slopes) > 1 and slopes[0] > 0 else None}
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    js, md = common.save(args.name, result, markdown(result))
    print()
    print(md.read_text())
    print(f"saved {js} and {md}")


if __name__ == "__main__":
    main()
