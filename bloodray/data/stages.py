"""The Ray Data read+decode stage: image files and tar shards in, decoded images or error rows out.

Every pipeline that turns stored images into model input uses it: the nightly
classification job, training's decode (:func:`bloodray.data.labelled.decode_batch`)
and evaluation (:func:`bloodray.evaluation.evaluate.predict_rows`). A bad input
never fails a task: it becomes a row with the one error shape,
:data:`ERROR_COLUMNS` -- the columns of the nightly ``errors`` table:

``stage``       where it failed: ``list``, ``read``, ``decode`` (``infer`` is added by consumers)
``error_type``  a stable kind: ``unreadable``, ``truncated``, ``unsafe_member``, ``corrupt_archive``,
                ``empty``, ``no_sample_id``, one of :data:`READ_FAILURE_KINDS`, or an
                :class:`~bloodray.data.decode.ImageDecodeError` kind (``not_a_cell_image``...)
``message``     one line for a person

All three are ``""`` on a good row (and ``image_sha256`` is ``""`` when nothing was read). ``error`` repeats them as one
``"<error_type>: <message>"`` string (``""`` when fine): the column
:class:`bloodray.predict.CellPredictor` skips rows by and the training data
report lists. Every other input column passes through unchanged.

Tar shards are read as streams (never extracted to disk); absolute or ``..``
member paths, links and device members are refused as ``unsafe_member`` rows.

Reads are bounded (:class:`ReadLimits`): only regular files are opened (a FIFO
or a link to a device is a ``not_regular_file`` row, never a hang), files and
members over ``max_file_bytes`` are ``file_too_large`` rows, and a local read
that gives no data within ``read_timeout_s`` is a ``read_timeout`` row. Names
reach the filesystem literally: ``[``, ``]``, ``*`` and ``?`` are never globs.

Which names are inputs (:func:`name_kind`, shared by the archive listing and
the tar reader): supported images; ``__MACOSX/`` folders and ``._*`` AppleDouble
files are ignored (macOS resource forks, not pictures); other image formats
(``.gif``...) are ``unsupported_format`` rows and archives inside a tar are
``nested_archive`` rows. In a shard a member name seen before is a
``duplicate_member`` row with the id ``<shard>#<member>#<n>`` (n-th occurrence;
the first is classified), so every ``image_uri`` is unique. A shard that is not
a tar (``not_a_tar_archive``, e.g. gzip data) or that ends early
(``corrupt_archive``, with a row for the shard saying later members are lost)
is accounted for by a row with the shard's URI.
"""

from __future__ import annotations

import hashlib
import posixpath
import tarfile
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from bloodray import storage
from bloodray.bounded_read import (DEFAULT_MAX_FILE_BYTES, DEFAULT_READ_TIMEOUT_S, InputReadError,
                                   call_with_timeout, open_regular_local, read_local)
from bloodray.classes import is_image_path
from bloodray.data.decode import CellImageLimits, DecodeBudget, ImageDecodeError, decode_image
from bloodray.data.preset import EvalPreset

#: The error columns every consumer of the stage reads (and the nightly errors table stores).
ERROR_COLUMNS: tuple[str, ...] = ("stage", "error_type", "message")
#: Columns the stage adds to its input rows.
OUTPUT_COLUMNS: tuple[str, ...] = ("image_sha256",) + ERROR_COLUMNS + ("error", "image")
#: How many files one storage request fetches; object storage fetches a request's files concurrently.
READ_CHUNK = 128
#: Error types of bounded reads and of the naming rules (:func:`name_kind`).
READ_FAILURE_KINDS = ("not_regular_file", "file_too_large", "read_timeout", "unsupported_format",
                      "unsupported_archive", "nested_archive", "duplicate_member", "not_a_tar_archive")
#: Image formats a scanner or export tool may write that the job does not read (an error row each).
UNSUPPORTED_IMAGE_SUFFIXES = (".gif", ".webp", ".jfif", ".jpe", ".jp2", ".j2k", ".heic", ".heif", ".svg",
                              ".ico", ".dcm")
