"""bf16 against fp32 training on CPU, end to end through the product's Ray Train job (issue 20 item 3).

Runs :func:`bloodray.train.ray_trainer.run_training` (split manifest, Ray Data decode, ``TorchTrainer`` with the
training augmentation in the workers' iterators, DDP, per-epoch validation and checkpoint) once per precision, one
after the other in the same process, with the same config, seed and schedule, on real PBC images (by default the
whole training split of ``configs/train/bloodnet.yaml``'s 70/10/20 split) at 128 px:

- training images/s of the steady epochs (the first ``--warmup-epochs`` left out; rank 0's training part of each
  epoch, augmentation included, all workers' images counted): bf16 / fp32 is the ratio to quote;
- val accuracy and macro-F1 after the same epochs;
- seconds per epoch (training + validation + checkpoint) and what ``--project-epochs`` epochs (default 60) of
  a from-scratch run would take at that rate on this machine;
- first, the bare training step in this process (fp32 / bf16, contiguous / channels_last), which says how much
  of the job's ratio the arithmetic alone gives.

The precision actually used (and why: ``train.precision=bf16`` falls back to fp32 on a CPU without native bf16)
is recorded beside each figure, with the CPU model, its bf16 flags and the load average (the machine may be shared).

Command of the figures in BENCHMARKS.md (about 20 minutes on 2 cores)::

    PYTHONPATH=. python bench/train_precision.py --epochs 3

Quick check (a few minutes)::

    PYTHONPATH=. python bench/train_precision.py --n 800 --epochs 2 --input-size 64
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PBC, REPO, facts_markdown, machine_facts, run_facts, save, table  # noqa: E402


def train_once(args, precision: str, storage: str) -> dict:
    from bloodray.checkpoint import read_metadata, run_checkpoints
    from bloodray.train.ray_trainer import load_train_config, run_training

    overrides = {
        "data.root": str(args.data),
        "model.name": "bloodnet",
        "model.input_size": args.input_size,
        "train.epochs": args.epochs,
        "train.precision": precision,
        "train.evaluate_test": "false",
        "run.name": f"bench-{precision}",
        "run.storage_path": storage,
        "run.keep_checkpoints": args.epochs,
    }
    if args.n:
        overrides["data.max_per_class"] = math.ceil(args.n / 8)
    if args.workers:
        overrides["scaling.num_workers"] = args.workers
    cfg = load_train_config(str(REPO / "configs" / "train" / "bloodnet.yaml"),
                            [f"{k}={v}" for k, v in overrides.items()] + list(args.set))
    load_before = os.getloadavg()
    started = time.perf_counter()
    run_training(cfg)
    wall = time.perf_counter() - started
    history = read_metadata(run_checkpoints(cfg.run_uri)[-1]).history
    steady = history[args.warmup_epochs:] or history[-1:]
    train_images = sum(h["train_images_per_second"] * h["train_seconds"] for h in steady)
    train_seconds = sum(h["train_seconds"] for h in steady)
    epoch_seconds = sum(h["epoch_seconds"] for h in steady) / len(steady)
    last = history[-1]
    return {
        "requested": precision, "precision": last["precision"], "precision_reason": last["precision_reason"],
        "train_images_per_second": train_images / train_seconds,
        "train_images_per_epoch": round(train_images / len(steady)),
        "epoch_seconds": epoch_seconds,
        "val_accuracy": last["val_accuracy"], "val_macro_f1": last["val_macro_f1"],
        "wall_seconds": wall, "fixed_seconds": wall - sum(h["epoch_seconds"] for h in history),
        f"projected_{args.project_epochs}_epochs_minutes": (args.project_epochs * epoch_seconds
                                                            + (wall - sum(h["epoch_seconds"] for h in history))) / 60,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "history": history,
    }


def training_steps(input_size: int, batch: int = 32, threads: int = 2, steps: int = 8) -> dict:
    """The bare training step (shared recipe, bloodnet + BN, random batch) in fp32 and bf16, contiguous and
    channels_last, in this process with ``threads`` torch threads: what the Ray job's figures are made of."""
    import contextlib

    import torch

    from bloodray.classes import NUM_CLASSES
    from bloodray.models import create_model
    from bloodray.train.recipe import Recipe, start_training, train_step

    torch.set_num_threads(threads)
    x, y = torch.randn(batch, 3, input_size, input_size), torch.randint(0, NUM_CLASSES, (batch,))
    recipe = Recipe(epochs=1, lr=1e-3)
    out = {}
    for name, bf16, channels_last in (("fp32", False, False), ("fp32_channels_last", False, True),
                                      ("bf16", True, False), ("bf16_channels_last", True, True)):
        torch.manual_seed(0)
        model = create_model("bloodnet", NUM_CLASSES, input_size=input_size, batch_norm=True)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model, xi = model.to(memory_format=fmt), x.contiguous(memory_format=fmt)
        state = start_training(model, recipe, 100)
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        for _ in range(3):
            train_step(state, xi, y, recipe, amp)
        started = time.perf_counter()
        for _ in range(steps):
            train_step(state, xi, y, recipe, amp)
        out[name] = batch * steps / (time.perf_counter() - started)
        print(f"step {name}: {out[name]:.1f} img/s", flush=True)
    return out


