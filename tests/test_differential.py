"""Tests for the differential counts and clinical flags (bloodray.nightly.differential)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from bloodray.data import synth as synth
from bloodray.classes import CLASS_NAMES, reference_ranges
from bloodray.nightly.differential import (
    ERYTHROBLAST_FLAG,
    IG_FLAG,
    LOW_WBC_FLAG,
    FlagRules,
    ReferenceRangeError,
    compute_differentials,
    count_columns,
    differential,
    flag_columns,
    load_reference_ranges,
    parse_reference_ranges,
)

REPO = Path(__file__).resolve().parents[1]
NO_LOW_WBC = FlagRules(min_wbc=0)

# 100 white cells inside every reference range.
NORMAL = {"neutrophil": 55, "lymphocyte": 35, "monocyte": 6, "eosinophil": 3, "basophil": 1, "ig": 0,
          "platelet": 5, "erythroblast": 0}


def test_normal_sample_has_no_flags_and_percentages_of_white_cells():
    row = differential(NORMAL, FlagRules(min_wbc=101))
    assert row["n_wbc"] == 100
    assert row["pct_neutrophil"] == pytest.approx(55.0)
    assert row["pct_basophil"] == pytest.approx(1.0)  # at the upper limit, not above it
    assert row["platelet_count"] == 5
    assert row["flags"] == [LOW_WBC_FLAG]  # 100 < 101 white cells
    row = differential(NORMAL, FlagRules(min_wbc=100))
    assert row["flags"] == [] and row["any_flag"] is False
    assert not any(row[c] for c in flag_columns())


def test_immature_granulocytes_count_as_white_cells_and_are_flagged_above_limit():
    counts = dict(NORMAL, neutrophil=53, ig=2)
    row = differential(counts, NO_LOW_WBC)
    assert row["n_wbc"] == 100
    assert row["ig_per_100_wbc"] == pytest.approx(2.0)
    assert row["flag_ig"] and IG_FLAG in row["flags"]
    # Exactly at the limit is not above it.
    at_limit = differential({"neutrophil": 991 * 55 // 100, "lymphocyte": 1000 - 9 - 991 * 55 // 100, "ig": 9},
                            FlagRules(min_wbc=0, ig_percent=0.9))
    assert at_limit["ig_per_100_wbc"] == pytest.approx(0.9)
    assert not at_limit["flag_ig"]


def test_range_flags_have_clinical_names():
    row = differential({"neutrophil": 80, "lymphocyte": 12, "monocyte": 5, "eosinophil": 2, "basophil": 1},
                       NO_LOW_WBC)
    assert row["flag_neutrophil_high"] and row["flag_lymphocyte_low"]
    assert row["flags"] == ["neutrophilia", "lymphopenia"]
    row = differential({"neutrophil": 30, "lymphocyte": 50, "monocyte": 12, "eosinophil": 7, "basophil": 1},
                       NO_LOW_WBC)
    assert row["flags"] == ["neutropenia", "lymphocytosis", "monocytosis", "eosinophilia"]


def test_any_erythroblast_is_flagged_and_reported_per_100_wbc():
    row = differential(dict(NORMAL, erythroblast=1), NO_LOW_WBC)
    assert row["n_wbc"] == 100  # erythroblasts are not white cells
    assert row["erythroblast_per_100_wbc"] == pytest.approx(1.0)
    assert row["flags"] == [ERYTHROBLAST_FLAG]


def test_no_white_cells_gives_null_percentages_and_only_count_flags():
    row = differential({"platelet": 4, "erythroblast": 2})
    assert row["n_wbc"] == 0
    assert row["pct_neutrophil"] is None and row["ig_per_100_wbc"] is None
    assert row["flags"] == [ERYTHROBLAST_FLAG, LOW_WBC_FLAG]


def test_table_computation_matches_per_sample_and_keeps_columns():
    samples = [NORMAL, dict(NORMAL, neutrophil=90), {"platelet": 1}, dict(NORMAL, ig=5, erythroblast=3)]
    table = pa.table({"sample_id": [f"S{i}" for i in range(len(samples))],
                      **{f"count_{c}": [s.get(c, 0) for s in samples] for c in CLASS_NAMES}})
    out = compute_differentials(table, NO_LOW_WBC)
    assert out.column_names[: 1 + len(CLASS_NAMES)] == ["sample_id"] + count_columns()
    for row, counts in zip(out.to_pylist(), samples):
        expected = differential(counts, NO_LOW_WBC)
        assert {k: row[k] for k in expected} == expected
    assert out.schema.field("flags").type == pa.list_(pa.string())
    empty = compute_differentials(table.slice(0, 0), NO_LOW_WBC)
    assert empty.num_rows == 0 and "any_flag" in empty.column_names


def test_synthetic_profiles_raise_their_flags():
    """The known compositions of synth.default_samples are flagged as their profile says."""
    expected_flag = {"neutrophilia": "neutrophilia", "lymphocytosis": "lymphocytosis",
                     "eosinophilia": "eosinophilia", "erythroblasts": ERYTHROBLAST_FLAG,
                     "immature_granulocytes": IG_FLAG, "monocytosis": "monocytosis"}
    for spec in synth.default_samples(12, 200, seed=3):
        row = differential(spec.counts, FlagRules(min_wbc=100))
        if spec.profile == "normal":
            assert [f for f in row["flags"] if f != "basopenia"] == [], (spec, row["flags"])
        else:
            assert expected_flag[spec.profile] in row["flags"], (spec, row["flags"])


def test_repo_reference_ranges_mirror_packaged_defaults():
    assert load_reference_ranges(str(REPO / "configs" / "reference_ranges.yaml")) == reference_ranges()
    assert load_reference_ranges(None) == reference_ranges()


def test_custom_ranges_change_flags(tmp_path):
    path = tmp_path / "ranges.yaml"
    path.write_text("reference_ranges:\n  neutrophil: {low: 40, high: 85}\n")
    rules = FlagRules(ranges=load_reference_ranges(str(path)), min_wbc=0)
    row = differential({"neutrophil": 80, "lymphocyte": 20}, rules)
    # Neutrophils within the widened range; lymphocytes have no range at all now.
    assert row["flags"] == []


@pytest.mark.parametrize("data, match", [
    ({"ranges": {}}, "top-level 'reference_ranges'"),
    ({"reference_ranges": {"platelet": {"low": 1, "high": 2}}}, r"reference_ranges\.platelet: ranges apply only"),
    ({"reference_ranges": {"neutrophil": {"low": 70, "high": 60}}}, r"neutrophil: low \(70\) is above high"),
    ({"reference_ranges": {"monocyte": {"low": "2%", "high": 8}}}, r"monocyte\.low: expected a percentage"),
    ({"reference_ranges": {"monocyte": {"low": 2}}}, r"monocyte: expected \{low"),
])
def test_invalid_ranges_name_the_key(data, match):
    with pytest.raises(ReferenceRangeError, match=match):
        parse_reference_ranges(data, where="ranges.yaml")


def test_missing_range_file_names_the_path(tmp_path):
    with pytest.raises(ReferenceRangeError, match="nope.yaml: reference-range file not found"):
        load_reference_ranges(str(tmp_path / "nope.yaml"))
