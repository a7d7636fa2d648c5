"""White-cell differentials and clinical flags from per-sample cell counts.

Pure logic, no I/O except reading the reference-range YAML: the nightly job
(:mod:`bloodray.nightly.pipeline`) counts predicted classes per sample with DuckDB and
hands the counts table to :func:`compute_differentials`, which adds the
percentages and flags column-wise. :func:`differential` is the same
computation for one sample given as a ``{class: count}`` mapping.

Definitions (adult peripheral blood):

* WBC = every class with ``is_wbc`` (the five mature leukocytes *and*
  immature granulocytes); erythroblasts and platelets are not white cells.
* ``pct_<class>`` = count / WBC x 100 for the five mature leukocytes.
* ``ig_per_100_wbc`` and ``erythroblast_per_100_wbc`` = count / WBC x 100.
* A percentage below its range's ``low`` (strictly) raises ``flag_<class>_low``,
  above ``high`` raises ``flag_<class>_high``. Percentages are null, and those
  flags false, for a sample without white cells.
* ``flag_erythroblasts``: any erythroblast at all; ``flag_ig``: immature
  granulocytes above ``ig_percent`` % of WBC; ``flag_low_wbc_count``: fewer
  than ``min_wbc`` white cells were classified, so percentages are unreliable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import yaml

from bloodray import storage
from bloodray.classes import (
    CLASS_NAMES,
    DEFAULT_IG_FLAG_PERCENT,
    DEFAULT_MIN_WBC_FOR_DIFFERENTIAL,
    DIFFERENTIAL_CLASSES,
    WBC_CLASSES,
    ReferenceRange,
    reference_ranges,
)

#: Human-readable names of the low/high flags of the five mature leukocytes.
RANGE_FLAG_NAMES: dict[str, tuple[str, str]] = {
    "neutrophil": ("neutropenia", "neutrophilia"),
    "lymphocyte": ("lymphopenia", "lymphocytosis"),
    "monocyte": ("monocytopenia", "monocytosis"),
    "eosinophil": ("eosinopenia", "eosinophilia"),
    "basophil": ("basopenia", "basophilia"),
}
ERYTHROBLAST_FLAG = "circulating erythroblasts"
IG_FLAG = "immature granulocytes"
LOW_WBC_FLAG = "WBC count too low for a reliable differential"


class ReferenceRangeError(ValueError):
    """The reference-range file is unreadable or invalid; the message names the file and key."""


@dataclass(frozen=True)
class FlagRules:
    """Everything that decides which flags a differential raises.

    Attributes:
        ranges: reference range (% of WBC) per mature leukocyte; a class left
            out is never flagged low or high.
        ig_percent: immature granulocytes above this % of WBC are flagged.
        min_wbc: fewer classified white cells than this flags the differential
            as unreliable.
    """

    ranges: Mapping[str, ReferenceRange] = field(default_factory=reference_ranges)
    ig_percent: float = DEFAULT_IG_FLAG_PERCENT
    min_wbc: int = DEFAULT_MIN_WBC_FOR_DIFFERENTIAL


def load_reference_ranges(uri: str | None = None,
                          storage_options: Mapping[str, Any] | None = None) -> dict[str, ReferenceRange]:
    """Read reference ranges from a YAML file (local or object storage).

    ``None`` returns the packaged defaults (:func:`bloodray.classes.reference_ranges`,
    mirrored by ``configs/reference_ranges.yaml``). The file holds a
    ``reference_ranges`` mapping of class name to ``{low: %, high: %}``.
    """
    if uri is None:
        return reference_ranges()
    fs, path = storage.filesystem(uri, storage_options)
    try:
        with fs.open(path, "rb") as fh:
            data = yaml.safe_load(fh.read()) or {}
    except FileNotFoundError as exc:
        raise ReferenceRangeError(f"{uri}: reference-range file not found") from exc
    except yaml.YAMLError as exc:
        raise ReferenceRangeError(f"{uri}: invalid YAML: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - storage failures become one readable line
        raise ReferenceRangeError(str(storage.describe_storage_error(uri, exc))) from exc
    return parse_reference_ranges(data, where=uri)


def parse_reference_ranges(data: Any, where: str = "reference ranges") -> dict[str, ReferenceRange]:
    """Validate a ``{"reference_ranges": {class: {low, high}}}`` mapping."""
    if not isinstance(data, Mapping) or not isinstance(data.get("reference_ranges"), Mapping):
        raise ReferenceRangeError(f"{where}: expected a top-level 'reference_ranges' mapping")
    unknown_top = set(data) - {"reference_ranges"}
    if unknown_top:
        raise ReferenceRangeError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown_top)))}")
    out: dict[str, ReferenceRange] = {}
    for name, spec in data["reference_ranges"].items():
        key = f"{where}: reference_ranges.{name}"
        if name not in DIFFERENTIAL_CLASSES:
            raise ReferenceRangeError(f"{key}: ranges apply only to {', '.join(DIFFERENTIAL_CLASSES)}")
        if not isinstance(spec, Mapping) or set(spec) != {"low", "high"}:
            raise ReferenceRangeError(f"{key}: expected {{low: <percent>, high: <percent>}}, got {spec!r}")
        low, high = spec["low"], spec["high"]
        for label, value in (("low", low), ("high", high)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
                raise ReferenceRangeError(f"{key}.{label}: expected a percentage in [0, 100], got {value!r}")
        if low > high:
            raise ReferenceRangeError(f"{key}: low ({low}) is above high ({high})")
        out[name] = ReferenceRange(float(low), float(high))
    return out


def count_columns() -> list[str]:
    """``count_<class>`` column names in class index order."""
    return [f"count_{name}" for name in CLASS_NAMES]


def flag_columns() -> list[str]:
    """Boolean flag column names, in output order."""
    cols = [f"flag_{name}_{side}" for name in DIFFERENTIAL_CLASSES for side in ("low", "high")]
    return cols + ["flag_erythroblasts", "flag_ig", "flag_low_wbc_count"]


def _pct(count: np.ndarray, n_wbc: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n_wbc > 0, count * 100.0 / np.maximum(n_wbc, 1), np.nan)


def compute_differentials(counts: pa.Table, rules: FlagRules = FlagRules()) -> pa.Table:
    """Add WBC count, percentages and flags to a table of per-sample counts.

    ``counts`` must have a ``count_<class>`` column for every class (other
    columns, such as ``sample_id``, are kept in front). Added columns:
    ``n_wbc``, ``pct_<class>`` for the five mature leukocytes,
    ``ig_per_100_wbc``, ``erythroblast_per_100_wbc``, ``platelet_count``, the
    :func:`flag_columns`, ``flags`` (list of flag names) and ``any_flag``.
    """
    missing = [c for c in count_columns() if c not in counts.column_names]
    if missing:
        raise ValueError(f"counts table lacks column(s) {', '.join(missing)}")
    c = {name: counts.column(f"count_{name}").to_numpy(zero_copy_only=False).astype(np.int64)
         for name in CLASS_NAMES}
    n = counts.num_rows
    n_wbc = sum((c[name] for name in WBC_CLASSES), np.zeros(n, dtype=np.int64))
    out = counts
    out = out.append_column("n_wbc", pa.array(n_wbc, pa.int64()))
    pct = {name: _pct(c[name], n_wbc) for name in DIFFERENTIAL_CLASSES}
    for name in DIFFERENTIAL_CLASSES:
        out = out.append_column(f"pct_{name}", pa.array(pct[name], pa.float64(), from_pandas=True))
    ig = _pct(c["ig"], n_wbc)
    out = out.append_column("ig_per_100_wbc", pa.array(ig, pa.float64(), from_pandas=True))
    out = out.append_column("erythroblast_per_100_wbc",
                            pa.array(_pct(c["erythroblast"], n_wbc), pa.float64(), from_pandas=True))
    out = out.append_column("platelet_count", pa.array(c["platelet"], pa.int64()))

    flags: dict[str, np.ndarray] = {}
    names: dict[str, str] = {}
    for name in DIFFERENTIAL_CLASSES:
        rng = rules.ranges.get(name)
        valid = ~np.isnan(pct[name])
        low_name, high_name = RANGE_FLAG_NAMES[name]
        # NaN compares False, so samples without white cells raise no range flag.
        flags[f"flag_{name}_low"] = valid & (pct[name] < rng.low) if rng else np.zeros(n, bool)
        flags[f"flag_{name}_high"] = valid & (pct[name] > rng.high) if rng else np.zeros(n, bool)
        names[f"flag_{name}_low"], names[f"flag_{name}_high"] = low_name, high_name
    flags["flag_erythroblasts"] = c["erythroblast"] > 0
    flags["flag_ig"] = ~np.isnan(ig) & (ig > rules.ig_percent)
    flags["flag_low_wbc_count"] = n_wbc < rules.min_wbc
    names.update(flag_erythroblasts=ERYTHROBLAST_FLAG, flag_ig=IG_FLAG, flag_low_wbc_count=LOW_WBC_FLAG)
    for col in flag_columns():
        out = out.append_column(col, pa.array(flags[col], pa.bool_()))
    matrix = np.stack([flags[col] for col in flag_columns()], axis=1) if n else np.zeros((0, len(flags)), bool)
    labels = [names[col] for col in flag_columns()]
    # One list per sample (not per image): a small Python loop is fine here.
    flag_lists = [[labels[j] for j in np.flatnonzero(row)] for row in matrix]
    out = out.append_column("flags", pa.array(flag_lists, pa.list_(pa.string())))
    out = out.append_column("any_flag", pa.array(matrix.any(axis=1) if n else np.zeros(0, bool), pa.bool_()))
    return out


def differential(counts: Mapping[str, int], rules: FlagRules = FlagRules()) -> dict[str, Any]:
    """The differential of one sample from ``{class_name: count}`` (absent classes count 0)."""
    unknown = set(counts) - set(CLASS_NAMES)
    if unknown:
        raise ValueError(f"unknown cell class(es) {', '.join(sorted(unknown))}; expected {', '.join(CLASS_NAMES)}")
    table = pa.table({f"count_{name}": pa.array([int(counts.get(name, 0))], pa.int64()) for name in CLASS_NAMES})
    row = compute_differentials(table, rules).to_pylist()[0]
    return row
