"""The domain-shift alarm of a nightly run: per-sample and per-run tests against the checkpoint's reference.

The checkpoint's OOD reference (:mod:`bloodray.ood`, stored by
``bloodray calibrate`` or refitted by ``jobs/fit_ood_packaged.py``) carries,
per predicted class, the validation OOD-score quantiles and the validation
share of unidentified cells. Each sample's cells, and all the run's cells
together, are tested against them, each cell against its own predicted
class's reference (:func:`bloodray.ood.shift_statistics`: a binomial test of
the unidentified share and a one-sided KS test of the scores, each needing
significance at ``shift.alpha`` and an effect of at least
``shift.min_effect``), so a sample dominated by one class of the training
laboratory (a left shift, an eosinophilia) does not raise it.

A sample under the alarm gets the flag :data:`~bloodray.ood.SHIFT_FLAG` in
front of its other flags, which it keeps -- a real left shift seen through a
new camera must not lose its IG flag -- marked unverified
(:data:`~bloodray.nightly.contract.FLAGS_UNVERIFIED` true): they were counted
from cells the model may not recognise. The run is under the alarm when its
pooled test fires or any of its samples is.

The reference is the one of the arithmetic the run's model actors scored the
cells in (:func:`reference_for_run`; the runs table's ``precision``): bf16
scores sit above fp32 ones (:mod:`bloodray.ood`), so an fp32 reference alarms
on bf16 cells of the training laboratory.
"""

from __future__ import annotations

import logging
from typing import Any, Collection, Mapping

import numpy as np
import pyarrow as pa

from bloodray.ood import SHIFT_FLAG, ShiftRule, for_precision, per_class_of, precision_of, shift_statistics
from bloodray.nightly.contract import FLAGS_UNVERIFIED

__all__ = ["SHIFT_FLAG", "SHIFT_COLUMNS", "ShiftRule", "apply_shift", "group_statistics", "mark_unverified",
           "no_shift", "reference_for_run"]

log = logging.getLogger(__name__)

#: Per-sample columns of the alarm in differentials (the run-level ones add n_samples_shifted).
SHIFT_COLUMNS = ("n_unidentified", "share_unidentified", "unidentified_p_value", "ood_ks", "ood_ks_p_value",
                 "domain_shift")


def no_shift() -> dict[str, Any]:
    """The run-level shift columns of a run without OOD scores (null statistics, no alarm)."""
    return {"n_unidentified": 0, "share_unidentified": None, "unidentified_p_value": None, "ood_ks": None,
            "ood_ks_p_value": None, "domain_shift": False, "n_samples_shifted": 0}


def reference_for_run(ood: Mapping[str, Any] | None, paths: Collection[str]) -> dict[str, Any] | None:
    """The checkpoint's ``ood`` entry with the validation reference of the arithmetic the run's actors used.

    ``paths``: the runs table's precisions of the run (``bf16``, ``fp32 (openvino)``...). One arithmetic: its
    reference (:func:`bloodray.ood.for_precision`); none known (every row resumed) or several (a mixed cluster):
    the entry's own, with a warning when that may not match.
    """
    if not ood:
        return None
    used = {p for p in (precision_of(path) for path in paths) if p}
    if len(used) > 1:
        log.warning("the run's model actors used %s: the domain-shift alarm compares every cell with the %s "
                    "reference", ", ".join(sorted(used)), ood.get("precision") or "fp32")
    ref = for_precision(ood, next(iter(used)) if len(used) == 1 else None)
    if len(used) == 1 and ref["precision"] not in used:
        log.warning("the checkpoint's OOD reference has no %s validation reference (only %s): the domain-shift alarm "
                    "may fire on cells of the training laboratory; refit it (jobs/fit_ood_packaged.py)",
                    next(iter(used)), ref["precision"])
    return ref


def group_statistics(scores: np.ndarray, classes: np.ndarray | None, ood: Mapping[str, Any],
                     rule: ShiftRule = ShiftRule()) -> dict[str, Any]:
    """The alarm's statistics of one group of cells (their OOD scores and predicted classes) against the
    checkpoint's ``ood`` metadata entry; ``classes`` None tests against the pooled reference."""
    return shift_statistics(scores, float(ood["threshold"]), list(ood["val_quantiles"]),
                            float(ood["val_unidentified_share"]), rule, int(ood.get("n_val") or 1000),
                            classes=classes, per_class=per_class_of(ood))


def _set(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in table.schema.names:
        return table.set_column(table.schema.get_field_index(name), name, values)
    return table.append_column(name, values)


def mark_unverified(diffs: pa.Table, shifted: np.ndarray) -> pa.Table:
    """Samples under the alarm: :data:`SHIFT_FLAG` in front of the flags they keep, and those marked unverified.

    Sets ``any_flag`` and :data:`~bloodray.nightly.contract.FLAGS_UNVERIFIED`
    (appended when absent) of those samples; their ``flag_*`` columns keep
    their values.
    """
    shifted = np.asarray(shifted, dtype=bool)
    flags = [[SHIFT_FLAG, *f] if s else f for s, f in zip(shifted, diffs.column("flags").to_pylist())]
    diffs = _set(diffs, "flags", pa.array(flags, diffs.schema.field("flags").type))
    diffs = _set(diffs, "any_flag", pa.array(np.asarray(diffs.column("any_flag").to_pylist(), dtype=bool) | shifted))
    return _set(diffs, FLAGS_UNVERIFIED, pa.array(shifted, pa.bool_()))


def apply_shift(diffs: pa.Table, scores: Mapping[str, np.ndarray], unidentified: Mapping[str, int],
                ood: Mapping[str, Any] | None, rule: ShiftRule = ShiftRule(),
                classes: Mapping[str, np.ndarray] | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """Add the shift columns to a differentials table and mark the flags of samples under the alarm unverified.

    ``scores`` maps sample ids to their cells' OOD scores, ``classes`` to the
    cells' predicted classes in the same order (None: the pooled reference),
    ``unidentified`` to their count of unidentified cells (used as is when
    there is no reference, e.g. carried rows). Returns the table and the
    run-level columns of the manifest (:func:`no_shift` shape).
    """
    classes = classes or {}
    ids = diffs.column("sample_id").to_pylist()
    rows = []
    for sid in ids:
        row = group_statistics(scores.get(sid, np.zeros(0)), classes.get(sid), ood, rule) if ood else no_shift()
        # The count of the status column itself, so the table always agrees with predictions.
        row["n_unidentified"] = int(unidentified.get(sid, 0))
        rows.append(row)
    shifted = np.array([r["domain_shift"] for r in rows], dtype=bool)
    for name in SHIFT_COLUMNS:
        values = [r[name] for r in rows]
        diffs = diffs.append_column(name, pa.array(values, diffs.schema.field(name).type
                                                   if name in diffs.schema.names else None))
    diffs = mark_unverified(diffs, shifted)
    run = no_shift()
    if ood:
        def pooled(parts: Mapping[str, np.ndarray], dtype) -> np.ndarray:
            return np.concatenate([np.asarray(parts[s], dtype=dtype) for s in scores]) if scores else np.zeros(0)

        run_classes = pooled(classes, str) if scores and all(s in classes for s in scores) else None
        run.update(group_statistics(pooled(scores, np.float64), run_classes, ood, rule))
    run["n_unidentified"] = int(sum(unidentified.values()))
    run["n_samples_shifted"] = int(shifted.sum())
    run["domain_shift"] = bool(run["domain_shift"] or shifted.any())
    return diffs, run
