"""Adapting the packaged model to another lab (issue 12), measured on chula_wbc through the real Ray Train job.

What it measures (printed, and saved to bench/results/adapt.json and .md):

1. zero-shot: accuracy and balanced accuracy of the packaged model on all 511 chula_wbc cells, with the
   BatchNorm running statistics (as shipped) and with test-time batch statistics (``bn_stats=batch``: every
   BatchNorm normalises with the statistics of the batch being scored, a zero-effort adaptation), and with the
   statistics re-estimated once on the target images (AdaBN);
2. the adaptation curve: chula_wbc split by series (the file-name prefix before ``_``; per class, every other
   series in sorted order goes to the labelled pool, the rest is scored), ``k`` labelled cells per class drawn
   from the pool with each seed, a fine-tune of the packaged model (or ``--checkpoint``) with
   ``bloodray.train.ray_trainer.run_training`` and ``configs/train/adapt.yaml`` as a lab would run it (``--lr``,
   ``--epochs``, ``--freeze-epochs``, ``--workers``, ``--batch-size`` and ``--set`` override it for a variant),
   then accuracy and balanced accuracy on the scored half and the PBC test accuracy of the adapted model
   (forgetting).

Run by hand (CPU, about half an hour on the 2-core development machine):

    nice -n 10 .venv/bin/python bench/adapt.py
    nice -n 5 .venv/bin/python bench/adapt.py --no-zero-shot --stain-norm --name adapt_stainnorm
    # the second: the chula cells Reinhard-normalised to PBC colours (bench/stain_norm.py) before the fine-tune
    # and before scoring
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _common import CHULA, decode, lab_stats, pbc_split_rows, predict, reinhard, scores  # noqa: E402

# Ray Train's 60 s for a worker group to start is too short on a loaded shared machine (set before ray.init).
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")



def series_split(root: Path) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Per class: (labelled pool, scored half), by series (file-name prefix before ``_``), deterministic."""
    pool, scored = {}, {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(folder.glob("*.jpg"))
        series = sorted({f.name.split("_")[0] for f in files})
        labelled = set(series[0::2])
        pool[folder.name] = [f for f in files if f.name.split("_")[0] in labelled]
        scored[folder.name] = [f for f in files if f.name.split("_")[0] not in labelled]
    return pool, scored


def adabn(model, images: np.ndarray, preset, batch_size: int = 64):
    """A copy of ``model`` whose BatchNorm statistics are re-estimated on ``images`` (shuffled batches)."""
    import copy

    from bloodray.train.recipe import precise_bn

    net = copy.deepcopy(model)
    order = np.random.default_rng(0).permutation(len(images))
    precise_bn(net, (preset.normalize(images[order[i:i + batch_size]]) for i in range(0, len(order), batch_size)))
    return net.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", default="5,10,20,50")
    ap.add_argument("--seeds", default="0,1,2")
    # Unset: configs/train/adapt.yaml's own values, so the bench measures what a lab would run.
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--freeze-epochs", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--pbc-test-max", type=int, default=500, help="score at most this many PBC test images (0 = all)")
    ap.add_argument("--set", action="append", default=[], help="extra dotted.key=value for every fine-tune")
    ap.add_argument("--workdir", default="/tmp/bloodray_adapt_bench")
    ap.add_argument("--name", default="adapt", help="results file name under bench/results/")
    ap.add_argument("--no-zero-shot", action="store_true", help="skip the zero-shot rows (a variant run)")
    ap.add_argument("--checkpoint", default="default",
                    help="the model to measure and adapt: a checkpoint or run dir, or default (the packaged model); "
                         "a checkpoint trained with stain normalisation applies it through its own preset")
    ap.add_argument("--stain-norm", action="store_true",
                    help="Reinhard-normalise the chula cells to PBC colour statistics (bench/stain_norm.py), both "
                         "the labelled cells the fine-tune reads (written as PNG) and the scored half")
    args = ap.parse_args()

    import ray
    import torch

    from bloodray.checkpoint import load_checkpoint
    from bloodray.classes import CLASS_TO_INDEX
    from bloodray.train.config import load_train_config
    from bloodray.train.ray_trainer import run_training

    torch.set_num_threads(2)
    # A model that predicts classes chula_wbc lacks is the point of the zero-shot rows, not a warning.
    warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
    started = time.perf_counter()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shipped = load_checkpoint(None if args.checkpoint == "default" else args.checkpoint)
    size, preset = shipped.metadata.input_size, shipped.metadata.preset()

    pool, scored = series_split(CHULA)
    every = {c: pool[c] + scored[c] for c in pool}
    chula_all = [f for c in sorted(every) for f in every[c]]
    y_all = np.array([CLASS_TO_INDEX[f.parent.name] for f in chula_all])
    x_all = decode(chula_all, size)
    held_names = {f for c in scored for f in scored[c]}
    held = np.array([f in held_names for f in chula_all])
    x_held, y_held = x_all[held], y_all[held]
    normalise = None
    if args.stain_norm:
        ref = [s.mean(0) for s in lab_stats(decode(_common.pbc_images()[::25][:400], size))]
        x_held = reinhard(x_held, *ref)

        def write_normalised(src: Path, dst: Path) -> None:
            """The original file, normalised at full resolution, as a lossless PNG."""
            from PIL import Image

            rgb = np.asarray(Image.open(src).convert("RGB"))
            Image.fromarray(reinhard(rgb[None], *ref)[0]).save(dst.with_suffix(".png"))

        normalise = write_normalised
    table, _ = pbc_split_rows()
    if args.pbc_test_max and args.pbc_test_max < len(table):
        # Every n-th image of the class-sorted list: a stratified subset.
        table = table[::-(-len(table) // args.pbc_test_max)]
    x_pbc = decode([Path(u) for u, _ in table], size)
    y_pbc = np.array([lab for _, lab in table])
    print(f"chula: {len(chula_all)} cells; pool {sum(map(len, pool.values()))}, scored {int(held.sum())}; "
          f"PBC test {len(y_pbc)}", flush=True)

    result = {"machine": _common.machine_facts(), "run": _common.run_facts(),
              "checkpoint": shipped.metadata.checkpoint_id, "stain_norm": shipped.metadata.stain_norm,
              "params": vars(args) | {"series": {c: sorted({f.name.split('_')[0] for f in pool[c]}) for c in pool},
                                      "pbc_test_scored": len(y_pbc)},
              "zero_shot": {}, "adapted": []}
    model = shipped.model
    for mode in () if args.no_zero_shot else ("running", "batch"):
        pred = predict(model, x_all, preset, mode)
        result["zero_shot"][f"chula_all_{mode}"] = scores(y_all, pred)
        # Batch statistics over the scored half alone, as a lab would run them on its own slides.
        result["zero_shot"][f"chula_scored_{mode}"] = scores(y_held, predict(model, x_held, preset, mode)
                                                             if mode == "batch" else pred[held])
        result["zero_shot"][f"pbc_test_{mode}"] = scores(y_pbc, predict(model, x_pbc, preset, mode))
    if not args.no_zero_shot:
        adapted = adabn(model, x_all, preset)
        result["zero_shot"]["chula_all_adabn"] = scores(y_all, predict(adapted, x_all, preset))
        print("zero-shot:", result["zero_shot"], flush=True)
    _common.save(args.name, result, markdown(result))

    if not ray.is_initialized():
        ray.init(num_cpus=max(2, (args.workers or 1) + 1), include_dashboard=False, log_to_driver=True)
    # Seeds outermost, so that a run stopped early still has every k for the first seeds.
    for seed in [int(v) for v in args.seeds.split(",")]:
        for k in [int(v) for v in args.ks.split(",")]:
            lab = work / f"lab_k{k}_s{seed}"
            rng = np.random.default_rng(1000 * k + seed)
            for c, files in pool.items():
                (lab / c).mkdir(parents=True)
                for i in sorted(rng.permutation(len(files))[:k]):
                    if normalise is not None:
                        normalise(files[i], lab / c / files[i].name)
                    else:
                        os.symlink(files[i], lab / c / files[i].name)
            cfg = load_train_config(str(_common.REPO / "configs/train/adapt.yaml"), [
                f"data.root={lab}", f"model.init_checkpoint={args.checkpoint}", f"run.name=k{k}_s{seed}",
                f"run.storage_path={work / 'runs'}",
                *(f"{key}={value}" for key, value in (
                    ("train.epochs", args.epochs), ("train.lr", args.lr),
                    ("train.freeze_backbone_epochs", args.freeze_epochs), ("train.batch_size", args.batch_size),
                    ("scaling.num_workers", args.workers)) if value is not None),
                f"train.seed={seed}", f"data.split.seed={seed}",
                "scaling.cpus_per_worker=1", "data.cpus_per_task=0.25", *args.set])
            t0 = time.perf_counter()
            out = run_training(cfg)
            seconds = time.perf_counter() - t0
            net = load_checkpoint(out.best_checkpoint).model
            row = {"k": k, "seed": seed, "train_seconds": round(seconds, 1),
                   "best_epoch": int(out.metrics.get("epoch", 0)),
                   "chula_scored": scores(y_held, predict(net, x_held, preset)),
                   "pbc_test": scores(y_pbc, predict(net, x_pbc, preset))}
            result["adapted"].append(row)
            print(f"k={k} seed={seed}: chula {row['chula_scored']['accuracy']:.4f} "
                  f"(balanced {row['chula_scored']['balanced_accuracy']:.4f}), PBC test "
                  f"{row['pbc_test']['accuracy']:.4f}, {seconds:.0f} s", flush=True)
            shutil.rmtree(work / "runs" / f"k{k}_s{seed}", ignore_errors=True)
            result["total_seconds"] = round(time.perf_counter() - started, 1)
            _common.save(args.name, result, markdown(result))  # after every run: partial results survive a stop
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    _common.save(args.name, result, markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    z, params = result["zero_shot"], result["params"]
    lines = ["# Adapting a trained model to chula_wbc (bench/adapt.py)", "", _common.facts_markdown(result), "",
             f"## Zero-shot ({params.get('checkpoint', 'default')})", "",
             _common.table(["scored on", "BN statistics", "accuracy", "balanced accuracy", "macro-F1"],
                           [[name.rsplit("_", 1)[0], name.rsplit("_", 1)[1], s["accuracy"], s["balanced_accuracy"],
                             s["macro_f1"]] for name, s in z.items()]), "",
             f"## Fine-tuned through Ray Train (configs/train/adapt.yaml, init_checkpoint={params.get('checkpoint', 'default')})", "",
             "Overrides of adapt.yaml: " + (", ".join(
                 [f"{key}={params[key]}" for key in ("epochs", "freeze_epochs", "lr", "workers", "batch_size")
                  if params.get(key) is not None] + list(params.get("set", []))) or "none (as shipped)") + ".", ""]
    rows = []
    for k in sorted({r["k"] for r in result["adapted"]}):
        runs = [r for r in result["adapted"] if r["k"] == k]
        acc = [r["chula_scored"]["accuracy"] for r in runs]
        bal = [r["chula_scored"]["balanced_accuracy"] for r in runs]
        pbc = [r["pbc_test"]["accuracy"] for r in runs]
        rows.append([k, len(runs), f"{np.mean(acc):.4f} ± {np.std(acc):.4f}", f"{np.mean(bal):.4f}",
                     f"{np.mean(pbc):.4f} ± {np.std(pbc):.4f}", f"{np.mean([r['train_seconds'] for r in runs]):.0f}"])
    lines += [_common.table(["k / class", "seeds", "chula scored half: accuracy", "balanced acc.",
                             "PBC test accuracy", "s / run"], rows), ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
