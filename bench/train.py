"""Training throughput of bloodnet: Ray Train data parallelism against plain PyTorch.

Measures images/s of training (forward, backward, optimizer step, with the
training augmentation and normalization of every batch) on real PBC images:

(a) Ray Train, ``--workers`` workers x ``--cpus-per-worker`` CPU, through the
    product's own path: :func:`bloodray.train.ray_trainer.run_training` (split manifest,
    Ray Data decode, ``TorchTrainer`` + ``train_loop_per_worker``,
    ``get_dataset_shard`` iteration, DDP, per-epoch validation and checkpoint);
(b) one plain PyTorch process, ``torch.set_num_threads(1)``, same model,
    training images, batch size per worker, augmentation and optimizer;
(c) one plain process with ``--threads-c`` threads (default 2) and the global
    batch of (a) (``--workers`` x ``--batch-size``; ``--c-batch`` overrides).

Throughput is measured in the steady state: every variant trains ``--epochs``
epochs over the same training split and the first ``--warmup-epochs`` are
left out. Only the training part of an epoch counts (for (a) rank 0's
``train_seconds``: iterating its shard, augmenting, stepping), not validation
or checkpoints; (a) counts the images of all workers.

The plain loops run with the same allocator settings that ``run_training``
gives its workers (``bloodray.train.ray_trainer.TRAIN_WORKER_ENV``: the script restarts
itself once with them); Ray's own processes start without them.

Reported: scaling efficiency = a / (workers x b) (target >= 0.85) and a / c,
plus machine facts (CPU count and model, versions, load average), the command,
the date, the git commit, the cores other processes kept busy during each
measurement, and where the CPU went during (a)'s training phases (per process
of this Ray session: train workers, SplitCoordinator, raylet, GCS, ...).

CPU milliseconds per training image are reported too: unlike images/s they
hardly change when other processes share the machine. From them the report
also estimates what (a) and (b) would reach on an idle machine (workers' CPU
per image; Ray's other processes counted as cores taken from the workers), so
a run on a busy machine still says something. Results are printed and written
to ``bench/results/train_scaling.json`` and ``.md``.

Default input size: 100 px (bloodnet's own, as in configs/train/bloodnet.yaml).

Command for the reference run (quiet machine; about 6-10 minutes on 2 cores)::

    .venv/bin/python bench/train.py --n 4000 --epochs 3

Quick check that everything works (a few minutes)::

    .venv/bin/python bench/train.py --n 400 --epochs 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_DATA = "/work/shared/data/pbc"
RESULTS = REPO / "bench" / "results"
CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# ----------------------------------------------------------------------------- machine facts and CPU accounting


def machine_facts() -> dict[str, Any]:
    import ray
    import torch

    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "bloodray", "bench/train.py"], cwd=REPO,
                                    capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "numpy": np.__version__,
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "git_commit": commit,
        "git_dirty_bloodray": dirty,
    }


def _machine_busy_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle, sum(fields[:8])


def _process_table() -> dict[int, tuple[int, str, int]]:
    """pid -> (ppid, name, utime + stime jiffies) for every process we can read."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2:].split()
        table[int(entry)] = (int(rest[1]), _short_name(cmd, stat[stat.index("(") + 1:stat.rindex(")")]),
                             int(rest[11]) + int(rest[12]))
    return table


def _short_name(cmd: str, comm: str) -> str:
    if cmd.startswith("ray::"):
        return cmd.split()[0].split(".")[0]  # ray::RayTrainWorker, ray::SplitCoordinator, ...
    if not cmd:
        return comm
    words = cmd.split()
    base = os.path.basename(words[0])
    if base.startswith("python"):
        for word in words[1:]:
            if not word.startswith("-"):
                return f"python {os.path.basename(word)}"
    return base


