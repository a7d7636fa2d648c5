"""Labelled image folders: listing, de-duplication, the split, and Ray Data input for training.

The split depends only on file contents and a seed: images are de-duplicated
by SHA-256, then within each class ordered by ``sha256(seed + content hash)``
and cut into train/val/test. Anyone with the same folder and seed gets the same
split, whatever the file names or listing order, and byte-identical copies can
never land on both sides of a split.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bloodray import storage
from bloodray.classes import CLASS_NAMES, CLASS_TO_INDEX, class_from_filename, class_from_folder, is_image_path
from bloodray.data.decode import DEFAULT_MAX_PIXELS
from bloodray.data.preset import EvalPreset
from bloodray.data.stages import read_decode_files, read_many

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """The labelled data cannot be used; the message names the URI or folder."""


@dataclass(frozen=True)
class SplitFractions:
    """Fractions of each class that go to train, val and test."""

    train: float = 0.7
    val: float = 0.1
    test: float = 0.2


def list_labelled_images(root: str, storage_options: Mapping[str, Any] | None = None) -> list[tuple[str, str]]:
    """List ``(uri, class_name)`` for every image under an ImageFolder root.

    Class folders may use PBC names or common spellings (``ig``,
    ``immature_granulocytes``...). Images directly under the root are labelled
    by their PBC file prefix (``BNE_123.jpg`` -> neutrophil).
    """
    fs, base = storage.filesystem(root, storage_options)
    try:
        if not fs.exists(base):
            raise DatasetError(f"{root}: data root not found")
        paths = sorted(p for p in fs.find(base) if is_image_path(p))
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - missing bucket, bad credentials...
        raise storage.describe_storage_error(root, exc) from exc
    if not paths:
        raise DatasetError(f"{root}: no images found (looked for *.jpg, *.jpeg, *.png, *.bmp, *.tif)")
    base = base.rstrip("/")
    rows: list[tuple[str, str]] = []
    unknown: set[str] = set()
    for path in paths:
        rel = path[len(base):].lstrip("/")
        parts = rel.split("/")
        if len(parts) > 1:
            name = class_from_folder(parts[0])
            if name is None:
                unknown.add(parts[0])
                continue
        else:
            name = class_from_filename(parts[0])
            if name is None:
                raise DatasetError(f"{storage.full_uri(fs, path)}: file name has no known PBC class prefix "
                                   "and is not in a class folder")
        rows.append((storage.full_uri(fs, path), name))
    if unknown:
        raise DatasetError(f"{root}: unknown class folder(s) {', '.join(sorted(unknown))}; "
                           f"expected one of {', '.join(CLASS_NAMES)}")
    return rows


def scan_dataset(root: str, storage_options: Mapping[str, Any] | None = None,
                 max_per_class: int | None = None) -> tuple[pa.Table, list[dict[str, str]]]:
    """List, hash and de-duplicate a labelled folder.

    Returns the kept images (uri, class_name, label, sha256, bytes) and a list of
    dropped inputs (uri, reason) -- empty files, unreadable files, duplicates.
    ``max_per_class`` keeps a deterministic subset per class (by content hash) for quick runs.
    """
    listed = list_labelled_images(root, storage_options)
    contents = read_many([u for u, _ in listed], storage_options)
    dropped: list[dict[str, str]] = []
    by_hash: dict[str, list[tuple[str, str, int]]] = {}
    for (uri, name), data in zip(listed, contents):
        if isinstance(data, BaseException):
            dropped.append({"uri": uri, "reason": f"unreadable: {type(data).__name__}: {data}"})
            continue
        if not data:
            dropped.append({"uri": uri, "reason": "empty: file is empty (0 bytes)"})
            continue
        digest = hashlib.sha256(data).hexdigest()
        by_hash.setdefault(digest, []).append((uri, name, len(data)))
    kept: list[tuple[str, str, str, int]] = []
    for digest, group in by_hash.items():
        group.sort()
        classes = {name for _, name, _ in group}
        if len(classes) > 1:
            # The same bytes under two labels: we cannot know which is right, so neither is used.
            for uri, name, _ in group:
                dropped.append({"uri": uri, "reason": f"duplicate: identical bytes labelled {sorted(classes)}"})
            continue
        uri, name, size = group[0]
        kept.append((uri, name, digest, size))
        for dup_uri, _, _ in group[1:]:
            dropped.append({"uri": dup_uri, "reason": f"duplicate: identical to {uri}"})
    if max_per_class:
        kept = _subset_per_class(kept, max_per_class)
    if not kept:
        raise DatasetError(f"{root}: no usable images (all {len(listed)} were empty, unreadable or duplicates)")
    kept.sort()
    table = pa.table({
        "uri": [k[0] for k in kept],
        "class_name": [k[1] for k in kept],
        "label": pa.array([CLASS_TO_INDEX[k[1]] for k in kept], pa.int16()),
        "sha256": [k[2] for k in kept],
        "bytes": pa.array([k[3] for k in kept], pa.int64()),
    })
    return table, dropped


def _subset_per_class(kept, limit):
    out, per_class = [], {}
    for row in sorted(kept, key=lambda r: r[2]):
        if per_class.get(row[1], 0) < limit:
            per_class[row[1]] = per_class.get(row[1], 0) + 1
            out.append(row)
    return out


def assign_splits(table: pa.Table, fractions: SplitFractions = SplitFractions(), seed: int = 0) -> pa.Table:
    """Add a ``split`` column: stratified by class, ordered by a seeded hash of the contents."""
    keys = [hashlib.sha256(f"{seed}:{h}".encode()).hexdigest() for h in table.column("sha256").to_pylist()]
    classes = table.column("class_name").to_pylist()
    split = [""] * len(keys)
    for name in CLASS_NAMES:
        idx = sorted((i for i, c in enumerate(classes) if c == name), key=lambda i: keys[i])
        n = len(idx)
        n_test = int(round(n * fractions.test))
        n_val = int(round(n * fractions.val))
        for rank, i in enumerate(idx):
            split[i] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return table.append_column("split", pa.array(split, pa.string()))


def build_split(root: str, fractions: SplitFractions = SplitFractions(), seed: int = 0,
                storage_options: Mapping[str, Any] | None = None,
                max_per_class: int | None = None) -> tuple[pa.Table, list[dict[str, str]]]:
    """Scan ``root`` and return the split manifest plus the dropped inputs."""
    table, dropped = scan_dataset(root, storage_options, max_per_class)
    return assign_splits(table, fractions, seed), dropped


def write_parquet(table: pa.Table, uri: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write one Parquet file to a local path or object-storage URI."""
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    storage.write_bytes(uri, buffer.getvalue().to_pybytes(), storage_options)