#: Archive formats other than plain tar (an error row each: they would hide images).
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".zip",
                    ".7z", ".rar", ".gz", ".bz2", ".xz", ".zst")
#: Leading bytes of compressed or other archive data (what a mislabelled ``.tar`` really holds).
_ARCHIVE_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"),
                  (b"PK\x03\x04", "zip"), (b"7z\xbc\xaf\x27\x1c", "7z"), (b"Rar!", "rar"))


@dataclass(frozen=True)
class ReadLimits:
    """Bounds on reading one input (the nightly job's ``limits.*`` keys).

    ``cell``: when set, decoded images that do not look like one cell's crop
    become ``not_a_cell_image`` rows (:class:`~bloodray.data.decode.CellImageLimits`).
    ``decode``: the work and time one image's decoding may take (``decode_budget`` rows beyond it).
    """

    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    cell: CellImageLimits | None = None
    decode: DecodeBudget = DecodeBudget()


def name_kind(relpath: str) -> str:
    """What a file name is to the job: ``image``, ``tar``, ``ignored``, ``unsupported_format``, ``archive`` or ``other``.

    ``ignored``: macOS metadata (anything under ``__MACOSX/``, ``._*`` AppleDouble files), never pictures of the
    sample. ``archive``: a compressed or non-tar archive (:data:`ARCHIVE_SUFFIXES`).
    """
    parts = [p for p in relpath.split("/") if p]
    if not parts or "__MACOSX" in parts or parts[-1].startswith("._"):
        return "ignored"
    lower = parts[-1].lower()
    if is_image_path(lower):
        return "image"
    if lower.endswith(".tar"):
        return "tar"
    if lower.endswith(UNSUPPORTED_IMAGE_SUFFIXES):
        return "unsupported_format"
    if lower.endswith(ARCHIVE_SUFFIXES):
        return "archive"
    return "other"


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


def read_many(uris: Sequence[str], storage_options: Mapping[str, Any] | None = None,
              limits: ReadLimits = ReadLimits()) -> list[bytes | BaseException]:
    """Fetch files of one filesystem; each result is the bytes or the exception for that file.

    The filesystem is resolved once (resolving an S3 URI costs about as much
    as decoding an image). Local files are opened only when regular and read
    with the size cap and timeout of ``limits``; object storage fetches
    :data:`READ_CHUNK` files concurrently per request, each a ranged GET of at
    most ``max_file_bytes + 1`` bytes (timeouts: botocore's). Paths are used
    literally (no glob expansion).
    """
    if not uris:
        return []
    fs, _ = storage.filesystem(uris[0], storage_options)
    paths = [fs._strip_protocol(u) for u in uris]
    cap = limits.max_file_bytes
    if storage.is_local(fs):
        results: list[bytes | BaseException] = []
        for path in paths:
            try:
                results.append(call_with_timeout(lambda p=path: read_local(p, cap), limits.read_timeout_s, path))
            except Exception as exc:  # noqa: BLE001 - one bad file is one error row
                results.append(exc)
        return results
    results = []
    for start in range(0, len(paths), READ_CHUNK):
        chunk = paths[start:start + READ_CHUNK]
        try:
            # cat_ranges, unlike cat, never expands glob characters and reads at most cap + 1 bytes.
            fetched = list(fs.cat_ranges(chunk, [0] * len(chunk), [cap + 1] * len(chunk), on_error="return"))
        except Exception as exc:  # noqa: BLE001 - a whole-request failure marks each file
            fetched = [exc] * len(chunk)
        for path, data in zip(chunk, fetched):
            if isinstance(data, OSError) and "range is not satisfiable" in str(data).lower():
                data = b""  # a range GET of an empty object is refused with InvalidRange
            elif isinstance(data, bytes) and len(data) > cap:
                data = InputReadError("file_too_large", f"{path}: more than limits.max_file_bytes ({cap}) bytes")
            results.append(data)
    return results


