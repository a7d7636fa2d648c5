"""The split: deterministic, stratified, content-addressed, duplicates never cross it."""

from __future__ import annotations

import shutil

import pytest

from bloodray.classes import CLASS_NAMES
from bloodray.data.labelled import DatasetError, SplitFractions, build_split, class_counts, list_labelled_images
from bloodray.data.synth import write_labelled_dataset


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("cells")
    write_labelled_dataset(str(root), 20, size=48, seed=3)
    # Byte-identical copies: two within a class, one pair across classes.
    shutil.copy(root / "basophil" / "BA_000001.jpg", root / "basophil" / "BA_copy.jpg")
    shutil.copy(root / "monocyte" / "MO_000002.jpg", root / "monocyte" / "MO_copy.jpg")
    shutil.copy(root / "neutrophil" / "SNE_000003.jpg", root / "eosinophil" / "EO_from_neutrophil.jpg")
    return root


def test_split_is_deterministic_and_independent_of_names(labelled, tmp_path):
    first, _ = build_split(str(labelled), seed=7)
    second, _ = build_split(str(labelled), seed=7)
    assert first.equals(second)
    # Same contents under other names and order -> same split per content hash.
    renamed = tmp_path / "renamed"
    shutil.copytree(labelled, renamed)
    for path in sorted((renamed / "platelet").glob("*.jpg")):
        path.rename(path.with_name("PLATELET_x" + path.name))
    third, _ = build_split(str(renamed), seed=7)
    by_hash = lambda t: dict(zip(t.column("sha256").to_pylist(), t.column("split").to_pylist()))  # noqa: E731
    assert by_hash(first) == by_hash(third)
    other_seed, _ = build_split(str(labelled), seed=8)
    assert by_hash(other_seed) != by_hash(first)


def test_split_is_stratified(labelled):
    table, _ = build_split(str(labelled), SplitFractions(0.7, 0.1, 0.2), seed=0)
    counts = class_counts(table)
    for name in CLASS_NAMES:
        total = sum(counts[s][name] for s in counts)
        assert counts["test"][name] == round(total * 0.2)
        assert counts["val"][name] == round(total * 0.1)
        assert counts["train"][name] == total - counts["test"][name] - counts["val"][name]


def test_duplicates_are_dropped_before_splitting(labelled):
    table, dropped = build_split(str(labelled), seed=0)
    hashes = table.column("sha256").to_pylist()
    assert len(hashes) == len(set(hashes)), "a content hash appears twice: duplicates could cross splits"
    reasons = {d["uri"].rsplit("/", 1)[-1]: d["reason"] for d in dropped}
    assert reasons["BA_copy.jpg"].startswith("duplicate") or reasons["BA_000001.jpg"].startswith("duplicate")
    # The cross-class pair has no trustworthy label: both copies go.
    assert "EO_from_neutrophil.jpg" in reasons and "SNE_000003.jpg" in reasons
    # 160 originals + 3 copies; the 2 within-class copies and both halves of the cross-class pair go.
    assert table.num_rows == 8 * 20 + 3 - 4


def test_unknown_class_folder_is_named(tmp_path):
    write_labelled_dataset(str(tmp_path), 1, size=48)
    (tmp_path / "macrophage").mkdir()
    shutil.copy(tmp_path / "basophil" / "BA_000000.jpg", tmp_path / "macrophage" / "x.jpg")
    with pytest.raises(DatasetError, match="macrophage"):
        list_labelled_images(str(tmp_path))


def test_pbc_prefixes_label_a_flat_folder(tmp_path):
    write_labelled_dataset(str(tmp_path / "src"), 1, size=48)
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in (tmp_path / "src").glob("*/*.jpg"):
        shutil.copy(path, flat / path.name)
    labels = {uri.rsplit("/", 1)[-1].split("_")[0]: name for uri, name in list_labelled_images(str(flat))}
    assert labels["SNE"] == "neutrophil" and labels["ERB"] == "erythroblast" and labels["PLATELET"] == "platelet"


def test_empty_and_missing_roots_are_clear(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        list_labelled_images(str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="not found"):
        list_labelled_images(str(tmp_path / "nowhere"))


def test_training_refuses_an_empty_val_split(tmp_path):
    from bloodray.train.ray_trainer import load_train_config, run_training

    write_labelled_dataset(str(tmp_path / "cells"), 3, size=48)
    cfg = load_train_config("configs/train/bloodnet.yaml", [f"data.root={tmp_path / 'cells'}",
                                                            f"run.storage_path={tmp_path / 'runs'}"])
    with pytest.raises(DatasetError, match="the val split is empty"):
        run_training(cfg)
