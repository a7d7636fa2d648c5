"""Inference throughput: the Ray Data classify job vs a hand-written loop vs the CPU ceiling.

Run on a quiet machine, from the repository root::

    source .venv/bin/activate
    python bench/inference.py --source both            # all 9,932 images, ~10 min
    python bench/inference.py --n 2000 --source local  # quicker; fixed start-up costs weigh more

Writes ``bench/results/inference.json`` and ``bench/results/inference.md``.

Over ``--n`` real PBC images (``/work/shared/data/pbc``, or ``$BLOODRAY_PBC``),
arranged as an archive of samples of 100 cells (local: symlinks in a temp dir;
S3: uploaded, untimed, to a moto server on 127.0.0.1 run as a separate
process, ``_common.MotoS3``, as ``tests/conftest.py`` runs it), it measures
images/s of

(a) the classify job as a user runs it: a local Ray cluster of all CPUs
    (``ray.init(address="local", num_cpus=os.cpu_count(),
    include_dashboard=False)``), then
    :func:`bloodray.nightly.pipeline.run_classification` with default inference
    settings, end to end (list, read, decode, infer, write, aggregate, commit).
    One untimed warm-up run on a small archive first (page cache, Ray Data's
    system actors), as on a cluster that is already up; the job's own actor
    processes start inside the timed run, as they do every night;
(b) the loop a user would write by hand: one process, read the bytes (local
    ``open``; S3 ``fs.cat`` of each batch), PIL decode (bloodray's
    ``decode_image``, with the same JPEG draft shortcut as the job), the
    EvalPreset resize and normalisation, the same model (``load_checkpoint``,
    eval mode), batches of 64, torch's default thread count, predictions
    written to one Parquet file;
(c) the ceiling: the CPU cost per image (process CPU time) of read + decode +
    preprocess + model, measured in one process with 1 torch thread through
    the job's own code (its reader, ``decode_image``, ``EvalPreset``,
    ``CellPredictor``), times the number of cores.

and prints/saves a/b, a/c and per-stage times. On S3 the moto server shares
the cores with the job, so it slows the S3 wall times (and images/s), but it
is a process of its own and its CPU time is in none of the CPU figures (a:
left out of the job's process tree; b, c: CPU time of this process only).
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import _common as common  # noqa: E402 (sets fake AWS credentials before Ray starts)
import numpy as np

TARGET_A_OVER_B = 1.6
TARGET_A_OVER_C = 0.8


def hand_loop(paths: list[str], fs, checkpoint: str | None, batch_size: int = 64) -> dict[str, Any]:
    """(b) One process, plain PIL decode, EvalPreset, the same model, torch default threads."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from bloodray.checkpoint import load_checkpoint
    from bloodray.data.decode import decode_image

    stages = dict.fromkeys(("read", "decode", "preprocess", "infer", "write"), 0.0)
    start = time.perf_counter()
    cpu0 = time.process_time()
    loaded = load_checkpoint(checkpoint)
    model = loaded.model.eval()
    preset, temperature = loaded.metadata.preset(), float(loaded.metadata.temperature or 1.0)
    classes = np.array(loaded.metadata.classes, dtype=object)
    out_uri, out_cls, out_conf = [], [], []
    for i in range(0, len(paths), batch_size):
        chunk = paths[i:i + batch_size]
        t = time.perf_counter()
        if fs is None:
            datas = [Path(p).read_bytes() for p in chunk]
        else:
            fetched = fs.cat(chunk)
            datas = [fetched[p] for p in chunk]
        t1 = time.perf_counter()
        images = [decode_image(d, target_size=preset.input_size) for d in datas]
        t2 = time.perf_counter()
        x = preset.normalize(np.stack([preset.resize(im) for im in images]))
        t3 = time.perf_counter()
        with torch.inference_mode():
            probs = torch.softmax(model(x) / temperature, dim=1).numpy()
        t4 = time.perf_counter()
        out_uri += chunk
        out_cls += list(classes[probs.argmax(1)])
        out_conf += list(probs.max(1))
        stages["read"] += t1 - t
        stages["decode"] += t2 - t1
        stages["preprocess"] += t3 - t2
        stages["infer"] += t4 - t3
    t = time.perf_counter()
    pq.write_table(pa.table({"image_uri": out_uri, "predicted_class": out_cls,
                             "confidence": np.asarray(out_conf, dtype=np.float32)}), io.BytesIO())
    stages["write"] = time.perf_counter() - t
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "cpu_seconds": time.process_time() - cpu0, "images_per_s": len(paths) / seconds,
            "stage_seconds": stages, "batch_size": batch_size, "torch_threads": torch.get_num_threads()}


