"""Deterministic synthetic labelled datasets and slide archives for tests and demos.

Real PBC images cannot ship with the repository, yet every stage (training,
batch classification of slide archives, differential reports) needs labelled
images whose true class and per-sample composition are known. This module
writes them from cells drawn by :func:`bloodray.data.synth_cells.render_cell`:
an ImageFolder-style labelled dataset (:func:`write_labelled_dataset`) and
unlabelled slide archives with a known differential per sample
(:func:`default_samples`, :func:`write_archive`).

Everything is reproducible: each image draws from its own
``numpy.random.default_rng([...])`` seeded by (seed, stream, class, index), so
an image is byte-identical across runs and does not depend on how many other
images are generated. All writes go through :mod:`bloodray.storage`, so output
may be a local folder or an ``s3://`` prefix.
"""

from __future__ import annotations

import hashlib
import io
import math
import posixpath
import tarfile
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
from PIL import Image

from bloodray import storage
from bloodray.classes import CELL_CLASSES, CLASS_NAMES, CLASS_TO_INDEX, reference_ranges
from bloodray.data.synth_cells import render_cell

__all__ = [
    "ARCHIVE_LAYOUTS",
    "JPEG_QUALITY",
    "SampleSpec",
    "default_samples",
    "expected_counts",
    "render_cell",
    "write_archive",
    "write_labelled_dataset",
]

#: archive layouts understood by :func:`write_archive`.
ARCHIVE_LAYOUTS: tuple[str, ...] = ("folders", "tar")
JPEG_QUALITY = 90

# Separate RNG streams so dataset images, archive images and shuffles never
# share random numbers: a model trained on the labelled dataset is then always
# evaluated on archive images it has not seen, even with the same seed.
_STREAM_DATASET = 0
_STREAM_ARCHIVE = 1
_STREAM_SHUFFLE = 2
_STREAM_SAMPLES = 3


# --------------------------------------------------------------------------
# Writing images.
# --------------------------------------------------------------------------


def _jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def write_labelled_dataset(out_uri: str, per_class: int, *, size: int = 128, seed: int = 0,
                           storage_options: dict | None = None) -> dict[str, int]:
    """Write a labelled ImageFolder dataset of synthetic cells.

    Layout: ``<out_uri>/<class_name>/<PREFIX>_<6-digit index>.jpg`` (PREFIX is the
    class's first PBC file prefix), JPEG quality 90, so both the folder and
    the file name identify the class exactly as with the real PBC dataset.

    Args:
        out_uri: local folder or ``s3://`` prefix.
        per_class: images per class (0 writes nothing but still returns counts).
        size: image side in pixels.
        seed: dataset seed; image ``i`` of a class depends only on (seed, class, i).
        storage_options: fsspec options for object storage (endpoint etc.).

    Returns:
        Number of images written per class name, in class index order.
    """
    per_class = int(per_class)
    if per_class < 0:
        raise ValueError(f"per_class must be >= 0, got {per_class}")
    fs, root = storage.filesystem(out_uri, storage_options)
    counts: dict[str, int] = {}
    for cls in CELL_CLASSES:
        class_idx = CLASS_TO_INDEX[cls.name]
        folder = storage.join(root, cls.name)
        prefix = cls.file_prefixes[0]
        for i in range(per_class):
            rng = np.random.default_rng([seed, _STREAM_DATASET, class_idx, i])
            image = render_cell(cls.name, rng, size)
            storage.put_bytes(fs, storage.join(folder, f"{prefix}_{i:06d}.jpg"), _jpeg_bytes(image))
        counts[cls.name] = per_class
    return counts


# --------------------------------------------------------------------------
# Samples (slides) with a known differential.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleSpec:
    """Composition of one synthetic sample (slide).

    Attributes:
        sample_id: identifier, used as the sample's folder / tar member prefix.
        counts: number of cells per class name; a class that is absent counts 0.
        profile: how the composition was chosen (``"normal"``, ``"neutrophilia"``,
            ...); ``"custom"`` for hand-made specs. Informational only.
    """

    sample_id: str
    counts: dict[str, int]
    profile: str = "custom"


