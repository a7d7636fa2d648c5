"""Listing a slide archive: image files and tar shards, and the sample each image belongs to.

Archive layouts (``input.layout``):

* ``folders``: ``<archive>/<sample_id>/**/<image>.{jpg,jpeg,png,bmp,tif,tiff}``;
* ``tar``: ``<archive>/**/*.tar`` with members ``<sample_id>/<image>`` (read by
  :func:`bloodray.data.stages.read_decode_shards`);
* ``auto``: both: image files are taken as images, ``*.tar`` as shards.

The sample id is the image's parent folder (``sample_id_from: parent``) or the
first path component under the archive root (``root``); inside a tar the
member path plays the role of the path under the root
(:func:`bloodray.data.stages.sample_id_of`).

Listing rules (:func:`bloodray.data.stages.name_kind`, shared with the tar
reader), so that every file that looks like an input is accounted for:

* ignored (counted in ``InputListing.ignored``): anything under a
  ``__MACOSX/`` folder and ``._*`` AppleDouble files (macOS resource forks,
  not pictures of the sample); files that are neither images nor archives;
  files the layout excludes (tar shards with ``folders``, image files with ``tar``);
* error rows (stage ``list``): images in formats the job does not read
  (``.gif``, ``.webp``... : ``unsupported_format``), compressed or non-tar
  archives (``.zip``, ``.tar.gz``... : ``unsupported_archive``), and images
  directly under the root (``no_sample_id``).

Names are taken literally: ``[``, ``]``, ``*`` and ``?`` in a file name are
characters, never glob patterns.

Links (local archives; object storage has none): the archive root (a date
folder) may be a link, and so may any folder under it: a linked folder is
listed like a real one, its images under the link's path (a sample folder
kept on another disk is classified as that sample). Real folders are listed
first. A link that is not followed is an error row (stage ``list``) with the
link's path, never skipped silently: a link to a folder above it
(``symlink_loop``), to a folder listed already by another path
(``linked_folder_listed``: its images are classified once, under the first
path), to nothing (``broken_link``); a folder that cannot be listed is
``unreadable_folder``. A link to a file is a file: the reader opens regular
files only (``not_regular_file`` otherwise).
"""

from __future__ import annotations

import datetime as dt
import os
import posixpath
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping

from bloodray import storage
from bloodray.data.stages import error_row, name_kind, sample_id_of
from bloodray.nightly.config import ClassifyError

TAR_SUFFIX = ".tar"
_DATE_FOLDER = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class ArchiveNotFoundError(ClassifyError):
    """The archive folder (or prefix) to list does not exist."""


@dataclass
class InputListing:
    """What the driver found under the archive root."""

    #: (image URI, sample id) of each image file.
    files: list[tuple[str, str]] = field(default_factory=list)
    #: URIs of tar shards.
    shards: list[str] = field(default_factory=list)
    #: error rows (stage ``list``): images that cannot be assigned to a sample, unsupported formats and archives.
    errors: list[dict[str, Any]] = field(default_factory=list)
    #: files ignored because of their type (not an image, not a shard for the layout).
    ignored: int = 0


#: Sample prefixes listed at once on object storage.
LIST_THREADS = 16