def ceiling(uris: list[str], storage_options: dict, checkpoint: str | None, cores: int,
            batch_size: int = 64) -> dict[str, Any]:
    """(c) CPU cost per image of read + decode + preprocess + model with 1 torch thread, times the cores."""
    import torch

    from bloodray.nightly import pipeline as classify
    from bloodray.predict import CellPredictor
    from bloodray.data.decode import decode_image

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        predictor = CellPredictor(checkpoint, storage_options, device="cpu")
        preset = predictor.preset
        read = getattr(classify, "read_files", None)
        if read is None:  # older code: the generic reader
            from bloodray.data.labelled import read_many as read
        warm = [Path(u).read_bytes() if "://" not in u else None for u in uris[:batch_size]]
        if all(w is not None for w in warm):
            predictor({"image": np.stack([preset.load(w) for w in warm])})
        else:
            predictor({"image": np.zeros((batch_size, preset.input_size, preset.input_size, 3), np.uint8)})
        names = ("read", "decode", "preprocess", "infer")
        cpu = dict.fromkeys(names, 0.0)
        wall = dict.fromkeys(names, 0.0)
        for i in range(0, len(uris), batch_size):
            chunk = uris[i:i + batch_size]
            marks = [(time.process_time(), time.perf_counter())]
            datas = read(chunk, storage_options)
            marks.append((time.process_time(), time.perf_counter()))
            images = [decode_image(d, target_size=preset.input_size, max_pixels=preset.max_pixels) for d in datas]
            marks.append((time.process_time(), time.perf_counter()))
            arr = np.stack([preset.resize(im) for im in images])
            marks.append((time.process_time(), time.perf_counter()))
            predictor({"image": arr})
            marks.append((time.process_time(), time.perf_counter()))
            for name, (c0, w0), (c1, w1) in zip(names, marks, marks[1:]):
                cpu[name] += c1 - c0
                wall[name] += w1 - w0
    finally:
        torch.set_num_threads(threads)
    n = len(uris)
    per_image_ms = {k: v / n * 1e3 for k, v in cpu.items()}
    total_ms = sum(per_image_ms.values())
    # CPU time of this whole process: on S3 it includes the client's I/O thread, not the
    # moto server (a separate process).
    return {"images": n, "per_image_ms": per_image_ms, "per_image_total_ms": total_ms,
            "per_image_wall_ms": {k: v / n * 1e3 for k, v in wall.items()},
            "per_image_wall_total_ms": sum(wall.values()) / n * 1e3, "timing": "process CPU time",
            "cores": cores, "images_per_s": cores * 1e3 / total_ms,
            "model_batch": getattr(predictor, "micro_batch", None)}


def classify_job(archive: str, out: str, storage_options: dict, checkpoint: str | None,
                 sets: list[str], exclude: set[int] | None = None) -> dict[str, Any]:
    """(a) The nightly classify job through its library entry point; ``exclude``: pids left out of its CPU."""
    from bloodray.nightly.pipeline import run_classification

    cfg = common.classify_config(archive, out, storage_options, checkpoint, sets)
    monitor = common.TreeMonitor(interval=0.2, exclude=exclude, memory=False)
    monitor.start()
    start = time.perf_counter()
    try:
        result = run_classification(cfg)
    finally:
        seconds = time.perf_counter() - start
        usage = monitor.stop()
        cpu = usage["cpu_seconds"]
    return {"seconds": seconds, "images_per_s": result.n_inputs / seconds, "timings": result.timings,
            "cpu_seconds": cpu, "cpu_ms_per_image": cpu / max(1, result.n_inputs) * 1e3,
            "cpu_seconds_by_process": usage["cpu_seconds_by_process"],
            "n_inputs": result.n_inputs, "n_predictions": result.n_predictions, "n_errors": result.n_errors,
            "n_samples": result.n_samples, "overrides": sets}


