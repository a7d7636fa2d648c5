"""Tests for the synthetic cell generator (bloodray.data.synth)."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bloodray.data import synth as synth
from bloodray.classes import (
    CLASS_NAMES,
    CLASS_TO_INDEX,
    WBC_CLASSES,
    class_from_filename,
    class_from_folder,
    reference_ranges,
)

SMALL = 64  # px; keeps the file fast while exercising the scaled geometry


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("class_name", CLASS_NAMES)
@pytest.mark.parametrize("size", [SMALL, 128])
def test_render_every_class_size_and_mode(class_name, size):
    image = synth.render_cell(class_name, np.random.default_rng(1), size)
    assert image.mode == "RGB"
    assert image.size == (size, size)
    arr = np.asarray(image)
    # Not blank: a scene with a background and some structure.
    assert arr.std() > 5


def test_render_is_deterministic_per_rng_state():
    a = np.asarray(synth.render_cell("monocyte", np.random.default_rng([0, 5, 3])))
    b = np.asarray(synth.render_cell("monocyte", np.random.default_rng([0, 5, 3])))
    c = np.asarray(synth.render_cell("monocyte", np.random.default_rng([0, 5, 4])))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_render_rejects_unknown_class_and_tiny_size():
    with pytest.raises(ValueError, match="unknown cell class 'blast'"):
        synth.render_cell("blast", np.random.default_rng(0))
    with pytest.raises(ValueError, match="size"):
        synth.render_cell("neutrophil", np.random.default_rng(0), size=8)


def test_labelled_dataset_layout_maps_back_to_classes(tmp_path):
    counts = synth.write_labelled_dataset(str(tmp_path), 2, size=SMALL, seed=3)
    assert counts == {name: 2 for name in CLASS_NAMES}
    assert list(counts) == list(CLASS_NAMES)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == 2 * len(CLASS_NAMES)
    per_folder = Counter()
    for path in files:
        folder_class = class_from_folder(path.parent.name)
        assert folder_class is not None
        assert class_from_filename(path.name) == folder_class
        assert path.suffix == ".jpg"
        stem_index = path.stem.split("_")[-1]
        assert len(stem_index) == 6 and stem_index.isdigit()
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (SMALL, SMALL)
        per_folder[folder_class] += 1
    assert dict(per_folder) == counts


def test_labelled_dataset_is_byte_identical_and_count_independent(tmp_path):
    synth.write_labelled_dataset(str(tmp_path / "a"), 2, size=SMALL, seed=7)
    synth.write_labelled_dataset(str(tmp_path / "b"), 2, size=SMALL, seed=7)
    synth.write_labelled_dataset(str(tmp_path / "c"), 1, size=SMALL, seed=7)
    synth.write_labelled_dataset(str(tmp_path / "d"), 1, size=SMALL, seed=8)
    a, b = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert a == b
    c = _tree_bytes(tmp_path / "c")
    # Image i depends on (seed, class, i) only, not on how many are generated.
    assert all(a[name] == data for name, data in c.items())
    d = _tree_bytes(tmp_path / "d")
    assert set(d) == set(c) and all(d[name] != c[name] for name in c)


def test_labelled_dataset_rejects_negative_count(tmp_path):
    with pytest.raises(ValueError):
        synth.write_labelled_dataset(str(tmp_path), -1)


def test_default_samples_mix_normal_and_abnormal():
    samples = synth.default_samples(6, 60, seed=0)
    assert [s.sample_id for s in samples] == [f"S{i:04d}" for i in range(1, 7)]
    assert synth.default_samples(6, 60, seed=0) == samples
    profiles = [s.profile for s in samples]
    assert profiles.count("normal") == 3
    assert {"neutrophilia", "lymphocytosis", "eosinophilia"} <= set(profiles)
    for spec in samples:
        assert set(spec.counts) == set(CLASS_NAMES)
        assert sum(spec.counts.values()) == 60
        wbc = sum(n for name, n in spec.counts.items() if name not in ("platelet", "erythroblast"))
        pct = {name: 100.0 * spec.counts[name] / wbc for name in spec.counts}
        if spec.profile == "normal":
            assert spec.counts["erythroblast"] == 0 and spec.counts["ig"] == 0
            assert spec.counts["platelet"] > 0
            assert 40 <= pct["neutrophil"] <= 60 and 20 <= pct["lymphocyte"] <= 40
        elif spec.profile == "neutrophilia":
            assert pct["neutrophil"] > 70
        elif spec.profile == "lymphocytosis":
            assert pct["lymphocyte"] > 50
        elif spec.profile == "eosinophilia":
            assert pct["eosinophil"] > 8

    # Every abnormal profile is reachable, and defining classes appear.
    many = synth.default_samples(12, 60)
    by_profile = {s.profile: s for s in many}
    assert by_profile["erythroblasts"].counts["erythroblast"] > 0
    assert by_profile["immature_granulocytes"].counts["ig"] > 0
    assert by_profile["monocytosis"].counts["monocyte"] > by_profile["normal"].counts["monocyte"]

    two = synth.default_samples(2, 20)
    assert {s.profile == "normal" for s in two} == {True, False}


def test_default_samples_normal_within_reference_ranges_abnormal_outside():
    # 120 cells leaves > 100 white cells, enough for the 0.5-1 % basophil range.
    ranges = reference_ranges()
    for spec in synth.default_samples(12, 120, seed=4):
        wbc = sum(spec.counts[name] for name in WBC_CLASSES)
        outside = [name for name, rr in ranges.items() if not rr.low <= 100.0 * spec.counts[name] / wbc <= rr.high]
        abnormal = bool(outside) or spec.counts["ig"] > 0 or spec.counts["erythroblast"] > 0
        assert abnormal == (spec.profile != "normal"), (spec, outside)


def test_expected_counts_fills_absent_classes():
    spec = synth.SampleSpec("X1", {"neutrophil": 3})
    assert spec.profile == "custom"
    expected = synth.expected_counts([spec])
    assert expected == {"X1": {name: (3 if name == "neutrophil" else 0) for name in CLASS_NAMES}}


def _archive_samples():
    return [
        synth.SampleSpec("S0001", {"neutrophil": 4, "lymphocyte": 3, "platelet": 1}),
        synth.SampleSpec("S0002", {"eosinophil": 2, "erythroblast": 2, "ig": 1, "monocyte": 1, "basophil": 1}),
        synth.SampleSpec("S0003", {}),
    ]


def test_archive_folders(tmp_path):
    samples = _archive_samples()
    rows = synth.write_archive(str(tmp_path / "arch"), samples, size=SMALL, seed=1)
    assert len(rows) == 15
    assert all(set(r) == {"sample_id", "image_name", "true_class", "uri"} for r in rows)
    files = sorted(p for p in (tmp_path / "arch").rglob("*") if p.is_file())
    assert sorted(Path(r["uri"]) for r in rows) == files
    for row in rows:
        path = Path(row["uri"])
        assert path.parent.name == row["sample_id"] and path.name == row["image_name"]
        # Names do not leak the class.
        assert class_from_filename(row["image_name"]) is None
        assert row["image_name"].startswith("cell_") and row["image_name"].endswith(".jpg")
    got = {s.sample_id: Counter() for s in samples}
    for row in rows:
        got[row["sample_id"]][row["true_class"]] += 1
    expected = synth.expected_counts(samples)
    for sid, counts in got.items():
        assert {name: counts.get(name, 0) for name in CLASS_NAMES} == expected[sid]
    # Shuffled: the first sample's rows are not grouped by class index.
    first = [CLASS_TO_INDEX[r["true_class"]] for r in rows if r["sample_id"] == "S0001"]
    assert first != sorted(first)

    again = synth.write_archive(str(tmp_path / "again"), samples, size=SMALL, seed=1)
    assert [(r["image_name"], r["true_class"]) for r in again] == [(r["image_name"], r["true_class"]) for r in rows]
    assert _tree_bytes(tmp_path / "arch") == _tree_bytes(tmp_path / "again")


def test_archive_tar(tmp_path):
    samples = _archive_samples()
    out = tmp_path / "tars"
    rows = synth.write_archive(str(out), samples, layout="tar", size=SMALL, seed=1, images_per_shard=4)
    shards = sorted(p.name for p in out.iterdir())
    assert shards == [f"shard-{i:05d}.tar" for i in range(4)]  # 15 images, 4 per shard
    members: dict[str, bytes] = {}
    for name in shards:
        with tarfile.open(out / name) as tar:
            names = tar.getnames()
            assert 1 <= len(names) <= 4
            for m in tar.getmembers():
                assert m.isfile()
                members[f"{out / name}#{m.name}"] = tar.extractfile(m).read()
    assert sorted(members) == sorted(r["uri"] for r in rows)
    for row in rows:
        member = row["uri"].split("#", 1)[1]
        assert member == f"{row['sample_id']}/{row['image_name']}"
        with Image.open(io.BytesIO(members[row["uri"]])) as im:
            assert im.format == "JPEG" and im.size == (SMALL, SMALL)
    per_sample = Counter((r["sample_id"], r["true_class"]) for r in rows)
    for sid, counts in synth.expected_counts(samples).items():
        for name, n in counts.items():
            assert per_sample[(sid, name)] == n

    # Same images as the folders layout, byte for byte; shards reproducible too.
    folders = synth.write_archive(str(tmp_path / "f"), samples, size=SMALL, seed=1)
    assert [Path(r["uri"]).read_bytes() for r in folders] == [members[r["uri"]] for r in rows]
    synth.write_archive(str(tmp_path / "tars2"), samples, layout="tar", size=SMALL, seed=1, images_per_shard=4)
    assert _tree_bytes(out) == _tree_bytes(tmp_path / "tars2")


def test_archive_rejects_bad_arguments(tmp_path):
    samples = _archive_samples()
    with pytest.raises(ValueError, match=r"'zip'.*folders.*tar"):
        synth.write_archive(str(tmp_path), samples, layout="zip")
    with pytest.raises(ValueError, match="images_per_shard"):
        synth.write_archive(str(tmp_path), samples, layout="tar", images_per_shard=0)
    with pytest.raises(ValueError, match="duplicate"):
        synth.write_archive(str(tmp_path), samples + [samples[0]])
    with pytest.raises(ValueError, match="unknown cell class"):
        synth.write_archive(str(tmp_path), [synth.SampleSpec("S9", {"blast": 1})])
    assert not any(tmp_path.iterdir())


def _colour_features(image: Image.Image) -> np.ndarray:
    arr = np.asarray(image, dtype=np.int32) // 64  # 4 levels per channel
    joint = np.bincount((arr[..., 0] * 16 + arr[..., 1] * 4 + arr[..., 2]).ravel(), minlength=64)
    return joint / joint.sum()


def test_classes_are_separable_by_colour_histograms():
    """A linear model on colour histograms separates the classes without any CNN."""
    from sklearn.linear_model import LogisticRegression

    def features(stream: int, n: int):
        xs, ys = [], []
        for label, name in enumerate(CLASS_NAMES):
            for i in range(n):
                rng = np.random.default_rng([99, stream, label, i])
                xs.append(_colour_features(synth.render_cell(name, rng, SMALL)))
                ys.append(label)
        return np.array(xs), np.array(ys)

    x_train, y_train = features(0, 30)
    x_test, y_test = features(1, 15)
    model = LogisticRegression(C=100.0, max_iter=3000).fit(np.sqrt(x_train), y_train)
    accuracy = (model.predict(np.sqrt(x_test)) == y_test).mean()
    assert accuracy >= 0.9, accuracy