# White-cell fractions per profile. Normal sits comfortably inside the adult
# reference ranges so that jitter cannot push it out; each abnormal profile
# moves one class well past its range.
_NORMAL_WBC = {"neutrophil": 0.55, "lymphocyte": 0.33, "monocyte": 0.06, "eosinophil": 0.03, "basophil": 0.0075}
_ABNORMAL_PROFILES: tuple[tuple[str, dict[str, float], str], ...] = (
    # (profile name, WBC fractions, class that defines the abnormality)
    ("neutrophilia", {"neutrophil": 0.80, "lymphocyte": 0.13, "monocyte": 0.05, "eosinophil": 0.015,
                      "basophil": 0.005}, "neutrophil"),
    ("lymphocytosis", {"neutrophil": 0.28, "lymphocyte": 0.61, "monocyte": 0.07, "eosinophil": 0.03,
                       "basophil": 0.01}, "lymphocyte"),
    ("eosinophilia", {"neutrophil": 0.50, "lymphocyte": 0.28, "monocyte": 0.06, "eosinophil": 0.12,
                      "basophil": 0.01}, "eosinophil"),
    ("erythroblasts", dict(_NORMAL_WBC), "erythroblast"),
    ("immature_granulocytes", {"neutrophil": 0.53, "lymphocyte": 0.30, "monocyte": 0.06, "eosinophil": 0.03,
                               "basophil": 0.01, "ig": 0.05}, "ig"),
    ("monocytosis", {"neutrophil": 0.50, "lymphocyte": 0.26, "monocyte": 0.20, "eosinophil": 0.03,
                     "basophil": 0.01}, "monocyte"),
)
_PLATELET_FRACTION = 0.05  # of all cells in a sample
_ERYTHROBLAST_FRACTION = 0.10  # of all cells, erythroblast profile only