class _Rows:
    """Accumulates decoded images and error rows into one Ray Data batch."""

    def __init__(self, size: int, keys: Sequence[str] = (), thumbnail_size: int | None = None):
        self.size = size
        #: ``keys``: columns the caller supplies per row (``extra``), before the stage's own.
        self.cols: dict[str, list] = {k: [] for k in (*keys, "image_sha256", *ERROR_COLUMNS)}
        self.images: list[np.ndarray | None] = []
        self.thumbnail_size = thumbnail_size
        self.jpegs: list[bytes | None] = []

    def __len__(self) -> int:
        return len(self.images)

    def ok(self, extra: Mapping[str, Any], sha: str, image: np.ndarray, jpeg: bytes | None = None) -> None:
        self._add(extra, sha, ("", "", ""), image, jpeg)

    def fail(self, extra: Mapping[str, Any], stage: str, error_type: str, message: str,
             sha: str | None = None) -> None:
        self._add(extra, sha, (stage, error_type, message), None)

    def _add(self, extra: Mapping[str, Any], sha: str | None, error: tuple[str, str, str], image,
             jpeg: bytes | None = None) -> None:
        for key, value in extra.items():
            self.cols[key].append(value)
        # "" rather than None: a batch of only failures must keep string columns, not Arrow's null type.
        self.cols["image_sha256"].append(sha or "")
        for key, value in zip(ERROR_COLUMNS, error):
            self.cols[key].append(value)
        self.images.append(image)
        self.jpegs.append(jpeg)

    def read_failed(self, extra: Mapping[str, Any], exc: BaseException) -> None:
        if isinstance(exc, InputReadError):
            self.fail(extra, "read", exc.kind, str(exc))
        else:
            self.fail(extra, "read", "unreadable", f"{type(exc).__name__}: {exc}")

    def decode(self, extra: Mapping[str, Any], data: bytes, preset: EvalPreset,
               limits: ReadLimits = ReadLimits()) -> None:
        sha = hashlib.sha256(data).hexdigest()
        cell = limits.cell
        try:
            decoded = decode_image(data, target_size=preset.input_size, max_pixels=preset.max_pixels, cell=cell,
                                   budget=limits.decode)
            image = preset.resize(decoded)
            if cell is not None:
                cell.check_contrast(image)
            # From the decode before the model's resize: for a JPEG at DCT scale that is usually larger than
            # the model's input and costs no resize of its own (see THUMBNAIL_SIZE).
            jpeg = thumbnail_jpeg(decoded, self.thumbnail_size) if self.thumbnail_size else None
        except ImageDecodeError as exc:
            self.fail(extra, "decode", exc.kind, str(exc), sha)
        except Exception as exc:  # noqa: BLE001 - a bad file is an error row, never a failed task
            self.fail(extra, "decode", "corrupt", f"{type(exc).__name__}: {exc}", sha)
        else:
            self.ok(extra, sha, image, jpeg)

    def emit(self) -> dict[str, np.ndarray]:
        images = np.zeros((len(self.images), self.size, self.size, 3), dtype=np.uint8)
        for i, image in enumerate(self.images):
            if image is not None:
                images[i] = image
        out = {k: np.array(v, dtype=object) for k, v in self.cols.items()}
        out["error"] = np.array([f"{t}: {m}" if t else "" for t, m in zip(out["error_type"], out["message"])],
                                dtype=object)
        out["image"] = images
        if self.thumbnail_size:
            out["jpeg"] = np.empty(len(self.jpegs), dtype=object)
            out["jpeg"][:] = self.jpegs
        return out


