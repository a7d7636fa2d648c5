"""Inference paths side by side: the float stain transform in fp32 (what the job ran before issue 20) against the
fast uint8 stain transform in fp32 and in the default precision (``auto``), on the PBC test split and chula.

For each path, through :class:`bloodray.predict.CellPredictor` with the packaged model: accuracy, the share of cells
given the same class as the reference path, the largest change of a calibrated probability, the share with the
same ``unidentified`` decision; then each path's predictor speed on one core (preprocessed cells, stain
normalisation and model, best of ``--repeats``) over a micro-batch sweep. Run by hand (several minutes on 2 cores)::

    .venv/bin/python bench/precision.py [--speed-images 512]

Writes ``bench/results/precision.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _common import CHULA, decode, pbc_split_rows  # noqa: E402


def run(predictor, images: np.ndarray, float_stain: bool) -> dict[str, np.ndarray]:
    """The predictor's outputs; ``float_stain`` feeds a tensor, so the preset takes the float stain transform."""
    import torch

    out = {"probs": [], "unidentified": []}
    for i in range(0, len(images), 64):
        batch = images[i:i + 64]
        if float_stain:
            batch = torch.as_tensor(batch)
        logits = predictor.logits(batch)
        out["probs"].append(predictor._calibrated(logits))
        if predictor.tap is not None and predictor.ood is not None:
            out["unidentified"].append(predictor.ood.score(*predictor.tap.take(views=1)) > predictor.ood.threshold)
    return {k: np.concatenate(v) if v else np.zeros(0, bool) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed-images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micro-batches", default="4,6,8,12,16,24,32")
    parser.add_argument("--checkpoint", default=None, help="checkpoint (default: the packaged default model)")
    parser.add_argument("--name", default="precision", help="results file name under bench/results/")
    args = parser.parse_args()
    import torch

    from bloodray.classes import CLASS_TO_INDEX
    from bloodray.predict import CellPredictor

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    result = {"machine": _common.machine_facts(), "run": _common.run_facts()}
    pbc_rows, _ = pbc_split_rows()
    chula = sorted(CHULA.glob("*/*.jpg"))
    data = {"pbc_test": (decode([Path(u) for u, _ in pbc_rows], 128), np.array([y for _, y in pbc_rows])),
            "chula": (decode(chula, 128), np.array([CLASS_TO_INDEX[f.parent.name] for f in chula]))}
    paths = {"float stain, fp32 (before)": ("fp32", True), "fast stain, fp32": ("fp32", False),
             "fast stain, auto (default)": ("auto", False)}
    predictors = {name: CellPredictor(args.checkpoint, device="cpu", precision=p) for name, (p, _) in paths.items()}
    result["precision_auto"] = predictors["fast stain, auto (default)"].precision
    result["checkpoint_id"] = predictors["fast stain, auto (default)"].meta.checkpoint_id
    outputs = {name: {ds: run(predictors[name], x, paths[name][1]) for ds, (x, _) in data.items()} for name in paths}
    ref = outputs["float stain, fp32 (before)"]
    rows, result["quality"] = [], {}
    for name in paths:
        for ds, (_, y) in data.items():
            got, base = outputs[name][ds], ref[ds]
            q = {"accuracy": float((got["probs"].argmax(1) == y).mean()),
                 "same_class": float((got["probs"].argmax(1) == base["probs"].argmax(1)).mean()),
                 "max_prob_change": float(np.abs(got["probs"] - base["probs"]).max()),
                 "same_unidentified": float((got["unidentified"] == base["unidentified"]).mean())
                 if len(got["unidentified"]) else None, "n": int(len(y))}
            result["quality"][f"{name} / {ds}"] = q
            rows.append([name, ds, q["n"], f"{q['accuracy']:.4f}", f"{q['same_class']:.4f}",
                         f"{q['max_prob_change']:.3f}", q["same_unidentified"]])
    quality_md = _common.table(["path", "data", "cells", "accuracy", "same class as reference", "max prob. change",
                                "same unidentified decision"], rows)
    _common.save(args.name, result, quality_md)  # the slow part is done: keep it even if the timing is cut short
    print(quality_md, flush=True)
    # Speed: the same cells through each path, one core, interleaved rounds, best of --repeats.
    x = data["pbc_test"][0][:args.speed_images]
    speed, speed_rows = {}, []
    for name, (precision, float_stain) in paths.items():
        for mb in [int(v) for v in args.micro_batches.split(",")] + [None]:
            predictor = CellPredictor(args.checkpoint, device="cpu", precision=precision, micro_batch=mb)
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                run(predictor, x, float_stain)
                best = min(best, time.perf_counter() - start)
            key = f"{name} / micro-batch {mb or 'auto ' + str(predictor.micro_batch)}"
            speed[key] = len(x) / best
            speed_rows.append([name, predictor.precision, mb or f"auto ({predictor.micro_batch})", f"{len(x) / best:.0f}"])
            print(key, f"{len(x) / best:.0f} img/s", flush=True)
    result["images_per_s_one_core"] = speed
    md = ("# Inference paths side by side (bench/precision.py)\n\n" + _common.facts_markdown(result)
          + f"\nModel `{result['checkpoint_id']}`; `auto` resolved to **{result['precision_auto']}** on this CPU. Reference: the "
            "float stain transform in fp32 (the job before issue 20).\n\n"
          + quality_md
          + f"\n## Predictor speed, one core ({len(x)} preprocessed PBC cells, stain + model, best of {args.repeats})\n\n"
          + _common.table(["path", "precision", "micro-batch", "img/s"], speed_rows))
    _common.save(args.name, result, md)
    print(md)


if __name__ == "__main__":
    main()