def run_source(source: str, layout: list, tmp: Path, s3, args) -> dict[str, Any]:
    import ray

    from bloodray import storage

    n = len(layout)
    if source == "local":
        archive = str(common.link_archive(tmp / "archive", layout))
        warm_archive = str(common.link_archive(tmp / "warm", layout[:args.warmup]))
        so, fs = {}, None
        uris = [str(Path(archive) / rel) for rel, _ in layout]
        paths = uris
        out = str(tmp / "out")
    else:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        t = time.perf_counter()
        archive = s3.upload(bucket, "archive", layout)
        warm_archive = s3.upload(f"{bucket}-warm", "archive", layout[:args.warmup])
        print(f"[s3] uploaded {n} images in {time.perf_counter() - t:.1f}s (not timed)", flush=True)
        so = s3.storage_options
        fs = s3.filesystem()
        paths = [f"{bucket}/archive/{rel}" for rel, _ in layout]
        uris = [f"s3://{p}" for p in paths]
        out = storage.join(f"s3://{bucket}", "out")
    res: dict[str, Any] = {"source": source, "images": n}

    print(f"[{source}] (b) hand-written loop ...", flush=True)
    res["hand_loop"] = hand_loop(paths, fs, args.checkpoint)
    print(f"[{source}]     {res['hand_loop']['images_per_s']:.1f} images/s", flush=True)

    print(f"[{source}] (c) ceiling: per-image CPU cost with 1 torch thread ...", flush=True)
    res["ceiling"] = ceiling(uris[:args.ceiling_n], so, args.checkpoint, os.cpu_count())
    print(f"[{source}]     {res['ceiling']['per_image_total_ms']:.2f} ms/image -> "
          f"{res['ceiling']['images_per_s']:.1f} images/s on {os.cpu_count()} cores", flush=True)

    print(f"[{source}] (a) classify job (Ray Data) ...", flush=True)
    exclude = {s3.pid} if source == "s3" else set()  # the moto server is not the job
    if args.warmup:
        classify_job(warm_archive, out + "-warm", so, args.checkpoint, args.set, exclude)
    res["job"] = classify_job(archive, out, so, args.checkpoint, args.set, exclude)
    assert res["job"]["n_predictions"] == n, res["job"]
    res["job"]["cluster_resources"] = ray.cluster_resources()
    print(f"[{source}]     {res['job']['images_per_s']:.1f} images/s; timings {res['job']['timings']}; "
          f"CPU s by process {res['job']['cpu_seconds_by_process']}", flush=True)

    a, b, c = res["job"]["images_per_s"], res["hand_loop"]["images_per_s"], res["ceiling"]["images_per_s"]
    res["a_over_b"], res["a_over_c"] = a / b, a / c
    res["targets_met"] = {"a_over_b>=1.6": a / b >= TARGET_A_OVER_B, "a_over_c>=0.8": a / c >= TARGET_A_OVER_C}
    return res