def read_parquet(uri: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """Read one Parquet file from a local path or object-storage URI."""
    fs, path = storage.filesystem(uri, storage_options)
    with fs.open(path, "rb") as fh:
        return pq.read_table(fh)


def decode_batch(batch: dict[str, np.ndarray], *, input_size: int,
                 storage_options: Mapping[str, Any] | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: read images by ``uri``, decode, resize (no normalisation).

    The read+decode stage of :mod:`bloodray.data.stages` with a pass-through
    preset: adds ``image`` (uint8 NHWC) and the stage's error columns, so a bad
    file becomes a row to skip and report, never a failed job.
    """
    preset = EvalPreset(input_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), max_pixels)
    return read_decode_files(batch, preset=preset, storage_options=storage_options)


def drop_failed(batch: dict[str, np.ndarray], keep: Sequence[str] = ("image", "label")) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: keep decodable rows and the training columns."""
    ok = np.array([not e for e in batch["error"]], dtype=bool)
    return {k: batch[k][ok] for k in keep}


def rows_of(table: pa.Table, split: str | None = None) -> list[dict[str, Any]]:
    """Manifest rows (optionally of one split) as plain dicts for ``ray.data.from_items``."""
    if split is not None:
        mask = np.array(table.column("split").to_pylist()) == split
        table = table.filter(pa.array(mask))
    return table.select(["uri", "label"]).to_pylist()


def class_counts(table: pa.Table) -> dict[str, dict[str, int]]:
    """Counts per split and class, for the run report."""
    out: dict[str, dict[str, int]] = {s: {c: 0 for c in CLASS_NAMES} for s in SPLITS}
    for split, name in zip(table.column("split").to_pylist(), table.column("class_name").to_pylist()):
        out[split][name] += 1
    return out
