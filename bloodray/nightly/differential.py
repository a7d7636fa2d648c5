"""White-cell differentials and clinical flags that respect counting error.

Pure logic, no I/O except reading the reference-range YAML and (through
:mod:`bloodray.nightly.sample_metadata`) the optional sample-metadata table: the
nightly job (:mod:`bloodray.nightly.pipeline`) counts predicted classes per
sample with DuckDB and hands the counts table to :func:`compute_differentials`,
which adds percentages, their confidence intervals and flags column-wise.
:func:`differential` is the same computation for one sample given as a
``{class: count}`` mapping.

Definitions (adult peripheral blood):

* WBC = every class with ``is_wbc`` (the five mature leukocytes *and*
  immature granulocytes); erythroblasts and platelets are not white cells.
* ``pct_<class>`` = count / WBC x 100 for the five mature leukocytes;
  ``ig_per_100_wbc`` and ``erythroblast_per_100_wbc`` = count / WBC x 100.
* Every one of them carries a Wilson score interval (``<column>_lo``,
  ``<column>_hi``; 95 % by default) on the counted white cells. The
  erythroblast rate's interval is the Wilson interval of
  erythroblasts / (WBC + erythroblasts) mapped through q / (1 - q).
* With a sample's absolute WBC count (``wbc_count_10e9_per_l``, from the sample
  metadata) ``abs_<class>`` = WBC count x fraction in 10^9/L, its interval the
  fraction's interval times the WBC count (the analyser's own WBC imprecision,
  a few %, is not added).
* ``flag_<class>_high`` is raised only when the whole interval lies above the
  range's ``high``; ``flag_<class>_low`` only when the whole interval lies below
  ``low`` and the range has a low limit (``flag_low``). Ranges are absolute
  (10^9/L) where the sample's WBC count is known and the class has an absolute
  range, else in % of WBC (``flag_basis`` says which). An interval touching
  the limit is not outside it.
* ``flag_ig`` / ``flag_erythroblasts``: the whole interval of the per-100-WBC
  rate lies above ``ig_percent`` / ``erythroblast_per_100_wbc``.
* ``flag_low_wbc_count``: fewer than ``min_wbc`` white cells were classified.
* Samples without white cells have null percentages and intervals and raise
  no range, ig or erythroblast flag.

The classifier's own errors (issue 21): with :attr:`FlagRules.confusion`
(the checkpoint's sealed confusion) the intervals behind the flags are those of
the sample's true rates, corrected for misclassification
(:mod:`bloodray.nightly.intervals` says how and why); without one the flags
keep the counting-error rule and ``flags_confusion_corrected`` is false.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from bloodray import storage
from bloodray.bounded_read import InputReadError, read_file
from bloodray.classes import (
    CLASS_NAMES,
    DEFAULT_ERYTHROBLAST_FLAG_PER_100_WBC,
    DEFAULT_FLAG_CONFIDENCE,
    DEFAULT_IG_FLAG_PERCENT,
    DEFAULT_MIN_WBC_FOR_DIFFERENTIAL,
    DIFFERENTIAL_CLASSES,
    WBC_CLASSES,
    ReferenceRange,
    absolute_reference_ranges,
    reference_ranges,
)
from bloodray.nightly.intervals import (ConfusionError, ModelConfusion, checkpoint_confusion, share_bounds,
                                        wilson_interval)
from bloodray.nightly.sample_metadata import (
    SAMPLE_ID_COLUMN,
    WBC_COLUMN,
    SampleMetadataError,
    load_sample_metadata,
    validate_sample_metadata,
)

__all__ = [
    "ConfusionError", "ERYTHROBLAST_FLAG", "IG_FLAG", "LOW_WBC_FLAG", "RANGE_FLAG_NAMES", "FlagRules",
    "FlagRulesError", "ModelConfusion", "ReferenceRangeError", "SampleMetadataError", "absolute_columns", "checkpoint_confusion",
    "compute_differentials", "count_columns", "verified_count_columns",
    "differential", "differential_fields", "flag_columns", "flag_labels", "interval_columns", "load_absolute_ranges",
    "load_flag_rules", "load_reference_ranges", "load_sample_metadata", "parse_absolute_ranges",
    "parse_reference_ranges", "rules_data", "wilson_interval",
]

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
#: Per-100-WBC rates, each with an interval.
RATE_COLUMNS: tuple[str, ...] = ("ig_per_100_wbc", "erythroblast_per_100_wbc")
#: Largest absolute limit accepted in a range file (10^9/L).
_MAX_ABSOLUTE = 1000.0


class FlagRulesError(ValueError):
    """A flag rule is invalid; the message names the config key (``flags.<field>``)."""


class ReferenceRangeError(FlagRulesError):
    """The reference-range file is unreadable or invalid; the message names the file and key."""


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


@dataclass(frozen=True)
class FlagRules:
    """Everything that decides which flags a differential raises.

    The field names are the nightly job's ``flags.<field>`` config keys;
    invalid values raise :class:`FlagRulesError` naming that key.

    Attributes:
        ranges: reference range (% of WBC) per mature leukocyte; a class left
            out is never flagged low or high.
        ig_percent: immature granulocytes whose whole interval lies above this
            % of WBC (= per 100 WBC) are flagged.
        min_wbc: fewer classified white cells than this flags the differential
            as unreliable.
        erythroblast_per_100_wbc: erythroblasts whose whole interval lies
            above this many per 100 WBC are flagged.
        confidence: level of the intervals, in (0, 1).
        absolute_ranges: reference range (10^9/L) per mature leukocyte, used
            for samples whose WBC count is known; empty = always percentages.
        confusion: the model's measured confusion (not a config key: the
            nightly job takes it from the checkpoint); None = intervals on the
            counted cells as if every cell were classified right.
    """

    ranges: Mapping[str, ReferenceRange] = field(default_factory=reference_ranges)
    ig_percent: float = DEFAULT_IG_FLAG_PERCENT
    min_wbc: int = DEFAULT_MIN_WBC_FOR_DIFFERENTIAL
    erythroblast_per_100_wbc: float = DEFAULT_ERYTHROBLAST_FLAG_PER_100_WBC
    confidence: float = DEFAULT_FLAG_CONFIDENCE
    absolute_ranges: Mapping[str, ReferenceRange] = field(default_factory=absolute_reference_ranges)
    confusion: ModelConfusion | None = None

    def __post_init__(self) -> None:
        if not _is_number(self.ig_percent) or not 0.0 <= self.ig_percent <= 100.0:
            raise FlagRulesError(f"flags.ig_percent: must be a percentage in [0, 100], got {self.ig_percent!r}")
        if isinstance(self.min_wbc, bool) or not isinstance(self.min_wbc, int) or self.min_wbc < 0:
            raise FlagRulesError(f"flags.min_wbc: must be an integer >= 0, got {self.min_wbc!r}")
        if not _is_number(self.erythroblast_per_100_wbc) or self.erythroblast_per_100_wbc < 0:
            raise FlagRulesError("flags.erythroblast_per_100_wbc: must be a number >= 0, "
                                 f"got {self.erythroblast_per_100_wbc!r}")
        if not _is_number(self.confidence) or not 0.0 < self.confidence < 1.0:
            raise FlagRulesError(f"flags.confidence: must be in (0, 1), e.g. 0.95, got {self.confidence!r}")
        for key, ranges in (("reference_ranges", self.ranges), ("absolute_reference_ranges", self.absolute_ranges)):
            for name, rng in ranges.items():
                if name not in DIFFERENTIAL_CLASSES:
                    raise FlagRulesError(f"flags.{key}.{name}: ranges apply only to "
                                         f"{', '.join(DIFFERENTIAL_CLASSES)}")
                if not isinstance(rng, ReferenceRange) or rng.low > rng.high:
                    raise FlagRulesError(f"flags.{key}.{name}: expected a ReferenceRange with low <= high, "
                                         f"got {rng!r}")
        if self.confusion is not None and not isinstance(self.confusion, ModelConfusion):
            raise FlagRulesError(f"confusion: expected a ModelConfusion or None, got {type(self.confusion).__name__}")


# --------------------------------------------------------------------------- reference-range file
def _read_yaml(uri: str, storage_options: Mapping[str, Any] | None) -> Any:
    try:
        return yaml.safe_load(read_file(uri, storage_options, what="reference-range file")) or {}
    except FileNotFoundError as exc:
        raise ReferenceRangeError(f"{uri}: reference-range file not found") from exc
    except yaml.YAMLError as exc:
        raise ReferenceRangeError(f"{uri}: invalid YAML: {exc}") from exc
    except (InputReadError, storage.StorageError) as exc:
        raise ReferenceRangeError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - storage failures become one readable line
        raise ReferenceRangeError(str(storage.describe_storage_error(uri, exc))) from exc


def load_reference_ranges(uri: str | None = None,
                          storage_options: Mapping[str, Any] | None = None) -> dict[str, ReferenceRange]:
    """Read the percentage reference ranges from a YAML file (local or object storage).

    ``None`` returns the packaged defaults (:func:`bloodray.classes.reference_ranges`,
    mirrored by ``configs/reference_ranges.yaml``). The file holds a
    ``reference_ranges`` mapping of class name to ``{low: %, high: %}`` and
    optionally ``absolute_reference_ranges`` (see :func:`load_absolute_ranges`).
    """
    if uri is None:
        return reference_ranges()
    return parse_reference_ranges(_read_yaml(uri, storage_options), where=uri)


def load_absolute_ranges(uri: str | None = None,
                         storage_options: Mapping[str, Any] | None = None) -> dict[str, ReferenceRange]:
    """Read the absolute (10^9/L) ranges of a reference-range file; defaults when it has none."""
    if uri is None:
        return absolute_reference_ranges()
    return parse_absolute_ranges(_read_yaml(uri, storage_options), where=uri)


def _check_top(data: Any, where: str) -> None:
    if not isinstance(data, Mapping) or not isinstance(data.get("reference_ranges"), Mapping):
        raise ReferenceRangeError(f"{where}: expected a top-level 'reference_ranges' mapping")
    unknown_top = set(data) - {"reference_ranges", "absolute_reference_ranges"}
    if unknown_top:
        raise ReferenceRangeError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown_top)))}; "
                                  "expected reference_ranges, absolute_reference_ranges")


def parse_reference_ranges(data: Any, where: str = "reference ranges") -> dict[str, ReferenceRange]:
    """Validate the ``reference_ranges`` section (% of WBC) of a parsed range file."""
    _check_top(data, where)
    return _parse_section(data["reference_ranges"], f"{where}: reference_ranges", 100.0, "percentage")


def parse_absolute_ranges(data: Any, where: str = "reference ranges") -> dict[str, ReferenceRange]:
    """Validate the ``absolute_reference_ranges`` section (10^9/L); absent = the packaged defaults."""
    _check_top(data, where)
    if "absolute_reference_ranges" not in data:
        return absolute_reference_ranges()
    section = data["absolute_reference_ranges"]
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise ReferenceRangeError(f"{where}: absolute_reference_ranges: expected a mapping of class to "
                                  f"{{low, high}}, got {section!r}")
    return _parse_section(section, f"{where}: absolute_reference_ranges", _MAX_ABSOLUTE, "count in 10^9/L")


def _parse_section(section: Mapping[str, Any], prefix: str, top: float, unit: str) -> dict[str, ReferenceRange]:
    out: dict[str, ReferenceRange] = {}
    for name, spec in section.items():
        key = f"{prefix}.{name}"
        if name not in DIFFERENTIAL_CLASSES:
            raise ReferenceRangeError(f"{key}: ranges apply only to {', '.join(DIFFERENTIAL_CLASSES)}")
        if not isinstance(spec, Mapping) or "high" not in spec or set(spec) - {"low", "high", "flag_low"}:
            raise ReferenceRangeError(f"{key}: expected {{low: <{unit} or null>, high: <{unit}>"
                                      f"[, flag_low: false]}}, got {spec!r}")
        low, high = spec.get("low"), spec["high"]
        for label, value in (("low", low), ("high", high)):
            if value is None and label == "low":
                continue
            if not _is_number(value) or not 0 <= value <= top:
                raise ReferenceRangeError(f"{key}.{label}: expected a {unit} in [0, {top:g}], got {value!r}")
        flag_low = spec.get("flag_low", low is not None)
        if not isinstance(flag_low, bool):
            raise ReferenceRangeError(f"{key}.flag_low: expected true or false, got {flag_low!r}")
        if low is None and flag_low:
            raise ReferenceRangeError(f"{key}.flag_low: a range without a low limit (low: null) cannot flag low")
        if low is not None and low > high:
            raise ReferenceRangeError(f"{key}: low ({low}) is above high ({high})")
        out[name] = ReferenceRange(float(low or 0.0), float(high), flag_low)
    return out


def load_flag_rules(uri: str | None = None, storage_options: Mapping[str, Any] | None = None,
                    **fields: Any) -> FlagRules:
    """:class:`FlagRules` from a reference-range file (``flags.reference_ranges``) and the other keys.

    ``fields`` are the remaining :class:`FlagRules` fields (``ig_percent``,
    ``min_wbc``, ``erythroblast_per_100_wbc``, ``confidence``). Raises
    :class:`ReferenceRangeError` for the file, :class:`FlagRulesError` naming
    ``flags.<field>`` for the rest.
    """
    unknown = set(fields) - {"ig_percent", "min_wbc", "erythroblast_per_100_wbc", "confidence"}
    if unknown:
        raise FlagRulesError(f"flags: unknown key(s) {', '.join(sorted(unknown))}")
    if uri is None:
        return FlagRules(**fields)
    data = _read_yaml(uri, storage_options)
    return FlagRules(ranges=parse_reference_ranges(data, uri), absolute_ranges=parse_absolute_ranges(data, uri),
                     **fields)


# --------------------------------------------------------------------------- columns
def count_columns() -> list[str]:
    """``count_<class>`` column names in class index order."""
    return [f"count_{name}" for name in CLASS_NAMES]


def flag_columns() -> list[str]:
    """Boolean flag column names, in output order."""
    cols = [f"flag_{name}_{side}" for name in DIFFERENTIAL_CLASSES for side in ("low", "high")]
    return cols + ["flag_erythroblasts", "flag_ig", "flag_low_wbc_count"]


def flag_labels() -> dict[str, str]:
    """The label each flag column puts in ``flags`` when raised, in :func:`flag_columns` order."""
    names = {f"flag_{name}_{side}": label for name in DIFFERENTIAL_CLASSES
             for side, label in zip(("low", "high"), RANGE_FLAG_NAMES[name])}
    names.update(flag_erythroblasts=ERYTHROBLAST_FLAG, flag_ig=IG_FLAG, flag_low_wbc_count=LOW_WBC_FLAG)
    return {col: names[col] for col in flag_columns()}


def rules_data(rules: FlagRules) -> dict[str, Any]:
    """``rules`` and the class facts :func:`compute_differentials` reads, as JSON-ready data.

    For code outside Python that recomputes differentials (the review page's
    live differential): it gets every threshold from here, the interval's
    ``z`` as this module computes it and the model's confusion (rates, the
    inverse of their transpose, val cells per class, the rows' posterior rates
    and (co)variance divisors; null without one), so
    nothing is copied by hand.
    """
    def ranges(section: Mapping[str, ReferenceRange]) -> dict[str, dict[str, Any]]:
        return {n: {"low": r.low, "high": r.high, "flag_low": r.flag_low} for n, r in section.items()}

    return {"classes": list(CLASS_NAMES), "wbc_classes": list(WBC_CLASSES),
            "differential_classes": list(DIFFERENTIAL_CLASSES), "confidence": rules.confidence,
            "z": NormalDist().inv_cdf(0.5 + rules.confidence / 2.0), "ranges": ranges(rules.ranges),
            "absolute_ranges": ranges(rules.absolute_ranges), "ig_percent": rules.ig_percent,
            "erythroblast_per_100_wbc": rules.erythroblast_per_100_wbc, "min_wbc": rules.min_wbc,
            "flag_labels": flag_labels(), "confusion": None if rules.confusion is None else {
                "rates": rules.confusion.rates.tolist(), "inverse_t": rules.confusion.inverse_t.tolist(),
                "row_totals": rules.confusion.row_totals.tolist(),
                "posterior_rates": rules.confusion.posterior_rates.tolist(),
                "posterior_cells": rules.confusion.posterior_cells.tolist()}}


def interval_columns() -> list[str]:
    """Confidence-interval bounds (``<value>_lo``, ``<value>_hi``) of every percentage and per-100-WBC rate."""
    values = [f"pct_{name}" for name in DIFFERENTIAL_CLASSES] + list(RATE_COLUMNS)
    return [f"{v}_{side}" for v in values for side in ("lo", "hi")]


def absolute_columns() -> list[str]:
    """The sample's WBC count and, per mature leukocyte, ``abs_<class>`` with its interval (10^9/L)."""
    return [WBC_COLUMN] + [f"abs_{n}{s}" for n in DIFFERENTIAL_CLASSES for s in ("", "_lo", "_hi")]


