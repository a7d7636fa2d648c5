"""The Ray Data read+decode stage: image files and tar shards in, decoded images or error rows out.

Every pipeline that turns stored images into model input uses it: the nightly
classification job, training's decode (:func:`bloodray.data.labelled.decode_batch`)
and evaluation (:func:`bloodray.evaluation.evaluate.predict_rows`). A bad input
never fails a task: it becomes a row with the one error shape,
:data:`ERROR_COLUMNS` -- the columns of the nightly ``errors`` table:

``stage``       where it failed: ``list``, ``read``, ``decode`` (``infer`` is added by consumers)
``error_type``  a stable kind: ``unreadable``, ``truncated``, ``unsafe_member``, ``corrupt_archive``,
                ``empty``, ``no_sample_id``, or an :class:`~bloodray.data.preset.ImageDecodeError` kind
``message``     one line for a person

All three are ``""`` on a good row (and ``image_sha256`` is ``""`` when nothing was read). ``error`` repeats them as one
``"<error_type>: <message>"`` string (``""`` when fine): the column
:class:`bloodray.predict.CellPredictor` skips rows by and the training data
report lists. Every other input column passes through unchanged.

Tar shards are read as streams (never extracted to disk); absolute or ``..``
member paths, links and device members are refused as ``unsafe_member`` rows.
"""

from __future__ import annotations

import hashlib
import tarfile
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from bloodray import storage
from bloodray.classes import is_image_path
from bloodray.data.decode import ImageDecodeError
from bloodray.data.preset import EvalPreset

#: The error columns every consumer of the stage reads (and the nightly errors table stores).
ERROR_COLUMNS: tuple[str, ...] = ("stage", "error_type", "message")
#: Columns the stage adds to its input rows.
OUTPUT_COLUMNS: tuple[str, ...] = ("image_sha256",) + ERROR_COLUMNS + ("error", "image")
#: How many files one storage request fetches; object storage fetches a request's files concurrently.
READ_CHUNK = 128


def error_row(sample_id: str | None, uri: str, stage: str, error_type: str, message: str) -> dict[str, Any]:
    """An error row in the stage's shape, for errors found outside Ray (the archive listing)."""
    return {"sample_id": sample_id, "image_uri": uri, "stage": stage, "error_type": error_type, "message": message}


def sample_id_of(relpath: str, rule: str) -> str | None:
    """Sample id of an image from its path relative to the archive root (or inside a tar).

    ``parent``: the name of the folder holding the image; ``root``: the first
    path component. ``None`` for an image directly at the root.
    """
    parts = [p for p in relpath.split("/") if p not in ("", ".")]
    if len(parts) < 2:
        return None
    return parts[-2] if rule == "parent" else parts[0]


def read_many(uris: Sequence[str], storage_options: Mapping[str, Any] | None = None) -> list[bytes | BaseException]:
    """Fetch files of one filesystem; each result is the bytes or the exception for that file.

    The filesystem is resolved once (resolving an S3 URI costs about as much
    as decoding an image) and files are fetched :data:`READ_CHUNK` at a time.
    """
    if not uris:
        return []
    fs, _ = storage.filesystem(uris[0], storage_options)
    paths = [fs._strip_protocol(u) for u in uris]
    results: list[bytes | BaseException] = []
    for start in range(0, len(paths), READ_CHUNK):
        chunk = paths[start:start + READ_CHUNK]
        try:
            fetched = fs.cat(chunk, on_error="return")
        except Exception as exc:  # noqa: BLE001 - a whole-request failure marks each file
            fetched = {p: exc for p in chunk}
        if not isinstance(fetched, dict):  # a single path returns its bytes
            fetched = {chunk[0]: fetched}
        # fsspec may normalise keys (protocol, trailing slash); look each up tolerant of that.
        normalised = {k.split("://", 1)[-1]: v for k, v in fetched.items()}
        results.extend(normalised.get(p.split("://", 1)[-1], FileNotFoundError(p)) for p in chunk)
    return results