def walk_local(base: str) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Every file under a local ``base``, links to folders followed; ``(files, problems)``.

    ``problems`` are ``(path, error_type, message)`` of links that are not
    followed (module docstring): a link to a folder above it
    (``symlink_loop``), to a folder listed already (``linked_folder_listed``),
    or to nothing (``broken_link``). Real folders are listed first, so a link
    never takes a folder's images from their real path. A link to a file is a
    file (the reader opens regular files only).
    """
    files: list[str] = []
    problems: list[tuple[str, str, str]] = []
    links: list[tuple[str, tuple[tuple[int, int], ...]]] = []
    visited: set[tuple[int, int]] = set()

    def walk(folder: str, above: tuple[tuple[int, int], ...]) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            problems.append((folder, "unreadable_folder", f"cannot list this folder ({exc.strerror or exc})"))
            return
        for entry in entries:
            path = posixpath.join(folder, entry.name)
            if entry.is_symlink():
                links.append((path, above))
            elif entry.is_dir(follow_symlinks=False):
                info = entry.stat(follow_symlinks=False)
                key = (info.st_dev, info.st_ino)
                visited.add(key)
                walk(path, above + (key,))
            else:
                files.append(path)

    try:
        info = os.stat(base)
    except OSError:
        return [], []
    if not stat.S_ISDIR(info.st_mode):
        return [base], []
    visited.add((info.st_dev, info.st_ino))
    walk(base, ((info.st_dev, info.st_ino),))
    while links:
        path, above = links.pop(0)
        try:
            info = os.stat(path)
        except OSError:
            problems.append((path, "broken_link", f"link to {os.readlink(path)}, which does not exist (a folder "
                                                  "on a disk not mounted?); nothing under it was read"))
            continue
        if not stat.S_ISDIR(info.st_mode):
            files.append(path)
            continue
        key, target = (info.st_dev, info.st_ino), os.path.realpath(path)
        if key in above:
            problems.append((path, "symlink_loop", f"link to {target}, a folder above it; followed, it would list "
                                                   "the same images forever"))
        elif key in visited:
            problems.append((path, "linked_folder_listed", f"link to {target}, a folder listed already; its "
                                                           "images are classified once, under their first path"))
        else:
            visited.add(key)
            walk(path, above + (key,))
    return files, problems


def find_files(fs, base: str) -> tuple[list[str], list[tuple[str, str, str]]]:
    """Every file under ``base``, without per-file ``info`` calls; ``(files, problems)``.

    Local: one walk (:func:`walk_local`: links to folders followed, the
    problems are links it does not follow). Object storage (no links): one
    delimiter listing of the first level, then one paginated listing per
    sample prefix, :data:`LIST_THREADS` at a time -- a single flat listing of
    a large prefix is a long chain of sequential 1,000-key pages.
    """
    if storage.is_local(fs):
        return walk_local(base)
    try:
        top = fs.ls(base, detail=True)
    except FileNotFoundError:
        return fs.find(base), []  # not a prefix: the caller tells a missing archive from an empty one
    files = [e["name"] for e in top if e.get("type") != "directory"]
    prefixes = [e["name"] for e in top if e.get("type") == "directory"]
    with ThreadPoolExecutor(max_workers=max(1, min(LIST_THREADS, len(prefixes)))) as pool:
        for found in pool.map(fs.find, prefixes):
            files.extend(found)
    return files, []


def list_inputs(input_uri: str, layout: str = "auto", sample_id_from: str = "parent",
                storage_options: Mapping[str, Any] | None = None) -> InputListing:
    """List the images and tar shards of an archive (see :func:`find_files`).

    No per-file ``info`` calls: on object storage this is one paginated
    listing per sample prefix, several at a time, however many files there are.
    """
    fs, base = storage.filesystem(input_uri, storage_options)
    base = base.rstrip("/")
    try:
        fs.invalidate_cache()
        paths, problems = find_files(fs, base)
        if not paths and not fs.exists(base):
            raise ArchiveNotFoundError(f"{input_uri}: input archive not found")
    except ClassifyError:
        raise
    except Exception as exc:  # noqa: BLE001 - missing bucket, credentials...
        raise storage.describe_storage_error(input_uri, exc) from exc
    finally:
        fs.invalidate_cache()  # the listing cache would hold an entry per file for the whole run
    listing = InputListing()

    def relative(path: str) -> str:
        return path[len(base):].lstrip("/") if path.startswith(base) else posixpath.basename(path)

    for path in sorted(paths):
        classify_listed_file(listing, storage.full_uri(fs, path), relative(path), layout, sample_id_from)
    for path, error_type, message in sorted(problems):
        listing.errors.append(error_row(sample_id_of(relative(path), sample_id_from), storage.full_uri(fs, path),
                                        "list", error_type, message))
    return listing


def date_folders(archive_uri: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The ``YYYY-MM-DD`` folders right under an archive root, sorted; empty when there are none or no root.

    One listing of the first level: an archive root of date folders is what
    ``run.date`` selects from, never an archive to classify whole.
    """
    fs, base = storage.filesystem(archive_uri, storage_options)
    try:
        fs.invalidate_cache()
        entries = fs.ls(base.rstrip("/"), detail=True)
    except Exception:  # noqa: BLE001 - a missing or unreadable root is reported by the listing itself
        return []
    names = [posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory"]
    found = []
    for name in names:
        try:
            if _DATE_FOLDER.match(name):
                dt.date.fromisoformat(name)
                found.append(name)
        except ValueError:
            continue
    return sorted(found)


def classify_listed_file(listing: InputListing, uri: str, rel: str, layout: str, sample_id_from: str) -> None:
    """Apply the listing rules (module docstring) to one file: add it to ``listing`` as an image, shard, error or ignored."""
    kind = name_kind(rel)
    want_images = layout in ("auto", "folders")
    want_tars = layout in ("auto", "tar")
    if kind == "tar" and want_tars:
        listing.shards.append(uri)
        return
    if (kind == "image" and want_images) or kind in ("unsupported_format", "archive"):
        sample_id = sample_id_of(rel, sample_id_from)
        if kind == "unsupported_format":
            suffix = posixpath.splitext(rel)[1]
            listing.errors.append(error_row(sample_id, uri, "list", "unsupported_format",
                                            f"{suffix} images are not read (use JPEG, PNG, BMP or TIFF)"))
        elif kind == "archive":
            listing.errors.append(error_row(sample_id, uri, "list", "unsupported_archive",
                                            "only uncompressed .tar shards are read; unpack or re-pack it as .tar"))
        elif sample_id is None:
            listing.errors.append(error_row(None, uri, "list", "no_sample_id",
                                            "image is directly under the archive root, not in a sample folder"))
        else:
            listing.files.append((uri, sample_id))
        return
    listing.ignored += 1
