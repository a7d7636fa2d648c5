"""The domain-shift alarm of a nightly run: per-sample and per-run tests against the checkpoint's reference.

The checkpoint's OOD reference (:mod:`bloodray.ood`, stored by
``bloodray calibrate``) carries the validation OOD-score quantiles and the
validation share of unidentified cells. Each sample's scores, and all the
run's scores together, are tested against them
(:func:`bloodray.ood.shift_statistics`: a binomial test of the
unidentified share and a one-sided KS test of the scores, each needing
significance at ``shift.alpha`` and an effect of at least
``shift.min_effect``). A sample under the alarm gets the single flag
:data:`~bloodray.ood.SHIFT_FLAG`; its other flags are withheld
(their columns false), because a differential of cells the model does not
recognise says nothing clinical. The run is under the alarm when its pooled
test fires or any of its samples is.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from bloodray.ood import SHIFT_FLAG, ShiftRule, shift_statistics
from bloodray.nightly.differential import flag_columns

__all__ = ["SHIFT_FLAG", "SHIFT_COLUMNS", "ShiftRule", "apply_shift", "no_shift", "withhold_flags"]

#: Per-sample columns of the alarm in differentials (the run-level ones add n_samples_shifted).
SHIFT_COLUMNS = ("n_unidentified", "share_unidentified", "unidentified_p_value", "ood_ks", "ood_ks_p_value",
                 "domain_shift")


def no_shift() -> dict[str, Any]:
    """The run-level shift columns of a run without OOD scores (null statistics, no alarm)."""
    return {"n_unidentified": 0, "share_unidentified": None, "unidentified_p_value": None, "ood_ks": None,
            "ood_ks_p_value": None, "domain_shift": False, "n_samples_shifted": 0}


def _stats(scores: np.ndarray, ood: Mapping[str, Any], rule: ShiftRule) -> dict[str, Any]:
    return shift_statistics(scores, float(ood["threshold"]), list(ood["val_quantiles"]),
                            float(ood["val_unidentified_share"]), rule, int(ood.get("n_val") or 1000))


def withhold_flags(diffs: pa.Table, shifted: np.ndarray) -> pa.Table:
    """Samples under the alarm keep only the flag :data:`SHIFT_FLAG`; their other ``flag_*`` columns are false."""
    if not shifted.any():
        return diffs
    for col in flag_columns():
        diffs = diffs.set_column(diffs.schema.get_field_index(col), col,
                                 pa.array(np.asarray(diffs.column(col).to_pylist(), dtype=bool) & ~shifted))
    flags = [[SHIFT_FLAG] if s else f for s, f in zip(shifted, diffs.column("flags").to_pylist())]
    diffs = diffs.set_column(diffs.schema.get_field_index("flags"), "flags",
                             pa.array(flags, diffs.schema.field("flags").type))
    return diffs.set_column(diffs.schema.get_field_index("any_flag"), "any_flag",
                            pa.array(np.asarray(diffs.column("any_flag").to_pylist(), dtype=bool) | shifted))


def apply_shift(diffs: pa.Table, scores: Mapping[str, np.ndarray], unidentified: Mapping[str, int],
                ood: Mapping[str, Any] | None, rule: ShiftRule = ShiftRule()) -> tuple[pa.Table, dict[str, Any]]:
    """Add the shift columns to a differentials table and withhold the flags of samples under the alarm.

    ``scores`` maps sample ids to their cells' OOD scores, ``unidentified`` to
    their count of unidentified cells (used as is when there is no reference,
    e.g. carried rows). Returns the table and the run-level columns of the
    manifest (:func:`no_shift` shape).
    """
    ids = diffs.column("sample_id").to_pylist()
    rows = []
    for sid in ids:
        row = _stats(scores.get(sid, np.zeros(0)), ood, rule) if ood else no_shift()
        # The count of the status column itself, so the table always agrees with predictions.
        row["n_unidentified"] = int(unidentified.get(sid, 0))
        rows.append(row)
    shifted = np.array([r["domain_shift"] for r in rows], dtype=bool)
    for name in SHIFT_COLUMNS:
        values = [r[name] for r in rows]
        diffs = diffs.append_column(name, pa.array(values, diffs.schema.field(name).type
                                                   if name in diffs.schema.names else None))
    diffs = withhold_flags(diffs, shifted)
    run = no_shift()
    if ood:
        pooled = np.concatenate([np.asarray(v, dtype=np.float64) for v in scores.values()]) if scores else np.zeros(0)
        run.update(_stats(pooled, ood, rule))
    run["n_unidentified"] = int(sum(unidentified.values()))
    run["n_samples_shifted"] = int(shifted.sum())
    run["domain_shift"] = bool(run["domain_shift"] or shifted.any())
    return diffs, run