def differential_fields() -> list[tuple[str, pa.DataType]]:
    """Every column :func:`compute_differentials` appends, in order, with its Arrow type."""
    f64 = pa.float64()
    return ([("n_wbc", pa.int64())] + [(f"pct_{n}", f64) for n in DIFFERENTIAL_CLASSES]
            + [(c, f64) for c in RATE_COLUMNS] + [("platelet_count", pa.int64())]
            + [(c, f64) for c in interval_columns()] + [(c, f64) for c in absolute_columns()]
            + [("flag_basis", pa.string()), ("flags_confusion_corrected", pa.bool_())]
            + [(c, pa.bool_()) for c in flag_columns()]
            + [("flags", pa.list_(pa.string())), ("any_flag", pa.bool_())])


# --------------------------------------------------------------------------- differentials
def _metadata_wbc(counts: pa.Table, sample_metadata: pa.Table | None) -> np.ndarray:
    """Each sample's WBC count (10^9/L) from the metadata, NaN where unknown."""
    if sample_metadata is None:
        return np.full(counts.num_rows, np.nan)
    if SAMPLE_ID_COLUMN not in counts.column_names:
        raise ValueError(f"counts table lacks column {SAMPLE_ID_COLUMN}, needed to join the sample metadata")
    meta = validate_sample_metadata(sample_metadata)
    ids = pc.cast(counts.column(SAMPLE_ID_COLUMN), pa.string())
    wbc = pc.take(meta.column(WBC_COLUMN), pc.index_in(ids, value_set=meta.column(SAMPLE_ID_COLUMN)))
    return wbc.to_numpy(zero_copy_only=False).astype(np.float64)  # nulls (absent, unknown) -> NaN