def read_decode_files(batch: dict[str, np.ndarray], *, preset: EvalPreset,
                      storage_options: Mapping[str, Any] | None = None,
                      limits: ReadLimits = ReadLimits(), thumbnail_size: int | None = None) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: rows with a ``uri`` column -> decoded, resized uint8 images.

    Adds :data:`OUTPUT_COLUMNS`; an unreadable or undecodable file becomes an
    error row (black image), never a failed task. With ``thumbnail_size`` it
    also adds ``jpeg``: each good row's :func:`thumbnail_jpeg` (``None`` on error rows).
    """
    uris = [str(u) for u in batch["uri"]]
    rows = _Rows(preset.input_size, thumbnail_size=thumbnail_size)
    for data in read_many(uris, storage_options, limits):
        if isinstance(data, BaseException):
            rows.read_failed({}, data)
        else:
            rows.decode({}, data, preset, limits)
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


def _open_shard(fs, path: str, uri: str):
    """Open a shard for streaming: local shards only when regular; :class:`InputReadError` when it is no tar."""
    fh = open_regular_local(path) if storage.is_local(fs) else fs.open(path, "rb")
    try:
        head = fh.read(8)
        for magic, name in _ARCHIVE_MAGIC:
            if head.startswith(magic):
                raise InputReadError("not_a_tar_archive", f"{uri}: not a tar archive ({name} data)")
        fh.seek(0)
    except BaseException:
        fh.close()
        raise
    return fh


def shard_rows(shard_uri: str, preset: EvalPreset, storage_options: Mapping[str, Any] | None,
               sample_id_from: str, skip_samples: frozenset[str], chunk_rows: int,
               limits: ReadLimits = ReadLimits(), thumbnail_size: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Stream one tar shard member by member into batches of at most ``chunk_rows`` rows.

    Each row has ``uri`` (``<shard>#<member>``; ``<shard>#<member>#<n>`` for the
    n-th occurrence of a repeated name; the shard itself for a shard-level
    error), ``sample_id`` and :data:`OUTPUT_COLUMNS` (and ``jpeg`` with
    ``thumbnail_size``, as :func:`read_decode_files`). Members of
    ``skip_samples`` are left out.
    """

    def new() -> _Rows:
        return _Rows(preset.input_size, ("uri", "sample_id"), thumbnail_size)

    def shard_error(kind: str, message: str) -> None:
        rows.fail({"uri": shard_uri, "sample_id": None}, "read", kind, message)

    rows = new()
    seen: dict[str, int] = {}
    try:
        fs, path = storage.filesystem(shard_uri, storage_options)
        with _open_shard(fs, path, shard_uri) as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
            for member in tar:
                problem = member_problem(member)
                # A path that leaves the archive names no trustworthy sample.
                sample_id = None if _escapes(member.name) else sample_id_of(member.name, sample_id_from)
                kind = name_kind(member.name)
                if sample_id is not None and sample_id in skip_samples:
                    continue
                if kind == "ignored" or (not problem and not member.isfile()):
                    continue  # macOS metadata and directories
                if kind == "other" and not problem:
                    continue  # non-image files, as in the folder layout
                seen[member.name] = seen.get(member.name, 0) + 1
                count = seen[member.name]
                uri = f"{shard_uri}#{member.name}" + (f"#{count}" if count > 1 else "")
                extra = {"uri": uri, "sample_id": sample_id}
                if count > 1:
                    rows.fail(extra, "read", "duplicate_member",
                              f"member name {member.name!r} occurs {count} times in the shard; only the first is read")
                elif problem:
                    rows.fail(extra, "read", "unsafe_member", problem)
                elif kind == "unsupported_format":
                    rows.fail(extra, "read", "unsupported_format",
                              f"{posixpath.splitext(member.name)[1]} images are not read (use JPEG, PNG, BMP or TIFF)")
                elif kind in ("tar", "archive"):
                    rows.fail(extra, "read", "nested_archive", "archives inside a tar shard are not read")
                elif sample_id is None:
                    rows.fail(extra, "read", "no_sample_id", "member is at the top of the tar, not in a sample folder")
                elif member.size > limits.max_file_bytes:
                    rows.fail(extra, "read", "file_too_large",
                              f"{member.size} bytes exceeds limits.max_file_bytes ({limits.max_file_bytes})")
                else:
                    try:
                        data = tar.extractfile(member).read()
                    except Exception as exc:  # noqa: BLE001 - a cut-off shard ends with this member
                        rows.fail(extra, "read", "truncated", f"cannot read member: {exc}")
                        shard_error("corrupt_archive", f"tar shard is cut inside member {member.name!r} "
                                                       f"({exc}); any members after it are lost")
                        break
                    rows.decode(extra, data, preset, limits)
                if len(rows) >= chunk_rows:
                    yield rows.emit()
                    rows = new()
            else:
                # tarfile ends iteration silently at a cut or damaged header; only
                # the end-of-archive block (zeros) tells a complete shard apart.
                fh.seek(tar.offset)
                block = fh.read(512)
                if len(block) < 512 or block.strip(b"\0"):
                    shard_error("corrupt_archive",
                                f"tar shard ends without an end-of-archive block at byte {tar.offset} "
                                "(truncated or damaged header); any members after it are lost")
    except InputReadError as exc:
        shard_error(exc.kind, str(exc))
    except Exception as exc:  # noqa: BLE001 - the shard itself is the bad input
        text = str(exc) or type(exc).__name__
        if isinstance(exc, tarfile.TarError):
            kind = "empty" if "empty file" in text else "corrupt_archive"
        else:
            kind = "unreadable"
        shard_error(kind, f"tar shard: {type(exc).__name__}: {text}")
    if len(rows):
        # A member's row and the shard's own error row may overfill the last batch.
        out = rows.emit()
        for start in range(0, len(rows), chunk_rows):
            yield {k: v[start:start + chunk_rows] for k, v in out.items()}


