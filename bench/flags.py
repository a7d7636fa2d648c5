"""How often the differential's flags fire on samples of real PBC test cells classified by a real model.

Run from the repository root (a few minutes the first time, to classify the val and test cells; seconds after)::

    PYTHONPATH=$PWD python bench/flags.py                          # the packaged default model
    PYTHONPATH=$PWD python bench/flags.py --checkpoint PATH_OR_NAME --name flags_new
    PYTHONPATH=$PWD python bench/flags.py --trials 2000            # quicker
    PYTHONPATH=$PWD python bench/flags.py --variants               # also the interval variants side by side

Writes ``bench/results/<name>.json`` and ``.md`` (``--name``, default ``flags``).

Each simulated sample of ``n`` white cells draws its true classes from a
profile (below); each cell is then a real PBC test-split cell of that class,
drawn with replacement, and its class is what the model predicted for that
image (:class:`bloodray.predict.CellPredictor`, as in a nightly run; cells
the OOD reference calls unidentified are not counted, as in a run). The split
is the one every run uses (0.7/0.1/0.2, seed 0, duplicates dropped); the
predictions are cached per checkpoint id in ``bench/.cache/``. Erythroblasts,
which are not white cells, come as a negative-binomial count (those met
before the ``n``-th white cell). Each sample is flagged three ways:

* ``perfect, Wilson``: the true classes counted, the counting-error rule
  (Wilson's interval with Newcombe's continuity correction, as the flags use it);
* ``model, Wilson`` (before): the model's classes, the counting-error rule
  (:func:`bloodray.nightly.differential.compute_differentials` without a
  confusion: what a checkpoint without a val confusion matrix gets);
* ``model, confusion`` (after): the model's classes, the flags accounting for
  the model's confusion (``FlagRules.confusion``): the checkpoint's sealed val
  confusion when it has one (``calibrate``), else the one counted here from the
  model's predictions on the val split. Never from test.

Profiles (% of white cells): ``healthy`` = the middle of every range with the
remainder split between neutrophils and lymphocytes (neutrophils 55.875,
lymphocytes 35.875, monocytes 5, eosinophils 2.5, basophils 0.75); ``healthy
(five renormalised)``; ``healthy, 0.3 % ig``; abnormal: one class at
neutrophils 80, lymphocytes 55, eosinophils 12 or monocytes 15 % (the rest of
``healthy`` scaled), ig 3 % and erythroblasts 3 per 100 WBC. Healthy rows
count any flag; abnormal rows their own flag. Targets (issue 21): healthy,
real model, any flag <= 5 % at 100 cells; each abnormal profile >= 90 % at 200
cells (the four range profiles, as issue 11 set them).

``--train-confusion`` adds a diagnostic (:func:`train_confusion_section`): the training split classified too,
its error rates beside val's and test's, and the same samples flagged with val + training-cell confusion.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, cpu_model, pbc_split_rows, run_facts, save, table  # noqa: E402

from bloodray.classes import CLASS_NAMES, CLASS_TO_INDEX  # noqa: E402
from bloodray.nightly import differential as _differential, intervals as _intervals  # noqa: E402
from bloodray.nightly.differential import (FlagRules, ModelConfusion, compute_differentials,  # noqa: E402
                                           count_columns, flag_labels)

CELLS = (100, 200, 400)
MIDDLE = {"neutrophil": 50.0, "lymphocyte": 30.0, "monocyte": 5.0, "eosinophil": 2.5, "basophil": 0.75}
REMAINDER = 100.0 - sum(MIDDLE.values())
HEALTHY = dict(MIDDLE, neutrophil=50.0 + REMAINDER / 2, lymphocyte=30.0 + REMAINDER / 2, ig=0.0)
RENORMALISED = dict({k: v * 100.0 / sum(MIDDLE.values()) for k, v in MIDDLE.items()}, ig=0.0)
HEALTHY_IG = dict(HEALTHY, neutrophil=HEALTHY["neutrophil"] - 0.3, ig=0.3)
RANGE_TARGETS = ("neutrophilia", "lymphocytosis", "eosinophilia", "monocytosis")
WAYS = ("perfect, Wilson", "model, Wilson", "model, confusion")
#: ``--variants``: the interval rules compared side by side (issue 21): (true classes?, continuity correction?,
#: Dirichlet prior of the confusion's rows or None = no confusion, correct with the posterior mean too?). The rule the
#: flags use is "model, cc, Jeffreys (rule)"; the last, which also corrects with the posterior mean rates, is
#: measured only to show why it is not the rule (bloodray/nightly/intervals.py says why).
VARIANTS = {
    "perfect, plain Wilson": (True, False, None, False),
    "perfect, Wilson cc": (True, True, None, False),
    "model, plain, multinomial (v2)": (False, False, 0.0, False),
    "model, plain, Jeffreys": (False, False, 0.5, False),
    "model, cc, multinomial": (False, True, 0.0, False),
    "model, cc, Jeffreys (rule)": (False, True, 0.5, False),
    "model, cc, Jeffreys, posterior-mean correction (rejected)": (False, True, 0.5, True),
}


#: Predictions per checkpoint id (git-ignored): a re-run of the bench takes seconds.
CACHE = REPO / "bench" / ".cache"


def classify_split(predictor, split: str, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true labels, predicted labels, unidentified) of one PBC split, as a run's model actor classifies them."""
    rows, _dropped = pbc_split_rows(split)
    preds, unid = [], []
    for i in range(0, len(rows), batch):
        images = np.stack([predictor.preset.load(Path(u).read_bytes()) for u, _ in rows[i:i + batch]])
        res = predictor({"image": images})
        preds.append(res["predicted_label"].astype(np.int64))
        unid.append(np.asarray(res["unidentified"], dtype=bool))
    return np.array([lab for _, lab in rows], dtype=np.int64), np.concatenate(preds), np.concatenate(unid)


