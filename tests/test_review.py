"""The review round trip end to end: a real Ray classify of a synthetic archive, export, fill, import, query, labels.

Bad review files (unknown class, unknown cell, duplicate cell, another run's
cells) must fail with one line naming the row, and leave the reviews table
untouched.
"""

from __future__ import annotations

import csv
import io
import shutil

import pytest
from PIL import Image

from bloodray.analysis import query
from bloodray.classes import CLASS_NAMES
from bloodray.data.labelled import list_labelled_images
from bloodray.data.stages import THUMBNAIL_SIZE, thumbnail_jpeg
from bloodray.nightly import contract
from bloodray.checkpoint import load_checkpoint
from bloodray.nightly.differential import FlagRules, compute_differentials, count_columns, verified_count_columns
from bloodray.nightly.intervals import ModelConfusion
from bloodray.review import page as review_page
from bloodray.review import roundtrip
from helpers_review import classify_synthetic, run_cli

DATE = "2024-06-01"


def test_thumbnail_is_a_small_jpeg_of_the_decoded_image():
    import numpy as np

    big = np.zeros((224, 224, 3), np.uint8)
    big[:, 112:] = 200
    thumb = Image.open(io.BytesIO(thumbnail_jpeg(big)))
    assert thumb.format == "JPEG" and thumb.size == (THUMBNAIL_SIZE, THUMBNAIL_SIZE)
    quarter = THUMBNAIL_SIZE // 4
    assert thumb.getpixel((quarter, 40))[0] < 30 < 170 < thumb.getpixel((3 * quarter, 40))[0]
    small = Image.open(io.BytesIO(thumbnail_jpeg(np.full((64, 64, 3), 90, np.uint8))))
    assert small.size == (64, 64)  # never enlarged
    # Galleries of the report embed them at the size their cards show.
    from bloodray.analysis.gallery import CARD_IMAGE_SIZE, card_jpeg

    assert Image.open(io.BytesIO(card_jpeg(thumbnail_jpeg(big)))).size == (CARD_IMAGE_SIZE, CARD_IMAGE_SIZE)
    assert card_jpeg(thumbnail_jpeg(np.full((64, 64, 3), 90, np.uint8))) == thumbnail_jpeg(np.full((64, 64, 3), 90,
                                                                                                    np.uint8))


