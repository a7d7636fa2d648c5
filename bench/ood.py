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

Then the class-mix simulation (issue 21): samples of PBC test cells with an
extreme share of one true class (90 % ig, 60 % eosinophils, 50 %
erythroblasts, 90 % neutrophils, 70 % platelets, 40 % monocytes; the rest
drawn from the other test cells), ``--draws`` samples of 50 and of 100 cells
each, tested by the nightly job's own function
(:func:`bloodray.nightly.shift.group_statistics`) against the checkpoint's
per-class reference of the arithmetic the run's actors used (the runs table's
``precision``, :func:`bloodray.nightly.shift.reference_for_run`: what the job
compares with) and, side by side and on the same cells, against a reference
from before (``--before CK``: an earlier seal of the same model, as the job
used it; default: the per-class fp32 reference, what the job compared bf16
cells with before the reference was kept per arithmetic) and the pooled one
(before the per-class format), plus a
control row of cells drawn from the whole test split. Targets: no skewed
sample under the alarm, every chula series under it.

The committed cells of the two runs are cached under
``~/.cache/bloodray-bench/`` (by checkpoint id), so a rerun only simulates;
``--fresh`` classifies again.

Usage::

    python bench/ood.py [--checkpoint CK] [--before CK] [--per-sample 100] [--draws 500] [--alpha A] [--fresh]

Writes bench/results/ood.json and ood.md (``--name`` to change).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PBC, facts_markdown, link_archive, machine_facts, run_facts, save, table  # noqa: E402

CHULA = Path("/work/shared/data/chula_wbc")
CACHE = Path.home() / ".cache" / "bloodray-bench"
#: (true class, its share of the sample) of the simulated extreme samples.
MIXES = (("ig", 0.9), ("eosinophil", 0.6), ("erythroblast", 0.5), ("neutrophil", 0.9), ("platelet", 0.7),
         ("monocyte", 0.4))
#: The control row: cells drawn from the whole test split, no class favoured.
CONTROL = ("test-split mix", 0.0)
SIZES = (50, 100)
#: Cell columns kept from the committed predictions.
CELL_COLUMNS = ("image_uri", "sample_id", "predicted_class", "confidence", "needs_review", "status", "ood_score")


def pbc_test_layout(checkpoint: str | None, per_sample: int) -> list[tuple[str, Path, str]]:
    from bloodray.checkpoint import read_metadata, resolve_checkpoint
    from bloodray.nightly.config import ShiftConfig
    from bloodray.ood import ShiftRule
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

    return (read_table(str(out), "predictions").to_pylist(), read_table(str(out), "differentials").to_pylist(),
            read_table(str(out), "runs").column("precision").to_pylist()[-1])


def classified(name: str, layout, checkpoint: str | None, checkpoint_id: str, fresh: bool) -> dict:
    """The committed cells, per-sample alarms and run facts of one archive: from the cache, or classified now."""
    cache = CACHE / f"ood-{checkpoint_id}-{name}.json"
    if cache.exists() and not fresh:
        print(f"{name}: cells from {cache}", flush=True)
        return json.loads(cache.read_text())
    with tempfile.TemporaryDirectory(prefix="bloodray-ood-") as tmp:
        archive = link_archive(Path(tmp) / name, [(rel, src) for rel, src, _ in layout])
        truth = {str(archive / rel): cls for rel, _, cls in layout}
        run, seconds = classify(archive, Path(tmp) / f"out-{name}", checkpoint)
        preds, diffs, precision = tables(Path(tmp) / f"out-{name}")
    cells = [{**{k: r[k] for k in CELL_COLUMNS}, "truth": truth[r["image_uri"]]} for r in preds]
    out = {"cells": cells, "seconds": round(seconds, 1), "run_domain_shift": run.domain_shift, "precision": precision,
           "samples_shifted": run.n_samples_shifted,
           "samples": [{k: d[k] for k in ("sample_id", "n_classified", "n_unidentified", "share_unidentified",
                                          "ood_ks", "domain_shift", "flags_unverified")} for d in diffs]}
    CACHE.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out))
    print(f"{name}: {len(cells)} cells, {len(diffs)} samples, {run.n_samples_shifted} under the alarm "
          f"({seconds:.0f} s)", flush=True)
    return out