def predictions(checkpoint: str | None, threads: int = 2, batch: int = 128) -> dict[str, np.ndarray | str]:
    """``{split}_label``, ``{split}_pred``, ``{split}_unidentified`` (val, test), ``checkpoint_id``, ``checkpoint_uri``,
    ``seconds`` (0 when read from the cache)."""
    import torch

    from bloodray.checkpoint import read_metadata, resolve_checkpoint

    uri = resolve_checkpoint(checkpoint)
    meta = read_metadata(uri)
    path = CACHE / f"flags-{meta.checkpoint_id}.npz"
    if path.exists():
        with np.load(path) as data:
            out = {k: data[k] for k in data.files}
        return {**out, "precision": str(out.pop("precision", "unknown")), "checkpoint_id": meta.checkpoint_id,
                "checkpoint_uri": uri, "seconds": 0.0, "cache": str(path)}
    from bloodray.predict import CellPredictor

    torch.set_num_threads(threads)
    predictor = CellPredictor(uri, device="cpu")
    start = time.monotonic()
    out: dict[str, np.ndarray] = {}
    for split in ("val", "test"):
        out[f"{split}_label"], out[f"{split}_pred"], out[f"{split}_unidentified"] = classify_split(
            predictor, split, batch)
    seconds = time.monotonic() - start
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out, precision=np.array(predictor.precision))
    return {**out, "checkpoint_id": meta.checkpoint_id, "checkpoint_uri": uri, "seconds": seconds, "cache": str(path),
            "precision": predictor.precision}