class _Rows:
    """Accumulates decoded images and error rows into one Ray Data batch."""

    def __init__(self, size: int, keys: Sequence[str] = ()):
        self.size = size
        #: ``keys``: columns the caller supplies per row (``extra``), before the stage's own.
        self.cols: dict[str, list] = {k: [] for k in (*keys, "image_sha256", *ERROR_COLUMNS)}
        self.images: list[np.ndarray | None] = []

    def __len__(self) -> int:
        return len(self.images)

    def ok(self, extra: Mapping[str, Any], sha: str, image: np.ndarray) -> None:
        self._add(extra, sha, ("", "", ""), image)

    def fail(self, extra: Mapping[str, Any], stage: str, error_type: str, message: str,
             sha: str | None = None) -> None:
        self._add(extra, sha, (stage, error_type, message), None)

    def _add(self, extra: Mapping[str, Any], sha: str | None, error: tuple[str, str, str], image) -> None:
        for key, value in extra.items():
            self.cols[key].append(value)
        # "" rather than None: a batch of only failures must keep string columns, not Arrow's null type.
        self.cols["image_sha256"].append(sha or "")
        for key, value in zip(ERROR_COLUMNS, error):
            self.cols[key].append(value)
        self.images.append(image)

    def decode(self, extra: Mapping[str, Any], data: bytes, preset: EvalPreset) -> None:
        sha = hashlib.sha256(data).hexdigest()
        try:
            image = preset.load(data)
        except ImageDecodeError as exc:
            self.fail(extra, "decode", exc.kind, str(exc), sha)
        except Exception as exc:  # noqa: BLE001 - a bad file is an error row, never a failed task
            self.fail(extra, "decode", "corrupt", f"{type(exc).__name__}: {exc}", sha)
        else:
            self.ok(extra, sha, image)

    def emit(self) -> dict[str, np.ndarray]:
        images = np.zeros((len(self.images), self.size, self.size, 3), dtype=np.uint8)
        for i, image in enumerate(self.images):
            if image is not None:
                images[i] = image
        out = {k: np.array(v, dtype=object) for k, v in self.cols.items()}
        out["error"] = np.array([f"{t}: {m}" if t else "" for t, m in zip(out["error_type"], out["message"])],
                                dtype=object)
        out["image"] = images
        return out


