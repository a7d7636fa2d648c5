"""bf16 against fp32 training on CPU, end to end through the product's Ray Train job (issue 20 item 3).

Runs :func:`bloodray.train.ray_trainer.run_training` (split manifest, Ray Data decode, ``TorchTrainer`` with the
training augmentation in the workers' iterators, DDP, per-epoch validation and checkpoint) once per precision, one
after the other in the same process, with the same config, seed and schedule, on real PBC images (by default the
whole training split of ``configs/train/bloodnet.yaml``'s 70/10/20 split) at 128 px:

- training images/s of the steady epochs (the first ``--warmup-epochs`` left out; rank 0's training part of each
  epoch, augmentation included, all workers' images counted): bf16 / fp32 is the ratio to quote;
- val accuracy and macro-F1 after the same epochs;
- seconds per epoch (training + validation + checkpoint) and what ``--project-epochs`` epochs (default 60) of
  a from-scratch run would take at that rate on this machine.

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=PBC)
    parser.add_argument("--n", type=int, default=0, help="images in all (per class: n/8); 0 = every PBC image")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0, help="Ray Train workers (0 = the config's)")
    parser.add_argument("--project-epochs", type=int, default=60)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--set", action="append", default=[], help="more dotted.key=value overrides")
    parser.add_argument("--name", default="train_precision")
    args = parser.parse_args()

    from bloodray.precision import cpu_bf16_flags

    result = {"machine": {**machine_facts(), "cpu_bf16_flags": cpu_bf16_flags()}, "run": run_facts(),
              "settings": {k: str(v) for k, v in vars(args).items()}, "variants": {}}
    with tempfile.TemporaryDirectory(prefix="bench-train-precision-") as tmp:
        for precision in args.precisions.split(","):
            out = train_once(args, precision, tmp)
            result["variants"][precision] = out
            print(f"{precision}: {out['train_images_per_second']:.1f} train img/s, {out['epoch_seconds']:.0f} s/epoch, "
                  f"val acc {out['val_accuracy']:.4f} ({out['precision']}: {out['precision_reason']})", flush=True)
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
    if "bf16_over_fp32_images_per_second" in result:
        md += (f"\nbf16 / fp32 training img/s: **{result['bf16_over_fp32_images_per_second']:.2f}x**; val accuracy "
               f"bf16 - fp32: {result['val_accuracy_points_bf16_minus_fp32']:+.2f} points.\n")
    save(args.name, result, md)
    print(md)


if __name__ == "__main__":
    main()