def start_ray(attempts: int = 6) -> None:
    """One local cluster for every variant; retried, since Ray gives a node 30 s to start and a loaded shared
    machine can take longer (run_training joins the cluster that is already up)."""
    import ray

    for attempt in range(attempts):
        try:
            ray.init(include_dashboard=False, log_to_driver=True)
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for the start-up timeout
            ray.shutdown()
            if "timed out during startup" not in str(exc) or attempt == attempts - 1:
                raise
            print(f"ray start-up timed out (attempt {attempt + 1}); retrying", flush=True)
            time.sleep(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=PBC)
    parser.add_argument("--n", type=int, default=0, help="images in all (per class: n/8); 0 = every PBC image")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0, help="Ray Train workers (0 = the config's)")
    parser.add_argument("--project-epochs", type=int, default=60)
    parser.add_argument("--precisions", default="fp32,bf16", help="Ray Train variants ('' = the step comparison only)")
    parser.add_argument("--set", action="append", default=[], help="more dotted.key=value overrides")
    parser.add_argument("--name", default="train_precision")
    parser.add_argument("--no-steps", action="store_true", help="skip the bare training-step comparison")
    args = parser.parse_args()

    from bloodray.precision import cpu_bf16_flags

    result = {"machine": {**machine_facts(), "cpu_bf16_flags": cpu_bf16_flags()}, "run": run_facts(),
              "settings": {k: str(v) for k, v in vars(args).items()}, "variants": {}}
    if not args.no_steps:
        result["training_steps_images_per_second"] = training_steps(args.input_size)
    precisions = [p for p in args.precisions.split(",") if p]
    if precisions:
        start_ray()
    else:
        report(args, result)
    with tempfile.TemporaryDirectory(prefix="bench-train-precision-") as tmp:
        for precision in precisions:
            out = train_once(args, precision, tmp)
            result["variants"][precision] = out
            print(f"{precision}: {out['train_images_per_second']:.1f} train img/s, {out['epoch_seconds']:.0f} s/epoch, "
                  f"val acc {out['val_accuracy']:.4f} ({out['precision']}: {out['precision_reason']})", flush=True)
            report(args, result)  # after every variant, so a long run that is stopped keeps what it measured


def report(args, result: dict) -> None:
    v = result["variants"]
    if {"fp32", "bf16"} <= set(v):
        result["bf16_over_fp32_images_per_second"] = v["bf16"]["train_images_per_second"] / v["fp32"]["train_images_per_second"]
        result["val_accuracy_points_bf16_minus_fp32"] = 100 * (v["bf16"]["val_accuracy"] - v["fp32"]["val_accuracy"])
    proj = f"projected_{args.project_epochs}_epochs_minutes"
    rows = [[k, o["precision"], o["train_images_per_second"], o["epoch_seconds"], o["train_images_per_epoch"],
             o["val_accuracy"], o["val_macro_f1"], o["fixed_seconds"], o[proj], o["load_average_before"]]
            for k, o in v.items()]
    md = (f"# bf16 vs fp32 training, Ray Train job end to end ({args.input_size} px bloodnet, {args.epochs} epochs)\n\n"
          + facts_markdown(result) + f"- CPU bf16 flags: {result['machine']['cpu_bf16_flags'] or 'none'}\n\n"
          + table(["requested", "ran in", "train img/s", "s/epoch", "train img/epoch", "val acc", "val macro-F1",
                   "fixed s", f"{args.project_epochs} epochs (min)", "load avg before"], rows))
    if result.get("training_steps_images_per_second"):
        steps = result["training_steps_images_per_second"]
        md += ("\nBare training step (same process, 2 threads, batch 32, img/s): "
               + ", ".join(f"{k} {v:.1f}" for k, v in steps.items())
               + f"; bf16+channels_last / fp32 = {steps['bf16_channels_last'] / steps['fp32']:.2f}x.\n")
    if "bf16_over_fp32_images_per_second" in result:
        md += (f"\nbf16 / fp32 training img/s: **{result['bf16_over_fp32_images_per_second']:.2f}x**; val accuracy "
               f"bf16 - fp32: {result['val_accuracy_points_bf16_minus_fp32']:+.2f} points.\n")
    save(args.name, result, md)
    print(md)


if __name__ == "__main__":
    main()