def read_decode_files(batch: dict[str, np.ndarray], *, preset: EvalPreset,
                      storage_options: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: rows with a ``uri`` column -> decoded, resized uint8 images.

    Adds :data:`OUTPUT_COLUMNS`; an unreadable or undecodable file becomes an
    error row (black image), never a failed task.
    """
    uris = [str(u) for u in batch["uri"]]
    rows = _Rows(preset.input_size)
    for data in read_many(uris, storage_options):
        if isinstance(data, BaseException):
            rows.fail({}, "read", "unreadable", f"{type(data).__name__}: {data}")
        else:
            rows.decode({}, data, preset)
    # One output row per input row: the input columns pass through with their own dtypes.
    return {**batch, **rows.emit()}


def _escapes(name: str) -> bool:
    """True for a member path that is absolute or climbs out of the archive with ``..``."""
    return name.startswith("/") or ".." in name.split("/")


def member_problem(member: tarfile.TarInfo) -> str | None:
    """Why a tar member must not be read, or None when it is a plain file with a safe path."""
    name = member.name
    if _escapes(name):
        return f"member path {name!r} is absolute or leaves the archive"
    if member.issym() or member.islnk():
        kind = "symbolic" if member.issym() else "hard"
        return f"{kind} link member ({name!r} -> {member.linkname!r}) refused"
    if member.ischr() or member.isblk() or member.isfifo():
        return f"device or FIFO member {name!r} refused"
    return None


def shard_rows(shard_uri: str, preset: EvalPreset, storage_options: Mapping[str, Any] | None,
               sample_id_from: str, skip_samples: frozenset[str], chunk_rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Stream one tar shard member by member into batches of at most ``chunk_rows`` rows.

    Each row has ``uri`` (``<shard>#<member>``, or the shard itself for a
    shard-level error), ``sample_id`` and :data:`OUTPUT_COLUMNS`. Members of
    ``skip_samples`` are left out.
    """

    def new() -> _Rows:
        return _Rows(preset.input_size, ("uri", "sample_id"))

    rows = new()
    try:
        fs, path = storage.filesystem(shard_uri, storage_options)
        with fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
            for member in tar:
                problem = member_problem(member)
                # A path that leaves the archive names no trustworthy sample.
                sample_id = None if _escapes(member.name) else sample_id_of(member.name, sample_id_from)
                extra = {"uri": f"{shard_uri}#{member.name}", "sample_id": sample_id}
                if sample_id is not None and sample_id in skip_samples:
                    continue
                if problem:
                    rows.fail(extra, "read", "unsafe_member", problem)
                elif not member.isfile() or not is_image_path(member.name):
                    continue  # directories and non-image files, as in the folder layout
                elif sample_id is None:
                    rows.fail(extra, "read", "no_sample_id", "member is at the top of the tar, not in a sample folder")
                else:
                    try:
                        data = tar.extractfile(member).read()
                    except Exception as exc:  # noqa: BLE001 - a cut-off shard ends with this member
                        rows.fail(extra, "read", "truncated", f"cannot read member: {exc}")
                        break
                    rows.decode(extra, data, preset)
                if len(rows) >= chunk_rows:
                    yield rows.emit()
                    rows = new()
            else:
                # tarfile ends iteration silently at a cut or damaged header; only
                # the end-of-archive block (zeros) tells a complete shard apart.
                block = fs.cat_file(path, start=tar.offset, end=tar.offset + 512)
                if len(block) < 512 or block.strip(b"\0"):
                    rows.fail({"uri": shard_uri, "sample_id": None}, "read", "corrupt_archive",
                              f"tar shard ends without an end-of-archive block at byte {tar.offset} "
                              "(truncated or damaged header); any members after it are missing")
    except Exception as exc:  # noqa: BLE001 - the shard itself is the bad input
        text = str(exc) or type(exc).__name__
        if isinstance(exc, tarfile.TarError):
            kind = "empty" if "empty file" in text else "corrupt_archive"
        else:
            kind = "unreadable"
        rows.fail({"uri": shard_uri, "sample_id": None}, "read", kind, f"tar shard: {type(exc).__name__}: {text}")
    if len(rows):
        yield rows.emit()


def read_decode_shards(batch: dict[str, np.ndarray], *, preset: EvalPreset,
                       storage_options: Mapping[str, Any] | None = None, sample_id_from: str = "parent",
                       skip_samples: frozenset[str] = frozenset(),
                       chunk_rows: int = 64) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data ``map_batches`` function (flat map): tar shard ``uri`` rows -> one row per image member."""
    for shard_uri in batch["uri"]:
        yield from shard_rows(str(shard_uri), preset, storage_options, sample_id_from, skip_samples, chunk_rows)


def cluster_cpu_slots(cpus_per_task: float) -> int:
    """How many tasks of ``cpus_per_task`` CPUs the connected Ray cluster runs at once (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_task))


#: Longest side of a cell thumbnail (pixels); smaller decoded images are kept at their size.
THUMBNAIL_SIZE = 80
#: JPEG quality of thumbnails: ~2-3 kB per cell, enough to judge a cell by eye.
THUMBNAIL_QUALITY = 85


def thumbnail_jpeg(image: np.ndarray, size: int = THUMBNAIL_SIZE, quality: int = THUMBNAIL_QUALITY) -> bytes:
    """JPEG bytes of a decoded uint8 HxWx3 image, scaled down to at most ``size`` pixels a side."""
    import io

    from PIL import Image

    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    if max(pil.size) > size:
        pil.thumbnail((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def thumbnails(batch: Mapping[str, np.ndarray], size: int = THUMBNAIL_SIZE) -> np.ndarray:
    """Thumbnail JPEG bytes for each row of a decoded batch (``None`` for error rows).

    Made from the stage's decoded ``image`` column, before the model sees the
    batch, so reviewers see the very pixels the model classified.
    """
    images = batch["image"]
    errors = batch.get("error")
    out = np.empty(len(images), dtype=object)
    for i, image in enumerate(images):
        out[i] = None if errors is not None and errors[i] else thumbnail_jpeg(image, size)
    return out
