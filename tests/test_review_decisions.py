"""The review decisions file (bloodray.review.decisions): the JSON the review page downloads, and review.csv.

Every bad file fails as a whole with one line naming the file and the entry.
"""

from __future__ import annotations

import copy
import datetime as dt
import json

import pytest

from bloodray.classes import CLASS_NAMES
from bloodray.review import decisions as dec
from bloodray.review.decisions import ReviewError

SHA = "ab" * 32
WHERE = "decisions-2024-06-01.json"


def _doc() -> dict:
    return {
        "format": dec.FORMAT, "output_uri": "s3://lab/out", "run_date": "2024-06-01", "run_id": "R1",
        "exported_at": "2024-06-02T07:00:00Z",
        "reviews": [
            {"sample_id": "S1", "image_uri": "s3://a/S1/x.jpg", "image_sha256": SHA, "predicted_class": "ig",
             "verified_class": "neutrophil", "reviewer": "dr a", "reviewed_at": "2024-06-02T08:00:00.123Z"},
            {"sample_id": "S1", "image_uri": "s3://a/S1/y.jpg", "image_sha256": "cd" * 32,
             "predicted_class": "monocyte", "verified_class": "unidentified", "reviewer": "dr a",
             "reviewed_at": "2024-06-02T08:01:00+02:00"},
        ],
        "signoffs": [{"sample_id": "S1", "reviewer": "dr b", "status": "signed_off",
                      "signed_at": "2024-06-02T09:00:00"}],
    }


def _parse(doc) -> dec.Decisions:
    return dec.parse_decisions(json.dumps(doc).encode(), WHERE)


def test_a_page_decisions_file_parses_and_round_trips():
    parsed = _parse(_doc())
    assert (parsed.kind, parsed.run_date, parsed.run_id, parsed.output_uri) == ("json", "2024-06-01", "R1", "s3://lab/out")
    first, second = parsed.reviews
    assert (first.sample_id, first.image_sha256, first.verified_class, first.run_id) == ("S1", SHA, "neutrophil", "R1")
    assert first.reviewed_at == dt.datetime(2024, 6, 2, 8, 0, 0, 123000, dt.timezone.utc)
    assert second.verified_class == "unidentified"
    assert second.reviewed_at == dt.datetime(2024, 6, 2, 6, 1, tzinfo=dt.timezone.utc)  # offset honoured
    (signoff,) = parsed.signoffs
    assert (signoff.status, signoff.reviewer) == ("signed_off", "dr b")
    assert signoff.signed_at == dt.datetime(2024, 6, 2, 9, tzinfo=dt.timezone.utc)  # no zone: UTC
    again = dec.parse_decisions(dec.to_json(parsed).encode(), WHERE)
    assert again.reviews == parsed.reviews and again.signoffs == parsed.signoffs
    # Forward compatible: keys a newer page adds are ignored; signoffs may be absent.
    doc = _doc()
    doc["page_version"] = 7
    doc["reviews"][0]["note"] = "nice cell"
    del doc["signoffs"]
    assert len(_parse(doc).reviews) == 2 and _parse(doc).signoffs == []


def test_allowed_verified_classes_are_the_class_names_and_unidentified():
    assert dec.VERIFIED_CLASSES == CLASS_NAMES + ("unidentified",)
    assert dec.SIGNOFF_STATUSES == ("signed_off", "reopened")
    assert dec.default_name("2024-06-01") == "decisions-2024-06-01.json"


def _spoil(path: tuple, value) -> dict:
    doc = copy.deepcopy(_doc())
    target = doc
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


BAD = [
    ((("format",), "bloodray-review-decisions/2"), "format 'bloodray-review-decisions/2' is not"),
    ((("run_date",), "01/06/2024"), "run_date '01/06/2024' is not YYYY-MM-DD"),
    ((("run_id",), KeyError), "missing run_id"),
    ((("reviews",), {"a": 1}), "reviews must be a list"),
    ((("reviews", 1, "verified_class"), "unicorn"),
     "reviews[1] (sample S1, image s3://a/S1/y.jpg): unknown class 'unicorn'; expected one of basophil"),
    ((("reviews", 1, "verified_class"), "Neutrophils"), "reviews[1] (sample S1, image s3://a/S1/y.jpg): unknown class"),
    ((("reviews", 0, "image_sha256"), "xyz"), "reviews[0] (sample S1, image s3://a/S1/x.jpg): image_sha256 'xyz'"),
    ((("reviews", 0, "reviewer"), ""), "reviews[0] (sample S1, image s3://a/S1/x.jpg): missing reviewer"),
    ((("reviews", 0, "sample_id"), KeyError), "reviews[0]: missing sample_id"),
    ((("reviews", 0, "reviewed_at"), "yesterday"), "reviewed_at: 'yesterday' is not an ISO 8601 time"),
    ((("reviews", 1, "image_uri"), "s3://a/S1/x.jpg"), "reviews[1]: duplicate cell 's3://a/S1/x.jpg' (also reviews[0])"),
    ((("reviews", 1, "image_sha256"), SHA), "reviews[1]: same image content as reviews[0] in sample S1"),
    ((("signoffs", 0, "status"), "approved"), "signoffs[0] (sample S1): status 'approved' is not one of signed_off"),
    ((("signoffs", 0, "signed_at"), KeyError), "signoffs[0] (sample S1): signed_at: missing time"),
]


@pytest.mark.parametrize("spoil, message", BAD, ids=[m[:40] for _, m in BAD])
def test_a_bad_entry_fails_the_file_with_one_line_naming_file_and_entry(spoil, message):
    with pytest.raises(ReviewError) as err:
        _parse(_spoil(*spoil))
    text = str(err.value)
    assert text.startswith(WHERE + ": ") and message in text and "\n" not in text


def test_not_json_not_utf8_and_reviewer_option_with_json():
    with pytest.raises(ReviewError, match=r"^d.json: not valid JSON \(line 1, column 2"):
        dec.parse_decisions(b"{oops", "d.json")
    with pytest.raises(ReviewError, match="not a UTF-8 text file"):
        dec.parse_decisions(b"\xff\xfe{", "d.json")
    with pytest.raises(ReviewError, match="--reviewer is for review CSV files"):
        dec.parse_decisions(json.dumps(_doc()).encode(), "d.json", reviewer="dr x")


def test_review_csv_rows_parse_with_folder_spellings_and_skip_empty_rows():
    text = ("run_id,sample_id,image_uri,image_sha256,predicted_class,confidence,verified_class,reviewer\n"
            f"R1,S1,/a/x.jpg,{SHA},ig,0.5,Neutrophils,\n"
            "R1,S1,/a/y.jpg,,monocyte,0.4,,\n"
            "R1,S2,/a/z.jpg,,monocyte,0.4,unidentified,dr c\n")
    parsed = dec.parse_decisions(text.encode("utf-8-sig"), "review.csv", reviewer="dr x")
    assert parsed.kind == "csv" and parsed.run_id == "R1" and parsed.run_date is None
    assert [(r.entry, r.verified_class, r.reviewer, r.image_sha256) for r in parsed.reviews] == [
        ("row 2", "neutrophil", "dr x", SHA), ("row 4", "unidentified", "dr c", None)]
    with pytest.raises(ReviewError, match=r"^review.csv: row 2: no reviewer"):
        dec.parse_decisions(text.encode(), "review.csv")
    with pytest.raises(ReviewError, match=r"^review.csv: missing column\(s\) verified_class"):
        dec.parse_decisions(b"image_uri\n/a/x.jpg\n", "review.csv")