#: The references the simulation compares side by side: name -> (which ``ood`` entry, per-class or pooled).
REFERENCES = {"per_class": ("run", True), "before": ("before", True), "pooled": ("run", False)}


def simulate(cells: list[dict], oods: dict, draws: int, rule, seed: int = 0) -> list[dict]:
    """Alarm rates of the extreme class mixes (and the control) against each of :data:`REFERENCES` (``oods``:
    ``run``/``before`` -> ``ood`` entry), ``draws`` samples per mix and size."""
    import numpy as np

    from bloodray.nightly.shift import group_statistics

    truth = np.array([c["truth"] for c in cells])
    scores = np.array([np.nan if c["ood_score"] is None else c["ood_score"] for c in cells], dtype=float)
    predicted = np.array([c["predicted_class"] for c in cells])
    rng = np.random.default_rng(seed)
    rows = []
    for cls, share in (*MIXES, CONTROL):
        own, rest = np.flatnonzero(truth == cls), np.flatnonzero(truth != cls)
        for n in SIZES:
            k = int(round(share * n))
            alarms = {ref: 0 for ref in REFERENCES}
            ks = {ref: [] for ref in REFERENCES}
            for _ in range(draws):
                pick = np.r_[rng.choice(own, k, replace=False), rng.choice(rest, n - k, replace=False)]
                for ref, (entry, per_class) in REFERENCES.items():
                    stats = group_statistics(scores[pick], predicted[pick] if per_class else None, oods[entry], rule)
                    alarms[ref] += stats["domain_shift"]
                    ks[ref].append(stats["ood_ks"])
            rows.append({"mix": f"{share:.0%} {cls}" if share else cls, "control": not share, "cells": n, "draws": draws,
                         **{f"alarms_{ref}": alarms[ref] for ref in REFERENCES},
                         **{f"median_ks_{ref}": float(np.median(ks[ref])) for ref in REFERENCES},
                         "max_ks_per_class": float(np.max(ks["per_class"]))})
            print(f"{share:.0%} {cls}, {n} cells: {alarms['per_class']} of {draws} under the per-class alarm "
                  f"({alarms['before']} with the reference before, {alarms['pooled']} pooled)", flush=True)
    return rows


def series_alarms(cells: list[dict], oods: dict, rule) -> dict[str, int]:
    """Chula series under the alarm against each of :data:`REFERENCES` (the same function, one sample per series)."""
    import numpy as np

    from bloodray.nightly.shift import group_statistics

    out = {**{ref: 0 for ref in REFERENCES}, "series": 0, "smallest": None}
    for sid in sorted({c["sample_id"] for c in cells}):
        own = [c for c in cells if c["sample_id"] == sid]
        scores = np.array([c["ood_score"] for c in own], dtype=float)
        out["series"] += 1
        out["smallest"] = min(out["smallest"] or len(own), len(own))
        classes = np.array([c["predicted_class"] for c in own])
        for ref, (entry, per_class) in REFERENCES.items():
            out[ref] += group_statistics(scores, classes if per_class else None, oods[entry], rule)["domain_shift"]
    return out