def _range_flags(lo: np.ndarray, hi: np.ndarray, rng: ReferenceRange | None) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) flags: the whole interval strictly below ``low`` / above ``high``; NaN never flags."""
    if rng is None:
        return np.zeros(lo.shape, bool), np.zeros(lo.shape, bool)
    low = (hi < rng.low) if rng.flag_low else np.zeros(lo.shape, bool)
    return low, lo > rng.high


def verified_count_columns() -> list[str]:
    """``verified_count_<class>``: the part of ``count_<class>`` a reviewer gave that class (optional input)."""
    return [f"verified_{col}" for col in count_columns()]


def _verified_matrix(counts: pa.Table, matrix: np.ndarray) -> np.ndarray | None:
    """Counts of reviewer-verified cells per sample and class when ``counts`` has them (else None)."""
    if not all(col in counts.column_names for col in verified_count_columns()):
        return None
    known = np.stack([counts.column(col).fill_null(0).to_numpy(zero_copy_only=False)
                      for col in verified_count_columns()], axis=1).astype(np.float64)
    if np.any(known < 0) or np.any(known > matrix):
        raise ValueError("verified_count_<class> must lie between 0 and count_<class>")
    return known.reshape(matrix.shape)


def compute_differentials(counts: pa.Table, rules: FlagRules = FlagRules(),
                          sample_metadata: pa.Table | None = None) -> pa.Table:
    """Add WBC count, percentages, their intervals and flags to a table of per-sample counts.

    ``counts`` must have a ``count_<class>`` column for every class (other
    columns, such as ``sample_id``, are kept in front). ``sample_metadata``
    (``sample_id, wbc_count_10e9_per_l``, see :func:`load_sample_metadata`)
    is optional; samples it lists with a count are flagged on absolute ranges.
    With the model's confusion (``rules.confusion``), optional
    :func:`verified_count_columns` say how many of each count a reviewer
    verified: those cells are no model error and are not corrected.
    The added columns are :func:`differential_fields`, in that order.
    """
    missing = [c for c in count_columns() if c not in counts.column_names]
    if missing:
        raise ValueError(f"counts table lacks column(s) {', '.join(missing)}")
    c = {name: counts.column(f"count_{name}").to_numpy(zero_copy_only=False).astype(np.int64)
         for name in CLASS_NAMES}
    n = counts.num_rows
    n_wbc = sum((c[name] for name in WBC_CLASSES), np.zeros(n, dtype=np.int64))
    wbc_count = _metadata_wbc(counts, sample_metadata)
    cols: dict[str, np.ndarray] = {"n_wbc": n_wbc}
    bounds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    matrix = np.stack([c[name] for name in CLASS_NAMES], axis=1).astype(np.float64).reshape(n, len(CLASS_NAMES))
    known = _verified_matrix(counts, matrix)

    def bounds_of(index: int, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fractions
        return share_bounds(matrix, index, members, rules.confusion, rules.confidence, known)

    wbc = np.array([name in WBC_CLASSES for name in CLASS_NAMES])
    with np.errstate(divide="ignore", invalid="ignore"):
        for name in DIFFERENTIAL_CLASSES + ("ig",):
            col = f"pct_{name}" if name != "ig" else "ig_per_100_wbc"
            cols[col] = np.where(n_wbc > 0, c[name] * 100.0 / np.maximum(n_wbc, 1), np.nan)
            bounds[name] = bounds_of(CLASS_NAMES.index(name), wbc)
        erb = c["erythroblast"]
        cols["erythroblast_per_100_wbc"] = np.where(n_wbc > 0, erb * 100.0 / np.maximum(n_wbc, 1), np.nan)
        erb_index = CLASS_NAMES.index("erythroblast")
        with_erb = wbc | (np.arange(len(CLASS_NAMES)) == erb_index)
        q_lo, q_hi = bounds_of(erb_index, with_erb)  # of (WBC + erythroblasts)
        erb_bounds = tuple(np.where(n_wbc > 0, q / (1.0 - q), np.nan) for q in (q_lo, q_hi))
    cols["platelet_count"] = c["platelet"]
    for name in DIFFERENTIAL_CLASSES:
        cols[f"pct_{name}_lo"], cols[f"pct_{name}_hi"] = (100.0 * b for b in bounds[name])
    cols["ig_per_100_wbc_lo"], cols["ig_per_100_wbc_hi"] = (100.0 * b for b in bounds["ig"])
    cols["erythroblast_per_100_wbc_lo"], cols["erythroblast_per_100_wbc_hi"] = (100.0 * b for b in erb_bounds)
    cols[WBC_COLUMN] = wbc_count
    for name in DIFFERENTIAL_CLASSES:
        frac = cols[f"pct_{name}"] / 100.0
        cols[f"abs_{name}"] = wbc_count * frac
        cols[f"abs_{name}_lo"], cols[f"abs_{name}_hi"] = (wbc_count * b for b in bounds[name])
    use_abs = ~np.isnan(wbc_count) & (n_wbc > 0) & bool(rules.absolute_ranges)
    cols["flag_basis"] = np.where(use_abs, "absolute", "percent")
    cols["flags_confusion_corrected"] = np.full(n, rules.confusion is not None)

    flags: dict[str, np.ndarray] = {}
    for name in DIFFERENTIAL_CLASSES:
        # NaN compares False, so samples without white cells raise no range flag.
        pct_low, pct_high = _range_flags(cols[f"pct_{name}_lo"], cols[f"pct_{name}_hi"], rules.ranges.get(name))
        abs_rng = rules.absolute_ranges.get(name)
        abs_low, abs_high = _range_flags(cols[f"abs_{name}_lo"], cols[f"abs_{name}_hi"], abs_rng)
        by_abs = use_abs & (abs_rng is not None)
        flags[f"flag_{name}_low"] = np.where(by_abs, abs_low, pct_low)
        flags[f"flag_{name}_high"] = np.where(by_abs, abs_high, pct_high)
    flags["flag_erythroblasts"] = cols["erythroblast_per_100_wbc_lo"] > rules.erythroblast_per_100_wbc
    flags["flag_ig"] = cols["ig_per_100_wbc_lo"] > rules.ig_percent
    flags["flag_low_wbc_count"] = n_wbc < rules.min_wbc
    cols.update(flags)
    matrix = np.stack([flags[col] for col in flag_columns()], axis=1) if n else np.zeros((0, len(flags)), bool)
    labels = list(flag_labels().values())
    # One list per sample (not per image): a small Python loop is fine here.
    cols["flags"] = [[labels[j] for j in np.flatnonzero(row)] for row in matrix]
    cols["any_flag"] = matrix.any(axis=1) if n else np.zeros(0, bool)
    out = counts
    for name, typ in differential_fields():
        out = out.append_column(name, pa.array(cols[name], typ, from_pandas=True))
    return out


def differential(counts: Mapping[str, int], rules: FlagRules = FlagRules(),
                 wbc_count_10e9_per_l: float | None = None) -> dict[str, Any]:
    """The differential of one sample from ``{class_name: count}`` (absent classes count 0).

    ``wbc_count_10e9_per_l``, when given, is the sample's absolute WBC count.
    """
    unknown = set(counts) - set(CLASS_NAMES)
    if unknown:
        raise ValueError(f"unknown cell class(es) {', '.join(sorted(unknown))}; expected {', '.join(CLASS_NAMES)}")
    table = pa.table({SAMPLE_ID_COLUMN: ["sample"],
                      **{f"count_{name}": pa.array([int(counts.get(name, 0))], pa.int64()) for name in CLASS_NAMES}})
    meta = None
    if wbc_count_10e9_per_l is not None:
        meta = pa.table({SAMPLE_ID_COLUMN: ["sample"], WBC_COLUMN: [float(wbc_count_10e9_per_l)]})
    row = compute_differentials(table, rules, meta).to_pylist()[0]
    del row[SAMPLE_ID_COLUMN]
    return row