def read_decode_shards(batch: dict[str, np.ndarray], *, preset: EvalPreset,
                       storage_options: Mapping[str, Any] | None = None, sample_id_from: str = "parent",
                       skip_samples: frozenset[str] = frozenset(), chunk_rows: int = 64,
                       limits: ReadLimits = ReadLimits(),
                       thumbnail_size: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data ``map_batches`` function (flat map): tar shard ``uri`` rows -> one row per image member."""
    for shard_uri in batch["uri"]:
        yield from shard_rows(str(shard_uri), preset, storage_options, sample_id_from, skip_samples, chunk_rows,
                              limits, thumbnail_size)


def cluster_cpu_slots(cpus_per_task: float) -> int:
    """How many tasks of ``cpus_per_task`` CPUs the connected Ray cluster runs at once (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_task))


#: Longest side of a cell thumbnail (pixels); smaller decoded images are kept at their size. Large enough for a
#: reviewer to enlarge a cell (the review page shows it at 2-3x). A 360 px CellaVision/PBC crop decodes at DCT
#: scale 1/2 (180x182 px) for a 100-224 px model, which fits as it is: the thumbnail costs a JPEG encode and no
#: resize (bench/thumbnails.py).
THUMBNAIL_SIZE = 192
#: JPEG quality of thumbnails: ~6 kB per 180 px cell, enough to judge a cell by eye.
THUMBNAIL_QUALITY = 85


def thumbnail_jpeg(image: np.ndarray | Any, size: int = THUMBNAIL_SIZE, quality: int = THUMBNAIL_QUALITY) -> bytes:
    """JPEG bytes of a decoded image (uint8 HxWx3 array or RGB PIL image), scaled down to at most ``size`` a side."""
    import io

    from PIL import Image

    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    if max(pil.size) > size:
        pil = pil.copy()  # thumbnail() works in place: never shrink the caller's image
        pil.thumbnail((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def thumbnails(batch: Mapping[str, np.ndarray], size: int = THUMBNAIL_SIZE) -> np.ndarray:
    """Thumbnail JPEG bytes for each row of a decoded batch (``None`` for error rows).

    For images decoded outside the decode stage (the GPU actors): made from
    the batch's ``image`` column, the resized model input.
    """
    images = batch["image"]
    errors = batch.get("error")
    out = np.empty(len(images), dtype=object)
    for i, image in enumerate(images):
        out[i] = None if errors is not None and errors[i] else thumbnail_jpeg(image, size)
    return out