def _apportion(total: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Integer counts summing exactly to ``total`` (largest-remainder method)."""
    norm = sum(fractions.values())
    raw = {name: total * f / norm for name, f in fractions.items()}
    counts = {name: int(math.floor(v)) for name, v in raw.items()}
    left = total - sum(counts.values())
    # Ties broken by class index so the result never depends on dict order.
    order = sorted(raw, key=lambda n: (-(raw[n] - counts[n]), CLASS_TO_INDEX[n]))
    for name in order[:left]:
        counts[name] += 1
    return counts


def _fit_reference_ranges(counts: dict[str, int], n_wbc: int) -> None:
    """Nudge a normal differential into every adult reference range it can reach.

    Rounding alone can push a narrow range out (basophils 0.5-1 %: 2 of 190
    white cells is 1.05 %); the difference is taken from or given to the
    neutrophils, whose range is wide. Ranges no integer count can meet (any
    basophil count with fewer than 100 white cells) are left alone.
    """
    for name, rr in reference_ranges().items():
        if name == "neutrophil":
            continue
        lo = math.ceil(rr.low * n_wbc / 100.0 - 1e-9)
        hi = math.floor(rr.high * n_wbc / 100.0 + 1e-9)
        if lo > hi:
            continue
        delta = min(max(counts[name], lo), hi) - counts[name]
        counts[name] += delta
        counts["neutrophil"] -= delta


def _sample_counts(profile: Mapping[str, float], defining: str | None, total: int,
                   rng: np.random.Generator) -> dict[str, int]:
    n_plt = int(round(_PLATELET_FRACTION * total)) if total >= 10 else 0
    n_erb = max(1, int(round(_ERYTHROBLAST_FRACTION * total))) if defining == "erythroblast" and total >= 2 else 0
    n_wbc = total - n_plt - n_erb
    # +-5 % relative jitter keeps samples of one profile from being identical
    # while staying far from the reference-range limits.
    jittered = {name: f * float(rng.uniform(0.95, 1.05)) for name, f in sorted(profile.items())}
    counts = {name: 0 for name in CLASS_NAMES}
    counts.update(_apportion(n_wbc, jittered))
    counts["platelet"] += n_plt
    counts["erythroblast"] += n_erb
    if defining in (None, "erythroblast"):
        # Only the defining finding should be abnormal in these samples.
        _fit_reference_ranges(counts, n_wbc)
    # A rare defining class (ig at 5 %) must still show up in a small sample.
    if defining in profile and counts[defining] == 0 and n_wbc >= 2:
        donor = max(profile, key=lambda n: counts[n])
        counts[donor] -= 1
        counts[defining] += 1
    return counts


def default_samples(n_samples: int = 6, cells_per_sample: int = 60, *, seed: int = 0) -> list[SampleSpec]:
    """A deterministic mix of normal and abnormal samples.

    Even positions are normal (neutrophils ~55 %, lymphocytes ~33 %, monocytes
    ~6 %, eosinophils ~3 %, basophils ~1 % of white cells, a few platelets, no
    erythroblasts or immature granulocytes); odd positions cycle through
    neutrophilia, lymphocytosis, eosinophilia, circulating erythroblasts,
    immature granulocytes and monocytosis. So with ``n_samples >= 2`` there is
    always at least one of each kind. The profile name is kept in
    :attr:`SampleSpec.profile`.

    Normal samples (and the white cells of the erythroblast profile) fall
    inside every adult reference range only from about 105 cells per sample:
    with fewer than 100 white cells a single basophil is already above 1 %.

    Args:
        n_samples: number of samples, ids ``S0001``, ``S0002``, ...
        cells_per_sample: images per sample (white cells plus platelets and,
            for the erythroblast profile, erythroblasts).
        seed: changes the small jitter of the fractions.

    Returns:
        One :class:`SampleSpec` per sample, counts for every class (0 when absent).
    """
    if n_samples < 0 or cells_per_sample < 0:
        raise ValueError("n_samples and cells_per_sample must be >= 0")
    specs = []
    for i in range(n_samples):
        rng = np.random.default_rng([seed, _STREAM_SAMPLES, i])
        if i % 2 == 0:
            name, fractions, defining = "normal", _NORMAL_WBC, None
        else:
            name, fractions, defining = _ABNORMAL_PROFILES[(i // 2) % len(_ABNORMAL_PROFILES)]
        counts = _sample_counts(fractions, defining, int(cells_per_sample), rng)
        specs.append(SampleSpec(sample_id=f"S{i + 1:04d}", counts=counts, profile=name))
    return specs


def expected_counts(samples: Iterable[SampleSpec]) -> dict[str, dict[str, int]]:
    """Map sample id -> count for every class name (absent classes as 0)."""
    return {s.sample_id: {name: int(s.counts.get(name, 0)) for name in CLASS_NAMES} for s in samples}


def _validate_samples(samples: list[SampleSpec]) -> None:
    seen: set[str] = set()
    for spec in samples:
        sid = spec.sample_id
        if not sid or "/" in sid or sid in (".", "..") or "#" in sid:
            raise ValueError(f"invalid sample id {sid!r}: must be a non-empty name without '/' or '#'")
        if sid in seen:
            raise ValueError(f"duplicate sample id {sid!r}")
        seen.add(sid)
        for name, n in spec.counts.items():
            if name not in CLASS_TO_INDEX:
                raise ValueError(f"sample {sid}: unknown cell class {name!r}; expected one of {', '.join(CLASS_NAMES)}")
            if int(n) < 0:
                raise ValueError(f"sample {sid}: negative count {n} for {name}")


def _sample_key(sample_id: str) -> int:
    # Stable across processes (unlike hash()), so a sample's images depend only
    # on its id and the seed, not on its position in the list.
    return int.from_bytes(hashlib.sha256(sample_id.encode("utf-8")).digest()[:8], "little")


def _sample_images(spec: SampleSpec, seed: int) -> list[tuple[str, str, int]]:
    """(image_name, class_name, index within class) in shuffled order."""
    key = _sample_key(spec.sample_id)
    cells = [(name, i) for name in CLASS_NAMES for i in range(int(spec.counts.get(name, 0)))]
    order = np.random.default_rng([seed, _STREAM_SHUFFLE, key]).permutation(len(cells))
    # Names carry the shuffled position only, so the class cannot be read from them.
    return [(f"cell_{pos:06d}.jpg", cells[j][0], cells[j][1]) for pos, j in enumerate(order.tolist())]


def _render_sample_image(spec: SampleSpec, class_name: str, index: int, seed: int, size: int) -> bytes:
    rng = np.random.default_rng([seed, _STREAM_ARCHIVE, _sample_key(spec.sample_id),
                                 CLASS_TO_INDEX[class_name], index])
    return _jpeg_bytes(render_cell(class_name, rng, size))


def _tar_shard(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            # Fixed metadata keeps shards byte-identical between runs.
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_archive(out_uri: str, samples: list[SampleSpec], *, layout: str = "folders", size: int = 128,
                  seed: int = 0, images_per_shard: int = 100,
                  storage_options: dict | None = None) -> list[dict]:
    """Write an unlabelled slide archive whose true composition is known.

    Layouts:
        ``"folders"``: ``<out_uri>/<sample_id>/cell_<6 digits>.jpg``;
        ``"tar"``: ``<out_uri>/shard-00000.tar``, ... (uncompressed), members
        ``<sample_id>/cell_<6 digits>.jpg``, at most ``images_per_shard`` each.
    Image names never reveal the class and each sample's images are in a
    deterministic shuffled order.

    Args:
        out_uri: local folder or ``s3://`` prefix.
        samples: compositions, e.g. from :func:`default_samples`.
        layout: one of :data:`ARCHIVE_LAYOUTS`.
        size: image side in pixels.
        seed: archive seed; images differ from :func:`write_labelled_dataset`
            images for the same seed.
        images_per_shard: tar layout only, at least 1.
        storage_options: fsspec options for object storage.

    Returns:
        One row per image, in write order: ``sample_id``, ``image_name``,
        ``true_class`` and ``uri`` (file URI, or ``<shard uri>#<member path>``).

    Raises:
        ValueError: for an unknown layout, bad shard size or invalid samples.
    """
    if layout not in ARCHIVE_LAYOUTS:
        raise ValueError(f"unknown archive layout {layout!r}; expected one of {', '.join(ARCHIVE_LAYOUTS)}")
    if layout == "tar" and int(images_per_shard) < 1:
        raise ValueError(f"images_per_shard must be >= 1, got {images_per_shard}")
    samples = list(samples)
    _validate_samples(samples)
    fs, root = storage.filesystem(out_uri, storage_options)
    rows: list[dict] = []

    if layout == "folders":
        for spec in samples:
            for image_name, class_name, index in _sample_images(spec, seed):
                data = _render_sample_image(spec, class_name, index, seed, size)
                storage.put_bytes(fs, storage.join(root, spec.sample_id, image_name), data)
                rows.append({"sample_id": spec.sample_id, "image_name": image_name, "true_class": class_name,
                             "uri": storage.join(out_uri, spec.sample_id, image_name)})
        return rows

    # tar: fill shards in sample order; a sample may span two shards, as real
    # sharded archives do. A local archive folder exists even when empty, as a
    # listing of an empty archive should say "no images", not "not found".
    if storage.is_local(fs):
        fs.makedirs(root, exist_ok=True)
    pending: list[tuple[str, bytes, dict]] = []
    shard_no = 0

    def flush() -> None:
        nonlocal shard_no
        if not pending:
            return
        shard_name = f"shard-{shard_no:05d}.tar"
        storage.put_bytes(fs, storage.join(root, shard_name), _tar_shard([(m, d) for m, d, _ in pending]))
        shard_uri = storage.join(out_uri, shard_name)
        for member, _, row in pending:
            row["uri"] = f"{shard_uri}#{member}"
            rows.append(row)
        pending.clear()
        shard_no += 1

    for spec in samples:
        for image_name, class_name, index in _sample_images(spec, seed):
            member = posixpath.join(spec.sample_id, image_name)
            data = _render_sample_image(spec, class_name, index, seed, size)
            pending.append((member, data, {"sample_id": spec.sample_id, "image_name": image_name,
                                           "true_class": class_name}))
            if len(pending) >= int(images_per_shard):
                flush()
    flush()
    return rows


def scan_bomb_jpeg(repeats: int, size: int = 128, seed: int = 0) -> bytes:
    """A progressive JPEG of noise whose smallest scan repeats ``repeats`` more times (a decoding-cost bomb).

    Each copy is decoded over the whole image, so the cost grows with ``repeats`` while the file stays small
    (~60 bytes a copy): what :class:`bloodray.data.decode.DecodeBudget` must stop. For tests and benches.
    """
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    scans, i = [], 2
    while data[i + 1] != 0xD9:  # walk the segments up to EOI
        end = i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if data[i + 1] == 0xDA:  # a scan's entropy-coded data runs to the next marker that is not FF00 or RSTn
            while not (data[end] == 0xFF and data[end + 1] != 0 and not 0xD0 <= data[end + 1] <= 0xD7):
                end += 1
            scans.append((i, end))
        i = end
    start, end = min(scans, key=lambda s: s[1] - s[0])
    return data[:i] + data[start:end] * repeats + data[i:]