def test_decode_stage_makes_the_thumbnail_from_the_image_before_the_model_resize(tmp_path):
    import numpy as np

    from bloodray.data.preset import EvalPreset
    from bloodray.data.stages import read_decode_files

    pixels = np.random.default_rng(0).integers(0, 255, (360, 364, 3), dtype=np.uint8)
    good, bad = tmp_path / "BNE_1.jpg", tmp_path / "bad.jpg"
    Image.fromarray(pixels).save(good, quality=90)
    bad.write_bytes(b"not an image")
    preset = EvalPreset(128, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    batch = {"uri": np.array([str(good), str(bad)], dtype=object)}
    out = read_decode_files(batch, preset=preset, thumbnail_size=THUMBNAIL_SIZE)
    assert out["image"].shape == (2, 128, 128, 3) and out["jpeg"][1] is None and out["error"][1]
    # A 360 px JPEG decodes at DCT scale 1/2 for a 128 px model: the thumbnail keeps those 180x182 pixels.
    assert Image.open(io.BytesIO(out["jpeg"][0])).size == (182, 180)
    assert "jpeg" not in read_decode_files(batch, preset=preset)  # training and evaluation make none


def _read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _write_csv(path, rows: list[dict[str, str]]) -> str:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


_cli = run_cli


@pytest.mark.slow
def test_review_round_trip(tmp_path, ray_cluster, capsys):
    out, result = classify_synthetic(tmp_path, DATE, seed=5)
    archive = tmp_path / "archive"
    assert result.n_predictions == 16 and result.n_review > 3

    # Every classified image has its thumbnail in the side table.
    con = query.connect(out)
    try:
        thumbs = con.execute("SELECT p.image_uri, t.jpeg FROM predictions p LEFT JOIN thumbnails t "
                             "USING (run_id, image_uri)").fetchall()
        stored = con.sql("SELECT * FROM differentials ORDER BY sample_id").to_arrow_table()
        before = con.sql("SELECT * FROM verified_differentials ORDER BY sample_id").to_arrow_table()
    finally:
        con.close()
    assert len(thumbs) == 16 and all(
        Image.open(io.BytesIO(j)).format == "JPEG" and max(Image.open(io.BytesIO(j)).size) <= THUMBNAIL_SIZE
        for _, j in thumbs)
    # Nothing reviewed yet: verified = predicted.
    names = contract.differentials_schema().names + [contract.RUN_DATE]  # the views add (different) alias names
    assert before.select(names).to_pylist() == stored.select(names).to_pylist()
    assert set(before.column("n_verified").to_pylist()) == {0} and set(before.column("reviewers").to_pylist()) == {None}

    # Export: CSV to fill and a self-contained gallery.
    review_dir = tmp_path / "review"
    rc, printed, _ = _cli(capsys, "review", "export", "--output", out, "--date", DATE, "--dest", str(review_dir))
    assert rc == 0 and "to review" in printed
    rows = _read_csv(review_dir / roundtrip.CSV_FILE)
    assert list(rows[0]) == list(roundtrip.CSV_COLUMNS) and len(rows) == result.n_review
    assert all(r["run_id"] == result.run_id and r["verified_class"] == "" for r in rows)
    page = (review_dir / roundtrip.HTML_FILE).read_text()
    embedded = review_page.embedded_data(page)  # the interactive page: every cell of the date, with its thumbnail
    assert sorted(c["uri"] for s in embedded["samples"] for c in s["cells"]) == sorted(u for u, _ in thumbs)
    assert all(c["thumb"] for s in embedded["samples"] for c in s["cells"])
    assert "Research use only" in page

    # The reviewer relabels two cells and confirms one; the rest stay unreviewed.
    filled = [dict(r) for r in rows]
    new = {0: "basophil", 1: "eosinophil"}
    for i, cls in new.items():
        filled[i]["verified_class"] = cls if cls != filled[i]["predicted_class"] else "monocyte"
        new[i] = filled[i]["verified_class"]
    filled[2]["verified_class"] = filled[2]["predicted_class"]

    # Bad files: one line naming the row, exit 2, nothing applied.
    bad_cases = {
        "unknown class": (lambda rs: rs[3].update(verified_class="unicorn"), "row 5: unknown class 'unicorn'"),
        "unknown cell": (lambda rs: rs[3].update(image_uri="/nowhere/x.jpg", verified_class="monocyte"),
                         "row 5: unknown cell '/nowhere/x.jpg'"),
        "duplicate": (lambda rs: rs.append(dict(rs[0])), f"row {len(filled) + 2}: duplicate cell"),
        "wrong run": (lambda rs: rs[1].update(run_id="another-run"), "row 3: run_id 'another-run'"),
    }
    for name, (spoil, message) in bad_cases.items():
        spoilt = [dict(r) for r in filled]
        spoil(spoilt)
        path = _write_csv(tmp_path / f"bad-{name.replace(' ', '-')}.csv", spoilt)
        rc, _, err = _cli(capsys, "review", "import", path, "--output", out, "--date", DATE, "--reviewer", "dr x")
        ours = [line for line in err.splitlines() if line.startswith("bloodray review: error:")]
        assert rc == 2 and len(ours) == 1 and message in ours[0], (name, err)  # Ray's own log lines aside
        assert not (tmp_path / "out" / contract.REVIEWS).exists(), name
    no_reviewer = _write_csv(tmp_path / "no-reviewer.csv", filled)
    rc, _, err = _cli(capsys, "review", "import", no_reviewer, "--output", out, "--date", DATE)
    assert rc == 2 and "row 2: no reviewer" in err

    # A good file: appended as one whole file.
    good = _write_csv(tmp_path / "filled.csv", filled)
    rc, printed, _ = _cli(capsys, "review", "import", good, "--output", out, "--date", DATE, "--reviewer", "dr x")
    assert rc == 0 and "imported 3 review(s)" in printed and "2 class change(s)" in printed
    files = list((tmp_path / "out" / contract.REVIEWS / f"run_date={DATE}").glob("*.parquet"))
    assert len(files) == 1

    con = query.connect(out)
    try:
        reviews = con.execute("SELECT image_uri, old_class, new_class, reviewer, run_date FROM reviews "
                              "ORDER BY image_uri").fetchall()
        verified = con.sql("SELECT * FROM verified_differentials ORDER BY sample_id").to_arrow_table()
        predictions = {u: (s, c) for u, s, c in con.execute(
            "SELECT image_uri, sample_id, predicted_class FROM predictions").fetchall()}
    finally:
        con.close()
    assert len(reviews) == 3 and {r[3] for r in reviews} == {"dr x"} and {str(r[4]) for r in reviews} == {DATE}
    assert {r[0]: r[2] for r in reviews} == {filled[i]["image_uri"]: filled[i]["verified_class"] for i in range(3)}

    # The verified view equals the job's own differential code run on the verified classes.
    verified_class = {u: c for u, (_, c) in predictions.items()}
    verified_class.update({r[0]: r[2] for r in reviews})
    counts = {s: {c: 0 for c in CLASS_NAMES} for s in stored.column("sample_id").to_pylist()}
    for uri, (sample, _) in predictions.items():
        counts[sample][verified_class[uri]] += 1
    import pyarrow as pa

    # As the run flagged them: with the checkpoint's val confusion, the reviewer's cells taken as true.
    verified_counts = {s: {c: 0 for c in CLASS_NAMES} for s in counts}
    for uri, cls in {r[0]: r[2] for r in reviews}.items():
        verified_counts[predictions[uri][0]][cls] += 1
    table = pa.table({"sample_id": list(counts), **{col: [counts[s][c] for s in counts]
                                                      for c, col in zip(CLASS_NAMES, count_columns())},
                      **{col: [verified_counts[s][c] for s in counts]
                         for c, col in zip(CLASS_NAMES, verified_count_columns())}})
    matrix = load_checkpoint("default").metadata.flag_confusion()
    rules = FlagRules(confusion=None if matrix is None else ModelConfusion.from_counts(matrix))
    expected = compute_differentials(table, rules).to_pylist()
    got = verified.to_pylist()
    for want, row in zip(expected, got):
        for key in ("n_wbc", "pct_neutrophil", "pct_basophil", "pct_eosinophil", "pct_monocyte_hi", "flags"):
            assert row[key] == want[key], key
    assert sum(r["n_verified"] for r in got) == 3
    assert sum(r["n_review"] for r in got) == result.n_review - 3

    # Labels for training: original archive bytes while the archive is there.
    labels = tmp_path / "labels"
    rc, printed, _ = _cli(capsys, "review", "labels", "--output", out, "--dest", str(labels))
    assert rc == 0 and "wrote 3 original image(s) and 0 thumbnail(s)" in printed
    listed = list_labelled_images(str(labels))
    assert sorted(c for _, c in listed) == sorted(filled[i]["verified_class"] for i in range(3))
    for uri, _cls in listed:
        source = next(r["image_uri"] for r in filled[:3] if uri.endswith(r["image_uri"].rsplit("/", 1)[-1]))
        assert open(uri, "rb").read() == open(source, "rb").read()

    # Archive gone: thumbnails stand in, and the manifest says so.
    shutil.move(str(archive), str(tmp_path / "archive-moved"))
    thumbs_dir = tmp_path / "labels-thumbs"
    rc, printed, _ = _cli(capsys, "review", "labels", "--output", out, "--dest", str(thumbs_dir))
    assert rc == 0 and "wrote 0 original image(s) and 3 thumbnail(s)" in printed
    assert len(list_labelled_images(str(thumbs_dir))) == 3
    assert {r["source"] for r in _read_csv(thumbs_dir / roundtrip.LABELS_MANIFEST)} == {"thumbnail"}


def test_gallery_puts_unidentified_then_review_cells_first_and_shows_ood_scores():
    from bloodray.analysis import gallery

    jpeg = thumbnail_jpeg(__import__("numpy").full((64, 64, 3), 120, "uint8"))
    cells = [
        {"image_uri": "s3://a/S1/ok.jpg", "predicted_class": "neutrophil", "confidence": 0.99, "needs_review": False},
        {"image_uri": "s3://a/S1/low.jpg", "predicted_class": "neutrophil", "confidence": 0.41, "needs_review": True},
        {"image_uri": "s3://a/shard.tar#S1/odd.jpg", "predicted_class": "monocyte", "confidence": 0.8,
         "needs_review": False, "status": "unidentified", "ood_score": 7.25},
        {"image_uri": "s3://a/S1/eo.jpg", "predicted_class": "eosinophil", "confidence": 0.97, "needs_review": False},
    ]
    page = gallery.gallery(cells, {c["image_uri"]: jpeg for c in cells[:3]}, confident_per_class=0)
    order = [page.index(name) for name in ("odd.jpg", "low.jpg")]
    assert order == sorted(order) and page.index("Unidentified (1)") < page.index("neutrophil (2, 1 to review)")
    assert "OOD 7.25" in page and "conf 0.41" in page
    assert "ok.jpg" not in page and "1 more confident cell(s) not shown" in page  # capped per class
    assert "eo.jpg" not in page and "no thumbnail" not in page
    assert page.count("src='data:image/jpeg;base64,") == 2


def test_labels_get_collision_free_names_and_hash_paths_are_not_taken_for_tar_members(tmp_path, capsys):
    """Issue 23 item 4: five reviewed cells, two pairs sharing sample and file name, one plain path with '#'."""
    import hashlib
    import tarfile

    import pyarrow.parquet as pq
    from test_query_report import _manifest

    from bloodray.nightly import tables

    run_id, out, arch = "run-labels", str(tmp_path / "out"), tmp_path / "archive"
    originals: dict[str, bytes] = {}
    for i, rel in enumerate(("S1/a/x.jpg", "S1/b/x.jpg", "S#3/cell.jpg")):
        (arch / rel).parent.mkdir(parents=True, exist_ok=True)
        data = thumbnail_jpeg(__import__("numpy").full((40, 40, 3), 30 * i + 10, "uint8"))
        (arch / rel).write_bytes(data)
        originals[str(arch / rel)] = data
    for i, shard in enumerate(("shard1.tar", "shard2.tar")):
        data = thumbnail_jpeg(__import__("numpy").full((40, 40, 3), 200 + 20 * i, "uint8"))
        with tarfile.open(arch / shard, "w") as tar:
            info = tarfile.TarInfo("S2/y.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        originals[f"{arch / shard}#S2/y.jpg"] = data
    samples = {u: ("S2" if ".tar#" in u else u.split("/archive/")[1].split("/")[0]) for u in originals}
    rows = [{"run_id": run_id, "sample_id": samples[u], "image_uri": u, "image_sha256": hashlib.sha256(d).hexdigest(),
             "predicted_class": "neutrophil", "confidence": 0.5, "needs_review": True} for u, d in originals.items()]
    fs, root = contract.output_root(out)
    part = contract.partition_dir(root, "predictions", DATE, run_id) + "/part-0.parquet"
    fs.makedirs(part.rsplit("/", 1)[0], exist_ok=True)
    pq.write_table(__import__("pyarrow").Table.from_pylist(rows, schema=contract.predictions_schema()), part)
    tables.commit_files(out, "predictions", DATE, run_id, [part], replace_date=True)
    manifest = contract.manifest_path(root, DATE, run_id)
    fs.makedirs(manifest.rsplit("/", 1)[0], exist_ok=True)
    from test_query_report import _ts

    pq.write_table(_manifest(run_id, DATE, _ts(1), 5, 0, 3).drop_columns(["run_date"]), manifest)
    tables.commit_files(out, contract.RUNS, DATE, run_id, [manifest], replace_date=False)
    review = _write_csv(tmp_path / "filled.csv", [{"image_uri": u, "verified_class": "monocyte", "reviewer": "dr y"}
                                                  for u in originals])
    from bloodray.review.records import import_decisions

    assert import_decisions(out, DATE, review).n_reviews == 5

    labels = tmp_path / "labels"
    rc, printed, _ = _cli(capsys, "review", "labels", "--output", out, "--dest", str(labels))
    assert rc == 0 and "wrote 5 original image(s) and 0 thumbnail(s)" in printed, printed
    files = sorted((labels / "monocyte").iterdir())
    assert len(files) == 5
    listed = _read_csv(labels / roundtrip.LABELS_MANIFEST)
    assert len({r["file"] for r in listed}) == 5 and {r["source"] for r in listed} == {"archive"}
    for r in listed:  # each file holds the bytes of its own cell, the '#' path's included
        assert (labels / r["file"]).read_bytes() == originals[r["image_uri"]], r
        assert r["file"].split("/")[1].startswith(r["sample_id"] + "__")
