"""Tests for the differential counts and clinical flags (bloodray.nightly.differential)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bloodray.data import synth as synth
from bloodray.classes import CLASS_NAMES, DIFFERENTIAL_CLASSES, ReferenceRange, absolute_reference_ranges, \
    reference_ranges
from bloodray.nightly.differential import (
    ERYTHROBLAST_FLAG,
    IG_FLAG,
    LOW_WBC_FLAG,
    FlagRules,
    FlagRulesError,
    ReferenceRangeError,
    SampleMetadataError,
    absolute_columns,
    compute_differentials,
    count_columns,
    differential,
    differential_fields,
    flag_columns,
    interval_columns,
    load_absolute_ranges,
    load_flag_rules,
    load_reference_ranges,
    load_sample_metadata,
    parse_absolute_ranges,
    parse_reference_ranges,
    wilson_interval,
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


def test_immature_granulocytes_count_as_white_cells_and_are_flagged_when_the_interval_is_above_limit():
    row = differential(dict(NORMAL, neutrophil=50, ig=5), NO_LOW_WBC)
    assert row["n_wbc"] == 100
    assert row["ig_per_100_wbc"] == pytest.approx(5.0)
    assert row["ig_per_100_wbc_lo"] > 0.9 and row["flag_ig"] and IG_FLAG in row["flags"]
    # 2 in 100 is above 0.9 % but its interval (0.55-7.0 %) is not: not flagged any more.
    row = differential(dict(NORMAL, neutrophil=53, ig=2), NO_LOW_WBC)
    assert row["ig_per_100_wbc_lo"] < 0.9 < row["ig_per_100_wbc"] and not row["flag_ig"]


def test_range_flags_have_clinical_names():
    row = differential({"neutrophil": 320, "lymphocyte": 48, "monocyte": 20, "eosinophil": 8, "basophil": 4},
                       NO_LOW_WBC)
    assert row["flag_neutrophil_high"] and row["flag_lymphocyte_low"]
    assert row["flags"] == ["neutrophilia", "lymphopenia"]
    row = differential({"neutrophil": 120, "lymphocyte": 200, "monocyte": 48, "eosinophil": 28, "basophil": 4},
                       NO_LOW_WBC)
    assert row["flags"] == ["neutropenia", "lymphocytosis", "monocytosis", "eosinophilia"]


def test_counting_error_keeps_small_deviations_unflagged():
    """What the old rule flagged at 100 cells: 62 % neutrophils, 0 or 2 basophils, 5 % eosinophils."""
    row = differential({"neutrophil": 62, "lymphocyte": 28, "monocyte": 5, "eosinophil": 5, "basophil": 0},
                       NO_LOW_WBC)
    assert row["pct_neutrophil_lo"] < 60 < row["pct_neutrophil"] and row["pct_basophil"] == 0
    assert row["flags"] == []
    row = differential({"neutrophil": 55, "lymphocyte": 35, "monocyte": 6, "eosinophil": 2, "basophil": 2},
                       NO_LOW_WBC)
    assert row["flags"] == []


def test_one_erythroblast_is_reported_but_not_flagged():
    row = differential(dict(NORMAL, erythroblast=1), NO_LOW_WBC)
    assert row["n_wbc"] == 100  # erythroblasts are not white cells
    assert row["erythroblast_per_100_wbc"] == pytest.approx(1.0)
    assert 0 < row["erythroblast_per_100_wbc_lo"] < 1.0 < row["erythroblast_per_100_wbc_hi"]
    assert row["flags"] == []
    row = differential(dict(NORMAL, erythroblast=5), NO_LOW_WBC)
    assert row["erythroblast_per_100_wbc_lo"] > 1.0 and row["flags"] == [ERYTHROBLAST_FLAG]
    # Threshold 0 = any erythroblast at all (the Wilson lower bound of k >= 1 is above 0).
    assert differential(dict(NORMAL, erythroblast=1), FlagRules(min_wbc=0, erythroblast_per_100_wbc=0))["flags"] \
        == [ERYTHROBLAST_FLAG]


def test_erythroblast_interval_is_wilson_on_all_nucleated_cells():
    row = differential(dict(NORMAL, erythroblast=5), NO_LOW_WBC)
    q_lo, q_hi = wilson_interval(5, 105)
    assert row["erythroblast_per_100_wbc_lo"] == pytest.approx(100 * q_lo / (1 - q_lo))
    assert row["erythroblast_per_100_wbc_hi"] == pytest.approx(100 * q_hi / (1 - q_hi))


def test_no_white_cells_gives_null_percentages_and_only_count_flags():
    row = differential({"platelet": 4, "erythroblast": 2})
    assert row["n_wbc"] == 0
    assert row["pct_neutrophil"] is None and row["ig_per_100_wbc"] is None
    assert row["pct_neutrophil_lo"] is None and row["erythroblast_per_100_wbc_hi"] is None
    assert row["flags"] == [LOW_WBC_FLAG]


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
    path = str(REPO / "configs" / "reference_ranges.yaml")
    assert load_reference_ranges(path) == reference_ranges()
    assert load_reference_ranges(None) == reference_ranges()
    assert load_absolute_ranges(path) == absolute_reference_ranges() == load_absolute_ranges(None)
    assert load_flag_rules(path) == FlagRules()
    # No low limit for the classes no clinician acts on when low.
    assert {n for n, r in reference_ranges().items() if r.flag_low} == {"neutrophil", "lymphocyte"}
    assert {n for n, r in absolute_reference_ranges().items() if r.flag_low} == {"neutrophil", "lymphocyte"}


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
    ({"reference_ranges": {"monocyte": {"low": 2, "high": 8, "flag": False}}}, r"monocyte: expected \{low"),
    ({"reference_ranges": {"monocyte": {"low": 2, "high": 8, "flag_low": "no"}}}, r"monocyte\.flag_low: expected"),
    ({"reference_ranges": {"monocyte": {"low": None, "high": 8, "flag_low": True}}},
     r"monocyte\.flag_low: a range without a low limit"),
    ({"reference_ranges": {"basophil": {"low": 0, "high": 101}}}, r"basophil\.high: expected a percentage"),
    ({"reference_ranges": {}, "absolute": {}}, r"unknown key\(s\) absolute"),
])
def test_invalid_ranges_name_the_key(data, match):
    with pytest.raises(ReferenceRangeError, match=match):
        parse_reference_ranges(data, where="ranges.yaml")


def test_missing_range_file_names_the_path(tmp_path):
    with pytest.raises(ReferenceRangeError, match="nope.yaml: reference-range file not found"):
        load_reference_ranges(str(tmp_path / "nope.yaml"))


# --------------------------------------------------------------------------- intervals
def test_wilson_interval_closed_forms_and_scipy():
    z2 = 1.959963984540054 ** 2
    lo, hi = wilson_interval([0, 100, 55], [100, 100, 100], continuity=False)
    assert lo[0] == 0.0 and hi[0] == pytest.approx(z2 / (100 + z2), rel=1e-12)
    assert hi[1] == 1.0 and lo[1] == pytest.approx(100 / (100 + z2), rel=1e-12)
    stats = pytest.importorskip("scipy.stats")
    # The flags' rule is Newcombe's continuity-corrected Wilson interval (scipy's "wilsoncc"); plain Wilson on request.
    for k, n, conf in [(55, 100, 0.95), (1, 200, 0.95), (37, 90, 0.9), (3, 7, 0.99), (0, 100, 0.95),
                       (100, 100, 0.95), (3, 100, 0.95), (1, 1, 0.95)]:
        for continuity, method in ((True, "wilsoncc"), (False, "wilson")):
            ci = stats.binomtest(k, n).proportion_ci(confidence_level=conf, method=method)
            got = wilson_interval(k, n, conf, continuity=continuity)
            assert (float(got[0]), float(got[1])) == pytest.approx((ci.low, ci.high), rel=1e-12, abs=1e-15), (
                k, n, conf, method)
    lo, hi = wilson_interval([0, 3], [0, 0])
    assert np.isnan(lo).all() and np.isnan(hi).all()


def test_three_basophils_of_100_are_no_basophilia_four_are():
    # The healthy middle is 0.75 % basophils (range 0.5-1.0 %): 3 of 100 is well within a healthy sample's counting
    # error (plain Wilson's lower bound 1.03 % flagged 4 % of healthy samples with a perfect classifier); the
    # continuity-corrected bound is 0.78 %. 4 of 100 (bound 1.29 %) still flags.
    assert float(wilson_interval(3, 100, continuity=False)[0]) == pytest.approx(0.010255, abs=1e-6)
    assert float(wilson_interval(3, 100)[0]) == pytest.approx(0.007780, abs=1e-6)
    assert float(wilson_interval(4, 100)[0]) == pytest.approx(0.012891, abs=1e-6)
    rules = FlagRules(min_wbc=0)
    assert differential(dict(NORMAL, neutrophil=NORMAL["neutrophil"] - 2, basophil=3), rules)["flags"] == []
    assert differential(dict(NORMAL, neutrophil=NORMAL["neutrophil"] - 3, basophil=4), rules)["flags"] == [
        "basophilia"]


def _edge_rules(name: str, rng: ReferenceRange, **kw) -> FlagRules:
    return FlagRules(ranges={name: rng}, min_wbc=0, absolute_ranges={}, **kw)


@pytest.mark.parametrize("shift, flagged", [(0, False), (-1, True), (+1, False)],
                         ids=["touching", "just-outside", "just-inside"])
def test_high_flag_at_the_range_edge(shift, flagged):
    counts = {"neutrophil": 150, "lymphocyte": 50}
    lo = differential(counts, NO_LOW_WBC)["pct_neutrophil_lo"]
    high = float(np.nextafter(lo, lo + shift)) if shift else lo
    row = differential(counts, _edge_rules("neutrophil", ReferenceRange(10.0, high)))
    assert row["flag_neutrophil_high"] is flagged and not row["flag_neutrophil_low"]
    assert row["flags"] == (["neutrophilia"] if flagged else [])


@pytest.mark.parametrize("shift, flagged", [(0, False), (+1, True), (-1, False)],
                         ids=["touching", "just-outside", "just-inside"])
def test_low_flag_at_the_range_edge(shift, flagged):
    counts = {"neutrophil": 150, "lymphocyte": 50}
    hi = differential(counts, NO_LOW_WBC)["pct_lymphocyte_hi"]
    low = float(np.nextafter(hi, hi + shift)) if shift else hi
    row = differential(counts, _edge_rules("lymphocyte", ReferenceRange(low, 90.0)))
    assert row["flag_lymphocyte_low"] is flagged and not row["flag_lymphocyte_high"]
    # The same range without a low limit never flags low.
    row = differential(counts, _edge_rules("lymphocyte", ReferenceRange(low, 90.0, flag_low=False)))
    assert row["flags"] == []


def test_classes_without_low_limit_are_not_flagged_low_by_default():
    # 800 white cells, no monocyte, eosinophil or basophil at all: intervals entirely below 2 and 1 %.
    counts = {"neutrophil": 480, "lymphocyte": 320}
    row = differential(counts, NO_LOW_WBC)
    assert row["pct_monocyte_hi"] < 1.0 and row["pct_basophil_hi"] < 1.0
    assert row["flags"] == []
    assert not any(row[f"flag_{c}_low"] for c in ("monocyte", "eosinophil", "basophil"))
    # A lab that wants them gives a low limit (flag_low defaults to true when low is set).
    ranges = parse_reference_ranges({"reference_ranges": {"monocyte": {"low": 2.0, "high": 8.0},
                                                          "basophil": {"low": None, "high": 1.0}}})
    assert ranges["basophil"] == ReferenceRange(0.0, 1.0, flag_low=False)
    row = differential(counts, FlagRules(ranges=ranges, min_wbc=0))
    assert row["flags"] == ["monocytopenia"]


@pytest.mark.parametrize("rate, count, shift, flagged", [
    ("ig_per_100_wbc", "ig", 0, False), ("ig_per_100_wbc", "ig", -1, True), ("ig_per_100_wbc", "ig", +1, False),
    ("erythroblast_per_100_wbc", "erythroblast", 0, False), ("erythroblast_per_100_wbc", "erythroblast", -1, True),
    ("erythroblast_per_100_wbc", "erythroblast", +1, False),
])
def test_per_100_wbc_thresholds_at_the_edge(rate, count, shift, flagged):
    counts = {"neutrophil": 120, "lymphocyte": 74, count: 6}
    lo = differential(counts, NO_LOW_WBC)[f"{rate}_lo"]
    threshold = float(np.nextafter(lo, lo + shift)) if shift else lo
    key = "ig_percent" if count == "ig" else "erythroblast_per_100_wbc"
    row = differential(counts, FlagRules(min_wbc=0, **{key: threshold}))
    flag = "flag_ig" if count == "ig" else "flag_erythroblasts"
    assert row[flag] is flagged
    assert row["flags"] == ([IG_FLAG if count == "ig" else ERYTHROBLAST_FLAG] if flagged else [])


# --------------------------------------------------------------------------- absolute ranges
def test_absolute_ranges_with_the_wbc_count():
    counts = {"neutrophil": 120, "lymphocyte": 60, "monocyte": 12, "eosinophil": 6, "basophil": 2}  # 60/30/6/3/1 %
    pct = differential(counts, NO_LOW_WBC)
    assert pct["flag_basis"] == "percent" and pct["flags"] == [] and pct["wbc_count_10e9_per_l"] is None
    assert pct["abs_neutrophil"] is None
    # WBC 20 x 10^9/L: 12.0 neutrophils, 6.0 lymphocytes -- both intervals above the absolute limits.
    high = differential(counts, NO_LOW_WBC, wbc_count_10e9_per_l=20.0)
    assert high["flag_basis"] == "absolute" and high["wbc_count_10e9_per_l"] == 20.0
    assert high["abs_neutrophil"] == pytest.approx(12.0)
    assert high["abs_neutrophil_lo"] == pytest.approx(20.0 * pct["pct_neutrophil_lo"] / 100)
    assert high["abs_neutrophil_hi"] == pytest.approx(20.0 * pct["pct_neutrophil_hi"] / 100)
    assert high["flags"] == ["neutrophilia", "lymphocytosis"]
    # WBC 2.0: 1.2 neutrophils and 0.6 lymphocytes, intervals below 2.0 and 1.0; 0.12 monocytes never low.
    low = differential(counts, NO_LOW_WBC, wbc_count_10e9_per_l=2.0)
    assert low["abs_lymphocyte_hi"] < 1.0 and low["abs_monocyte"] < 0.2
    assert low["flags"] == ["neutropenia", "lymphopenia"]


@pytest.mark.parametrize("shift, flagged", [(0, False), (-1, True), (+1, False)],
                         ids=["touching", "just-outside", "just-inside"])
def test_absolute_high_flag_at_the_edge(shift, flagged):
    counts = {"neutrophil": 120, "lymphocyte": 80}
    lo = differential(counts, NO_LOW_WBC, wbc_count_10e9_per_l=9.0)["abs_neutrophil_lo"]
    high = float(np.nextafter(lo, lo + shift)) if shift else lo
    rules = FlagRules(min_wbc=0, absolute_ranges={"neutrophil": ReferenceRange(0.0, high)})
    row = differential(counts, rules, wbc_count_10e9_per_l=9.0)
    assert row["flag_neutrophil_high"] is flagged
    # Lymphocytes have no absolute range in these rules: judged on percentages (40 % is inside 20-40 %).
    assert not row["flag_lymphocyte_high"] and not row["flag_lymphocyte_low"]


def test_metadata_joins_on_sample_id_and_unknown_counts_fall_back_to_percentages():
    counts = {"neutrophil": 120, "lymphocyte": 60, "monocyte": 12, "eosinophil": 6, "basophil": 2}
    table = pa.table({"sample_id": ["A", "B", "C"], **{f"count_{c}": [counts.get(c, 0)] * 3 for c in CLASS_NAMES}})
    meta = pa.table({"sample_id": ["C", "A", "Z"], "wbc_count_10e9_per_l": [None, 20.0, 5.0]})
    out = compute_differentials(table, NO_LOW_WBC, meta).to_pylist()
    assert [r["flag_basis"] for r in out] == ["absolute", "percent", "percent"]
    assert [r["wbc_count_10e9_per_l"] for r in out] == [20.0, None, None]
    assert out[0]["flags"] == ["neutrophilia", "lymphocytosis"] and out[1]["flags"] == []
    # No absolute ranges = percentages even with a count.
    out = compute_differentials(table, FlagRules(min_wbc=0, absolute_ranges={}), meta).to_pylist()
    assert out[0]["flag_basis"] == "percent" and out[0]["abs_neutrophil"] == pytest.approx(12.0)
    with pytest.raises(ValueError, match="lacks column sample_id"):
        compute_differentials(table.drop(["sample_id"]), NO_LOW_WBC, meta)
    with pytest.raises(SampleMetadataError, match=r"row 2: sample_id 'A' repeats row 1"):
        compute_differentials(table, NO_LOW_WBC, pa.table({"sample_id": ["A", "A"], "wbc_count_10e9_per_l": [1, 2]}))


# --------------------------------------------------------------------------- sample metadata files
def test_load_sample_metadata_csv_and_parquet(tmp_path):
    path = tmp_path / "meta.csv"
    path.write_text("sample_id,wbc_count_10e9_per_l,ward\nS1,7.4,A\n S2 , 12.5 ,B\nS3,,C\n")
    meta = load_sample_metadata(str(path))
    assert meta.schema.names == ["sample_id", "wbc_count_10e9_per_l"]
    assert meta.to_pylist() == [{"sample_id": "S1", "wbc_count_10e9_per_l": 7.4},
                                {"sample_id": "S2", "wbc_count_10e9_per_l": 12.5},
                                {"sample_id": "S3", "wbc_count_10e9_per_l": None}]
    pq.write_table(pa.table({"sample_id": [1, 2], "wbc_count_10e9_per_l": [3.5, None]}), tmp_path / "meta.parquet")
    assert load_sample_metadata(str(tmp_path / "meta.parquet")).to_pylist() == [
        {"sample_id": "1", "wbc_count_10e9_per_l": 3.5}, {"sample_id": "2", "wbc_count_10e9_per_l": None}]


@pytest.mark.parametrize("text, match", [
    ("sample_id,wbc\nS1,7\n", r"meta\.csv: missing column\(s\) wbc_count_10e9_per_l; expected .* \(found: sample_id, wbc\)"),
    ("sample_id,wbc_count_10e9_per_l\nS1,7\nS2,seven\n",
     r"meta\.csv: row 2 \(line 3\), sample_id 'S2': wbc_count_10e9_per_l: expected a number \(10\^9/L\), got 'seven'"),
    ("sample_id,wbc_count_10e9_per_l\nS1,-1\n", r"row 1 \(line 2\), sample_id 'S1': wbc_count_10e9_per_l: '-1' is not"),
    ("sample_id,wbc_count_10e9_per_l\nS1,7500\n", r"sample_id 'S1': wbc_count_10e9_per_l: .*per microlitre"),
    ("sample_id,wbc_count_10e9_per_l\nS1,inf\n", r"sample_id 'S1': wbc_count_10e9_per_l: 'inf' is not"),
    ("sample_id,wbc_count_10e9_per_l\nS1,7\n,8\n", r"row 2 \(line 3\): sample_id is empty"),
    ("sample_id,wbc_count_10e9_per_l\nS1,7\nS2,8\nS1,9\n", r"row 3 \(line 4\): sample_id 'S1' repeats row 1"),
    ("sample_id,wbc_count_10e9_per_l\nS1,7,extra\n", r"meta\.csv: line 2: more fields than the header's 2"),
    ("", r"meta\.csv: empty file"),
])
def test_bad_metadata_files_name_the_uri_row_and_field(tmp_path, text, match):
    path = tmp_path / "meta.csv"
    path.write_text(text)
    with pytest.raises(SampleMetadataError, match=match):
        load_sample_metadata(str(path))


def test_bad_metadata_paths_and_parquet(tmp_path):
    with pytest.raises(SampleMetadataError, match=r"nope\.csv: sample-metadata file not found"):
        load_sample_metadata(str(tmp_path / "nope.csv"))
    with pytest.raises(SampleMetadataError, match=r"meta\.xlsx: sample metadata must be a \.csv or \.parquet"):
        load_sample_metadata(str(tmp_path / "meta.xlsx"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(SampleMetadataError, match=r"broken\.parquet: not a readable Parquet file"):
        load_sample_metadata(str(tmp_path / "broken.parquet"))
    pq.write_table(pa.table({"sample_id": ["S1"], "wbc_count_10e9_per_l": [True]}), tmp_path / "b.parquet")
    with pytest.raises(SampleMetadataError, match=r"b\.parquet: row 1, sample_id 'S1': wbc_count_10e9_per_l: expected a number"):
        load_sample_metadata(str(tmp_path / "b.parquet"))


def test_sample_metadata_from_s3(s3_bucket):
    bucket, so = s3_bucket
    from bloodray import storage
    storage.write_bytes(f"{bucket}/meta/wbc.csv", b"sample_id,wbc_count_10e9_per_l\nS1,20\nS2,6.1\n", so)
    storage.write_bytes(f"{bucket}/meta/wbc.parquet",
                        storage.parquet_bytes(pa.table({"sample_id": ["S1"], "wbc_count_10e9_per_l": [20.0]})), so)
    storage.write_bytes(f"{bucket}/meta/bad.csv", b"sample_id,wbc_count_10e9_per_l\nS1,x\n", so)
    meta = load_sample_metadata(f"{bucket}/meta/wbc.csv", so)
    assert meta.to_pylist() == [{"sample_id": "S1", "wbc_count_10e9_per_l": 20.0},
                                {"sample_id": "S2", "wbc_count_10e9_per_l": 6.1}]
    assert load_sample_metadata(f"{bucket}/meta/wbc.parquet", so).num_rows == 1
    with pytest.raises(SampleMetadataError, match=rf"{bucket}/meta/bad\.csv: row 1 \(line 2\), sample_id 'S1'"):
        load_sample_metadata(f"{bucket}/meta/bad.csv", so)
    with pytest.raises(SampleMetadataError, match=rf"{bucket}/meta/none\.csv: sample-metadata file not found"):
        load_sample_metadata(f"{bucket}/meta/none.csv", so)
    counts = pa.table({"sample_id": ["S1"], **{f"count_{c}": [{"neutrophil": 120, "lymphocyte": 80}.get(c, 0)]
                                                for c in CLASS_NAMES}})
    row = compute_differentials(counts, NO_LOW_WBC, meta).to_pylist()[0]
    assert row["flag_basis"] == "absolute" and row["abs_neutrophil"] == pytest.approx(12.0)
    assert row["flags"] == ["neutrophilia", "lymphocytosis"]


# --------------------------------------------------------------------------- rules, config keys, columns
@pytest.mark.parametrize("kw, match", [
    ({"confidence": 1.0}, r"flags\.confidence: must be in \(0, 1\)"),
    ({"confidence": "95%"}, r"flags\.confidence"),
    ({"erythroblast_per_100_wbc": -1}, r"flags\.erythroblast_per_100_wbc: must be a number >= 0"),
    ({"ig_percent": 101}, r"flags\.ig_percent: must be a percentage"),
    ({"min_wbc": -1}, r"flags\.min_wbc: must be an integer >= 0"),
    ({"min_wbc": 1.5}, r"flags\.min_wbc"),
    ({"ranges": {"ig": ReferenceRange(0, 1)}}, r"flags\.reference_ranges\.ig: ranges apply only"),
    ({"absolute_ranges": {"neutrophil": ReferenceRange(8, 2)}}, r"flags\.absolute_reference_ranges\.neutrophil"),
])
def test_invalid_rules_name_the_config_key(kw, match):
    with pytest.raises(FlagRulesError, match=match):
        FlagRules(**kw)


def test_load_flag_rules_reads_both_sections_and_the_keys(tmp_path):
    path = tmp_path / "ranges.yaml"
    path.write_text("reference_ranges:\n  neutrophil: {low: 45, high: 70}\n"
                    "absolute_reference_ranges:\n  lymphocyte: {low: 1.5, high: 4.0}\n")
    rules = load_flag_rules(str(path), confidence=0.9, erythroblast_per_100_wbc=0.5, ig_percent=2, min_wbc=50)
    assert rules.ranges == {"neutrophil": ReferenceRange(45.0, 70.0)}
    assert rules.absolute_ranges == {"lymphocyte": ReferenceRange(1.5, 4.0)}
    assert (rules.confidence, rules.erythroblast_per_100_wbc, rules.ig_percent, rules.min_wbc) == (0.9, 0.5, 2, 50)
    # An old file (percentages only) keeps working and gets the packaged absolute ranges.
    path.write_text("reference_ranges:\n  neutrophil: {low: 40, high: 60}\n")
    assert load_flag_rules(str(path)).absolute_ranges == absolute_reference_ranges()
    path.write_text("reference_ranges:\n  neutrophil: {low: 40, high: 60}\nabsolute_reference_ranges: {}\n")
    assert load_flag_rules(str(path)).absolute_ranges == {}
    with pytest.raises(FlagRulesError, match=r"flags\.confidence"):
        load_flag_rules(str(path), confidence=2)
    with pytest.raises(FlagRulesError, match=r"flags: unknown key\(s\) confidance"):
        load_flag_rules(None, confidance=0.9)


@pytest.mark.parametrize("section, match", [
    ({"neutrophil": {"low": 2, "high": 7500}}, r"absolute_reference_ranges\.neutrophil\.high: expected a count in 10\^9/L"),
    ({"platelet": {"low": 150, "high": 400}}, r"absolute_reference_ranges\.platelet: ranges apply only"),
    ([1, 2], r"absolute_reference_ranges: expected a mapping"),
])
def test_invalid_absolute_ranges_name_the_key(section, match):
    with pytest.raises(ReferenceRangeError, match=match):
        parse_absolute_ranges({"reference_ranges": {}, "absolute_reference_ranges": section}, where="r.yaml")


def test_column_lists_describe_the_output():
    counts = pa.table({"sample_id": ["S"], **{f"count_{c}": [NORMAL.get(c, 0)] for c in CLASS_NAMES}})
    out = compute_differentials(counts)
    fields = differential_fields()
    assert out.schema.names == ["sample_id"] + count_columns() + [n for n, _ in fields]
    assert [(f.name, f.type) for f in out.schema][1 + len(CLASS_NAMES):] == fields
    names = {n for n, _ in fields}
    assert set(interval_columns()) <= names and set(absolute_columns()) <= names and set(flag_columns()) <= names
    assert interval_columns()[:2] == ["pct_neutrophil_lo", "pct_neutrophil_hi"]
    assert len(interval_columns()) == 2 * (len(DIFFERENTIAL_CLASSES) + 2)
    assert absolute_columns()[:4] == ["wbc_count_10e9_per_l", "abs_neutrophil", "abs_neutrophil_lo", "abs_neutrophil_hi"]