class CpuSampler:
    """Samples, twice a second, the CPU time of this process tree and of the whole machine.

    Its own CPU time is taken off this process's figures.
    """

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.samples: list[tuple[float, dict[int, tuple[str, int]], tuple[int, int] | None, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "CpuSampler":
        if os.path.isdir("/proc"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        me = os.getpid()
        while True:
            table = _process_table()
            children: dict[int, list[int]] = {}
            for pid, (ppid, _, _) in table.items():
                children.setdefault(ppid, []).append(pid)
            tree, todo = {}, [me]
            while todo:
                pid = todo.pop()
                if pid in table:
                    tree[pid] = (table[pid][1], table[pid][2])
                todo += children.get(pid, [])
            self.samples.append((time.time(), tree, _machine_busy_ticks(), time.thread_time()))
            if self._stop.wait(self.interval):
                break

    def window(self, start: float, end: float) -> dict[str, Any] | None:
        """CPU use between two unix times: cores used per process name of our tree, and by everything else."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return None
        (t0, first, m0, own0), (t1, last, m1, own1) = inside[0], inside[-1]
        seconds = t1 - t0
        per_name: dict[str, float] = {}
        for pid, (name, ticks) in last.items():
            before = first[pid][1] if pid in first else 0
            per_name[name] = per_name.get(name, 0.0) + (ticks - before) / CLK / seconds
        sampler = (own1 - own0) / seconds
        me = last.get(os.getpid(), (None,))[0]
        if me in per_name:
            per_name[me] = max(0.0, per_name[me] - sampler)
        ours = sum(per_name.values())
        out = {"seconds": seconds, "cores_by_process": {k: v for k, v in per_name.items() if v >= 0.0005},
               "cores_this_run": ours, "bench_sampler_cores": sampler}
        if m0 and m1 and m1[1] > m0[1]:
            machine = (m1[0] - m0[0]) / (m1[1] - m0[1]) * (os.cpu_count() or 1)
            out["cores_machine_busy"] = machine
            out["cores_other_processes"] = max(0.0, machine - ours - sampler)
        return out

    def training_phases(self, epochs: list[dict[str, Any]]) -> dict[str, Any] | None:
        """CPU per process during the training part of each epoch only (not validation, not checkpoints).

        The cores a process used inside an epoch's window, times that epoch's training seconds.
        """
        cpu_seconds: dict[str, float] = {}
        images = seconds = other = 0.0
        for epoch in epochs:
            window = self.window(epoch["start_unix"], epoch["end_unix"])
            if not window:
                continue
            for name, cores in window["cores_by_process"].items():
                cpu_seconds[name] = cpu_seconds.get(name, 0.0) + cores * epoch["seconds"]
            images += epoch["images"]
            seconds += epoch["seconds"]
            other += window.get("cores_other_processes", float("nan")) * epoch["seconds"]
        if not images:
            return None
        ranked = sorted(cpu_seconds.items(), key=lambda kv: -kv[1])
        return {"seconds": round(seconds, 2), "images": images,
                "cores_by_process": {k: round(v / seconds, 4) for k, v in ranked},
                "cpu_ms_per_image_by_process": {k: round(1000 * v / images, 3) for k, v in ranked},
                "cpu_ms_per_image": round(1000 * sum(cpu_seconds.values()) / images, 3),
                "cores_this_run": round(sum(cpu_seconds.values()) / seconds, 4),
                "cores_other_processes": round(other / seconds, 3)}


# ----------------------------------------------------------------------------- setup shared by the variants


def bench_config(args, storage_path: str):
    from bloodray.train.ray_trainer import load_train_config

    overrides = {
        "data.root": args.data,
        "data.max_per_class": math.ceil(args.n / 8),
        "data.split.train": 0.8, "data.split.val": 0.1, "data.split.test": 0.1,
        "model.name": args.model,
        "model.input_size": args.input_size,
        "train.epochs": args.epochs,
        "train.batch_size": args.batch_size,
        "train.evaluate_test": "false",
        "scaling.num_workers": args.workers,
        "scaling.cpus_per_worker": args.cpus_per_worker,
        "run.name": "bench-train",
        "run.storage_path": storage_path,
        "run.keep_checkpoints": args.epochs,
    }
    return load_train_config(str(REPO / "configs" / "train" / "bloodnet.yaml"),
                             [f"{k}={v}" for k, v in overrides.items()])


def decode_train_images(cfg, table) -> tuple[np.ndarray, np.ndarray]:
    """The training split decoded in this process exactly as the Ray Data stage does it."""
    from bloodray.data.labelled import decode_batch, rows_of

    rows = rows_of(table, "train")
    images, labels = [], []
    for start in range(0, len(rows), 256):
        chunk = rows[start:start + 256]
        out = decode_batch({"uri": np.array([r["uri"] for r in chunk], dtype=object),
                            "label": np.array([r["label"] for r in chunk], dtype=np.int64)},
                           input_size=cfg.input_size, max_pixels=cfg.data.max_pixels)
        ok = np.array([not e for e in out["error"]], dtype=bool)
        images.append(out["image"][ok])
        labels.append(out["label"][ok])
    return np.concatenate(images), np.concatenate(labels)


def _summarise(epochs: list[dict[str, float]], warmup: int) -> dict[str, Any]:
    steady = epochs[warmup:] or epochs[-1:]
    images = sum(e["images"] for e in steady)
    seconds = sum(e["seconds"] for e in steady)
    return {"images_per_second": images / seconds if seconds else float("nan"),
            "steady_epochs": [e["epoch"] for e in steady], "steady_images": images,
            "steady_seconds": round(seconds, 3), "epochs": epochs}


# ----------------------------------------------------------------------------- (b), (c): plain PyTorch


def plain_torch(cfg, images: np.ndarray, labels: np.ndarray, *, threads: int, batch_size: int, epochs: int,
                warmup: int, seed: int = 0) -> dict[str, Any]:
    """A hand-written training loop: no Ray, no DDP, batches sliced from an in-memory array."""
    import torch

    from bloodray.classes import NUM_CLASSES
    from bloodray.data.augment import augment_batch
    from bloodray.data.preset import EvalPreset
    from bloodray.models import create_model, get_model_info
    from bloodray.train.recipe import start_training, train_step

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    info = get_model_info(cfg.model.name)
    preset = EvalPreset(cfg.input_size, info.mean, info.std)
    model = create_model(cfg.model.name, NUM_CLASSES, **cfg.builder_kwargs())
    recipe = cfg.train.recipe()
    # The same optimizer, per-step schedule, loss and weight average as the Ray Train workers.
    state = start_training(model, recipe, -(-len(images) // batch_size))
    augment = cfg.train.augment.to_augment() if cfg.train.augment.enabled else None
    rng = np.random.default_rng(seed)
    model.train()
    records = []
    for epoch in range(epochs):
        order = rng.permutation(len(images))
        wall, cpu = time.perf_counter(), time.process_time()
        start_unix = time.time()
        loss_sum = 0.0
        for start in range(0, len(order), batch_size):
            idx = np.sort(order[start:start + batch_size])
            batch = images[idx]
            if augment is not None:
                batch = augment_batch(batch, rng, augment)
            x = preset.normalize(batch)
            loss = train_step(state, x, torch.from_numpy(labels[idx]), recipe)
            loss_sum += float(loss) * len(idx)
        seconds = time.perf_counter() - wall
        records.append({"epoch": epoch + 1, "images": len(order), "seconds": seconds,
                        "images_per_second": len(order) / seconds, "process_cpu_per_wall": (time.process_time() - cpu) / seconds,
                        "train_loss": loss_sum / len(order), "start_unix": start_unix, "end_unix": time.time()})
        print(f"  epoch {epoch + 1}: {len(order) / seconds:.1f} img/s  ({seconds:.1f} s, "
              f"{records[-1]['process_cpu_per_wall']:.2f} CPU/wall, loss {loss_sum / len(order):.3f})", flush=True)
    return _summarise(records, warmup) | {"threads": threads, "batch_size": batch_size}


# ----------------------------------------------------------------------------- (a): Ray Train


def ray_train(cfg, warmup: int) -> dict[str, Any]:
    from bloodray.checkpoint import read_metadata
    from bloodray.train.ray_trainer import run_training

    result = run_training(cfg)
    last = os.path.join(cfg.run_uri, f"checkpoint_epoch{cfg.train.epochs:04d}")
    history = read_metadata(last if os.path.isdir(last) else result.best_checkpoint).history
    records = [{"epoch": h["epoch"], "images": h["train_images_per_second"] * h["train_seconds"],
                "seconds": h["train_seconds"], "images_per_second": h["train_images_per_second"],
                "epoch_seconds_with_val_and_checkpoint": h["epoch_seconds"], "train_loss": h["train_loss"],
                "torch_threads_per_worker": h.get("torch_threads"),
                "start_unix": h["train_ended_unix"] - h["train_seconds"], "end_unix": h["train_ended_unix"]}
               for h in history]
    for r in records:
        print(f"  epoch {r['epoch']}: {r['images_per_second']:.1f} img/s  ({r['seconds']:.1f} s training, "
              f"{r['epoch_seconds_with_val_and_checkpoint']:.1f} s with validation + checkpoint)", flush=True)
    return _summarise(records, warmup) | {"workers": cfg.scaling.num_workers,
                                          "cpus_per_worker": cfg.scaling.cpus_per_worker,
                                          "batch_size_per_worker": cfg.train.batch_size}


# ----------------------------------------------------------------------------- report


def cpu_time_estimate(a: dict[str, Any], b: dict[str, Any], cores: float) -> dict[str, Any] | None:
    """What (a) and (b) would reach on an otherwise idle machine, from the CPU time they used per image.

    The training workers' CPU per image is work per image; Ray's other processes (raylet, GCS,
    coordinators, controller, driver, ...) poll at a steady rate, so they are counted as cores
    taken from the workers. Assumes CPU-bound training and no contention for caches or memory.
    """
    cpu_a, cpu_b = a.get("cpu"), b.get("cpu")
    if not cpu_a or not cpu_b or "ray::RayTrainWorker" not in cpu_a["cpu_ms_per_image_by_process"]:
        return None
    worker_ms = cpu_a["cpu_ms_per_image_by_process"]["ray::RayTrainWorker"]
    background = cpu_a["cores_this_run"] - cpu_a["cores_by_process"]["ray::RayTrainWorker"]
    a_est = (cores - background) / worker_ms * 1000
    b_est = 1000 / b["cpu_ms_per_image"]
    return {"a_worker_cpu_ms_per_image": worker_ms, "a_other_ray_processes_cores": round(background, 3),
            "b_cpu_ms_per_image": b["cpu_ms_per_image"], "a_images_per_second": round(a_est, 1),
            "b_images_per_second": round(b_est, 1), "scaling_efficiency": round(a_est / (cores * b_est), 4)}


def markdown(report: dict[str, Any]) -> str:
    m, p, r = report["machine"], report["params"], report["results"]
    lines = [
        "# Training throughput: Ray Train vs plain PyTorch",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- git commit: {m['git_commit']}" + (" (bloodray/ or bench/ modified)" if m.get("git_dirty_bloodray") else ""),
        f"- machine: {m['cpu_count']} CPUs, {m['cpu_model']}; {m['platform']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['loadavg_at_start'] or [])}",
        f"- versions: python {m['python']}, torch {m['torch']}, ray {m['ray']}, numpy {m['numpy']}",
        f"- model {p['model']} at {p['input_size']} px; {p['n_train']} training images of {p['n_scanned']} PBC images "
        f"(`--n {p['n']}`); {p['epochs']} epochs, first {p['warmup_epochs']} left out; augmentation "
        f"{'on' if p['augment'] else 'off'}; optimizer {p['optimizer']}",
        "",
        "| variant | setup | batch | images/s (steady) | CPU ms per image | CPU busy by others |",
        "|---|---|---|---|---|---|",
    ]
    labels = {"a": "(a) Ray Train", "b": "(b) plain PyTorch", "c": "(c) plain PyTorch"}
    for key in ("a", "b", "c"):
        if key not in r:
            continue
        v = r[key]
        if key == "a":
            setup = f"{v['workers']} workers x {v['cpus_per_worker']} CPU, DDP"
            batch = f"{v['batch_size_per_worker']} per worker"
        else:
            setup = f"1 process, {v['threads']} thread{'s' if v['threads'] > 1 else ''}"
            batch = str(v["batch_size"])
        other = (v.get("cpu") or {}).get("cores_other_processes")
        cost = v.get("cpu_ms_per_image")
        lines.append(f"| {labels[key]} | {setup} | {batch} | {v['images_per_second']:.1f} | "
                     f"{'n/a' if cost is None else f'{cost:.1f}'} | "
                     f"{'n/a' if other is None else f'{other:.2f} cores'} |")
    ratios = report.get("ratios", {})
    lines.append("")
    if "scaling_efficiency" in ratios:
        lines.append(f"- scaling efficiency a / ({p['workers']} x b) = **{ratios['scaling_efficiency']:.1%}** "
                     f"(target >= 85 %)")
    if "a_over_c" in ratios:
        lines.append(f"- a / c = **{ratios['a_over_c']:.2f}**")
    est = report.get("cpu_time_estimate")
    if est:
        lines.append(f"- estimate for an idle machine from CPU time per image: a {est['a_images_per_second']:.0f} img/s "
                     f"(workers {est['a_worker_cpu_ms_per_image']:.1f} ms/image, other Ray processes "
                     f"{est['a_other_ray_processes_cores']:.2f} cores), b {est['b_images_per_second']:.0f} img/s "
                     f"({est['b_cpu_ms_per_image']:.1f} ms/image): scaling efficiency ~{est['scaling_efficiency']:.0%}")
    cpu = (r.get("a") or {}).get("cpu")
    if cpu:
        lines += ["", f"CPU use during the training part of (a)'s steady epochs ({cpu['seconds']:.1f} s; validation "
                      "and checkpoints left out), per process of this Ray session:",
                  "", "| process | cores | CPU ms per training image |", "|---|---|---|"]
        per_image = cpu["cpu_ms_per_image_by_process"]
        lines += [f"| {name} | {cores:.3f} | {per_image[name]:.2f} |"
                  for name, cores in cpu["cores_by_process"].items() if cores >= 0.003]
        lines.append(f"| (other processes on the machine) | {cpu['cores_other_processes']:.3f} | |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA, help="folder of <class>/ image folders (PBC)")
    parser.add_argument("--n", type=int, default=4000, help="PBC images to use (n/8 per class; 80%% train)")
    parser.add_argument("--model", default="bloodnet")
    parser.add_argument("--input-size", type=int, default=100, help="input side in px (default 100)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per worker per step")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--warmup-epochs", type=int, default=1, help="leading epochs left out of the figures")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--threads-c", type=int, default=2, help="torch threads of variant (c)")
    parser.add_argument("--c-batch", type=int, default=None, help="batch of (c); default workers x batch-size")
    parser.add_argument("--only", default="abc", help="variants to run, e.g. 'a' or 'bc'")
    parser.add_argument("--out", default=str(RESULTS), help="folder for train_scaling.json/.md")
    args = parser.parse_args(argv)
    if args.epochs <= args.warmup_epochs:
        parser.error("--epochs must be larger than --warmup-epochs")

    from bloodray.train.ray_trainer import TRAIN_WORKER_ENV, prepare_split

    # (a)'s workers get bloodray's allocator settings from run_training; the plain loops (b) and (c)
    # run in this process, so it restarts itself once with the same settings (glibc reads them at start).
    if any(os.environ.get(k) != v for k, v in TRAIN_WORKER_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **TRAIN_WORKER_ENV})
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

    report: dict[str, Any] = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                              "command": " ".join([os.path.relpath(sys.executable, REPO)
                                                   if sys.executable.startswith(str(REPO)) else "python",
                                                   os.path.relpath(__file__, REPO), *sys.argv[1:]]),
                              "machine": machine_facts(), "results": {},
                              "allocator_env_of_b_c_and_a_workers": dict(TRAIN_WORKER_ENV)}
    with tempfile.TemporaryDirectory(prefix="bloodray-bench-") as tmp, CpuSampler() as sampler:
        cfg = bench_config(args, tmp)
        table, _ = prepare_split(cfg.run_uri, cfg.data, cfg.storage.storage_options())
        n_train = sum(1 for s in table.column("split").to_pylist() if s == "train")
        report["params"] = {"n": args.n, "n_scanned": table.num_rows, "n_train": n_train, "model": cfg.model.name,
                            "input_size": cfg.input_size, "epochs": args.epochs, "warmup_epochs": args.warmup_epochs,
                            "workers": args.workers, "batch_size": args.batch_size,
                            "augment": cfg.train.augment.enabled, "optimizer": cfg.train.optimizer,
                            "lr": cfg.train.lr}
        print(f"[bench] {cfg.model.name} @ {cfg.input_size} px, {n_train} training images, {args.epochs} epochs",
              flush=True)
        results = report["results"]
        if "b" in args.only or "c" in args.only:
            images, labels = decode_train_images(cfg, table)
            for key, threads, batch in (("b", 1, args.batch_size),
                                        ("c", args.threads_c, args.c_batch or args.workers * args.batch_size)):
                if key not in args.only:
                    continue
                print(f"[bench] ({key}) plain PyTorch, {threads} thread(s), batch {batch}", flush=True)
                results[key] = plain_torch(cfg, images, labels, threads=threads, batch_size=batch,
                                           epochs=args.epochs, warmup=args.warmup_epochs)
            del images, labels
        if "a" in args.only:
            import ray

            print(f"[bench] (a) Ray Train, {args.workers} workers x {args.cpus_per_worker} CPU", flush=True)
            # Ray's processes must not inherit this process's allocator settings: (a) gets only what
            # run_training gives its workers.
            for key in TRAIN_WORKER_ENV:
                os.environ.pop(key, None)
            if not ray.is_initialized():
                ray.init(include_dashboard=False, configure_logging=False)
            try:
                results["a"] = ray_train(cfg, args.warmup_epochs)
            finally:
                ray.shutdown()
        time.sleep(sampler.interval * 1.5)
    for key, value in results.items():
        steady = [e for e in value["epochs"] if e["epoch"] in value["steady_epochs"]]
        # CPU time per image hardly depends on what else runs on the machine: the figure to trust when it is busy.
        value["cpu"] = sampler.training_phases(steady)
        if value["cpu"]:
            value["cpu_ms_per_image"] = value["cpu"]["cpu_ms_per_image"]

    ratios = report["ratios"] = {}
    if "a" in results and "b" in results:
        ratios["scaling_efficiency"] = results["a"]["images_per_second"] / (args.workers * results["b"]["images_per_second"])
        report["cpu_time_estimate"] = cpu_time_estimate(results["a"], results["b"], args.workers * args.cpus_per_worker)
    if "a" in results and "c" in results:
        ratios["a_over_c"] = results["a"]["images_per_second"] / results["c"]["images_per_second"]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (out / "train_scaling.md").write_text(text)
    print("\n" + text)
    print(f"[bench] wrote {out / 'train_scaling.json'} and {out / 'train_scaling.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