def main(argv=None) -> int:
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from bloodray.checkpoint import read_metadata, resolve_checkpoint
    from bloodray.nightly.config import ShiftConfig
    from bloodray.nightly.shift import reference_for_run
    from bloodray.ood import ShiftRule, for_precision, precisions_of

    p = argparse.ArgumentParser(description="OOD score and domain-shift alarm: PBC test split vs chula_wbc")
    p.add_argument("--checkpoint", default=None, help="checkpoint with an OOD reference (default: packaged)")
    p.add_argument("--per-sample", type=int, default=100)
    p.add_argument("--draws", type=int, default=500, help="simulated samples per class mix and size")
    p.add_argument("--fresh", action="store_true", help="classify again even when the cells are cached")
    p.add_argument("--alpha", type=float, default=None,
                   help="shift.alpha of the simulation (default: the job's); the two runs always use the job's")
    p.add_argument("--name", default="ood", help="results file name under bench/results/")
    p.add_argument("--before", default=None,
                   help="an earlier seal of the same model (same weights and OOD score) whose reference is compared "
                        "side by side, as the job used it (default: this checkpoint's fp32 reference)")
    args = p.parse_args(argv)
    meta = read_metadata(resolve_checkpoint(args.checkpoint))
    if not meta.ood:
        raise SystemExit(f"{resolve_checkpoint(args.checkpoint)}: no OOD reference")
    defaults = ShiftConfig()
    rule = ShiftRule(defaults.alpha if args.alpha is None else args.alpha, defaults.min_effect)
    result = {"run": run_facts(), "machine": machine_facts(), "per_sample": args.per_sample,
              "simulation_rule": {"alpha": rule.alpha, "min_effect": rule.min_effect},
              "checkpoint_id": meta.checkpoint_id, "per_class_reference": bool(meta.ood.get("per_class"))}
    per = {}
    for name, layout in (("pbc", pbc_test_layout(args.checkpoint, args.per_sample)), ("chula", chula_layout())):
        got = classified(name, layout, args.checkpoint, meta.checkpoint_id, args.fresh)
        cells = got["cells"]
        per[name] = cells
        result[name] = {
            "n_cells": len(cells), "n_samples": len(got["samples"]), "seconds": got["seconds"],
            "run_domain_shift": got["run_domain_shift"], "samples_shifted": got["samples_shifted"],
            "unidentified_share": float(np.mean([c["status"] == "unidentified" for c in cells])),
            "unidentified_or_review_share": float(np.mean([c["status"] == "unidentified" or c["needs_review"]
                                                           for c in cells])),
            "accuracy": float(np.mean([c["predicted_class"] == c["truth"] for c in cells])),
            "samples": got["samples"], "precision": got.get("precision"),
        }
    pbc, chula = per["pbc"], per["chula"]
    timer = time.monotonic()
    # The job's reference: the arithmetic its actors ran (both runs ran on this machine, in the same one).
    run_ood = reference_for_run(dict(meta.ood), {result["pbc"]["precision"] or ""})
    if args.before:
        # The previous seal of the same model, as the job used it: the same OOD tensors and standardisation, so the
        # same scores, against its own validation reference.
        before = read_metadata(resolve_checkpoint(args.before))
        same = all(before.ood.get(k) == meta.ood.get(k) for k in ("file_sha256", "pen_scale", "early_scale"))
        if not same or before.weights_sha256 != meta.weights_sha256:
            raise SystemExit(f"{args.before}: not the same weights and OOD score as {meta.checkpoint_id}")
        before_ood, before_label = reference_for_run(dict(before.ood), {result["pbc"]["precision"] or ""}), (
            f"`{before.checkpoint_id}`'s reference as the job used it")
    else:
        before_ood, before_label = for_precision(dict(meta.ood), "fp32"), "the per-class fp32 reference"
    oods = {"run": run_ood, "before": before_ood}
    result["before_reference"] = before_label
    result["reference_precision"], result["run_precision"] = run_ood["precision"], result["pbc"]["precision"]
    result["simulation"] = simulate(pbc, oods, args.draws, rule)
    result["chula_series"] = series_alarms(chula, oods, rule)
    result["simulation_seconds"] = round(time.monotonic() - timer, 1)
    y = np.r_[np.zeros(len(pbc)), np.ones(len(chula))]
    ood = np.r_[[c["ood_score"] for c in pbc], [c["ood_score"] for c in chula]].astype(float)
    msp = -np.r_[[c["confidence"] for c in pbc], [c["confidence"] for c in chula]].astype(float)
    wrong = [c for c in chula if c["predicted_class"] != c["truth"]]
    caught = [c["status"] == "unidentified" or c["needs_review"] for c in wrong]
    result["auroc_ood_score"] = float(roc_auc_score(y, ood))
    result["auroc_msp"] = float(roc_auc_score(y, msp))
    result["chula_errors"] = len(wrong)
    result["chula_errors_caught"] = float(np.mean(caught)) if caught else 1.0
    small = [s for s in result["chula"]["samples"] if not s["domain_shift"]]
    sim = result["simulation"]
    skewed = [r for r in sim if not r["control"]]
    total = sum(r["draws"] for r in skewed)
    series = result["chula_series"]
    md = ["# OOD score and domain-shift alarm (bench/ood.py)\n", facts_markdown(result),
          f"- checkpoint `{meta.checkpoint_id}`, per-class reference: {result['per_class_reference']}; the runs' "
          f"arithmetic {result['run_precision']}, the reference compared with: {result['reference_precision']} "
          f"(the checkpoint has {', '.join(precisions_of(meta.ood))})\n",
          table(["figure", "value", "target"], [
              ["AUROC ood_score, PBC test vs chula", round(result["auroc_ood_score"], 4), ">= 0.95"],
              ["AUROC 1 - confidence (MSP), same cells", round(result["auroc_msp"], 4), "(comparison)"],
              ["PBC test cells unidentified", f"{result['pbc']['unidentified_share']:.2%}", "<= 1 %"],
              ["PBC test cells unidentified or in review", f"{result['pbc']['unidentified_or_review_share']:.2%}",
               "<= 5 %"],
              ["chula errors unidentified or in review",
               f"{result['chula_errors_caught']:.1%} of {result['chula_errors']}", ">= 95 %"],
              ["chula samples under the alarm (nightly job)",
               f"{result['chula']['samples_shifted']} of {result['chula']['n_samples']}", "all"],
              ["PBC test samples under the alarm (nightly job)",
               f"{result['pbc']['samples_shifted']} of {result['pbc']['n_samples']}", "none"],
              ["run alarm (chula / PBC)", f"{result['chula']['run_domain_shift']} / {result['pbc']['run_domain_shift']}",
               "True / False"],
              ["skewed-mix samples under the alarm, per-class reference of the run's arithmetic (the job's)",
               f"{sum(r['alarms_per_class'] for r in skewed)} of {total}", "0"],
              [f"skewed-mix samples under the alarm, before: {before_label} (same cells, same test)",
               f"{sum(r['alarms_before'] for r in skewed)} of {total}", "(comparison)"],
              ["skewed-mix samples under the alarm, pooled reference (as before, same test)",
               f"{sum(r['alarms_pooled'] for r in skewed)} of {total}", "(comparison)"],
              ["chula series under the alarm, per-class / before / pooled (same function)",
               f"{series['per_class']} / {series['before']} / {series['pooled']} of {series['series']} "
               f"(smallest {series['smallest']} cells)", "all"],
          ]),
          "\nChula samples not under the alarm: "
          + (", ".join(f"{s['sample_id']} ({s['n_classified']} cells)" for s in small) or "none") + "\n",
          f"\n## Extreme class mixes of PBC test cells ({args.draws} samples per row; shift.alpha {rule.alpha:g}, "
          f"shift.min_effect {rule.min_effect:g})\n",
          table(["mix (true class)", "cells", "under the alarm, per-class", "before",
                 "pooled reference", "median KS per-class / before / pooled", "largest KS per-class"],
                [[r["mix"], r["cells"], f"{r['alarms_per_class']} of {r['draws']}",
                  f"{r['alarms_before']} of {r['draws']}", f"{r['alarms_pooled']} of {r['draws']}",
                  f"{r['median_ks_per_class']:.3f} / {r['median_ks_before']:.3f} / "
                  f"{r['median_ks_pooled']:.3f}", f"{r['max_ks_per_class']:.3f}"]
                 for r in sim])]
    js, mdp = save(args.name, result, "\n".join(md))
    print("\n".join(md))
    print(f"saved {js} and {mdp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