def markdown(result: dict[str, Any]) -> str:
    md = [f"# Inference throughput ({result['images']} real PBC images, {result['checkpoint']})\n\n",
          common.facts_markdown(result), "\n"]
    rows = []
    for r in result["sources"]:
        rows.append([r["source"], r["job"]["images_per_s"], r["hand_loop"]["images_per_s"],
                     r["ceiling"]["images_per_s"], f"{r['a_over_b']:.2f}", f"{r['a_over_c']:.2f}"])
    md.append(common.table(["source", "a: job img/s", "b: hand loop img/s", "c: ceiling img/s", "a/b (>= 1.6)",
                            "a/c (>= 0.8)"], rows))
    for r in result["sources"]:
        t = r["job"]["timings"]
        hs, cm = r["hand_loop"]["stage_seconds"], r["ceiling"]["per_image_ms"]
        n = r["images"]
        md.append(f"\n## Stages, {r['source']}\n\n")
        job_rdi = t.get("read_decode_infer", 0.0)
        job_write = sum(t.get(k, 0.0) for k in ("write", "aggregate", "commit"))
        stage_rows = [
            ["list", f"{t.get('list', 0):.2f}", "-", "-"],
            ["read", f"{job_rdi:.2f} (read+decode+preprocess+infer, fused, {os.cpu_count()} cores)",
             f"{hs['read']:.2f}", f"{cm['read']:.3f}"],
            ["decode", "(fused above)", f"{hs['decode']:.2f}", f"{cm['decode']:.3f}"],
            ["preprocess", "(fused above)", f"{hs['preprocess']:.2f}", f"{cm['preprocess']:.3f}"],
            ["infer", "(fused above)", f"{hs['infer']:.2f}", f"{cm['infer']:.3f}"],
            ["write", f"{job_write:.2f} (write {t.get('write', 0):.2f} + aggregate {t.get('aggregate', 0):.2f}"
                      f" + commit {t.get('commit', 0):.2f})", f"{hs['write']:.2f}", "-"],
            ["total", f"{r['job']['seconds']:.2f}", f"{r['hand_loop']['seconds']:.2f}",
             f"{r['ceiling']['per_image_total_ms']:.3f}"],
        ]
        md.append(common.table(["stage", "a: job wall s", "b: hand loop wall s", "c: CPU ms/image, 1 thread"],
                               stage_rows))
        rdi_rate = n / job_rdi if job_rdi else float("nan")
        md.append(f"\nJob streaming part alone (read_decode_infer): {rdi_rate:.1f} images/s = "
                  f"{rdi_rate / r['ceiling']['images_per_s']:.2f} of the ceiling; fixed costs (list, actor start, "
                  f"aggregate, commit) make up the rest of the end-to-end time.\n")
        job_cpu = r["job"]["cpu_ms_per_image"]
        md.append(f"\nCPU per image (all processes of the job: driver, Ray, actors{'; not the S3 server' if r['source'] == 's3' else ''}): "
                  f"{job_cpu:.2f} ms, vs {r['ceiling']['per_image_total_ms']:.2f} ms for read + decode + preprocess "
                  f"+ model alone (c) and {r['hand_loop']['cpu_seconds'] / n * 1e3:.2f} ms for the hand loop (b, "
                  f"{r['hand_loop']['torch_threads']} torch threads). On a busy machine this ratio "
                  f"({r['ceiling']['per_image_total_ms'] / job_cpu:.2f}) is the steadier figure of the job's overhead.\n")
        by_process = ", ".join(f"{k} {v:.1f}" for k, v in r["job"]["cpu_seconds_by_process"].items())
        md.append(f"\nJob CPU seconds by process: {by_process}.\n")
    return "".join(md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=0,
                        help="images (default 0 = all 9,932). The job pays a fixed ~2-3 s on 2 cores to start its "
                             "actor processes (Ray Data, torch imports); at --n 2000 that is a third of the run")
    parser.add_argument("--source", choices=["local", "s3", "both"], default="local")
    parser.add_argument("--checkpoint", default=None, help="checkpoint dir (default: the packaged model)")
    parser.add_argument("--ceiling-n", type=int, default=1024, help="images timed for the ceiling (c)")
    parser.add_argument("--warmup", type=int, default=256, help="images of the untimed warm-up job (0: none)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra classify config override for (a), e.g. inference.batch_size=128")
    parser.add_argument("--name", default="inference", help="result file name under bench/results/")
    args = parser.parse_args()

    import ray

    from bloodray.checkpoint import read_metadata, resolve_checkpoint

    meta = read_metadata(resolve_checkpoint(args.checkpoint))
    images = common.pbc_images(args.n or None)
    layout = common.archive_layout(images)
    result: dict[str, Any] = {"benchmark": "inference", "images": len(images), "checkpoint":
                              f"{args.checkpoint or 'packaged default'}: {meta.checkpoint_id}, "
                              f"{meta.input_size} px",
                              "machine": common.machine_facts(), "run": common.run_facts(), "sources": []}
    sources = ["local", "s3"] if args.source == "both" else [args.source]
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False)
    try:
        with tempfile.TemporaryDirectory(prefix="bloodray-bench-") as tmp:
            s3 = common.MotoS3().start() if "s3" in sources else None
            try:
                for source in sources:
                    result["sources"].append(run_source(source, layout, Path(tmp) / source, s3, args))
            finally:
                if s3 is not None:
                    s3.stop()
    finally:
        ray.shutdown()
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    js, md = common.save(args.name, result, markdown(result))
    print()
    print(md.read_text())
    print(f"saved {js} and {md}")


if __name__ == "__main__":
    main()