def train_predictions(checkpoint_uri: str, checkpoint_id: str, threads: int = 2,
                      batch: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(labels, predicted, unidentified, seconds) of the training split, predicted as :func:`predictions` does val and test
    (``--train-confusion``)."""
    import torch

    path = CACHE / f"flags-train-{checkpoint_id}.npz"
    if path.exists():
        with np.load(path) as data:
            return data["label"], data["pred"], data["unidentified"], 0.0
    from bloodray.predict import CellPredictor

    torch.set_num_threads(threads)
    predictor = CellPredictor(checkpoint_uri, device="cpu")
    start = time.monotonic()
    out = (*classify_split(predictor, "train", batch), time.monotonic() - start)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, label=out[0], pred=out[1], unidentified=out[2])
    return out


def abnormal(name: str, pct: float) -> dict[str, float]:
    rest = {k: v for k, v in HEALTHY.items() if k != name}
    scale = (100.0 - pct) / sum(rest.values())
    return dict({k: v * scale for k, v in rest.items()}, **{name: pct})


class Pools:
    """The model's predicted label of every test cell, grouped by true class (-1: unidentified, not counted)."""

    def __init__(self, labels: np.ndarray, predicted: np.ndarray, unidentified: np.ndarray):
        counted = np.where(unidentified, -1, predicted)
        self.by_class = {c: counted[labels == i] for i, c in enumerate(CLASS_NAMES)}

    def classify(self, true: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Predicted labels (-1: unidentified) of cells whose true class indices are ``true``."""
        out = np.empty(true.shape, np.int64)
        for i, c in enumerate(CLASS_NAMES):
            where = true == i
            pool = self.by_class[c]
            out[where] = pool[rng.integers(0, len(pool), int(where.sum()))]
        return out


def _counts(labels: np.ndarray, sample: np.ndarray, trials: int) -> pa.Table:
    keep = labels >= 0
    flat = np.bincount(sample[keep] * len(CLASS_NAMES) + labels[keep], minlength=trials * len(CLASS_NAMES))
    matrix = flat.reshape(trials, len(CLASS_NAMES))
    return pa.table({col: matrix[:, j] for j, col in enumerate(count_columns())})


def simulate(profile: dict[str, float], erythroblasts_per_100: float, n: int, trials: int, pools: Pools,
             rng: np.random.Generator) -> tuple[pa.Table, pa.Table]:
    """(true counts, the model's counts) of ``trials`` samples."""
    wbc = [c for c in profile]
    p = np.array([profile[c] for c in wbc])
    true = np.array([CLASS_TO_INDEX[c] for c in wbc])[rng.choice(len(wbc), size=(trials, n), p=p / p.sum())]
    sample = np.repeat(np.arange(trials), n)
    true = true.ravel()
    q = erythroblasts_per_100 / (100.0 + erythroblasts_per_100)
    if q > 0:
        erb = rng.negative_binomial(n, 1.0 - q, size=trials)
        sample = np.concatenate([sample, np.repeat(np.arange(trials), erb)])
        true = np.concatenate([true, np.full(int(erb.sum()), CLASS_TO_INDEX["erythroblast"])])
    return _counts(true, sample, trials), _counts(pools.classify(true, rng), sample, trials)


def flag_rates(counts: pa.Table, rules: FlagRules, continuity: bool = True) -> dict[str, np.ndarray]:
    """Every flag of every sample; ``continuity=False``: the rule without Newcombe's correction (comparison only)."""
    with contextlib.ExitStack() as stack:
        if not continuity:  # the bench's only way to the uncorrected interval: the product has one rule
            stack.enter_context(_patched_share_bounds())
        out = compute_differentials(counts, rules)
    return {label: out.column(col).to_numpy(zero_copy_only=False)
            for col, label in flag_labels().items() if col != "flag_low_wbc_count"}


def _posterior_mean_correction(confusion: ModelConfusion) -> ModelConfusion:
    """The rejected variant (bench only): the counts corrected with the rows' posterior mean rates, not the raw ones."""
    out = dataclasses.replace(confusion)
    out.__dict__.update(rates=out.posterior_rates, inverse_t=np.linalg.inv(out.posterior_rates.T))
    return out


@contextlib.contextmanager
def _patched_share_bounds():
    original = _differential.share_bounds
    _differential.share_bounds = functools.partial(_intervals.share_bounds, continuity=False)
    try:
        yield
    finally:
        _differential.share_bounds = original


def test_halves(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of the test cells, every class split alternately (for the diagnostic table)."""
    rank = np.zeros(len(labels), np.int64)
    for i in range(len(CLASS_NAMES)):
        where = np.flatnonzero(labels == i)
        rank[where] = np.arange(len(where))
    return rank % 2 == 0, rank % 2 == 1


def confusion_counts(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    k = len(CLASS_NAMES)
    return np.bincount(labels * k + predicted, minlength=k * k).reshape(k, k)


def flags_confusion(pred: dict[str, Any], checkpoint_uri: str) -> tuple[np.ndarray, str]:
    """The confusion counts the flags use (``CheckpointMetadata.flag_confusion``: val's, plus the training cells'
    when they passed calibrate's check), else counted from the val predictions."""
    from bloodray.checkpoint import read_metadata

    meta = read_metadata(checkpoint_uri)
    sealed = meta.flag_confusion()
    if sealed is not None:
        joined = bool((meta.calibration.get("train_confusion") or {}).get("joined"))
        return np.asarray(sealed, np.int64), ("sealed in the checkpoint by calibrate: val split"
                                              + (" + training split (passed calibrate's check)" if joined else ""))
    return confusion_counts(pred["val_label"], pred["val_pred"]), "counted here from the model's predictions on the val split (the checkpoint has none)"


def run_cases(cases, cells, pools: Pools, rules: dict[str, FlagRules], trials: int,
              seed: int, continuity: dict[str, bool] | None = None) -> tuple[list[list[Any]], list[dict[str, Any]]]:
    """Flag rates of every case and cell count, each way of ``rules`` (a way named "perfect..." counts the true
    classes; ``continuity``: per way, False = without the continuity correction): (markdown rows, JSON records)."""
    rows, results = [], []
    ways = tuple(rules)
    continuity = continuity or {}
    for label, profile, erb, expected in cases:
        for n in cells:
            rng = np.random.default_rng([seed, n, len(results)])
            true_counts, model_counts = simulate(profile, erb, n, trials, pools, rng)
            flags = {way: flag_rates(true_counts if way.startswith("perfect") else model_counts, rules[way],
                                     continuity.get(way, True))
                     for way in ways}
            if expected is None:  # healthy: any flag at all is a false flag
                rate = {way: float(np.mean(np.any(list(f.values()), axis=0))) for way, f in flags.items()}
                target = "<= 5 %" if n == 100 else ""
                which = {way: {k: round(float(np.mean(v)), 4) for k, v in f.items() if np.mean(v) > 0}
                         for way, f in flags.items()}
            else:
                rate = {way: float(np.mean(f[expected])) for way, f in flags.items()}
                target = ">= 90 %" if n == 200 and expected in RANGE_TARGETS else ""
                which = {}
            results.append({"profile": label, "differential_pct": {k: round(v, 4) for k, v in profile.items()},
                            "erythroblasts_per_100_wbc": erb, "white_cells": n, "flag": expected or "any flag",
                            "rates": rate, "target": target, "flag_rates": which})
            rows.append([label, n, expected or "any flag", *(f"{100 * rate[w]:.1f} %" for w in ways), target])
    return rows, results


def train_confusion_section(pred: dict[str, Any], cases, base: FlagRules, trials: int,
                            seed: int) -> tuple[str, dict[str, Any]]:
    """``--train-confusion``: would a larger confusion estimate meet issue 21's target? (markdown, JSON)

    Val's 992 cells under-estimate the model's commonest error; the only other PBC cells that are not test cells
    are the training split's. A model usually classifies its training cells better than new ones (an optimistic
    confusion), so the section shows their error rates beside val's and test's, then the flags of the same
    simulated samples with val's confusion alone and with val + training cells (what the flags use when the
    checkpoint's sealed check passed: ``CheckpointMetadata.flag_confusion``).
    """
    from bloodray.checkpoint import read_metadata

    uri, cid = str(pred["checkpoint_uri"]), str(pred["checkpoint_id"])
    sealed_val = read_metadata(uri).val_confusion()
    # Val alone here, whatever the flags use: the section compares val with val + training cells.
    counts_val = sealed_val if sealed_val is not None else confusion_counts(pred["val_label"], pred["val_pred"])
    t_label, t_pred, _t_unid, t_seconds = train_predictions(uri, cid)
    counts_train = confusion_counts(t_label, t_pred)
    counts_test = confusion_counts(pred["test_label"], pred["test_pred"])
    pooled = ModelConfusion.from_counts(counts_val + counts_train, "val + training-cell confusion")
    pools = Pools(pred["test_label"], pred["test_pred"], pred["test_unidentified"])
    rules = {"val only": dataclasses.replace(base, confusion=ModelConfusion.from_counts(counts_val)),
             "val + training cells": dataclasses.replace(base, confusion=pooled)}
    rows, results = run_cases([c for c in cases if c[3] is None], CELLS, pools, rules, trials, seed)
    r2, res2 = run_cases([c for c in cases if c[3] is not None], (200,), pools, rules, trials, seed)
    rows, results = rows + r2, results + res2

    def acc(c: np.ndarray) -> float:
        return float(np.trace(c) / c.sum())

    rates = []
    for i, a in enumerate(CLASS_NAMES):
        for j, b in enumerate(CLASS_NAMES):
            if i != j and (counts_val[i, j] or counts_train[i, j] or counts_test[i, j]):
                rates.append([f"{a} -> {b}", *(f"{c[i, j]}/{c[i].sum()} ({100 * c[i, j] / c[i].sum():.1f} %)"
                                             for c in (counts_val, counts_train, counts_test))])
    md = ("\n## Diagnostic (`--train-confusion`): val alone vs val + the model's training cells\n\n"
          f"Accuracy: val {acc(counts_val):.4f} ({counts_val.sum()} cells), training split {acc(counts_train):.4f} "
          f"({counts_train.sum()} cells, classified in {t_seconds:.0f} s, 0 = cached), test {acc(counts_test):.4f}. "
          "A model usually does better on its training cells; where it does not, they are a larger sample of its "
          "errors. The flags use val + training cells when calibrate's check passed (the headline's confusion "
          "source says which).\n\n"
          + table(["error (true -> predicted)", "val", "training split", "test (never used by flags)"], rates)
          + "\n" + table(["profile", "white cells", "flag", *rules, "target"], rows))
    return md, {"accuracy": {"val": acc(counts_val), "train": acc(counts_train), "test": acc(counts_test)},
                "train_confusion": counts_train.tolist(), "seconds_train_classification": round(t_seconds, 1),
                "cases": results}


def which_flags(rates: dict[str, dict[str, float]], ways) -> str:
    """``way: flag share %, ...; ...`` of each way's flags, commonest first (the healthy rows' breakdown)."""
    return "; ".join(f"{way}: " + (", ".join(f"{k} {100 * v:.2f} %" for k, v in sorted(
        rates[way].items(), key=lambda kv: -kv[1])) or "none") for way in ways)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="checkpoint dir, run dir or packaged name (default: packaged)")
    ap.add_argument("--trials", type=int, default=20000, help="simulated samples per profile and cell count")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the one-off classification")
    ap.add_argument("--name", default="flags", help="results file name under bench/results/")
    ap.add_argument("--confidence", type=float, default=0.95, help="flags.confidence of all three rules")
    ap.add_argument("--variants", action="store_true",
                    help="also compare the interval variants (VARIANTS) on the same samples: healthy rows and "
                         "the four range profiles at 200 cells")
    ap.add_argument("--train-confusion", action="store_true",
                    help="also classify the training split and flag the same samples with val + training-cell "
                         "confusion (a diagnostic: train_confusion_section)")
    args = ap.parse_args(argv)
    pred = predictions(args.checkpoint, threads=args.threads)
    counts_flags, source = flags_confusion(pred, str(pred["checkpoint_uri"]))
    confusion = ModelConfusion.from_counts(counts_flags, "the flags' confusion")
    pools = Pools(pred["test_label"], pred["test_pred"], pred["test_unidentified"])
    base = FlagRules(min_wbc=0, confidence=args.confidence)
    rules = {"perfect, Wilson": base, "model, Wilson": base,
             "model, confusion": dataclasses.replace(base, confusion=confusion)}
    cases: list[tuple[str, dict[str, float], float, str | None]] = [
        ("healthy", HEALTHY, 0.0, None),
        ("healthy (five renormalised)", RENORMALISED, 0.0, None),
        ("healthy, 0.3 % ig", HEALTHY_IG, 0.0, None),
        ("neutrophils 80 %", abnormal("neutrophil", 80.0), 0.0, "neutrophilia"),
        ("lymphocytes 55 %", abnormal("lymphocyte", 55.0), 0.0, "lymphocytosis"),
        ("eosinophils 12 %", abnormal("eosinophil", 12.0), 0.0, "eosinophilia"),
        ("monocytes 15 %", abnormal("monocyte", 15.0), 0.0, "monocytosis"),
        ("ig 3 %", abnormal("ig", 3.0), 0.0, "immature granulocytes"),
        ("erythroblasts 3 per 100 WBC", HEALTHY, 3.0, "circulating erythroblasts"),
    ]
    start = time.monotonic()
    rows, results = run_cases(cases, CELLS, pools, rules, args.trials, args.seed)
    # Diagnostic, not the headline: the same rule with a confusion measured on cells like the sampled ones
    # (one half of test gives the confusion, the other half the cells), to separate the method from val's estimate.
    half_a, half_b = test_halves(pred["test_label"])
    held_out = ModelConfusion.from_counts(confusion_counts(pred["test_label"][half_a], pred["test_pred"][half_a]))
    pools_b = Pools(pred["test_label"][half_b], pred["test_pred"][half_b], pred["test_unidentified"][half_b])
    diag_rules = dict(rules, **{"model, confusion": dataclasses.replace(base, confusion=held_out)})
    diag_cases = [c for c in cases if c[3] is None or c[3] in RANGE_TARGETS + ("immature granulocytes",)]
    diag_rows, diag_results = run_cases(diag_cases, (100, 200), pools_b, diag_rules, args.trials, args.seed)
    variant_rows: list[list[Any]] = []
    variant_results: list[dict[str, Any]] = []
    if args.variants:
        def variant_confusion(prior: float, shrunk: bool) -> ModelConfusion:
            out = dataclasses.replace(confusion, prior=prior)
            return _posterior_mean_correction(out) if shrunk else out

        v_rules = {name: base if prior is None else dataclasses.replace(base, confusion=variant_confusion(
            prior, shrunk)) for name, (_true, _cc, prior, shrunk) in VARIANTS.items()}
        v_cc = {name: cc for name, (_true, cc, _prior, _shrunk) in VARIANTS.items()}
        for v_cases, v_cells in ((cases[:3], CELLS), (cases[3:], (200,))):
            r, res = run_cases(v_cases, v_cells, pools, v_rules, args.trials, args.seed, v_cc)
            variant_rows += r
            variant_results += res
    elapsed = time.monotonic() - start
    test_acc = float(np.mean(pred["test_label"] == pred["test_pred"]))
    val_acc = float(np.mean(pred["val_label"] == pred["val_pred"]))
    result: dict[str, Any] = {
        "trials": args.trials, "seed": args.seed, "confidence": args.confidence, "seconds_simulation": round(elapsed, 1),
        "seconds_classification": round(float(pred["seconds"]), 1), "prediction_cache": str(pred["cache"]),
        "checkpoint": str(pred["checkpoint_uri"]), "checkpoint_id": str(pred["checkpoint_id"]),
        "precision": pred.get("precision"), "val_cells": int(len(pred["val_label"])),
        "test_cells": int(len(pred["test_label"])), "val_accuracy": round(val_acc, 4),
        "test_accuracy": round(test_acc, 4),
        "test_unidentified_share": round(float(np.mean(pred["test_unidentified"])), 4),
        "confusion_source": source, "flags_confusion": counts_flags.tolist(), "classes": list(CLASS_NAMES),
        "cases": results, "diagnostic_held_out_test_confusion": {
            "note": "confusion from one half of the test cells, samples from the other half; not the headline",
            "val_confusion_not_used": True, "confusion": held_out.counts, "cases": diag_results},
        "variants": {"ways": {k: {"true_classes": t, "continuity": cc, "prior": pr, "posterior_mean_correction": sh}
                              for k, (t, cc, pr, sh) in VARIANTS.items()}, "cases": variant_results} if args.variants
        else None,
        "run": run_facts(),
        "machine": {"cpu_count": os.cpu_count(), "cpu_model": cpu_model(),
                    "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
    }
    healthy100 = next(r for r in results if r["profile"] == "healthy" and r["white_cells"] == 100)
    def off_diagonal(m: np.ndarray) -> str:
        return ", ".join(f"{CLASS_NAMES[i]}->{CLASS_NAMES[j]} {m[i, j]}/{m[i].sum()}" for i in range(len(m))
                         for j in range(len(m)) if i != j and m[i, j])

    counts_test = confusion_counts(pred["test_label"], pred["test_pred"])
    result["test_confusion_for_comparison_only"] = counts_test.tolist()
    md = ("# Flags on real PBC test cells classified by a real model\n\n"
          f"- command: `{result['run']['command']}`; {args.trials} samples per row, seed {args.seed}, "
          f"flags.confidence {args.confidence}; "
          f"simulation {elapsed:.1f} s (classification {result['seconds_classification']:.0f} s, 0 = cached)\n"
          f"- date: {result['run']['date']}; git commit: `{result['run']['git_commit']}`\n"
          f"- machine: {os.cpu_count()} CPUs ({cpu_model()}), shared with other sessions; load average at start "
          f"{result['machine']['load_average_at_start']}\n"
          f"- model: `{result['checkpoint_id']}` ({result['checkpoint']}), {result['precision']} (as a run would); "
          f"PBC val {result['val_cells']} cells, accuracy {val_acc:.3f}; test {result['test_cells']} cells, "
          f"accuracy {test_acc:.3f}, {100 * result['test_unidentified_share']:.1f} % unidentified (not counted)\n"
          f"- confusion the flags use: {source}; off-diagonal (true->predicted, its cells): "
          f"{off_diagonal(counts_flags)}\n"
          f"- for comparison only (never used by the flags), the same on the test cells the samples are drawn "
          f"from: {off_diagonal(counts_test)}\n\n"
          "Share of simulated samples flagged (healthy rows: any flag; other rows: the profile's own flag). "
          "`perfect, Wilson`: true classes, counting-error rule; `model, Wilson` (before): the model's classes, "
          "counting-error rule; `model, confusion` (after): the model's classes, flags with the confusion they use (source above). "
          "Every interval is the flags' rule: continuity-corrected (bloodray/nightly/intervals.py); "
          "`--variants` compares it with the others.\n\n"
          + table(["profile", "white cells", "flag", *WAYS, "target"], rows)
          + "\nWhich flags fire on `healthy` at 100 cells: "
          + which_flags(healthy100["flag_rates"], WAYS)
          + ".\n\n## Diagnostic: the same rule with a confusion measured on held-out test cells\n\n"
          "Not the headline figure (the flags must use the checkpoint's sealed confusion): one half of the test cells (every class "
          "split alternately) gives the confusion, samples are drawn from the other half. It separates what the "
          "rule does with a representative confusion from how well the sealed one represents the model.\n\n"
          + table(["profile", "white cells", "flag", *WAYS, "target"], diag_rows))
    if args.variants:
        md += ("\n## Interval variants side by side (`--variants`)\n\n"
               "The same simulated samples flagged with each variant of the interval (the confusion the flags use): `plain` = "
               "Wilson's score interval, `cc` = with Newcombe's continuity correction; `multinomial` = the "
               "confusion's uncertainty from its raw val rates (Dirichlet prior 0), `Jeffreys` = from the "
               "posterior of each val row under a Dirichlet(1/2) prior. `model, plain, multinomial (v2)` is the "
               "rule before (flags_robust_v2); `model, cc, Jeffreys (rule)` the one the flags use; the last also corrects "
               "the counts with the posterior mean rates (rejected: it subtracts half a pseudo-cell per val row from "
               "every class, so rare classes are biased low: bloodray/nightly/intervals.py).\n\n"
               + table(["profile", "white cells", "flag", *VARIANTS, "target"], variant_rows)
               + "\nWhich flags fire on `healthy` at 100 cells: "
               + which_flags(variant_results[0]["flag_rates"], VARIANTS) + ".\n")
    if args.train_confusion:
        section_md, result["diagnostic_train_confusion"] = train_confusion_section(
            pred, cases, base, args.trials, args.seed)
        md += section_md
    js, mdp = save(args.name, result, md)
    print(md)
    print(f"wrote {js} and {mdp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
