"""OOD score and domain-shift alarm of a checkpoint, measured with the real nightly job (issue 11, item 4).

Two local archives of symlinks under a temporary folder (never in the repo):

* ``pbc``: the PBC test split (the checkpoint's own split: fractions and seed
  from its config, defaults 0.7/0.1/0.2 seed 0), shuffled (seed 0) into samples
  of ``--per-sample`` cells;
* ``chula``: every ``chula_wbc`` cell, one sample per series (the file name
  before the first ``_``).

Both are classified by ``run_classification`` (Ray Data, local disk, the
checkpoint's review threshold, ``shift.*`` defaults); the figures come from
the committed ``predictions`` and ``differentials`` tables:

* AUROC of ``ood_score`` between PBC test and chula cells (and of 1 - confidence, for comparison);
* share of PBC test cells unidentified, and unidentified or in review;
* share of wrongly classified chula cells that end unidentified or in review;
* samples under the domain-shift alarm in each archive.

Usage::

    python bench/ood.py [--checkpoint CK] [--per-sample 100]

Writes bench/results/ood.json and ood.md (``--name`` to change).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PBC, facts_markdown, link_archive, machine_facts, run_facts, save, table  # noqa: E402

CHULA = Path("/work/shared/data/chula_wbc")


def pbc_test_layout(checkpoint: str | None, per_sample: int) -> list[tuple[str, Path, str]]:
    from bloodray.checkpoint import read_metadata, resolve_checkpoint
    from bloodray.classes import CLASS_NAMES
    from bloodray.data.labelled import SplitFractions, build_split, rows_of

    split = (read_metadata(resolve_checkpoint(checkpoint)).config.get("data", {}) or {}).get("split", {})
    fractions = SplitFractions(split.get("train", 0.7), split.get("val", 0.1), split.get("test", 0.2))
    table_, _ = build_split(str(PBC), fractions, split.get("seed", 0))
    rows = rows_of(table_, "test")
    random.Random(0).shuffle(rows)
    return [(f"P{i // per_sample:04d}/{i:05d}-{Path(r['uri']).name}", Path(r["uri"]), CLASS_NAMES[r["label"]])
            for i, r in enumerate(rows)]


def chula_layout() -> list[tuple[str, Path, str]]:
    return [(f"{p.name.split('_')[0]}/{p.name}", p, p.parent.name) for p in sorted(CHULA.glob("*/*.jpg"))]


def classify(archive: Path, out: Path, checkpoint: str | None):
    from bloodray.config import load_config
    from bloodray.nightly.pipeline import ClassifyConfig, run_classification

    sets = [f"input.uri={archive}", f"output.uri={out}"]
    if checkpoint:
        sets.append(f"model.checkpoint={checkpoint}")
    timer = time.monotonic()
    result = run_classification(load_config(ClassifyConfig, None, sets))
    return result, time.monotonic() - timer


def tables(out: Path):
    from bloodray.analysis.query import read_table

    return read_table(str(out), "predictions").to_pylist(), read_table(str(out), "differentials").to_pylist()


def main(argv=None) -> int:
    import numpy as np
    from sklearn.metrics import roc_auc_score

    p = argparse.ArgumentParser(description="OOD score and domain-shift alarm: PBC test split vs chula_wbc")
    p.add_argument("--checkpoint", default=None, help="checkpoint with an OOD reference (default: packaged)")
    p.add_argument("--per-sample", type=int, default=100)
    p.add_argument("--name", default="ood", help="results file name under bench/results/")
    args = p.parse_args(argv)
    result = {"run": run_facts(), "machine": machine_facts(), "per_sample": args.per_sample}
    per = {}
    with tempfile.TemporaryDirectory(prefix="bloodray-ood-") as tmp:
        for name, layout in (("pbc", pbc_test_layout(args.checkpoint, args.per_sample)), ("chula", chula_layout())):
            archive = link_archive(Path(tmp) / name, [(rel, src) for rel, src, _ in layout])
            truth = {str(archive / rel): cls for rel, _, cls in layout}
            run, seconds = classify(archive, Path(tmp) / f"out-{name}", args.checkpoint)
            preds, diffs = tables(Path(tmp) / f"out-{name}")
            per[name] = {"preds": preds, "truth": truth, "diffs": diffs}
            result[name] = {
                "n_cells": len(preds), "n_samples": len(diffs), "seconds": round(seconds, 1),
                "run_domain_shift": run.domain_shift, "samples_shifted": run.n_samples_shifted,
                "unidentified_share": float(np.mean([r["status"] == "unidentified" for r in preds])),
                "unidentified_or_review_share": float(np.mean([r["status"] == "unidentified" or r["needs_review"]
                                                               for r in preds])),
                "accuracy": float(np.mean([r["predicted_class"] == truth[r["image_uri"]] for r in preds])),
                "samples": [{k: d[k] for k in ("sample_id", "n_classified", "n_unidentified", "share_unidentified",
                                               "ood_ks", "domain_shift")} for d in diffs],
            }
            print(f"{name}: {len(preds)} cells, {len(diffs)} samples, {run.n_samples_shifted} under the alarm "
                  f"({seconds:.0f} s)", flush=True)
    pbc, chula = per["pbc"]["preds"], per["chula"]["preds"]
    y = np.r_[np.zeros(len(pbc)), np.ones(len(chula))]
    ood = np.r_[[r["ood_score"] for r in pbc], [r["ood_score"] for r in chula]].astype(float)
    msp = -np.r_[[r["confidence"] for r in pbc], [r["confidence"] for r in chula]].astype(float)
    wrong = [r for r in chula if r["predicted_class"] != per["chula"]["truth"][r["image_uri"]]]
    caught = [r["status"] == "unidentified" or r["needs_review"] for r in wrong]
    result["auroc_ood_score"] = float(roc_auc_score(y, ood))
    result["auroc_msp"] = float(roc_auc_score(y, msp))
    result["chula_errors"] = len(wrong)
    result["chula_errors_caught"] = float(np.mean(caught)) if caught else 1.0
    small = [s for s in result["chula"]["samples"] if not s["domain_shift"]]
    md = ["# OOD score and domain-shift alarm (bench/ood.py)\n", facts_markdown(result),
          table(["figure", "value", "target"], [
              ["AUROC ood_score, PBC test vs chula", round(result["auroc_ood_score"], 4), ">= 0.95"],
              ["AUROC 1 - confidence (MSP), same cells", round(result["auroc_msp"], 4), "(comparison)"],
              ["PBC test cells unidentified", f"{result['pbc']['unidentified_share']:.2%}", "<= 1 %"],
              ["PBC test cells unidentified or in review", f"{result['pbc']['unidentified_or_review_share']:.2%}",
               "<= 5 %"],
              ["chula errors unidentified or in review",
               f"{result['chula_errors_caught']:.1%} of {result['chula_errors']}", ">= 95 %"],
              ["chula samples under the alarm", f"{result['chula']['samples_shifted']} of {result['chula']['n_samples']}",
               "all"],
              ["PBC test samples under the alarm", f"{result['pbc']['samples_shifted']} of {result['pbc']['n_samples']}",
               "none"],
              ["run alarm (chula / PBC)", f"{result['chula']['run_domain_shift']} / {result['pbc']['run_domain_shift']}",
               "True / False"],
          ]),
          "\nChula samples not under the alarm: "
          + (", ".join(f"{s['sample_id']} ({s['n_classified']} cells)" for s in small) or "none") + "\n"]
    js, mdp = save(args.name, result, "\n".join(md))
    print("\n".join(md))
    print(f"saved {js} and {mdp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
